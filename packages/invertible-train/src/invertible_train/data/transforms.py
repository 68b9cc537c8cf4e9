"""On-device augmentation and normalisation of ``uint8`` batches.

Float conversion, augmentation and normalisation happen per batch on the training device
(:class:`BatchTransform`), which is both faster than per-image PIL transforms and
deterministic: the random crop offsets and flips of a batch come from a generator seeded
with ``(seed, iteration)``, so a resumed run sees exactly the images an uninterrupted one
would have seen, whatever the number of loader workers.

Training hygiene (the defects of MemCNN's harness this module exists to avoid):

* augmentation (pad-and-crop, horizontal flip) is applied to training batches only;
* normalisation uses the statistics of the training images only;
* the test set is never augmented.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["BatchTransform", "augment_batch"]


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
