import pytest
import torch_fidelity

from bench.extractor import INCEPTION, get_extractor
from datamodules import ImageDataModule
from tests.data_files import write_mnist_dir


@pytest.fixture
def small_mnist(tmp_path, monkeypatch):
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path / "cache"))
    write_mnist_dir(tmp_path / "data", n_train=300, n_test=100)
    dm = ImageDataModule("mnist", data_dir=str(tmp_path / "data"), val_size=0)
    dm.setup()
    return dm


def test_classifier_is_trained_once_cached_and_registered(small_mnist, tmp_path):
    messages = []
    first = get_extractor("classifier", small_mnist, seed=0, epochs=1, log=messages.append)
    second = get_extractor("classifier", small_mnist, seed=0, epochs=1, log=messages.append)
    assert len(messages) == 1 and "training the feature classifier" in messages[0]
    assert first.name == second.name and first.name.startswith("genbench-cnn-mnist-")
    assert first.name in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY
    assert list((tmp_path / "cache" / "extractors").glob("classifier-mnist-*.pt"))
    assert 0.0 <= first.accuracy <= 1.0


def test_auto_uses_local_inception_weights_when_given(small_mnist, tmp_path):
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"weights")
    extractor = get_extractor("auto", small_mnist, seed=0, inception_weights=str(weights))
    assert (extractor.name, extractor.weights_path) == (INCEPTION, str(weights))


def test_auto_falls_back_to_the_classifier_without_weights(small_mnist, tmp_path, monkeypatch):
    monkeypatch.setattr("torch.hub.get_dir", lambda: str(tmp_path / "no-hub"))
    assert get_extractor("auto", small_mnist, seed=0, epochs=1,
                         log=lambda m: None).name.startswith("genbench-cnn-")


def test_unknown_features_choice_lists_the_options(small_mnist):
    with pytest.raises(ValueError, match="choose one of: auto, inception, classifier"):
        get_extractor("clip", small_mnist, seed=0)
