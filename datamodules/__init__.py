"""Datamodules: MNIST, Fashion-MNIST and CIFAR-10 as in-memory uint8 tensors."""

from datamodules.formats import CorruptDataError
from datamodules.image import ImageDataModule, TensorBatches, to_unit_float
from datamodules.specs import (DATASETS, DataNotFoundError, DatasetSpec, UnknownDatasetError,
                               get_spec, locate)

__all__ = ["DATASETS", "CorruptDataError", "DataNotFoundError", "DatasetSpec", "ImageDataModule",
           "TensorBatches", "UnknownDatasetError", "get_spec", "locate",
           "to_unit_float"]
