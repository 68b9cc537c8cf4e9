"""Datasets, the resumable sampler, and the on-device augmentation and normalisation.

Every dataset here yields ``uint8`` images of shape ``(C, H, W)`` with an integer label;
float conversion, augmentation and normalisation happen per batch on the training device
(:class:`BatchTransform`), which is both faster than per-image PIL transforms and
deterministic: the random crop offsets and flips of a batch come from a generator seeded
with ``(seed, iteration)``, so a resumed run sees exactly the images an uninterrupted one
would have seen, whatever the number of loader workers.

Training hygiene (the defects of MemCNN's harness this module exists to avoid):

* augmentation (pad-and-crop, horizontal flip) is applied to training batches only;
* normalisation statistics are computed from the training images only;
* the test set is never augmented and never contributes to any statistic.

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
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from invertible_train.config import ConfigError, DataConfig

__all__ = [
    "DATASETS",
    "DATASET_BUILDERS",
    "DIGITS_LEVELS",
    "DIGITS_TEST_SIZE",
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


def _collate_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate for :class:`InMemoryImages`: ``__getitems__`` already built the batch."""
    return batch


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


class _Sized:
    """Stands in for a dataset where only its length matters (``DistributedSampler``)."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length


class ResumableSampler(DistributedSampler):  # type: ignore[type-arg]
    """``torch.utils.data.DistributedSampler`` whose position can be saved mid-epoch.

    The order is ``DistributedSampler``'s own for the same ``seed``, ``epoch``,
    ``num_replicas`` and ``rank`` (it computes it); this subclass adds ``start_index``: the
    number of this rank's indices of the epoch already consumed. A checkpoint stores
    ``(epoch, start_index)``; restoring both continues the same order, where the stock
    sampler could only restart the epoch. One process is ``num_replicas=1, rank=0``.
    """

    def __init__(
        self,
        length: int,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        super().__init__(
            _Sized(length),  # type: ignore[arg-type]
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
        )
        self.length = length
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Select the epoch's order and how many of its indices to skip."""
        super().set_epoch(epoch)
        self.start_index = start_index

    def indices(self) -> list[int]:
        """This rank's whole index list for the current epoch."""
        return list(super().__iter__())

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start_index :])

    def __len__(self) -> int:
        return int(self.num_samples) - self.start_index


def make_loader(
    dataset: Dataset[Any],
    batch_size: int,
    sampler: Sampler[int] | None = None,
    workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> DataLoader[Any]:
    """A DataLoader that batches ``uint8`` images (one gather for in-memory datasets).

    It has a generator of its own: a stock DataLoader draws a number from torch's global
    generator each time an epoch's iterator starts (the base seed of its workers), which
    would shift every random number the model draws afterwards (dropout, drop path, a
    flow's dequantisation noise) by where epochs begin and where a run was resumed.
    """
    collate: Callable[[Any], Any] | None = (
        _collate_batch if isinstance(dataset, InMemoryImages) else None
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        collate_fn=collate,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(0),
    )


def augment_batch(
    images: torch.Tensor, generator: torch.Generator, padding: int = 4, flip: bool = True
) -> torch.Tensor:
    """Random pad-and-crop (zero padding) and horizontal flip, per image, on any device.

    The offsets and flips are drawn from ``generator`` (a CPU generator) so that a batch's
    augmentation depends only on the generator's seed.
    """
    n, c, h, w = images.shape
    device = images.device
    if padding > 0:
        offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator).to(device)
        padded = F.pad(images, (padding, padding, padding, padding))
        rows = (offsets[0, :, None] + torch.arange(h, device=device))[:, None, :, None]
        cols = (offsets[1, :, None] + torch.arange(w, device=device))[:, None, None, :]
        batch = torch.arange(n, device=device)[:, None, None, None]
        chan = torch.arange(c, device=device)[None, :, None, None]
        images = padded[batch, chan, rows, cols]
    if flip:
        flips = (torch.rand(n, generator=generator) < 0.5).to(device)
        images = torch.where(flips[:, None, None, None], images.flip(3), images)
    return images


class BatchTransform:
    """``uint8`` batch -> normalised float batch, augmented only when training.

    Built from the training set's statistics; holds them on the training device.
    ``levels`` is the dataset's number of levels per value (:attr:`ImageData.levels`), for
    :meth:`discrete`.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        augment: bool = True,
        padding: int = 4,
        flip: bool = True,
        seed: int = 0,
        levels: int = 256,
    ) -> None:
        if not 2 <= levels <= 256:
            raise ValueError(f"levels must be in [2, 256] (values per pixel), got {levels}")
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.augment = augment
        self.padding = padding
        self.flip = flip
        self.seed = seed
        self.levels = levels

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Scale to [0, 1] and standardise with the training statistics."""
        return (images.to(torch.float32) / 255.0 - self.mean) / self.std

    def generator(self, iteration: int, rank: int = 0, stream: int = 0) -> torch.Generator:
        """A CPU generator for batch ``iteration`` of ``rank``: one reproducible random stream
        per (seed, iteration, rank, stream), whatever ran before (resumes stay bit-exact)."""
        key = ((self.seed * 1_000_003 + iteration) * 4_099 + rank) * 7 + stream
        return torch.Generator().manual_seed(key)

    def augmented(self, images: torch.Tensor, iteration: int, rank: int = 0) -> torch.Tensor:
        """Batch ``iteration``, augmented when augmentation is on, still ``uint8``."""
        if not self.augment:
            return images
        return augment_batch(images, self.generator(iteration, rank), self.padding, self.flip)

    def train(self, images: torch.Tensor, iteration: int, rank: int = 0) -> torch.Tensor:
        """The training view of batch number ``iteration`` (deterministic in seed, iteration)."""
        return self.normalize(self.augmented(images, iteration, rank))

    def test(self, images: torch.Tensor) -> torch.Tensor:
        """The evaluation view: normalised, never augmented."""
        return self.normalize(images)

    def discrete(self, images: torch.Tensor) -> torch.Tensor:
        """``uint8`` pixels as their levels ``k / (levels - 1)`` in [0, 1], float32.

        ``k`` is the value the image was quantised to: the pixel itself for 8-bit images
        (``x / 255``, torchvision ``ToTensor``'s scaling), the scan value 0..16 for
        ``digits`` (stored as ``round(k * 255 / 16)``, mapped back exactly). The view a
        density model is given; it dequantises the levels itself.
        """
        steps = self.levels - 1
        k = torch.round(images.to(torch.float32) * (steps / 255.0))
        return k / steps
