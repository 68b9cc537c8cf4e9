"""Segmentation data: images or volumes with a class per pixel (voxel), offline.

Two sources, both giving ``uint8`` inputs ``(C, *S)`` and ``int64`` masks ``(*S)`` with one
or two or three spatial axes ``S``:

- ``shapes2d`` and ``shapes3d``: synthetic, seeded, generated on the spot. Each sample holds
  one to three objects on a noisy background, each a *ball* (class 1) or a *box* (class 2),
  both of the same brightness: a pixel's value does not tell its class, the shape around it
  does, so a network must look at context (what a U-Net's levels are for) while a constant
  or per-pixel prediction stays poor. Side ``data.image_size``; ``data.synthetic_train_size``
  and ``data.synthetic_test_size`` samples (the test samples from another seed).
- ``masks:PATH``: a user's own data, laid out as an ``imagefolder`` of pairs::

      PATH/train/images/NAME.png   PATH/train/masks/NAME.png
      PATH/test/images/NAME.png    PATH/test/masks/NAME.png

  A mask holds the class index of each pixel (0, 1, ... in a single-channel PNG). Images are
  resized to ``data.image_size`` squares (bilinear), masks alike (nearest, so classes stay
  classes). Volumes come as NumPy files instead (``NAME.npy``: an image ``(D, H, W)`` or
  ``(C, D, H, W)`` of ``uint8``, a mask ``(D, H, W)`` of integers), all of one shape and used
  as they are. The classes are ``0 .. max(training masks)``.

Everything is held in memory (``uint8`` inputs and masks); normalisation statistics come
from the training inputs only.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from invertible_train.config import ConfigError, DataConfig
from invertible_train.data import DATASET_BUILDERS, DatasetUnavailableError, ImageData

__all__ = [
    "SEGMENTATION_DATASETS",
    "SHAPE_CLASSES",
    "SegmentationSet",
    "build_segmentation_data",
    "is_segmentation_dataset",
    "load_mask_folder",
    "shapes",
]

#: the dataset names of segmentation data (``masks:`` takes a path after the colon)
SEGMENTATION_DATASETS = ("shapes2d", "shapes3d", "masks:PATH")
#: background, ball, box
SHAPE_CLASSES = 3


def is_segmentation_dataset(name: str) -> bool:
    """Whether ``data.dataset`` names segmentation data."""
    return name in ("shapes2d", "shapes3d") or (name.startswith("masks:") and len(name) > 6)


class SegmentationSet(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Inputs ``uint8 (N, C, *S)`` with masks ``(N, *S)``; item ``i`` is ``(input, mask)``,
    the mask as ``int64`` class indices."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or not 4 <= images.dim() <= 5:
            raise ValueError(
                f"inputs must be uint8 (N, C, H, W) or (N, C, D, H, W), got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        if masks.shape != images.shape[:1] + images.shape[2:]:
            raise ValueError(
                f"masks {tuple(masks.shape)} do not match inputs {tuple(images.shape)} (one "
                "class per position of each input)"
            )
        self.images = images.contiguous()
        largest = int(masks.max()) if masks.numel() else 0
        self.masks = masks.to(torch.uint8 if largest < 256 else torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.masks[index].to(torch.int64)


def shapes(n: int, size: int, dims: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` synthetic samples with ``dims`` spatial axes of ``size``: ``uint8`` inputs
    ``(n, 1, *S)`` and masks ``(n, *S)`` (0 background, 1 ball, 2 box); seeded by ``seed``.

    Objects have radius ``size / 8`` to ``size / 4``; a box is the cube of half-side 0.8 of
    its radius; later objects cover earlier ones. Background 0.3, objects 0.65, plus
    Gaussian noise of 0.12 and a slow brightness ramp per sample, clipped to ``[0, 1]``.
    """
    if dims not in (2, 3):
        raise ValueError(f"shapes have 2 or 3 spatial axes, got {dims}")
    if size < 8:
        raise ConfigError(f"data.image_size must be at least 8 for shapes, got {size}")
    g = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * dims, indexing="ij")
    grid = torch.stack(axes)  # (dims, *S)
    masks = torch.zeros(n, *([size] * dims), dtype=torch.uint8)
    count = torch.randint(1, 4, (n,), generator=g)
    for k in range(3):
        radius = size / 8 + torch.rand(n, generator=g) * size / 8
        centre = radius[:, None] + torch.rand(n, dims, generator=g) * (size - 2 * radius[:, None])
        kind = torch.randint(1, 3, (n,), generator=g)
        offset = grid.unsqueeze(0) - centre.view(n, dims, *([1] * dims))
        r = radius.view(n, *([1] * dims))
        ball = offset.square().sum(1) <= r.square()
        box = offset.abs().amax(1) <= 0.8 * r
        inside = torch.where(kind.view(n, *([1] * dims)) == 1, ball, box)
        inside &= (k < count).view(n, *([1] * dims))
        masks[inside] = kind.view(n, *([1] * dims)).expand_as(masks)[inside].to(torch.uint8)
    ramp = (
        (grid[-1] / size - 0.5).unsqueeze(0)
        * (torch.rand(n, generator=g) - 0.5).view(n, *([1] * dims))
        * 0.3
    )
    values = torch.where(masks > 0, 0.65, 0.3) + ramp
    values = values + 0.12 * torch.randn(values.shape, generator=g)
    images = (values.clamp(0, 1) * 255).round().to(torch.uint8).unsqueeze(1)
    return images, masks


