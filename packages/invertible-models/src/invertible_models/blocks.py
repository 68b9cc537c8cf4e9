"""The building blocks of the zoo: residual functions, residual blocks, couplings, stem, head.

Every network in this package is pre-activation (He et al., "Identity Mappings in Deep
Residual Networks"): a residual function starts with BatchNorm + ReLU and ends with a
convolution, so the sum ``x + F(x)`` is never squashed. The very first block of a network
receives the stem's already activated output and therefore omits the leading BN + ReLU
(``preactivate=False``).

Two residual functions exist, one per block type:

* :class:`BasicResidual`: [BN, ReLU] -> conv3x3 -> BN -> ReLU -> conv3x3.
* :class:`BottleneckResidual`: [BN, ReLU] -> conv1x1 -> BN -> ReLU -> conv3x3 -> BN -> ReLU
  -> conv1x1, with ``expansion = 4`` output channels per bottleneck channel.

They are used in two ways:

* full width inside a :class:`ResidualBlock` (``x + F(x)``, or ``proj(x) + F(x)`` with a
  1x1 strided conv + BN projection when the block changes shape): the ResNets, and the
  shape-changing blocks of the RevNets, which cannot be reversible;
* at half the channels as the ``Fm`` and ``Gm`` of an additive coupling
  (:func:`reversible_block`): the RevNets' reversible blocks.

Reversible blocks compute on the core's fixed-point grid (``AdditiveCoupling(...,
fixed_point_bits=16)``, :mod:`invertible_core.fixed_point`), so that their inverse is
bit-exact.
The stem, the residual blocks (a ResNet's, a RevNet's transitions) and the ViT blocks are
the core's :class:`~invertible_core.CheckpointableModule`: each has its own switch
``block.checkpointed`` (``torch.utils.checkpoint`` around the block, BatchNorm statistics
updated once), so the memory planner (:func:`~invertible_core.fit_memory_budget`) can
checkpoint some and store others; a model's ``memory_saving`` sets them all.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from invertible_core import AdditiveCoupling, CheckpointableModule

__all__ = [
    "BasicBlock",
    "BasicResidual",
    "BlockType",
    "Bottleneck",
    "BottleneckResidual",
    "Head",
    "ResidualBlock",
    "Stem",
    "StemType",
    "float32_stream",
    "init_weights",
    "residual_function",
    "reversible_block",
]

BlockType = Literal["basic", "bottleneck"]
StemType = Literal["cifar", "imagenet"]


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """A 3x3 convolution with padding 1 and no bias (a BatchNorm follows or precedes it)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """A 1x1 convolution without bias."""
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class BasicResidual(nn.Module):
    """The residual function of a basic block: [BN, ReLU] -> conv3x3 -> BN -> ReLU -> conv3x3.

    Args:
        in_channels: channels of the input.
        channels: channels of both convolutions and of the output (``expansion = 1``).
        stride: stride of the first convolution (2 halves the resolution).
        preactivate: start with BN + ReLU; False for the network's first block, whose
            input is already normalised and activated by the stem.
    """

    expansion = 1

    def __init__(
        self, in_channels: int, channels: int, stride: int = 1, preactivate: bool = True
    ) -> None:
        super().__init__()
        self.bn1: nn.Module = nn.BatchNorm2d(in_channels) if preactivate else nn.Identity()
        self.relu1: nn.Module = nn.ReLU(inplace=True) if preactivate else nn.Identity()
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn2 = nn.BatchNorm2d(channels)
        # In place is safe: the ReLU's input is the BN's fresh output, needed by nobody else.
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu1(self.bn1(x)))
        return self.conv2(self.relu2(self.bn2(out)))


class BottleneckResidual(nn.Module):
    """The residual function of a bottleneck block.

    [BN, ReLU] -> conv1x1 -> BN -> ReLU -> conv3x3 (strided) -> BN -> ReLU -> conv1x1, the
    last convolution widening to ``channels * expansion`` (4x) outputs.

    Args:
        in_channels: channels of the input.
        channels: bottleneck width (the output has ``4 * channels``).
        stride: stride of the 3x3 convolution.
        preactivate: start with BN + ReLU (see :class:`BasicResidual`).
    """

    expansion = 4

    def __init__(
        self, in_channels: int, channels: int, stride: int = 1, preactivate: bool = True
    ) -> None:
        super().__init__()
        self.bn1: nn.Module = nn.BatchNorm2d(in_channels) if preactivate else nn.Identity()
        self.relu1: nn.Module = nn.ReLU(inplace=True) if preactivate else nn.Identity()
        self.conv1 = conv1x1(in_channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(channels, channels, stride)
        self.bn3 = nn.BatchNorm2d(channels)
        self.relu3 = nn.ReLU(inplace=True)
        self.conv3 = conv1x1(channels, channels * self.expansion)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu1(self.bn1(x)))
        out = self.conv2(self.relu2(self.bn2(out)))
        return self.conv3(self.relu3(self.bn3(out)))


def residual_function(block: BlockType) -> type[BasicResidual] | type[BottleneckResidual]:
    """The residual function class for a block type name; ValueError for an unknown name."""
    if block == "basic":
        return BasicResidual
    if block == "bottleneck":
        return BottleneckResidual
    raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")


