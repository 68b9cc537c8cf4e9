"""The datasets: what ``data.dataset`` names, loaded as ``uint8`` images with their labels.

Every dataset here yields ``uint8`` images of shape ``(C, H, W)`` with an integer label;
float conversion, augmentation and normalisation happen per batch on the training device
(:mod:`invertible_train.data.transforms`). Normalisation statistics are computed from the
training images only (:func:`channel_stats`); the test set never contributes to any
statistic.

Datasets: ``cifar10`` and ``cifar100`` through torchvision (downloaded when absent),
``digits`` (scikit-learn's 1,797 handwritten 8x8 scans, shipped inside scikit-learn, so
offline; the optional extra ``invertible-train[digits]``), ``imagefolder:PATH``
(torchvision ``ImageFolder`` over ``PATH/train`` and ``PATH/test``), and ``synthetic``
(generated, learnable, offline; CIFAR-shaped by default).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from invertible_train.config import ConfigError, DataConfig

__all__ = [
    "DATASETS",
    "DATASET_BUILDERS",
    "DIGITS_LEVELS",
    "DIGITS_TEST_SIZE",
    "MAX_STATS_IMAGES",
    "DatasetUnavailableError",
    "FolderImages",
    "ImageData",
    "InMemoryImages",
    "build_data",
    "channel_stats",
    "check_dataset_name",
    "digits_images",
    "synthetic_images",
]

#: the names ``data.dataset`` accepts (``imagefolder:`` takes a path after the colon).
DATASETS = ("cifar10", "cifar100", "digits", "synthetic", "imagefolder:PATH")

#: datasets of other modules, by name (a name ending in ``:`` takes a path after it), and
#: how to build them (:mod:`invertible_train.segmentation_data` registers ``shapes2d``,
#: ``shapes3d`` and ``masks:``; the package's ``__init__`` imports it)
DATASET_BUILDERS: dict[str, Callable[[DataConfig, int], ImageData]] = {}

#: scans of ``digits`` held out as its test set (20%, the same ones in every run).
DIGITS_TEST_SIZE = 360
#: the seed of the permutation that splits ``digits`` into training and test scans.
_DIGITS_SPLIT_SEED = 20180406
#: grey levels of the ``digits`` scans (values 0..16).
DIGITS_LEVELS = 17

#: at most this many training images (a seeded random subset) enter the normalisation
#: statistics of a folder dataset, which must be decoded from disk to be measured.
MAX_STATS_IMAGES = 10_000


class DatasetUnavailableError(RuntimeError):
    """A dataset could not be found or fetched; the message says where to put the files."""


class InMemoryImages(Dataset[tuple[torch.Tensor, int]]):
    """Images held as one ``uint8`` tensor ``(N, C, H, W)`` with ``int64`` labels ``(N,)``.

    ``__getitems__`` returns a whole batch by one indexing operation (the DataLoader uses
    it when present), so batching costs one gather instead of ``batch_size`` Python calls.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}"
            )
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match {images.shape[0]} images")
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return self.images[idx], self.labels[idx]


class FolderImages(Dataset[tuple[torch.Tensor, int]]):
    """A torchvision ``ImageFolder``, resized and centre-cropped to a square, as ``uint8``."""

    def __init__(self, root: Path, image_size: int, classes: Sequence[str] | None = None) -> None:
        from torchvision import datasets, transforms

        self.folder = datasets.ImageFolder(
            str(root),
            transform=transforms.Compose(
                [
                    transforms.Resize(image_size),
                    transforms.CenterCrop(image_size),
                    transforms.PILToTensor(),
                ]
            ),
        )
        if classes is not None and list(self.folder.classes) != list(classes):
            raise DatasetUnavailableError(
                f"{root} has classes {self.folder.classes}, but the training folder has "
                f"{list(classes)}: train/ and test/ must hold the same class subfolders"
            )
        self.classes: list[str] = list(self.folder.classes)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.folder[index]
        return image, int(label)


