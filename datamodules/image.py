"""One LightningDataModule for the 28x28 and 32x32 image datasets, with a tensor fast path."""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Iterator

import lightning as L
import numpy as np
import torch

from bench.errors import UserError
from datamodules.specs import (DataCheck, DatasetSpec, DataSource, check_files, get_spec,
                               load_arrays, locate)


@functools.lru_cache(maxsize=2)
def _decoded(spec_name: str, directory: str) -> dict[str, torch.Tensor]:
    """Decode a dataset's files once per process; a suite builds many datamodules on one dataset."""
    spec = get_spec(spec_name)
    source = locate(spec, data_dir=directory)
    return {key: torch.from_numpy(np.ascontiguousarray(value))
            for key, value in load_arrays(spec, source).items()}


def to_unit_float(images: torch.Tensor, binarize: bool = False,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1]; with `binarize`, a fresh Bernoulli draw per pixel with
    p = intensity (dynamic binarisation, as in Salakhutdinov & Murray 2008 and Burda et al. 2016)."""
    x = images.float().div_(255.0)
    return torch.bernoulli(x, generator=generator) if binarize else x


def stream_seed(seed: int, purpose: str, *indices: int) -> int:
    """The seed of one random stream of a run: a hash of (run seed, what the stream is for, its
    indices), e.g. ("order", epoch) for an epoch's data order, ("binarise", epoch, batch) for a
    batch's pixels, ("image", i) for an evaluated image's noise, ("rank", r) for a DDP rank.
    A function of those alone, not of the global random state, so a resumed, re-sharded or
    re-batched run redraws exactly what an uninterrupted one would; and a hash, not a sum, so
    that no two tuples share a stream (seed + epoch made seed 1's epoch 0 seed 0's epoch 1)."""
    key = repr((int(seed), purpose, *(int(i) for i in indices))).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 1


def binarized_once(images: torch.Tensor, seed: int) -> torch.Tensor:
    """A fixed binarisation of a whole evaluation split (uint8 0 / 255), drawn in the split's
    order from `seed`: every run, every device count and every batching sees the same pixels."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.bernoulli(images.cpu().float().div(255.0), generator=generator)
    return (draws * 255).to(torch.uint8).to(images.device)


