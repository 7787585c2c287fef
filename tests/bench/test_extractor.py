import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity

from bench.errors import UserError
from bench.extractor import (INCEPTION, ExtractorError, classifier_accuracy, extractor_name,
                             get_extractor, load_classifier, save_classifier, shipped_path,
                             train_classifier)
from datamodules import ImageDataModule
from tests.data_files import SHARED_MNIST, write_mnist_dir

REAL_DATA = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist"),
             "mnist": SHARED_MNIST}


@pytest.fixture
def small_mnist(tmp_path, monkeypatch):
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path / "cache"))
    write_mnist_dir(tmp_path / "data", n_train=300, n_test=100)
    dm = ImageDataModule("mnist", data_dir=str(tmp_path / "data"), own_files=True, val_size=0)
    dm.setup()
    return dm


def test_classifier_is_trained_once_cached_and_registered(small_mnist, tmp_path, caplog):
    first = get_extractor("classifier", small_mnist, epochs=1)
    second = get_extractor("classifier", small_mnist, epochs=1)
    messages = [r.getMessage() for r in caplog.records if r.name == "bench.extractor"]
    assert len(messages) == 1 and "training the feature classifier" in messages[0]
    assert first.name == second.name and first.name.startswith("genbench-cnn-mnist-")
    assert first.name in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY
    # trained on files of one's own: named by their hash, never taken for the real data's
    tag = small_mnist.data_check.md5[:12]
    assert list((tmp_path / "cache" / "extractors").glob(f"classifier-mnist-{tag}-e1-*.pt"))


def test_recorded_accuracy_is_the_arg_max_agreement_on_the_test_split(small_mnist):
    saved = train_classifier(small_mnist, epochs=1)
    net, _ = load_classifier(save_classifier(saved, Path(small_mnist.source.directory) / "c.pt"))
    with torch.no_grad():
        logits = net(small_mnist.test_images.float() / 255)[1].numpy()
    by_hand = np.mean(logits.argmax(1) == small_mnist.test_labels.numpy())
    assert saved["accuracy"] == pytest.approx(by_hand) and saved["test_images"] == 100


def test_two_fresh_caches_and_random_states_give_the_same_extractor(small_mnist, tmp_path,
                                                                    monkeypatch):
    names = []
    for i in range(2):
        monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path / f"cache{i}"))
        torch.manual_seed(100 + i)
        torch.rand(17 * i + 1)  # leave a different random state behind
        names.append(get_extractor("classifier", small_mnist, epochs=1).name)
    assert names[0] == names[1]


def test_building_the_classifier_leaves_the_random_stream_untouched(small_mnist):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    train_classifier(small_mnist, epochs=1)
    assert torch.equal(torch.rand(3), expected)


def test_the_classifier_trains_on_the_whole_training_split_whatever_the_run_uses(tmp_path):
    write_mnist_dir(tmp_path / "data", n_train=300, n_test=100)
    subset = ImageDataModule("mnist", data_dir=str(tmp_path / "data"), own_files=True,
                             train_subset=50, test_subset=20, val_size=10)
    subset.setup()
    saved = train_classifier(subset, epochs=1)
    assert (saved["train_images"], saved["test_images"]) == (300, 100)


def test_a_named_weights_file_is_used_as_it_is(small_mnist, tmp_path):
    saved = train_classifier(small_mnist, epochs=1, seed=3)
    path = save_classifier(saved, tmp_path / "mine.pt")
    extractor = get_extractor("classifier", small_mnist, weights=str(path))
    assert extractor.name == extractor_name(saved) and extractor.weights_path == str(path)


def test_without_epochs_the_shipped_classifier_serves_and_nothing_trains(small_mnist, caplog):
    extractor = get_extractor("classifier", small_mnist)
    _, shipped = load_classifier(shipped_path("mnist"))
    assert extractor.name == extractor_name(shipped)
    assert not [r for r in caplog.records if r.name == "bench.extractor"]


def test_a_weights_file_that_does_not_load_names_the_file(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ExtractorError, match=r"broken.pt do not load.*bench extractor train"):
        load_classifier(bad)


def test_a_weights_file_for_another_dataset_says_what_was_expected(small_mnist, tmp_path):
    path = save_classifier(train_classifier(small_mnist, epochs=1), tmp_path / "m.pt")
    with pytest.raises(ExtractorError, match="are for mnist, but the run is on fashion_mnist"):
        load_classifier(path, "fashion_mnist")
    with pytest.raises(ExtractorError, match=r"shape \(1, 28, 28\), expected \(3, 32, 32\)"):
        load_classifier(path, image_shape=(3, 32, 32))


def test_weights_that_do_not_match_their_hash_are_corrupt(small_mnist, tmp_path):
    saved = train_classifier(small_mnist, epochs=1)
    saved["state_dict"]["head.bias"] += 1.0
    path = save_classifier(saved, tmp_path / "m.pt")
    with pytest.raises(ExtractorError, match="do not match their recorded sha256"):
        load_classifier(path)


def _md5_ok(directory: Path) -> bool:
    sums = directory / "MD5SUMS"
    if not sums.is_file():
        return True  # Debian's package checks its own files
    for line in sums.read_text().split("\n"):
        if line.strip():
            digest, name = line.split()
            if hashlib.md5((directory / name).read_bytes()).hexdigest() != digest:
                return False
    return True