@dataclass
class ImageData:
    """A train/test pair with what the model and the transform need to know about it."""

    train: Dataset[Any]
    test: Dataset[Any]
    num_classes: int
    #: per-channel mean and std of the *training* images, in [0, 1] units.
    mean: tuple[float, ...]
    std: tuple[float, ...]
    #: distinct values a pixel channel was quantised to: 256 for 8-bit images, 17 for
    #: ``digits`` (scans of 0..16, stored as ``round(k * 255 / 16)``). Density models are
    #: given the images as these levels (:meth:`BatchTransform.discrete`).
    levels: int = 256

    @property
    def channels(self) -> int:
        """Channels of the images (3 for colour, 1 for ``digits``)."""
        return len(self.mean)


def synthetic_images(
    n: int, classes: int, size: int, seed: int, channels: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` learnable images: a class-dependent smooth colour pattern plus pixel noise.

    Each class has a fixed random 4x4 pattern per channel, upsampled to ``size``; an image is
    its class pattern plus Gaussian noise, so a small network learns it in a few hundred
    steps while a constant prediction stays at chance. The patterns come from a fixed seed
    (they are the dataset); ``seed`` picks the samples, so train and test differ.
    """
    patterns = torch.rand(classes, channels, 4, 4, generator=torch.Generator().manual_seed(1234))
    patterns = F.interpolate(patterns, size=(size, size), mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    noise = torch.randn(n, channels, size, size, generator=g) * 0.15
    images = (0.2 + 0.6 * patterns[labels] + noise).clamp(0, 1)
    return (images * 255).round().to(torch.uint8), labels


def channel_stats(
    dataset: Dataset[Any], seed: int = 0
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation (in [0, 1] units) of a dataset's images.

    In-memory datasets are measured whole; other datasets on a seeded random subset of at
    most :data:`MAX_STATS_IMAGES` images (decoding every file of a large folder twice would
    cost more than the estimate gains).
    """
    if isinstance(dataset, InMemoryImages):
        chunks: Iterator[torch.Tensor] = iter(dataset.images.split(4096))
    else:
        n = len(dataset)  # type: ignore[arg-type]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        chosen = order[:MAX_STATS_IMAGES].tolist()
        chunks = (dataset[i][0].unsqueeze(0) for i in chosen)
    total = 0
    sums: torch.Tensor | None = None
    squares: torch.Tensor | None = None
    for chunk in chunks:
        x = chunk.to(torch.float64) / 255.0
        s, q = x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3))
        sums = s if sums is None else sums + s
        squares = q if squares is None else squares + q
        total += x.shape[0] * x.shape[2] * x.shape[3]
    if sums is None or squares is None:
        raise DatasetUnavailableError("the training set is empty: no statistics to compute")
    mean = sums / total
    std = (squares / total - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def _cifar(cfg: DataConfig, name: str) -> tuple[InMemoryImages, InMemoryImages, int]:
    from torchvision import datasets

    cls, folder, archive, classes = {
        "cifar10": (datasets.CIFAR10, "cifar-10-batches-py", "cifar-10-python.tar.gz", 10),
        "cifar100": (datasets.CIFAR100, "cifar-100-python", "cifar-100-python.tar.gz", 100),
    }[name]
    root = Path(cfg.data_dir).expanduser()
    try:
        splits = [cls(str(root), train=train, download=cfg.download) for train in (True, False)]
    except (OSError, RuntimeError) as exc:
        how = f"the download failed ({exc})" if cfg.download else "downloading is off"
        raise DatasetUnavailableError(
            f"{name} is not in {root} and {how}. Put the extracted folder at "
            f"{root / folder} (from {archive}, https://www.cs.toronto.edu/~kriz/cifar.html), "
            f"or the archive itself at {root / archive}, or pass --data-dir to where it is."
        ) from None
    out = []
    for split in splits:
        images = torch.from_numpy(split.data).permute(0, 3, 1, 2)
        out.append(InMemoryImages(images, torch.as_tensor(split.targets, dtype=torch.int64)))
    return out[0], out[1], classes


def digits_images() -> tuple[InMemoryImages, InMemoryImages]:
    """scikit-learn's handwritten digits as ``uint8`` 1x8x8 images: (train, test).

    1,797 real scans (``sklearn.datasets.load_digits``, 17 grey levels scaled to 0..255),
    split once by a fixed permutation into 1,437 training and :data:`DIGITS_TEST_SIZE` test
    scans, the same in every run and on every machine.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetUnavailableError(
            "dataset 'digits' needs scikit-learn, which is not installed: "
            "pip install 'invertible-train[digits]' (or pip install scikit-learn)"
        ) from None
    bunch = load_digits()
    scans = torch.as_tensor(bunch.images, dtype=torch.float64)  # (1797, 8, 8), 0..16
    images = (scans * (255.0 / (DIGITS_LEVELS - 1))).round().to(torch.uint8).unsqueeze(1)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_DIGITS_SPLIT_SEED))
    test, train = order[:DIGITS_TEST_SIZE], order[DIGITS_TEST_SIZE:]
    return InMemoryImages(images[train], labels[train]), InMemoryImages(images[test], labels[test])


def _imagefolder(cfg: DataConfig, path: str) -> tuple[FolderImages, FolderImages, int]:
    root = Path(path).expanduser()
    missing = [sub for sub in ("train", "test") if not (root / sub).is_dir()]
    if missing:
        raise DatasetUnavailableError(
            f"imagefolder:{path} needs subfolders train/ and test/ with one folder of images "
            f"per class (e.g. {root / 'train' / 'cat' / '001.png'}); missing: {', '.join(missing)}"
        )
    try:
        train = FolderImages(root / "train", cfg.image_size)
        test = FolderImages(root / "test", cfg.image_size, classes=train.classes)
    except FileNotFoundError as exc:  # ImageFolder: a class folder without images
        raise DatasetUnavailableError(f"imagefolder:{path}: {exc}") from None
    return train, test, len(train.classes)


def _registered(name: str) -> Callable[[DataConfig, int], ImageData] | None:
    for key, build in DATASET_BUILDERS.items():
        if name == key or (key.endswith(":") and name.startswith(key) and len(name) > len(key)):
            return build
    return None


def check_dataset_name(name: str) -> None:
    """Raise :class:`ConfigError` (naming the choices) when ``name`` is no dataset."""
    known = name in DATASETS or (name.startswith("imagefolder:") and len(name) > 12)
    if not known and _registered(name) is None:
        choices = [*DATASETS, *(k + "PATH" if k.endswith(":") else k for k in DATASET_BUILDERS)]
        raise ConfigError(f"data.dataset must be one of {', '.join(choices)}; got {name!r}")


def build_data(cfg: DataConfig, seed: int = 0) -> ImageData:
    """Load the dataset named in ``cfg`` and compute normalisation from its training split."""
    name = cfg.dataset
    check_dataset_name(name)
    registered = _registered(name)
    if registered is not None:
        return registered(cfg, seed)
    train: Dataset[Any]
    test: Dataset[Any]
    levels = 256
    if name in ("cifar10", "cifar100"):
        train, test, classes = _cifar(cfg, name)
    elif name.startswith("imagefolder:"):
        train, test, classes = _imagefolder(cfg, name.split(":", 1)[1])
    elif name == "digits":
        train, test = digits_images()
        classes, levels = 10, DIGITS_LEVELS
    else:  # synthetic
        classes = cfg.synthetic_classes
        size = cfg.image_size
        train = InMemoryImages(*synthetic_images(cfg.synthetic_train_size, classes, size, 1))
        test = InMemoryImages(*synthetic_images(cfg.synthetic_test_size, classes, size, 2))
    mean, std = channel_stats(train, seed)
    return ImageData(train=train, test=test, num_classes=classes, mean=mean, std=std, levels=levels)
