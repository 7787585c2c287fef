import gzip

import numpy as np
import pytest

from datamodules.formats import CorruptDataError, read_cifar_batch, read_idx
from tests.data_files import idx_bytes, random_images, write_cifar_batch, write_idx


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_read_idx_returns_what_was_written(tmp_path, name):
    images, _ = random_images(7, (28, 28), seed=1)
    assert np.array_equal(read_idx(write_idx(tmp_path / name, images), expected_ndim=3), images)


def test_read_idx_names_file_when_gzip_is_truncated(tmp_path):
    path = write_idx(tmp_path / "train-images-idx3-ubyte.gz", random_images(50, (28, 28), 0)[0])
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CorruptDataError, match=r"train-images-idx3-ubyte\.gz.*decompress"):
        read_idx(path, expected_ndim=3)


def test_read_idx_reports_truncated_data_against_header(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(idx_bytes(random_images(5, (28, 28), 0)[0])[:-10])
    with pytest.raises(CorruptDataError, match=r"t10k-images-idx3-ubyte: truncated.*\(5, 28, 28\)"):
        read_idx(path, expected_ndim=3)


def test_read_idx_rejects_wrong_magic_number(tmp_path):
    labels = np.arange(10, dtype=np.uint8)
    path = write_idx(tmp_path / "labels.gz", labels)  # a 1-d labels file where images are expected
    with pytest.raises(CorruptDataError, match="magic number 2049 .*expected 2051"):
        read_idx(path, expected_ndim=3)


def test_read_idx_rejects_non_idx_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"<html>not found</html>")
    with pytest.raises(CorruptDataError, match="magic number"):
        read_idx(path, expected_ndim=3)


def test_read_cifar_batch_returns_chw_images(tmp_path):
    images, labels = random_images(6, (3, 32, 32), seed=2)
    got_images, got_labels = read_cifar_batch(write_cifar_batch(tmp_path / "b", images, labels))
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)


def test_read_cifar_batch_names_file_when_truncated(tmp_path):
    path = write_cifar_batch(tmp_path / "data_batch_3", *random_images(6, (3, 32, 32), 2))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptDataError, match="data_batch_3: not a readable CIFAR-10 pickle"):
        read_cifar_batch(path)


def test_read_cifar_batch_checks_image_size(tmp_path):
    images, labels = random_images(4, (3, 16, 16), seed=3)
    path = write_cifar_batch(tmp_path / "test_batch", images, labels)
    with pytest.raises(CorruptDataError, match=r"test_batch: b'data' has shape \(4, 768\)"):
        read_cifar_batch(path)
