"""Readers for the two on-disk formats behind the datasets: IDX (MNIST, Fashion-MNIST) and the
CIFAR-10 python pickle batches.

torchvision has readers for both, but its IDX reader trusts the header (a truncated file gives a
reshape error that names no file) and its CIFAR class needs the whole archive layout. These
readers check every header field against the data and raise `CorruptDataError` naming the file
and what is wrong, which is what a user with a half-downloaded file needs to see.
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from pathlib import Path

import numpy as np

from bench.errors import UserError


class CorruptDataError(UserError):
    """A data file exists but cannot be what it claims to be (truncated, wrong magic, bad shape)."""


IDX_UBYTE = 0x08  # IDX type code for unsigned bytes, the only type MNIST-style files use


def read_bytes(path: Path) -> bytes:
    """Whole file content, decompressed when the name ends in .gz."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, OSError, zlib.error) as err:  # BadGzipFile is an OSError
        raise CorruptDataError(f"{path}: cannot decompress ({err}); the file is truncated or "
                               "not gzip. Delete it and fetch it again.") from err


def read_idx(path: str | Path, expected_ndim: int) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format) of unsigned bytes.

    Header: two zero bytes, a type byte (0x08 = ubyte), a byte with the number of dimensions,
    then one big-endian uint32 per dimension. For MNIST images the magic is 0x00000803 (2051),
    for labels 0x00000801 (2049). The data must hold exactly prod(dims) bytes.
    """
    path = Path(path)
    raw = read_bytes(path)
    if len(raw) < 4:
        raise CorruptDataError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    zero0, zero1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    magic = int.from_bytes(raw[:4], "big")
    if zero0 or zero1 or type_code != IDX_UBYTE or ndim != expected_ndim:
        expected_magic = (IDX_UBYTE << 8) | expected_ndim
        raise CorruptDataError(f"{path}: magic number {magic} (0x{magic:08x}), expected "
                               f"{expected_magic} (0x{expected_magic:08x}) for a {expected_ndim}-d "
                               "unsigned-byte IDX file; is this the right file?")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise CorruptDataError(f"{path}: truncated header ({len(raw)} bytes, need {header_len})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    n_expected = int(np.prod(dims))
    n_found = len(raw) - header_len
    if n_found != n_expected:
        what = "truncated" if n_found < n_expected else "has trailing bytes"
        raise CorruptDataError(f"{path}: {what}: header says shape {dims} ({n_expected} bytes) "
                               f"but the file holds {n_found} data bytes")
    # copy: frombuffer over bytes is read-only, and torch warns on (and must not write to) it
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims).copy()


CIFAR_IMAGE_BYTES = 3 * 32 * 32
# What a CIFAR-10 batch's pickle may build besides dicts, lists, strings, bytes and numbers:
# numpy's array reconstruction (numpy 1 and 2 module names), and the bytes of a batch re-saved
# by Python 3 at protocol 2 (_codecs.encode of a str).
CIFAR_GLOBALS = {("_codecs", "encode"), ("numpy.core.multiarray", "_reconstruct"),
                 ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
                 ("numpy", "dtype")}


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list."""


class CifarUnpickler(pickle.Unpickler):
    """pickle.Unpickler that builds only what a CIFAR-10 batch holds. A plain pickle.load runs
    whatever callable the file names (torchvision's reader does that too); a dataset folder
    shared between people should not be able to run code."""

    def find_class(self, module: str, name: str):
        if (module, name) in CIFAR_GLOBALS:
            return super().find_class(module, name)
        raise ForbiddenGlobal(f"it asks for {module}.{name}, which a CIFAR-10 batch never holds "
                              "(refused: loading it could run code)")


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch: a pickled dict with b'data' (N x 3072 uint8, channel-major
    rows, i.e. already CHW) and b'labels' (N ints). Returns (images N x 3 x 32 x 32, labels N)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            # CIFAR batches were pickled by Python 2; 'bytes' keeps the keys as b'data'.
            entry = CifarUnpickler(f, encoding="bytes").load()
    except ForbiddenGlobal as err:
        raise CorruptDataError(f"{path}: not a CIFAR-10 batch: {err}") from err
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError) as err:
        raise CorruptDataError(f"{path}: not a readable CIFAR-10 pickle batch ({type(err).__name__}:"
                               f" {err}); the file is truncated or not from cifar-10-python.tar.gz"
                               ) from err
    if not isinstance(entry, dict) or b"data" not in entry or b"labels" not in entry:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise CorruptDataError(f"{path}: expected a dict with b'data' and b'labels', found {keys}")
    data = np.asarray(entry[b"data"])
    labels = np.asarray(entry[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_IMAGE_BYTES:
        raise CorruptDataError(f"{path}: b'data' has shape {data.shape} and dtype {data.dtype}, "
                               f"expected (N, {CIFAR_IMAGE_BYTES}) uint8")
    if labels.shape != (data.shape[0],):
        raise CorruptDataError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    return data.reshape(-1, 3, 32, 32), labels
