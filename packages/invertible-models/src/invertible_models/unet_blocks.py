"""What the iUNet and its plain twin share: the layout, the residual function, stem and head.

Both networks (:mod:`invertible_models.iunet`, :mod:`invertible_models.unet`) are U-Nets of
the same shape: an injective *lift* of the image to ``width`` channels, ``levels`` levels
above the bottom, each level's channels cut into a skip and a part that goes down, the
downsampled part with ``2**dim`` times the channels at half the resolution (so channels
double per level: half of them go down in 2D, a quarter in 3D), and a 1x1 convolution from
the top level's features to class logits per pixel (voxel). What differs is how a block
and a resampling step compute (see each file); they are built so that the two networks have
the same parameters, tensor for tensor in count:

- a block of the iUNet, an additive coupling at ``C`` channels, holds two
  :class:`ResidualFunction` of ``C / 2 -> C / 2 -> C / 2`` channels; a block of the twin, a
  residual block, one of ``C -> C / 2 -> C``: ``2 (k C^2 / 2)`` weights either way (``k`` =
  9 in 2D, 27 in 3D; no biases, parameter-free normalisation);
- a resampling step of either holds one ``sigma x sigma`` matrix per channel of the part
  that goes down (``sigma = 2**dim``): an orthogonal kernel's generator in the iUNet, a
  grouped strided convolution's kernel in the twin, both starting as the Haar wavelet.

The last convolution of every residual function starts at zero (so every block starts as
the identity), and the twin's resampling starts as the iUNet's: a fresh twin computes the
same function as a fresh iUNet, and training decides what differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "ResidualFunction",
    "SegmentationHead",
    "UNetLayout",
    "check_volume",
    "conv_nd",
    "grouped_resampling_weight",
    "haar_kernel",
    "lift",
    "lift_inverse",
]


def conv_nd(dim: int) -> type[nn.Conv1d] | type[nn.Conv2d] | type[nn.Conv3d]:
    """``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` for ``dim`` spatial axes."""
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dim - 1]


@dataclass(frozen=True)
class UNetLayout:
    """The channels of a U-Net: ``channels[i]`` at level ``i`` (the bottom last), and the
    ``(skip, rest)`` cut of each level above the bottom."""

    dim: int
    channels: tuple[int, ...]
    splits: tuple[tuple[int, int], ...]

    @classmethod
    def doubling(cls, width: int, levels: int, dim: int) -> UNetLayout:
        """Channels doubling per level from ``width``: ``2 C / 2**dim`` of each level's ``C``
        go down (half in 2D, a quarter in 3D), the rest is the skip.

        Raises:
            ValueError: ``dim`` not 2 or 3, ``levels`` < 1, or ``width`` not divisible as the
                cuts need (the message says by what).
        """
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 (images) or 3 (volumes), got {dim!r}")
        if levels < 1:
            raise ValueError(f"levels must be >= 1 (levels above the bottom), got {levels}")
        sigma = 2**dim
        # every cut (the part that goes down: 2 C / sigma) and every coupling's halves
        # must be whole: width divisible by sigma / 2, and by 2 for the halves
        need = max(sigma // 2, 2)
        if width < need or width % need:
            raise ValueError(
                f"width must be a multiple of {need} for dim={dim} (a level sends 2/{sigma} "
                f"of its channels down, and couplings halve them), got {width}"
            )
        channels = [width * 2**i for i in range(levels + 1)]
        rest = [2 * c // sigma for c in channels[:-1]]
        return cls(dim, tuple(channels), tuple((c - r, r) for c, r in zip(channels, rest)))

    @property
    def levels(self) -> int:
        """Levels above the bottom."""
        return len(self.splits)

    @property
    def reduction(self) -> int:
        """How much the bottom is smaller than the input along each axis."""
        return 2**self.levels


class ResidualFunction(nn.Sequential):
    """``conv3 -> GroupNorm -> LeakyReLU -> conv3``: ``in -> mid -> out`` channels.

    No biases, a GroupNorm without affine parameters (one group: it normalises over the
    channels and positions of each sample, as iUNets do, so it is the same function in train
    and eval mode), and the last convolution zero-initialised: a block built from it starts
    as the identity. Weights: ``k (in mid + mid out)`` for ``k`` taps per kernel.
    """

    def __init__(self, dim: int, in_channels: int, mid_channels: int, out_channels: int) -> None:
        conv = conv_nd(dim)
        first = conv(in_channels, mid_channels, 3, padding=1, bias=False)
        last = conv(mid_channels, out_channels, 3, padding=1, bias=False)
        nn.init.kaiming_normal_(first.weight, a=0.01, mode="fan_out", nonlinearity="leaky_relu")
        nn.init.zeros_(last.weight)
        super().__init__(
            first, nn.GroupNorm(1, mid_channels, affine=False), nn.LeakyReLU(0.01), last
        )


def haar_kernel(dim: int) -> Tensor:
    """The orthonormal Haar matrix of a ``2 x ... x 2`` patch, ``(2**dim, 2**dim)``, row
    ``k`` band ``k`` (the order of :class:`invertible_core.HaarDownsampling`)."""
    haar = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2.0)
    matrix = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(dim):
        matrix = torch.kron(matrix, haar)
    return matrix


def lift(x: Tensor, width: int) -> Tensor:
    """The injective stem: ``x``'s channels repeated (and cut) to ``width`` channels.

    Copies rather than zeros: a channel of zeros is rebuilt only up to rounding by an
    invertible network, and a normalisation would amplify that noise (see the i-RevNet's
    ``stem_padding``)."""
    copies = -(-width // x.shape[1])
    return x.repeat(1, copies, *([1] * (x.dim() - 2)))[:, :width]


def lift_inverse(y: Tensor, in_channels: int) -> Tensor:
    """The lift's left inverse: the first ``in_channels`` channels."""
    return y[:, :in_channels]


class SegmentationHead(nn.Module):
    """A 1x1 convolution from features to class logits per position."""

    def __init__(self, dim: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = conv_nd(dim)(in_channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)  # type: ignore[no-any-return]


def check_volume(x: Tensor, in_channels: int, layout: UNetLayout) -> None:
    """A ``ValueError`` unless ``x`` is ``(batch, in_channels, *spatial)`` with ``dim``
    spatial sizes divisible by ``2**levels``."""
    dim = layout.dim
    names = "height, width" if dim == 2 else "depth, height, width"
    if x.dim() != dim + 2 or x.shape[1] != in_channels:
        raise ValueError(
            f"expected a batch of shape (batch, {in_channels}, {names}), got {tuple(x.shape)}; "
            "build the model with in_channels= and dim= your data's"
        )
    if any(s % layout.reduction for s in x.shape[2:]):
        raise ValueError(
            f"every spatial size must be divisible by {layout.reduction} (2 per level, "
            f"{layout.levels} levels), got {tuple(x.shape)}; pad or crop the input"
        )


def grouped_resampling_weight(channels: int, dim: int) -> Tensor:
    """The Haar kernel for a grouped (transposed) convolution: ``(channels * sigma, 1, 2,
    ..., 2)``, kernel row ``k`` of every channel made into a ``2 x ... x 2`` filter."""
    sigma = 2**dim
    rows = haar_kernel(dim).to(torch.get_default_dtype())
    return rows.reshape(sigma, 1, *([2] * dim)).repeat(channels, 1, *([1] * dim))