class ResidualBlock(CheckpointableModule):
    """``shortcut(x) + residual(x)``: an ordinary (non-reversible) pre-activation block.

    The shortcut is the identity when the shape is kept, otherwise a 1x1 strided
    convolution + BatchNorm projection applied to the block's input. A block that changes
    the shape (stride or channels) cannot be inverted, so the RevNets use this block there.
    Checkpointable (``block.checkpointed``, off by default).

    Args:
        residual_cls: :class:`BasicResidual` or :class:`BottleneckResidual`.
        in_channels: channels of the input.
        channels: residual width; the output has ``channels * residual_cls.expansion``.
        stride: spatial stride (2 halves height and width).
        preactivate: start the residual function with BN + ReLU.
    """

    def __init__(
        self,
        residual_cls: type[BasicResidual] | type[BottleneckResidual],
        in_channels: int,
        channels: int,
        stride: int = 1,
        preactivate: bool = True,
    ) -> None:
        super().__init__()
        out_channels = channels * residual_cls.expansion
        self.residual = residual_cls(in_channels, channels, stride, preactivate)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels)
            )
        else:
            self.shortcut = nn.Identity()
        self.out_channels = out_channels

    def compute(self, x: Tensor) -> Tensor:
        return self.shortcut(x) + self.residual(x)


class BasicBlock(ResidualBlock):
    """A pre-activation basic residual block (two 3x3 convolutions)."""

    def __init__(
        self, in_channels: int, channels: int, stride: int = 1, preactivate: bool = True
    ) -> None:
        super().__init__(BasicResidual, in_channels, channels, stride, preactivate)


class Bottleneck(ResidualBlock):
    """A pre-activation bottleneck residual block (1x1, 3x3, 1x1; 4x wider output)."""

    def __init__(
        self, in_channels: int, channels: int, stride: int = 1, preactivate: bool = True
    ) -> None:
        super().__init__(BottleneckResidual, in_channels, channels, stride, preactivate)


def float32_stream(x: Tensor) -> Tensor:
    """``x`` in float32 when it is half precision: the residual stream of a reversible chain.

    Under autocast a convolution's output is bfloat16/float16, and a chain fed with it would
    add and subtract its residuals in 8 (or 11) bits, so rebuilding each input by
    subtraction would drift far (saving changed revnet38's bf16 gradients by 13% this way).
    In float32 the blocks still compute in the autocast dtype; only the sums are float32,
    exact on the fixed-point grid. Costs the chain's kept output in float32 instead of 16 bits.
    """
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def reversible_block(
    residual_cls: type[BasicResidual] | type[BottleneckResidual],
    channels: int,
    preactivate: bool = True,
    fixed_point_bits: int | None = None,
) -> AdditiveCoupling:
    """A reversible block: an additive coupling over a ``channels``-wide feature map.

    ``Fm`` and ``Gm`` are two independently initialised residual functions working on half
    the channels (``y1 = x1 + Fm(x2)``, ``y2 = x2 + Gm(y1)``), so the block keeps its shape
    and can be inverted exactly, which is what lets a sequence of them skip storing
    activations. ``channels`` is the full width (``residual width * expansion``).
    ``fixed_point_bits`` computes the coupling on that fixed-point grid
    (:mod:`invertible_core.fixed_point`), which makes the inverse bit-exact when the block's input lies
    on the same grid.
    """
    half = channels // 2
    if half * 2 != channels or half % residual_cls.expansion:
        raise ValueError(
            f"a reversible {residual_cls.__name__} needs channels divisible by "
            f"{2 * residual_cls.expansion}, got {channels}"
        )
    width = half // residual_cls.expansion
    fm = residual_cls(half, width, 1, preactivate)
    gm = residual_cls(half, width, 1, preactivate)
    return AdditiveCoupling(fm, gm, fixed_point_bits=fixed_point_bits)


class Stem(CheckpointableModule, nn.Sequential):
    """The network's entry: convolution, BatchNorm, ReLU (and a max-pool for ImageNet).

    ``"cifar"``: conv3x3 stride 1, for 32x32 inputs. ``"imagenet"``: conv7x7 stride 2 and
    a 3x3 stride-2 max-pool, which divide the resolution by 4 before the first stage.
    Checkpointable (``stem.checkpointed``): a RevNet checkpoints it while saving memory.
    """

    def __init__(self, in_channels: int, out_channels: int, kind: StemType = "cifar") -> None:
        if kind == "cifar":
            layers: list[nn.Module] = [
                conv3x3(in_channels, out_channels),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
        elif kind == "imagenet":
            layers = [
                nn.Conv2d(in_channels, out_channels, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            ]
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {kind!r}")
        super().__init__(*layers)

    def compute(self, x: Tensor) -> Tensor:
        return nn.Sequential.forward(self, x)  # type: ignore[no-any-return]


class Head(nn.Module):
    """The classifier: BN, ReLU (closing the last pre-activation block), average pool, linear."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn(x))
        return self.fc(torch.flatten(out.mean(dim=(2, 3)), 1))


def init_weights(module: nn.Module) -> None:
    """He-normal initialisation of every convolution (fan-out, ReLU gain); BN to identity.

    Fan-out is the choice of the ResNet and RevNet papers: it keeps the gradients' variance
    constant through the depth, which is what a very deep residual network needs.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
