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


def test_read_idx_reads_dimensions_as_big_endian_words(tmp_path):
    array = np.arange(3 * 300, dtype=np.uint16).astype(np.uint8).reshape(3, 300)
    assert np.array_equal(read_idx(write_idx(tmp_path / "wide", array), expected_ndim=2), array)


@pytest.mark.parametrize("header", [b"\x01\x00\x08\x03", b"\x00\x01\x08\x03"])
def test_read_idx_requires_both_leading_zero_bytes(tmp_path, header):
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(header + idx_bytes(random_images(2, (28, 28), 0)[0])[4:])
    with pytest.raises(CorruptDataError, match="x-idx3-ubyte: magic number"):
        read_idx(path, expected_ndim=3)


@pytest.mark.parametrize("content, message", [
    (b"\x00\x00\x08", "3 bytes, too short for an IDX header"),
    (b"\x00\x00\x08\x03", r"truncated header \(4 bytes, need 16\)"),
    (idx_bytes(np.zeros((2, 28, 28), np.uint8)) + b"\x00",
     r"has trailing bytes: header says shape \(2, 28, 28\) \(1568 bytes\) but the file holds "
     "1569 data bytes")])
def test_read_idx_says_what_is_wrong_with_a_short_or_long_file(tmp_path, content, message):
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(CorruptDataError, match=f"t10k-images-idx3-ubyte: {message}"):
        read_idx(path, expected_ndim=3)


def _pickle(tmp_path, entry):
    import pickle

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(entry, protocol=2))
    return path


@pytest.mark.parametrize("entry, found", [
    ({b"data": np.zeros((2, 3072), np.uint8)}, r"found \[b'data'\]"),
    ({b"labels": [0, 1]}, r"found \[b'labels'\]"),
    ([1, 2], "found list")])
def test_read_cifar_batch_names_missing_keys(tmp_path, entry, found):
    with pytest.raises(CorruptDataError, match=r"data_batch_1: expected a dict with b'data' and "
                                               rf"b'labels', {found}"):
        read_cifar_batch(_pickle(tmp_path, entry))


def test_read_cifar_batch_refuses_images_that_are_not_bytes(tmp_path):
    entry = {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}
    with pytest.raises(CorruptDataError, match=r"b'data' has shape \(2, 3072\) and dtype float32"):
        read_cifar_batch(_pickle(tmp_path, entry))


def test_read_cifar_batch_counts_images_against_labels(tmp_path):
    entry = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]}
    with pytest.raises(CorruptDataError, match="data_batch_1: 2 images but 3 labels"):
        read_cifar_batch(_pickle(tmp_path, entry))


class _Payload:
    """A pickle that, when loaded, creates a file (what a crafted dataset file could do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_cifar_batch_whose_pickle_would_run_code_is_refused_and_runs_nothing(tmp_path):
    import pickle

    marker = tmp_path / "payload-ran"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Payload(marker), b"labels": [1]}, protocol=2))
    with pytest.raises(CorruptDataError, match=r"data_batch_1: not a CIFAR-10 batch: it asks for "
                                               r"(io|builtins)\.open.*could run code"):
        read_cifar_batch(path)
    assert not marker.exists()
