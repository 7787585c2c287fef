import dataclasses
from pathlib import Path

import numpy as np
import pytest

from datamodules import DataNotFoundError, UnknownDatasetError, get_spec, locate
from datamodules.formats import CorruptDataError
from datamodules.specs import WrongDataError, check_files, load_arrays
from tests.data_files import SHARED_MNIST, standing_in_for, write_idx, write_mnist_dir


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
    assert "GENBENCH_DATA" in message
    # each command's own spelling of the settings: no flag bench run does not have
    assert "data: {download: true} in a suite" in message
    assert "data: {data_dir: DIR} in a suite" in message


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


# -- the files are what their name says ------------------------------------------------------------
def test_another_datasets_files_under_this_name_are_refused_naming_them(tmp_path, monkeypatch):
    write_mnist_dir(tmp_path)
    standing_in_for(monkeypatch, "mnist", tmp_path)
    spec = get_spec("fashion_mnist")
    with pytest.raises(WrongDataError, match="this is not Fashion-MNIST's train-images-idx3-ubyte "
                       "but MNIST's train-images-idx3-ubyte .*name the dataset mnist"):
        check_files(spec, locate(spec, data_dir=tmp_path), own_files=True)
    mnist = get_spec("mnist")
    assert check_files(mnist, locate(mnist, data_dir=tmp_path)).status == "verified"


def test_unknown_files_are_refused_unless_they_are_declared_ones_own(tmp_path):
    write_mnist_dir(tmp_path)
    spec = get_spec("mnist")
    source = locate(spec, data_dir=tmp_path)
    with pytest.raises(WrongDataError, match="nor any dataset's genbench knows.*own_files: true"):
        check_files(spec, source)
    check = check_files(spec, source, own_files=True)
    assert check.status == "own files" and len(check.md5) == 32


def test_the_files_hash_names_their_contents_not_their_compression(tmp_path):
    write_mnist_dir(tmp_path / "gz", gz=True)
    write_mnist_dir(tmp_path / "raw", gz=False)
    write_mnist_dir(tmp_path / "other", seed=1)
    spec = get_spec("mnist")
    md5 = {name: check_files(spec, locate(spec, data_dir=tmp_path / name), own_files=True).md5
           for name in ("gz", "raw", "other")}
    assert md5["gz"] == md5["raw"] != md5["other"]


@pytest.mark.parametrize("name, directory", [
    ("fashion_mnist", "/usr/share/datasets/fashion-mnist"), ("mnist", str(SHARED_MNIST))])
def test_the_real_files_are_verified(name, directory):
    spec = get_spec(name)
    if not (Path(directory) / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real {spec.title} not found in {directory}")
    assert check_files(spec, locate(spec, data_dir=directory)).status == "verified"


def test_fashion_mnist_pointed_at_the_real_mnist_is_refused():
    if not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST not found in {SHARED_MNIST}")
    spec = get_spec("fashion_mnist")
    with pytest.raises(WrongDataError, match="not Fashion-MNIST's .* but MNIST's"):
        check_files(spec, locate(spec, data_dir=SHARED_MNIST), own_files=True)
