"""Datamodules: MNIST, Fashion-MNIST and CIFAR-10 as in-memory uint8 tensors."""

from datamodules.formats import CorruptDataError
from datamodules.specs import (DATASETS, DataNotFoundError, DatasetSpec, UnknownDatasetError,
                               get_spec, locate)

__all__ = ["DATASETS", "CorruptDataError", "DataNotFoundError", "DatasetSpec", "ImageDataModule",
           "TensorBatches", "UnknownDatasetError", "get_spec", "locate",
           "to_unit_float"]

# The datamodule imports Lightning; the dataset specs do not, and commands that only read a
# results table (bench table, compare) need the specs alone. PEP 562: imported on first use.
_LIGHTNING_NAMES = ("ImageDataModule", "TensorBatches", "to_unit_float")


def __getattr__(name: str):
    if name in _LIGHTNING_NAMES:
        from datamodules import image

        return getattr(image, name)
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
