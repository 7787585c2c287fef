"""Small dataset files in the real on-disk formats, so the real readers run in tests."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import yaml

# The real MNIST beside the repository (shared/data/mnist), where the workplace has it: tests
# that need it skip cleanly without it.
SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
IDX_NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: 0, 0, 0x08 (ubyte), ndim, big-endian uint32 dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def random_images(n: int, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(n, *shape), dtype=np.uint8),
            rng.integers(0, 10, size=n).astype(np.uint8))


def write_mnist_dir(directory: Path, n_train: int = 300, n_test: int = 100,
                    gz: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """The four MNIST IDX files; returns the arrays written."""
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = random_images(n, (28, 28), seed + (split == "test"))
        write_idx(directory / (IDX_NAMES[split][0] + suffix), images)
        write_idx(directory / (IDX_NAMES[split][1] + suffix), labels)
        written[f"{split}_images"], written[f"{split}_labels"] = images, labels
    return written


class _Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` (the BINSTRING opcodes), as the CIFAR-10 batches were
    pickled: they load only with `encoding="bytes"` (or latin1), not Python 3's default."""

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch = pickle._Pickler.dispatch.copy()
    dispatch[bytes] = save_bytes


def write_cifar_batch(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """One batch as cifar-10-python.tar.gz has it: a dict pickled by Python 2 (protocol 2),
    its keys and the image array's bytes Python 2 strings."""
    entry = {b"batch_label": b"genbench test", b"data": images.reshape(len(images), -1),
             b"labels": [int(v) for v in labels], b"filenames": [b"x.png"] * len(images)}
    with open(path, "wb") as f:
        _Python2Pickler(f, protocol=2).dump(entry)
    return path


def write_cifar_dir(directory: Path, n_per_batch: int = 40, n_test: int = 50,
                    seed: int = 0) -> dict[str, np.ndarray]:
    directory.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = [], []
    for i in range(1, 6):
        images, labels = random_images(n_per_batch, (3, 32, 32), seed + i)
        write_cifar_batch(directory / f"data_batch_{i}", images, labels)
        train_images.append(images)
        train_labels.append(labels)
    test_images, test_labels = random_images(n_test, (3, 32, 32), seed + 100)
    write_cifar_batch(directory / "test_batch", test_images, test_labels)
    return {"train_images": np.concatenate(train_images),
            "train_labels": np.concatenate(train_labels),
            "test_images": test_images, "test_labels": test_labels}


def write_mnist_suite(directory: Path, runs: list[dict], n_train: int = 300, n_test: int = 100,
                      **defaults) -> Path:
    """A suite file over a small synthetic MNIST written beside it. `defaults` update these
    (mappings merge one level): 2 epochs, batches of 10, 50 validation images, no FID."""
    write_mnist_dir(directory / "data", n_train=n_train, n_test=n_test)
    merged = {"datasets": ["mnist"], "budget": {"epochs": 2}, "eval": {"generation": False},
              "data": {"data_dir": str(directory / "data"), "own_files": True, "val_size": 50,
                       "batch_size": 10}}
    for key, value in defaults.items():
        both_maps = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = {**merged[key], **value} if both_maps else value
    path = directory / "suite.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "defaults": merged, "runs": runs}))
    return path


def standing_in_for(monkeypatch, dataset: str, directory: Path) -> None:
    """Small synthetic files in `directory` stand in for `dataset`'s real ones: its known content
    checksums become theirs, for runs that cannot say `own_files` (the shipped suites)."""
    import dataclasses

    from datamodules.specs import DATASETS, content_md5, get_spec, locate

    spec = get_spec(dataset)
    source = locate(spec, data_dir=directory)
    digests = {name: content_md5(source.files[name]) for name in spec.all_files}
    monkeypatch.setitem(DATASETS, spec.name, dataclasses.replace(spec, content_md5=digests))
