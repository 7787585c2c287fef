"""What each dataset is, where its files may lie, and how to load its splits as uint8 arrays.

Search order for a dataset's files (the first directory that holds all of them wins):
1. an explicit `data_dir` (the files themselves, or torchvision's layout below it);
2. the `GENBENCH_DATA` environment variable (same two forms);
3. torchvision's layout under the data root (`root`, default `~/.cache/genbench/data`);
4. system directories, e.g. Debian's `dataset-fashion-mnist` package;
5. a download through torchvision into the data root, only when `download=True`.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.errors import UserError
from datamodules.formats import CorruptDataError, read_bytes, read_cifar_batch, read_idx

ENV_VAR = "GENBENCH_DATA"
# The download and data_dir settings as each command spells them, for what a missing-data error
# prints (the same words reach bench run, bench data, bench fit and the extractor).
DOWNLOAD = ("let torchvision download it (data: {download: true} in a suite, --download on bench "
            "data, --data.download true on bench fit)")
DATA_DIR = (f"the data_dir setting (data: {{data_dir: DIR}} in a suite, --data-dir on bench data, "
            f"--data.data_dir on bench fit) or ${ENV_VAR}")
DEFAULT_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "genbench" / "data"


class DataNotFoundError(UserError):
    """No searched place holds a dataset's files."""


class UnknownDatasetError(UserError):
    """A dataset name that genbench does not know."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str
    image_shape: tuple[int, int, int]  # C, H, W
    num_classes: int
    file_format: str  # "idx" or "cifar"
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    torchvision_subdir: str  # where torchvision's class keeps the files under its root
    torchvision_class: str
    full_sizes: tuple[int, int]  # (train, test) of the complete dataset
    system_dirs: tuple[str, ...] = field(default=())
    how_to_get: str = ""
    # md5 of each file's contents, decompressed (the gzip header differs between copies: Debian's
    # package recompresses the files, so the md5 of a .gz says nothing about the data in it)
    content_md5: dict[str, str] = field(default_factory=dict)

    @property
    def all_files(self) -> tuple[str, ...]:
        return self.train_files + self.test_files


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            name="mnist", title="MNIST", image_shape=(1, 28, 28), num_classes=10,
            file_format="idx",
            train_files=("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
            test_files=("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
            torchvision_subdir="MNIST/raw", torchvision_class="MNIST", full_sizes=(60000, 10000),
            # the files whose .gz match torchvision's md5s, decompressed
            content_md5={"train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
                         "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
                         "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
                         "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637"},
            how_to_get=f"{DOWNLOAD} (torchvision fetches it into the data root), or put the four "
                       f"IDX files (gzipped or not) in a folder named by {DATA_DIR}",
        ),
        DatasetSpec(
            name="fashion_mnist", title="Fashion-MNIST", image_shape=(1, 28, 28), num_classes=10,
            file_format="idx",
            train_files=("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
            test_files=("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
            torchvision_subdir="FashionMNIST/raw", torchvision_class="FashionMNIST",
            full_sizes=(60000, 10000),
            system_dirs=("/usr/share/datasets/fashion-mnist",),
            # Debian's dataset-fashion-mnist 0.0~git20200523, decompressed
            content_md5={"train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
                         "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
                         "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
                         "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965"},
            how_to_get="install it offline with `sudo apt-get install dataset-fashion-mnist` "
                       f"(Debian/Ubuntu), {DOWNLOAD}, or put the four IDX files in a folder "
                       f"named by {DATA_DIR}",
        ),
        DatasetSpec(
            name="cifar10", title="CIFAR-10", image_shape=(3, 32, 32), num_classes=10,
            file_format="cifar",
            train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
            test_files=("test_batch",),
            torchvision_subdir="cifar-10-batches-py", torchvision_class="CIFAR10",
            full_sizes=(50000, 10000),
            # torchvision's md5 of each batch (CIFAR10.train_list / test_list): not compressed
            content_md5={"data_batch_1": "c99cafc152244af753f735de768cd75f",
                         "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
                         "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
                         "data_batch_4": "634d18415352ddfa80567beed471001a",
                         "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
                         "test_batch": "40351d587109b95175f43aff81a1287e"},
            how_to_get=f"{DOWNLOAD} (torchvision fetches cifar-10-python.tar.gz into the data "
                       "root), or unpack that archive and name its cifar-10-batches-py folder by "
                       f"{DATA_DIR}",
        ),
    ]
}


def get_spec(name: str) -> DatasetSpec:
    """The spec for `name`; accepts `fashion-mnist` and case variants of the known names."""
    key = name.strip().lower().replace("-", "_")
    if key not in DATASETS:
        raise UnknownDatasetError(f"unknown dataset {name!r}; choose one of: "
                                  f"{', '.join(DATASETS)}")
    return DATASETS[key]


def _find_file(directory: Path, filename: str) -> Path | None:
    for candidate in (directory / filename, directory / f"{filename}.gz"):
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class DataSource:
    """Where a dataset's files were found, and why that place was looked at."""

    directory: Path
    origin: str  # "data_dir", "GENBENCH_DATA", "data root", "system", "download"
    files: dict[str, Path]