def _read(path: Path) -> torch.Tensor:
    """A ``.npy`` array as it is, or a PNG as ``(C, H, W)`` (Pillow, torchvision's own
    dependency; palette and greyscale PNGs as one channel of their indices)."""
    import numpy as np

    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False))
    from PIL import Image

    with Image.open(path) as image:
        array = np.array(image)
    tensor = torch.from_numpy(array)
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)


def _pairs(folder: Path) -> list[tuple[Path, Path]]:
    images, masks = folder / "images", folder / "masks"
    missing = [p.name for p in (images, masks) if not p.is_dir()]
    if missing:
        raise DatasetUnavailableError(
            f"{folder} needs subfolders images/ and masks/ with files of the same names "
            f"(e.g. {images / 'case001.png'} and {masks / 'case001.png'}); missing: "
            f"{', '.join(missing)}"
        )
    files = sorted(p for p in images.iterdir() if p.suffix in (".png", ".npy"))
    if not files:
        raise DatasetUnavailableError(f"{images} holds no .png or .npy file")
    pairs = []
    for image in files:
        mask = masks / image.name
        if not mask.is_file():
            raise DatasetUnavailableError(f"{image} has no mask {mask} (the same name)")
        pairs.append((image, mask))
    return pairs


def load_mask_folder(folder: Path, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs under ``folder`` (``images/``, ``masks/``): ``uint8`` inputs ``(N, C, *S)``
    and ``int64`` masks ``(N, *S)``; PNGs resized to ``image_size`` squares."""
    inputs, labels = [], []
    for image_path, mask_path in _pairs(folder):
        image, mask = _read(image_path), _read(mask_path)
        if image.dtype != torch.uint8:
            raise DatasetUnavailableError(f"{image_path} is {image.dtype}; inputs must be uint8")
        if image_path.suffix == ".png":
            if mask.dim() == 3:
                if mask.shape[0] != 1:
                    raise DatasetUnavailableError(
                        f"{mask_path} has {mask.shape[0]} channels; a mask is one channel of "
                        "class indices"
                    )
                mask = mask[0]
            if image.shape[1:] != mask.shape:
                raise DatasetUnavailableError(
                    f"{image_path} is {tuple(image.shape[1:])} but its mask is {tuple(mask.shape)}"
                )
            size = [image_size, image_size]
            image = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True)
            image = image[0].round().clamp(0, 255).to(torch.uint8)
            mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0]
        elif image.dim() == 3:  # a volume without a channel axis
            image = image[None]
        if image.shape[1:] != mask.shape:
            raise DatasetUnavailableError(
                f"{image_path} is {tuple(image.shape)} but its mask is {tuple(mask.shape)}"
            )
        inputs.append(image)
        labels.append(mask.to(torch.int64))
    shapes_seen = {tuple(t.shape) for t in inputs}
    if len(shapes_seen) > 1:
        raise DatasetUnavailableError(
            f"{folder}: the inputs have different shapes {sorted(shapes_seen)}; volumes must "
            "all have one shape"
        )
    masks = torch.stack(labels)
    if int(masks.min()) < 0:
        raise DatasetUnavailableError(f"{folder}: a mask holds a negative class index")
    return torch.stack(inputs), masks


def _stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.to(torch.float64) / 255.0
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dim=dims)
    std = x.std(dim=dims, correction=0).clamp_min(1e-6)
    return tuple(mean.tolist()), tuple(std.tolist())


def build_segmentation_data(cfg: DataConfig, seed: int = 0) -> ImageData:
    """The segmentation data named by ``cfg.dataset`` (see the module docstring), with the
    training inputs' statistics; ``num_classes`` counts the background."""
    name = cfg.dataset
    if name in ("shapes2d", "shapes3d"):
        dims = 2 if name == "shapes2d" else 3
        train = SegmentationSet(*shapes(cfg.synthetic_train_size, cfg.image_size, dims, 1))
        test = SegmentationSet(*shapes(cfg.synthetic_test_size, cfg.image_size, dims, 2))
        classes = SHAPE_CLASSES
    elif is_segmentation_dataset(name):
        root = Path(name.split(":", 1)[1]).expanduser()
        train = SegmentationSet(*load_mask_folder(root / "train", cfg.image_size))
        test = SegmentationSet(*load_mask_folder(root / "test", cfg.image_size))
        if train.images.shape[1:] != test.images.shape[1:]:
            raise DatasetUnavailableError(
                f"{name}: training inputs are {tuple(train.images.shape[1:])}, test inputs "
                f"{tuple(test.images.shape[1:])}; they must have one shape"
            )
        classes = max(int(train.masks.max()) + 1, 2)
        if int(test.masks.max()) >= classes:
            raise DatasetUnavailableError(
                f"{name}: a test mask holds class {int(test.masks.max())}, but the training "
                f"masks only 0..{classes - 1}"
            )
    else:
        raise ConfigError(
            f"data.dataset {name!r} is no segmentation dataset; use one of "
            f"{', '.join(SEGMENTATION_DATASETS)}"
        )
    mean, std = _stats(train.images)
    return ImageData(train=train, test=test, num_classes=classes, mean=mean, std=std)


for _name in ("shapes2d", "shapes3d", "masks:"):
    DATASET_BUILDERS.setdefault(_name, build_segmentation_data)