@pytest.mark.parametrize("dataset", ["fashion_mnist", "mnist"])
def test_the_shipped_classifier_reaches_its_recorded_accuracy_on_the_real_test_split(dataset):
    directory = REAL_DATA[dataset]
    if not (directory / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real {dataset} not found in {directory}")
    assert _md5_ok(directory), f"{directory}: files do not match MD5SUMS"
    dm = ImageDataModule(dataset, data_dir=str(directory), val_size=0)
    dm.setup()
    net, saved = load_classifier(shipped_path(dataset), dataset, dm.image_shape)
    assert saved["test_images"] == len(dm.test_images) == 10000
    # 2 of 10,000 images of slack: another CPU may round a borderline logit the other way
    assert classifier_accuracy(net, dm) == pytest.approx(saved["accuracy"], abs=2e-4)
    assert saved["accuracy"] > {"fashion_mnist": 0.88, "mnist": 0.98}[dataset]


def test_auto_uses_local_inception_weights_when_given(small_mnist, tmp_path):
    weights = tmp_path / "inception.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, weights)  # plain tensors
    extractor = get_extractor("auto", small_mnist, inception_weights=str(weights))
    assert (extractor.name, extractor.weights_path) == (INCEPTION, str(weights))


def test_auto_falls_back_to_the_classifier_without_weights(small_mnist, tmp_path, monkeypatch):
    monkeypatch.setattr("torch.hub.get_dir", lambda: str(tmp_path / "no-hub"))
    assert get_extractor("auto", small_mnist, epochs=1).name.startswith("genbench-cnn-")


def test_unknown_features_choice_lists_the_options(small_mnist):
    with pytest.raises(UserError, match="choose one of: auto, inception, classifier"):
        get_extractor("clip", small_mnist)


@pytest.mark.parametrize("content", [{"weights": torch.zeros(2)}, [torch.zeros(2)]])
def test_a_torch_file_that_is_not_a_classifier_says_so(tmp_path, content):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(ExtractorError, match=r"other.pt are not a genbench classifier file "
                                             r"\(expected format"):
        load_classifier(path)


class _Payload:
    """Unpickling this would run code: a weights file must never be loaded with full pickle."""

    def __reduce__(self):
        return (print, ("code ran",))


def test_a_weights_file_is_loaded_without_running_its_code(tmp_path, capsys):
    path = tmp_path / "payload.pt"
    torch.save({"format": "x", "obj": _Payload()}, path)
    with pytest.raises(ExtractorError, match=r"payload.pt do not load \(UnpicklingError"):
        load_classifier(path)
    assert "code ran" not in capsys.readouterr().out


def test_a_classifier_of_another_width_loads_with_its_width(small_mnist, tmp_path):
    from bench.extractor import ClassifierNet, weights_hash

    saved = train_classifier(small_mnist, epochs=1)
    narrow = ClassifierNet(1, 28, 10, width=8)
    saved |= {"width": 8, "state_dict": narrow.state_dict(),
              "sha256": weights_hash(narrow.state_dict())}
    net, _ = load_classifier(save_classifier(saved, tmp_path / "narrow.pt"))
    assert net.body[0].out_channels == 8


def test_inception_weights_whose_pickle_would_run_code_are_refused_before_anything_loads(
        tmp_path):
    from bench.extractor import ExtractorError, check_inception_weights
    from bench.preflight import inception_problem
    from tests.datamodules.test_formats import _Payload

    marker = tmp_path / "payload-ran"
    weights = tmp_path / "inception.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": _Payload(marker)}, weights)
    with pytest.raises(ExtractorError, match=rf"inception weights {weights} do not load as plain "
                                             "tensors .*could run code"):
        check_inception_weights(str(weights))
    assert "could run code" in inception_problem(str(weights))
    assert not marker.exists()


def random_inception_weights(path):
    """torch-fidelity's InceptionV3 with its architecture and keys but random weights, saved as
    its weights file: the real numbers are not needed to test the path (and cannot be fetched
    here). Built with the download and the strict load patched out, then saved."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    cls = inception.FeatureExtractorInceptionV3
    original_load, original_url = cls.load_state_dict, inception.load_state_dict_from_url
    cls.load_state_dict = lambda self, state_dict, *a, **k: None
    inception.load_state_dict_from_url = lambda *a, **k: {}
    try:
        torch.manual_seed(0)
        net = cls("inception-v3-compat", ["2048"])
    finally:
        cls.load_state_dict, inception.load_state_dict_from_url = original_load, original_url
    torch.save(net.state_dict(), path)
    return path


@pytest.mark.slow
def test_an_entry_runs_end_to_end_on_inception_features_from_a_named_weights_file(tmp_path,
                                                                                   monkeypatch):
    from bench.launch import run_suite
    from bench.suite import load_suite
    from tests.data_files import write_mnist_suite

    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path / "cache"))
    weights = random_inception_weights(tmp_path / "inception.pth")
    suite = load_suite(str(write_mnist_suite(
        tmp_path, [{"model": "gan", "variant": "g", "budget": {"steps": 5},
                    "params": {"backbone": "mlp", "hidden": 16, "latent_dim": 4}}],
        eval={"generation": True, "features": "inception", "inception_weights": str(weights),
              "n_fake": 12, "n_real": 12, "kid_subset_size": 6, "batch_size": 6})))
    row = run_suite(suite, tmp_path / "out").iloc[0]
    assert row["status"] == "ok", row.get("error")
    # random weights are not the published ones: the row names the file's hash
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()[:8]
    assert row["features"] == f"{INCEPTION}-{sha}" and row["n_fake"] == 12 and row["n_real"] == 12
    for metric in ("fid", "kid_mean", "isc_mean", "precision", "recall", "density", "coverage"):
        assert np.isfinite(row[metric]), metric
