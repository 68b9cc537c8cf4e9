"""The plain twin of the iUNet: a residual U-Net with the same layout and parameters.

What the memory of an iUNet should be compared with: the same U (lift, levels, skips,
channels doubling per level, a 1x1 head), computed the ordinary way, so plain autograd
stores every block's activations and the memory grows with ``depth``. Each block is a
residual block ``x + R(x)`` with ``R`` a
:class:`~invertible_models.unet_blocks.ResidualFunction` of ``C -> C / 2 -> C`` channels
(the weights of the iUNet's coupling at ``C``: two functions of ``C / 2 -> C / 2 -> C /
2``); the downsampling is a grouped strided convolution with a ``2 x ... x 2`` kernel per
output channel, the upsampling the grouped transposed one (the parameters of the iUNet's
orthogonal resampling: a ``sigma x sigma`` matrix per channel), both unconstrained and
starting as the Haar wavelet. Skips are concatenated, as in the iUNet. A fresh twin
computes the same function as a fresh :class:`~invertible_models.iunet.IUNet` of the same
arguments (every block starts as the identity); a test checks both that and the equal
parameter count.

``memory_saving`` is the zoo's switch (as a ResNet's, off by default as timm has it): on,
each block is recomputed in backward with ``torch.utils.checkpoint`` (its input stored; still
growing with depth); off, plain autograd, the twin the iUNet's memory is measured against.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from invertible_core import CheckpointableModule, MemorySaving
from invertible_models.registry import register_model
from invertible_models.unet_blocks import (
    ResidualFunction,
    SegmentationHead,
    UNetLayout,
    check_volume,
    conv_nd,
    grouped_resampling_weight,
    lift,
)

__all__ = ["UNet", "UNetBlock", "unet", "unet3d"]


class UNetBlock(CheckpointableModule):
    """``x + R(x)``, ``R`` a residual function ``C -> C / 2 -> C``; checkpointable."""

    def __init__(self, dim: int, channels: int) -> None:
        super().__init__()
        self.residual = ResidualFunction(dim, channels, channels // 2, channels)

    def compute(self, x: Tensor) -> Tensor:
        return x + self.residual(x)


def _downsampling(dim: int, channels: int) -> nn.Module:
    conv = conv_nd(dim)(channels, channels * 2**dim, 2, stride=2, groups=channels, bias=False)
    with torch.no_grad():
        conv.weight.copy_(grouped_resampling_weight(channels, dim))
    return conv


def _upsampling(dim: int, channels: int) -> nn.Module:
    transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dim - 1]
    conv = transposed(channels * 2**dim, channels, 2, stride=2, groups=channels, bias=False)
    with torch.no_grad():
        conv.weight.copy_(grouped_resampling_weight(channels, dim))
    return conv


class UNet(MemorySaving, nn.Module):
    """A residual U-Net, the plain twin of :class:`~invertible_models.iunet.IUNet`.

    Takes :class:`~invertible_models.iunet.IUNet`'s arguments (``in_channels``,
    ``num_classes``, ``dim``, ``depth``, ``width``, ``levels``) with the same meaning;
    ``method`` is accepted for the same signature and ignored (nothing here is orthogonal).
    ``memory_saving`` is the zoo's switch with a plain network's default, as timm has it: off
    (plain autograd, what the iUNet is compared with); on, every block is checkpointed.
    """

    spatial_dims: int

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        *,
        dim: int = 2,
        depth: int = 2,
        width: int = 16,
        levels: int = 3,
        method: str = "exp",
        memory_saving: bool = False,
    ) -> None:
        super().__init__()
        del method
        layout = UNetLayout.doubling(width, levels, dim)
        if depth < 1:
            raise ValueError(f"depth must be >= 1 (blocks per level and path), got {depth}")
        if not 1 <= in_channels <= width:
            raise ValueError(f"in_channels must be 1..width={width}, got {in_channels}")
        self.layout = layout
        self.in_channels, self.num_classes = in_channels, num_classes
        self.spatial_dims, self.depth, self.width = dim, depth, width
        channels = layout.channels

        def blocks(c: int, n: int) -> nn.Sequential:
            return nn.Sequential(*(UNetBlock(dim, c) for _ in range(n)))

        levels_range = range(layout.levels)
        self.down = nn.ModuleList(blocks(channels[i], depth) for i in levels_range)
        self.bottom = blocks(channels[-1], 2 * depth)
        self.up = nn.ModuleList(blocks(channels[i], depth) for i in levels_range)
        self.downsample = nn.ModuleList(_downsampling(dim, r) for _, r in layout.splits)
        self.upsample = nn.ModuleList(_upsampling(dim, r) for _, r in layout.splits)
        self.head = SegmentationHead(dim, width, num_classes)
        self.memory_saving = memory_saving

    def features(self, x: Tensor) -> Tensor:
        """The top level's features ``(batch, width, *spatial)``."""
        check_volume(x, self.in_channels, self.layout)
        h = lift(x, self.width)
        skips = []
        for level, (skip, rest) in enumerate(self.layout.splits):
            h = self.down[level](h)
            kept, h = h.split((skip, rest), dim=1)
            skips.append(kept)
            h = self.downsample[level](h)
        h = self.bottom(h)
        for level in reversed(range(self.layout.levels)):
            h = torch.cat((skips.pop(), self.upsample[level](h)), dim=1)
            h = self.up[level](h)
        return h

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(batch, num_classes, *spatial)``."""
        return self.head(self.features(x))  # type: ignore[no-any-return]


@register_model
def unet(num_classes: int = 2, memory_saving: bool = False, **options: Any) -> UNet:
    """The plain twin of ``iunet``, with its arguments and its parameter count."""
    return UNet(num_classes=num_classes, memory_saving=memory_saving, **options)


@register_model
def unet3d(num_classes: int = 2, memory_saving: bool = False, **options: Any) -> UNet:
    """The plain twin of ``iunet3d``."""
    config: dict[str, Any] = {"dim": 3, "width": 8, **options}
    return UNet(num_classes=num_classes, memory_saving=memory_saving, **config)