def _candidates(spec: DatasetSpec, data_dir: str | Path | None,
                root: Path) -> list[tuple[Path, str]]:
    places: list[tuple[Path, str]] = []
    for given, origin in ((data_dir, "data_dir"), (os.environ.get(ENV_VAR), ENV_VAR)):
        if given:
            places += [(Path(given), origin), (Path(given) / spec.torchvision_subdir, origin)]
    places.append((root / spec.torchvision_subdir, "data root"))
    places += [(Path(d), "system") for d in spec.system_dirs]
    return places


def locate(spec: DatasetSpec, data_dir: str | Path | None = None, root: str | Path | None = None,
           download: bool = False) -> DataSource:
    """Find the directory holding all of `spec`'s files, or download them when allowed."""
    root = Path(root) if root else DEFAULT_ROOT
    searched = []
    for directory, origin in _candidates(spec, data_dir, root):
        found = {name: _find_file(directory, name) for name in spec.all_files}
        missing = [name for name, path in found.items() if path is None]
        if not missing:
            return DataSource(directory, origin, found)  # type: ignore[arg-type]
        state = "does not exist" if not directory.exists() else f"lacks {', '.join(missing)}"
        searched.append(f"  - {directory} ({origin}): {state}")
    if download:
        _download(spec, root)
        directory = root / spec.torchvision_subdir
        found = {name: _find_file(directory, name) for name in spec.all_files}
        if all(found.values()):
            return DataSource(directory, "download", found)  # type: ignore[arg-type]
        searched.append(f"  - {directory} (download): torchvision finished but files are missing")
    raise DataNotFoundError(
        f"{spec.title} not found. Searched, in order:\n" + "\n".join(searched) +
        f"\nTo get it: {spec.how_to_get}." +
        ("" if download else " Downloading is off (download=False).")
    )


def _download(spec: DatasetSpec, root: Path) -> None:
    import torchvision.datasets  # heavy; only needed on this path

    dataset_class = getattr(torchvision.datasets, spec.torchvision_class)
    root.mkdir(parents=True, exist_ok=True)
    try:
        for train in (True, False):
            dataset_class(str(root), train=train, download=True)
    except Exception as err:  # torchvision raises URLError, RuntimeError, ... depending on cause
        raise DataNotFoundError(f"downloading {spec.title} into {root} failed: {err}. "
                                f"Without network access: {spec.how_to_get}.") from err


OWN_FILES_SETTING = "own_files"


class WrongDataError(CorruptDataError):
    """A dataset's file whose contents are not the named dataset's."""


@functools.lru_cache(maxsize=64)
def _content_md5(path: str, size: int, mtime_ns: int) -> str:
    """md5 of a file's decompressed contents; cached by path, size and modification time, so a
    suite that builds many datamodules on one dataset reads each file once."""
    return hashlib.md5(read_bytes(Path(path))).hexdigest()


def content_md5(path: Path) -> str:
    stat = Path(path).stat()
    return _content_md5(str(path), stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True)
