"""i-RevNet (Jacobsen, Smeulders and Oyallon, ICLR 2018): a classifier that discards nothing.

A RevNet is reversible only inside its stages: its stem and its strided transition blocks
throw information away. An i-RevNet is invertible from the image to the final features,
so the input can be rebuilt from what the classifier sees (``features_inverse``):

* an *injective stem*: optionally a space-to-depth (``stem_downsampling``), then channels
  appended up to the first stage's width: zeros (``stem_padding="zeros"``, the paper's
  injective padding, which its CIFAR model uses to turn 3 channels into 2 x 16) or copies
  of the image channels (``"repeat"``). The inverse keeps the first copy and drops the rest;
* *stages of additive couplings* (``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``) whose ``F`` and
  ``G`` are the paper's bottleneck: [BN, ReLU] -> conv3x3 (to 1/``mult`` of the width) ->
  BN -> ReLU -> conv3x3 -> dropout -> BN -> ReLU -> conv3x3 (back to the width);
* between stages an :class:`~invertible_core.InvertibleDownsampling` (space-to-depth by 2)
  instead of a strided block: 4x the channels at half the resolution, every value kept.

One i-RevNet block of the paper transforms one half and swaps the halves
(``(x1, x2) -> (x2, x1 + F(x2))``); an additive coupling is two such blocks, so the paper's
18 blocks per stage are 9 couplings here. The paper's stride-2 block applies a strided
``F`` next to the downsampling; here the downsampling is a layer of its own and ``F``
always works at the stage's resolution.

Everything from the stem's output to the final features is ONE
:class:`~invertible_core.ReversibleSequence` (couplings and downsamplings), which keeps
only its output for backward: training memory is flat in depth. The head (BatchNorm,
ReLU, global average pooling, linear) works on the final features; it is the only part
that is not invertible, and it sits after them.

``fixed_point_bits`` (default 16, as the RevNets) puts the couplings' sums on a grid of
``2**-16``: the chain's input is rounded to it, and then ``features_inverse(features(x))``
returns that rounded input bit for bit (and memory saving changes no gradient). With
``fixed_point_bits=None`` the reconstruction is exact up to float rounding, amplified by
the inverse's conditioning, with one trap that zero padding sets: a padded half is exactly
zero in the forward pass but rebuilt only up to rounding, and BatchNorm with batch
statistics (train mode) scales a channel of pure rounding noise to unit variance: the
reconstruction in train mode goes wrong, and with it the memory-saving gradients (the core's
drift check warns). In float arithmetic use ``stem_padding="repeat"``, whose stem gives
every channel real data (measured in ``docs/results/models.md``). The chain re-rounds its state
after each downsampling (a no-op on values already on the grid) until the core's
``InvertibleDownsampling`` declares ``preserves_grid``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch.nn.functional as F
from torch import Tensor, nn

from invertible_core import (
    AdditiveCoupling,
    InvertibleDownsampling,
    MemorySaving,
    ReversibleSequence,
)
from invertible_models.blocks import Head, conv3x3, init_weights
from invertible_models.registry import register_model

__all__ = ["IRevNet", "IRevNetBottleneck", "irevnet", "irevnet_block"]

StemPadding = Literal["zeros", "repeat"]

#: Fractional bits of the couplings' fixed-point grid by default (as the RevNets').
DEFAULT_FIXED_POINT_BITS = 16


class IRevNetBottleneck(nn.Module):
    """The residual function ``F`` of an i-RevNet coupling, at half the stage's width.

    [BN, ReLU] -> conv3x3 (``channels -> channels // mult``) -> BN -> ReLU -> conv3x3 ->
    dropout -> BN -> ReLU -> conv3x3 (``-> channels``); output shaped like the input.

    Args:
        channels: channels of the half it reads and of the half it adds to.
        mult: bottleneck reduction (the paper's 4).
        preactivate: start with BN + ReLU; the network's very first ``F`` omits them (the
            paper's ``first`` block), since its input is the raw padded image.
        dropout: dropout rate before the last BN (the paper's CIFAR model); the memory-saving
            recompute draws the same masks.
    """

    def __init__(
        self, channels: int, mult: int = 4, preactivate: bool = True, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if mult < 1 or channels % mult:
            raise ValueError(
                f"an i-RevNet bottleneck of {channels} channels needs mult dividing it, got "
                f"mult={mult}; pick a stage width divisible by 2 * mult"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout}")
        hidden = channels // mult
        layers: list[nn.Module] = []
        if preactivate:
            layers += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        layers += [
            conv3x3(channels, hidden),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            conv3x3(hidden, hidden),
            nn.Dropout(dropout),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            conv3x3(hidden, channels),
        ]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)  # type: ignore[no-any-return]


def irevnet_block(
    channels: int,
    mult: int = 4,
    preactivate: bool = True,
    dropout: float = 0.0,
    fixed_point_bits: int | None = DEFAULT_FIXED_POINT_BITS,
) -> AdditiveCoupling:
    """An i-RevNet coupling over a ``channels``-wide map: ``F`` and ``G`` at half the width.

    ``preactivate=False`` drops the leading BN + ReLU of ``F`` only (the network's first
    coupling: ``G`` always reads a sum, which it normalises).
    """
    if channels % 2:
        raise ValueError(f"an i-RevNet coupling splits its channels in two, got {channels}")
    half = channels // 2
    return AdditiveCoupling(
        IRevNetBottleneck(half, mult, preactivate, dropout),
        IRevNetBottleneck(half, mult, True, dropout),
        fixed_point_bits=fixed_point_bits,
    )


class IRevNet(MemorySaving, nn.Module):
    """An invertible network: injective stem, stages of couplings and downsamplings, head.

    Args:
        stage_blocks: couplings per stage (each coupling is two of the paper's blocks).
        width: channels of the first stage (both halves); each later stage has 4x as many
            (the downsampling's), at half the resolution.
        num_classes: outputs of the classifier.
        in_channels: image channels.
        stem_downsampling: space-to-depth factor of the stem (1: none, as the paper's CIFAR
            model; 2: its bijective ImageNet model). The stem's output must have at most
            ``width`` channels; ``stem_padding`` fills the rest.
        stem_padding: ``"zeros"`` (the paper's injective padding) or ``"repeat"`` (the
            stem's channels again and again, cut at ``width``).
        mult: bottleneck reduction inside ``F`` and ``G``.
        dropout: dropout inside ``F`` and ``G``.
        memory_saving: the zoo's switch: the reversible chain rebuilds its activations in
            backward instead of storing them; settable later, no ``state_dict`` change.
        fixed_point_bits: grid of the couplings' sums (``None``: plain float; see the module
            docstring).
        anchor_every: keep the exact activation every this many chain blocks (the core's
            drift control; not needed with ``fixed_point_bits``).

    Input height and width must be divisible by ``stem_downsampling * 2 ** (stages - 1)``.
    """

    def __init__(
        self,
        stage_blocks: Sequence[int] = (9, 9, 9),
        width: int = 32,
        num_classes: int = 10,
        *,
        in_channels: int = 3,
        stem_downsampling: int = 1,
        stem_padding: StemPadding = "zeros",
        mult: int = 4,
        dropout: float = 0.0,
        memory_saving: bool = True,
        fixed_point_bits: int | None = DEFAULT_FIXED_POINT_BITS,
        anchor_every: int = 0,
    ) -> None:
        super().__init__()
        stage_blocks = tuple(stage_blocks)
        if not stage_blocks or any(n < 1 for n in stage_blocks):
            raise ValueError(f"stage_blocks must be one or more counts >= 1, got {stage_blocks}")
        if stem_downsampling < 1:
            raise ValueError(f"stem_downsampling must be >= 1, got {stem_downsampling}")
        stem_channels = in_channels * stem_downsampling**2
        if stem_channels > width:
            raise ValueError(
                f"the stem gives {stem_channels} channels ({in_channels} x "
                f"{stem_downsampling}^2), more than width={width}; raise width to at least "
                f"{stem_channels} or lower stem_downsampling"
            )
        if stem_padding not in get_args(StemPadding):
            raise ValueError(f"stem_padding must be 'zeros' or 'repeat', got {stem_padding!r}")
        self.in_channels = in_channels
        self.stem_padding: StemPadding = stem_padding
        self.stem_downsampling = stem_downsampling
        self.stem_channels = stem_channels
        self.width = width
        blocks: list[nn.Module] = []
        channels = width
        for stage, count in enumerate(stage_blocks):
            if stage > 0:
                blocks.append(InvertibleDownsampling(2))
                channels *= 4
            blocks += [
                irevnet_block(channels, mult, stage > 0 or i > 0, dropout, fixed_point_bits)
                for i in range(count)
            ]
        self.blocks = ReversibleSequence(*blocks, anchor_every=anchor_every)
        self.reduction = stem_downsampling * 2 ** (len(stage_blocks) - 1)
        self.num_features = channels
        self.head = Head(channels, num_classes)
        self.memory_saving = memory_saving
        init_weights(self)

    def _check_images(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected images of shape (batch, {self.in_channels}, height, width), got "
                f"{tuple(x.shape)}; build the model with in_channels= your image channels"
            )
        if x.shape[2] % self.reduction or x.shape[3] % self.reduction:
            raise ValueError(
                f"height and width must be divisible by {self.reduction} (the stem's and the "
                f"stages' downsampling), got images of shape {tuple(x.shape)}"
            )

    def stem(self, x: Tensor) -> Tensor:
        """The injective stem: space-to-depth, then channels up to ``width`` (zeros or copies)."""
        self._check_images(x)
        if self.stem_downsampling > 1:
            x = F.pixel_unshuffle(x, self.stem_downsampling)
        if self.stem_padding == "repeat":
            copies = -(-self.width // self.stem_channels)
            return x.repeat(1, copies, 1, 1)[:, : self.width]
        return F.pad(x, (0, 0, 0, 0, 0, self.width - self.stem_channels))

    def stem_inverse(self, y: Tensor) -> Tensor:
        """The stem's left inverse: drop the padded channels, then depth-to-space."""
        x = y[:, : self.stem_channels]
        if self.stem_downsampling > 1:
            x = F.pixel_shuffle(x, self.stem_downsampling)
        return x

    def features(self, x: Tensor) -> Tensor:
        """The final invertible features ``(batch, num_features, H / r, W / r)``."""
        return self.blocks(self.stem(x))

    def features_inverse(self, z: Tensor) -> Tensor:
        """The image whose features are ``z``: ``features_inverse(features(x)) == x``.

        Exact up to float rounding; with ``fixed_point_bits`` bit-exact, to ``x`` rounded to
        the grid (:func:`invertible_core.round_to_grid`). Features that did not come from an
        image (edited ones) give the image of their non-padded part. In train mode dropout
        draws other masks here than in :meth:`features`, so only a model without dropout
        (or in eval mode) is undone exactly.
        """
        if z.dim() != 4 or z.shape[1] != self.num_features:
            raise ValueError(
                f"expected features of shape (batch, {self.num_features}, height, width), "
                f"got {tuple(z.shape)}"
            )
        return self.stem_inverse(self.blocks.inverse(z))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits of shape ``(batch, num_classes)``."""
        return self.head(self.features(x))


@register_model
def irevnet(num_classes: int = 10, memory_saving: bool = True, **options: Any) -> IRevNet:
    """The i-RevNet of the paper's CIFAR code: 9, 9, 9 couplings (18, 18, 18 of its blocks),
    halves of 16, 64, 256 channels at 32, 16, 8 pixels, injective padding 3 -> 32 channels."""
    config: dict[str, Any] = {"stage_blocks": (9, 9, 9), "width": 32, **options}
    return IRevNet(num_classes=num_classes, memory_saving=memory_saving, **config)
