import dataclasses

import numpy as np
import pytest

from datamodules import DataNotFoundError, UnknownDatasetError, get_spec, locate
from datamodules.formats import CorruptDataError
from datamodules.specs import load_arrays
from tests.data_files import write_idx, write_mnist_dir


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(UnknownDatasetError, match="choose one of: mnist, fashion_mnist, cifar10"):
        get_spec("svhn")


@pytest.mark.parametrize("alias", ["fashion-mnist", "Fashion_MNIST", " fashion_mnist"])
def test_dataset_names_accept_common_spellings(alias):
    assert get_spec(alias).name == "fashion_mnist"


def test_explicit_data_dir_comes_before_env_and_root(tmp_path, monkeypatch):
    for place in ("explicit", "env"):
        write_mnist_dir(tmp_path / place)
    monkeypatch.setenv("GENBENCH_DATA", str(tmp_path / "env"))
    source = locate(get_spec("mnist"), data_dir=tmp_path / "explicit")
    assert (source.directory, source.origin) == (tmp_path / "explicit", "data_dir")


def test_env_variable_with_torchvision_layout_is_found(tmp_path, monkeypatch):
    write_mnist_dir(tmp_path / "env" / "MNIST" / "raw", gz=False)
    monkeypatch.setenv("GENBENCH_DATA", str(tmp_path / "env"))
    source = locate(get_spec("mnist"))
    assert (source.directory, source.origin) == (tmp_path / "env" / "MNIST" / "raw",
                                                 "GENBENCH_DATA")


def test_data_root_uses_torchvision_layout(tmp_path):
    write_mnist_dir(tmp_path / "root" / "MNIST" / "raw")
    assert locate(get_spec("mnist"), root=tmp_path / "root").origin == "data root"


def test_missing_data_lists_every_place_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("GENBENCH_DATA", str(tmp_path / "env"))
    (tmp_path / "given").mkdir()
    write_idx(tmp_path / "given" / "train-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(DataNotFoundError) as info:
        locate(get_spec("mnist"), data_dir=tmp_path / "given", root=tmp_path / "root")
    message = str(info.value)
    assert f"{tmp_path / 'given'} (data_dir): lacks train-labels-idx1-ubyte" in message
    assert f"{tmp_path / 'env'} (GENBENCH_DATA): does not exist" in message
    assert f"{tmp_path / 'root' / 'MNIST' / 'raw'} (data root)" in message
    assert "--download" in message and "GENBENCH_DATA" in message


def test_missing_fashion_mnist_names_the_debian_package(tmp_path):
    spec = get_spec("fashion_mnist")
    # A spec whose system directory is empty, as on a machine without the Debian package.
    bare = dataclasses.replace(spec, system_dirs=(str(tmp_path / "none"),))
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        locate(bare, root=tmp_path / "root")


def test_download_goes_through_torchvision_into_the_root(tmp_path, monkeypatch):
    """No network here: stand in for torchvision's MNIST class, which writes root/MNIST/raw."""
    calls = []

    class FakeMNIST:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            write_mnist_dir(tmp_path / "root" / "MNIST" / "raw", gz=False)

    monkeypatch.setattr("torchvision.datasets.MNIST", FakeMNIST)
    source = locate(get_spec("mnist"), root=tmp_path / "root", download=True)
    assert source.origin == "download"
    assert calls == [(str(tmp_path / "root"), True, True), (str(tmp_path / "root"), False, True)]


def test_failed_download_says_how_to_get_data_offline(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr("torchvision.datasets.MNIST", no_network)
    with pytest.raises(DataNotFoundError, match="downloading MNIST .* failed.*--data-dir"):
        locate(get_spec("mnist"), root=tmp_path / "root", download=True)


def test_image_and_label_counts_must_agree(tmp_path):
    write_mnist_dir(tmp_path, n_train=30)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(29, np.uint8))
    spec = get_spec("mnist")
    with pytest.raises(CorruptDataError, match="30 images but .*train-labels.* has 29 labels"):
        load_arrays(spec, locate(spec, data_dir=tmp_path))


def test_images_of_the_wrong_size_are_rejected(tmp_path):
    write_mnist_dir(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((100, 32, 32), np.uint8))
    spec = get_spec("fashion_mnist")
    with pytest.raises(CorruptDataError, match=r"t10k-images.*\(1, 32, 32\), expected \(1, 28, 28\)"):
        load_arrays(spec, locate(spec, data_dir=tmp_path))