class DataCheck:
    """What a dataset's files were found to be: `verified` (each file's contents are the named
    dataset's) or `own files` (not checked: allowed with the own_files setting), and `md5`, a
    hash over the files' content hashes that names exactly the data a run saw."""

    status: str
    md5: str


def check_files(spec: DatasetSpec, source: DataSource, own_files: bool = False) -> DataCheck:
    """Each file's decompressed contents against the named dataset's known md5. A file that is
    another known dataset's (MNIST's digits under Fashion-MNIST's file names) is refused always;
    one that is no known dataset's is refused unless `own_files` (a subset, another
    binarisation, made on purpose), and the check then says so."""
    digests = {name: content_md5(source.files[name]) for name in spec.all_files}
    combined = hashlib.md5(" ".join(digests[n] for n in spec.all_files).encode()).hexdigest()
    known = {md5: (other, name) for other in DATASETS.values()
             for name, md5 in other.content_md5.items()}
    unknown = []
    for name, digest in digests.items():
        if digest == spec.content_md5.get(name):
            continue
        path = source.files[name]
        where = f"it was found in {source.directory} ({source.origin})"
        if digest not in known:
            unknown.append((name, path, digest, where))
            continue
        other, other_name = known[digest]
        raise WrongDataError(
            f"{path}: this is not {spec.title}'s {name} but {other.title}'s {other_name} "
            f"(md5 of its contents {digest}); {where}. Give {spec.title}'s own files "
            f"instead (keep each dataset in its own folder, or in "
            f"torchvision's layout: <folder>/{spec.torchvision_subdir}); to get them: "
            f"{spec.how_to_get}" + (f"; to train on {other.title}, name the dataset "
                                    f"{other.name}" if other.name != spec.name else ""))
    if unknown and not own_files:
        name, path, digest, where = unknown[0]
        raise WrongDataError(
            f"{path}: its contents (md5 {digest}) are not {spec.title}'s {name} (md5 "
            f"{spec.content_md5.get(name, '?')}) nor any dataset's genbench knows; {where}. "
            f"A copy changed on purpose (a subset, another binarisation) is allowed with the "
            f"data setting {OWN_FILES_SETTING}: true (in a suite's data:, --data."
            f"{OWN_FILES_SETTING} true for bench fit), and its rows then say so; otherwise "
            f"fetch the files again: {spec.how_to_get}")
    return DataCheck("own files" if unknown else "verified", combined)


def load_arrays(spec: DatasetSpec, source: DataSource) -> dict[str, np.ndarray]:
    """Decode the files into uint8 images (N, C, H, W) and int64 labels (N,) for train and test."""
    if spec.file_format == "idx":
        arrays = {}
        for split, (images_name, labels_name) in (("train", spec.train_files),
                                                  ("test", spec.test_files)):
            images_path, labels_path = source.files[images_name], source.files[labels_name]
            images = read_idx(images_path, expected_ndim=3)
            labels = read_idx(labels_path, expected_ndim=1).astype(np.int64)
            if images.shape[0] != labels.shape[0]:
                raise CorruptDataError(f"{images_path}: {images.shape[0]} images but "
                                       f"{labels_path} has {labels.shape[0]} labels")
            arrays[f"{split}_images"] = images[:, None]  # add the channel axis: N, 1, H, W
            arrays[f"{split}_labels"] = labels
    else:
        arrays = {}
        for split, names in (("train", spec.train_files), ("test", spec.test_files)):
            parts = [read_cifar_batch(source.files[name]) for name in names]
            arrays[f"{split}_images"] = np.concatenate([images for images, _ in parts])
            arrays[f"{split}_labels"] = np.concatenate([labels for _, labels in parts])
    for split, names in (("train", spec.train_files), ("test", spec.test_files)):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[1:] != spec.image_shape:
            raise CorruptDataError(f"{source.files[names[0]]}: images have shape "
                                   f"{images.shape[1:]}, expected {spec.image_shape} for "
                                   f"{spec.title}")
        if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
            raise CorruptDataError(f"{source.files[names[-1]]}: labels span "
                                   f"[{labels.min()}, {labels.max()}], expected 0.."
                                   f"{spec.num_classes - 1}")
    return arrays
