"""Data of a run: datasets, loading, and on-device transforms (one file each).

- :mod:`~invertible_train.data.datasets`: what ``data.dataset`` names (``cifar10``,
  ``cifar100``, ``digits``, ``imagefolder:PATH``, ``synthetic``), as ``uint8`` images, with
  normalisation statistics from the training images only (:func:`build_data`).
- :mod:`~invertible_train.data.loading`: the resumable sampler and the DataLoader.
- :mod:`~invertible_train.data.transforms`: augmentation and normalisation per batch on
  the training device (:class:`BatchTransform`), seeded per iteration.
"""

from invertible_train.data.datasets import (
    DATASET_BUILDERS,
    DATASETS,
    DIGITS_LEVELS,
    DIGITS_TEST_SIZE,
    MAX_STATS_IMAGES,
    DatasetUnavailableError,
    FolderImages,
    ImageData,
    InMemoryImages,
    build_data,
    channel_stats,
    check_dataset_name,
    digits_images,
    synthetic_images,
)
from invertible_train.data.loading import ResumableSampler, make_loader
from invertible_train.data.transforms import BatchTransform, augment_batch

__all__ = [
    "DATASETS",
    "DATASET_BUILDERS",
    "DIGITS_LEVELS",
    "DIGITS_TEST_SIZE",
    "MAX_STATS_IMAGES",
    "BatchTransform",
    "DatasetUnavailableError",
    "FolderImages",
    "ImageData",
    "InMemoryImages",
    "ResumableSampler",
    "augment_batch",
    "build_data",
    "channel_stats",
    "check_dataset_name",
    "digits_images",
    "make_loader",
    "synthetic_images",
]