class TensorBatches:
    """Batches as slices of in-memory tensors, in a fresh random order each epoch when shuffling.

    Hand-written because a DataLoader over a TensorDataset indexes and collates item by item in
    Python, which costs more than a small model's step. It shards by rank itself: rank r takes
    positions r, r + W, r + 2W, ... of the epoch's order. Training (`drop_last`) gives every
    rank the same number of full batches, as DDP needs; evaluation covers every image exactly
    once across ranks. `epoch_batches(epoch, start)` is what the harness's loop reads (it
    resumes mid-epoch); iterating the object gives the next epoch's batches, or the Trainer's
    current epoch's (`epoch_fn`), for lightning.Trainer.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 shuffle: bool, drop_last: bool, binarize: bool = False, seed: int = 0,
                 rank: int = 0, world_size: int = 1,
                 epoch_fn: Callable[[], int] | None = None) -> None:
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.binarize, self.seed, self.rank, self.world_size = binarize, seed, rank, world_size
        self.epoch_fn = epoch_fn
        self.epoch = 0  # the next pass's epoch, alone

    def _shard_size(self) -> int:
        n = len(self.images)
        if self.drop_last:
            return n // self.world_size
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        size = self._shard_size()
        return size // self.batch_size if self.drop_last else -(-size // self.batch_size)

    def _order(self, epoch: int) -> torch.Tensor | None:
        """This rank's positions in the split for `epoch`; None for the whole split in order."""
        n = len(self.images)
        order = None
        if self.shuffle:
            generator = torch.Generator().manual_seed(stream_seed(self.seed, "order", epoch))
            order = torch.randperm(n, generator=generator)
        if self.world_size > 1:
            order = (order if order is not None else torch.arange(n))[self.rank::self.world_size]
            order = order[: self._shard_size()]
        return order

    def positions(self, epoch: int = 0) -> torch.Tensor:
        """The split index of every image this rank yields in `epoch`, in yield order: what makes
        per-image draws (evaluation noise) independent of batching and device count."""
        order = self._order(epoch)
        return torch.arange(len(self.images)) if order is None else order

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor,
                                                                          torch.Tensor]]:
        """The (images, labels) batches of `epoch` from batch `start` on; each depends on
        nothing but (seed, epoch, its position), so a resumed epoch goes on exactly."""
        order = self._order(epoch)
        if order is not None:
            order = order.to(self.images.device)
        for i in range(start, len(self)):
            yield self._batch(order, epoch, i)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch_fn() if self.epoch_fn is not None else self.epoch
        self.epoch = epoch + 1
        yield from self.epoch_batches(epoch)

    def _batch(self, order: torch.Tensor | None, epoch: int,
               i: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = i * self.batch_size, (i + 1) * self.batch_size
        if order is None:  # contiguous slices are views: no copy at all
            images, labels = self.images[lo:hi], self.labels[lo:hi]
        else:
            # index_select, not images[index]: an order of magnitude faster for a batch of
            # small images on a CPU, a visible share of a small MLP's step.
            index = order[lo:hi]
            images = self.images.index_select(0, index)
            labels = self.labels.index_select(0, index)
        generator = None
        if self.binarize:
            generator = torch.Generator(device=images.device)
            generator.manual_seed(stream_seed(self.seed, "binarise", epoch, i))
        return to_unit_float(images, self.binarize, generator), labels


# Offsets of the fixed evaluation binarisations from the split seed (one draw per split).
EVAL_DRAW = {"val": 1, "test": 2, "train": 3}
BATCH_SIZE = 128  # training images per batch, unless a suite's data: says otherwise
EVAL_BATCH_SIZE = 1000  # images per batch in evaluation (no gradients: larger)


class ImageDataModule(L.LightningDataModule):
    """MNIST, Fashion-MNIST or CIFAR-10 as float images in [0, 1], NCHW, with integer labels.

    The whole split is decoded once into uint8 tensors and moved to the training device in
    `setup`; batches are slices of a random permutation and become float on the device.
    `val_size` images are held out of the training split with the fixed `split_seed`.
    The files are checked against the dataset's known contents (`check_files`) before use;
    `own_files` allows a copy changed on purpose (a subset, another binarisation).
    """

    def __init__(self, dataset: str = "fashion_mnist", data_dir: str | None = None,
                 root: str | None = None, download: bool = False, batch_size: int = BATCH_SIZE,
                 eval_batch_size: int = EVAL_BATCH_SIZE, val_size: int = 5000, split_seed: int = 0,
                 binarize: bool = False, train_subset: int | None = None,
                 test_subset: int | None = None, own_files: bool = False,
                 seed: int = 0) -> None:  # pragma: no mutate block
        super().__init__()
        self.save_hyperparameters()
        # Where the harness's loop trains (`place`); under a Trainer, the Trainer's.
        self.placement: tuple[torch.device | None, int, int] = (None, 0, 1)
        self.spec: DatasetSpec = get_spec(dataset)
        self.source: DataSource | None = None
        self.data_check: DataCheck | None = None
        self.load_seconds: float | None = None
        self._loaded = False
        self._binarized: dict[str, torch.Tensor] = {}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.spec.image_shape

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node: the only place a download may happen.
        hp = self.hparams
        self.source = locate(self.spec, hp.data_dir, hp.root, download=hp.download)

    def place(self, device: torch.device, rank: int = 0, world_size: int = 1) -> None:
        """Where the data lives and which shard is this process's, for a loop without a
        Trainer (bench run's, on Fabric): call before `setup`."""
        self.placement = (device, rank, world_size)

    def _where(self) -> tuple[torch.device | None, int, int]:
        """(device, rank, world size): the Trainer's when one is attached, else `placement`."""
        trainer = self.trainer
        if trainer is not None:
            return trainer.strategy.root_device, trainer.global_rank, trainer.world_size
        return self.placement

    def setup(self, stage: str | None = None) -> None:
        if self._loaded:
            return
        hp = self.hparams
        start = time.perf_counter()
        self.source = locate(self.spec, hp.data_dir, hp.root, download=False)
        self.data_check = check_files(self.spec, self.source, hp.own_files)
        arrays = _decoded(self.spec.name, str(self.source.directory))
        n_train_total = len(arrays["train_images"])
        if not 0 <= hp.val_size < n_train_total:
            raise UserError(f"val_size={hp.val_size} must be in [0, {n_train_total}) for "
                             f"{self.spec.title}'s {n_train_total} training images")
        order = torch.randperm(n_train_total, generator=torch.Generator().manual_seed(hp.split_seed))
        val_index, train_index = order[: hp.val_size], order[hp.val_size:]
        if hp.train_subset is not None:
            train_index = train_index[: hp.train_subset]
        train_index, val_index = train_index.sort().values, val_index.sort().values
        test_stop = hp.test_subset if hp.test_subset is not None else len(arrays["test_images"])

        device = self._where()[0]
        self.train_images = arrays["train_images"][train_index].to(device)
        self.train_labels = arrays["train_labels"][train_index].to(device)
        self.val_images = arrays["train_images"][val_index].to(device)
        self.val_labels = arrays["train_labels"][val_index].to(device)
        self.test_images = arrays["test_images"][:test_stop].to(device)
        self.test_labels = arrays["test_labels"][:test_stop].to(device)
        self.load_seconds = time.perf_counter() - start
        self._loaded = True

    def _batches(self, split: str, train: bool) -> TensorBatches:
        hp = self.hparams
        trainer = self.trainer
        images = getattr(self, f"{split}_images")
        if hp.binarize and not train:  # evaluation sees one fixed draw, whatever the run
            if split not in self._binarized:
                self._binarized[split] = binarized_once(images, hp.split_seed + EVAL_DRAW[split])
            images = self._binarized[split]
        _, rank, world_size = self._where()
        return TensorBatches(
            images, getattr(self, f"{split}_labels"),
            hp.batch_size if train else hp.eval_batch_size, shuffle=train, drop_last=train,
            binarize=hp.binarize and train, seed=hp.seed, rank=rank, world_size=world_size,
            epoch_fn=(lambda: trainer.current_epoch) if trainer is not None else None)

    def train_dataloader(self) -> TensorBatches:
        return self._batches("train", train=True)

    def ordered_train_dataloader(self) -> TensorBatches:
        """The training split in a fixed order and evaluation batch size, for statistics fitted
        after training (the AE's latent mixture): they must not depend on the epoch count."""
        return self._batches("train", train=False)

    def val_dataloader(self) -> TensorBatches:
        return self._batches("val", train=False)

    def test_dataloader(self) -> TensorBatches:
        return self._batches("test", train=False)

    def provenance(self) -> dict[str, str]:
        """A row's data columns: where the files came from, whether they are the named
        dataset's, and a hash of their contents."""
        assert self.source is not None and self.data_check is not None, "call setup() first"
        return {"data_source": f"{self.source.directory} ({self.source.origin})",
                "data_files": self.data_check.status, "data_md5": self.data_check.md5[:12]}

    def describe(self) -> dict[str, object]:
        """What `bench data` prints: where the data came from and what it looks like."""
        assert self.source is not None, "call setup() first"
        sample = self.train_images[: min(len(self.train_images), 10000)]
        return {
            "dataset": f"{self.spec.title} ({self.spec.name})",
            "source": f"{self.source.directory} ({self.source.origin})",
            "files": f"{self.data_check.status}, md5 {self.data_check.md5}",
            "splits": {"train": len(self.train_images), "val": len(self.val_images),
                       "test": len(self.test_images)},
            "image_shape": self.image_shape,
            "num_classes": self.num_classes,
            "stored": f"{self.train_images.dtype} on {self.train_images.device}",
            "batches": f"float32 in [0, 1]{', binarised' if self.hparams.binarize else ''}",
            "pixel_range": (int(sample.min()), int(sample.max())) if len(sample) else None,
            "load_seconds": round(self.load_seconds or 0.0, 3),
        }
