"""The iUNet (Etmann, Ke and Schönlieb, 2020): a fully invertible U-Net for 2D and 3D data.

A U-Net whose every step between the lifted input and the top level's features is
invertible: additive couplings as blocks, learnable orthogonal up- and downsampling
(:class:`invertible_core.OrthogonalDownsampling`, ``OrthogonalUpsampling``, starting as the
Haar wavelet), and a channel split into skip and rest at each level. The U runs through
:class:`invertible_core.ReversibleUNet`: each segment between two joints is one
``ReversibleSequence``, so training keeps the U's state (the segments' outputs) and not the
activations of its blocks, whatever the ``depth`` (blocks per level and path). That is
what lets the paper train a depth-30 3D iUNet in 12% of its plain twin's memory.

Layout (:class:`~invertible_models.unet_blocks.UNetLayout`): channels double per level, the
input lifted to ``width`` channels by repeating its channels (injective; its inverse keeps
the first ``in_channels``), a 1x1 convolution from the features to class logits. The blocks
are ``AdditiveCoupling(F, G)`` with ``F`` and ``G`` a
:class:`~invertible_models.unet_blocks.ResidualFunction` on half the channels; the last
convolution of each starts at zero, so a fresh iUNet is the lift, Haar wavelets down and
their inverses up: the identity on the lifted input.

:meth:`IUNet.features` is invertible, :meth:`IUNet.inverse` undoes it
(``inverse(features(x)) == x`` up to float rounding); ``forward`` returns
``head(features(x))``, logits of shape ``(batch, num_classes, *spatial)``. The plain twin
with the same arguments and parameters is :mod:`invertible_models.unet`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from invertible_core import (
    AdditiveCoupling,
    OrthogonalDownsampling,
    OrthogonalUpsampling,
    ReversibleUNet,
)
from invertible_models.registry import register_model
from invertible_models.unet_blocks import (
    ResidualFunction,
    SegmentationHead,
    UNetLayout,
    check_volume,
    lift,
    lift_inverse,
)

__all__ = ["IUNet", "iunet", "iunet3d", "iunet_coupling"]


def iunet_coupling(dim: int, channels: int) -> AdditiveCoupling:
    """An additive coupling at ``channels``: ``F`` and ``G`` residual functions on halves."""
    half = channels // 2
    return AdditiveCoupling(
        ResidualFunction(dim, half, half, half), ResidualFunction(dim, half, half, half)
    )


class IUNet(nn.Module):
    """A fully invertible U-Net for segmentation of images (``dim=2``) or volumes (``dim=3``).

    Args:
        in_channels: channels of the input (at most ``width``).
        num_classes: logits per position.
        dim: 2 or 3 spatial axes.
        depth: couplings per level on the way down and on the way up (the bottom holds
            ``2 * depth``, as iUNets' layout).
        width: channels at the top level (doubling per level below).
        levels: levels above the bottom; spatial sizes must be divisible by ``2**levels``.
        method: the orthogonal resampling's map, ``'exp'`` or ``'cayley'``.
        memory_saving: rebuild the U's activations in backward (default); ``False`` for
            plain autograd. Settable later; no parameter or ``state_dict`` key changes.
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
        memory_saving: bool = True,
    ) -> None:
        super().__init__()
        layout = UNetLayout.doubling(width, levels, dim)
        if depth < 1:
            raise ValueError(f"depth must be >= 1 (couplings per level and path), got {depth}")
        if not 1 <= in_channels <= width:
            raise ValueError(f"in_channels must be 1..width={width}, got {in_channels}")
        self.layout = layout
        self.in_channels, self.num_classes = in_channels, num_classes
        self.spatial_dims, self.depth, self.width = dim, depth, width
        channels = layout.channels
        rests = [rest for _, rest in layout.splits]

        def couplings(c: int, n: int) -> list[nn.Module]:
            return [iunet_coupling(dim, c) for _ in range(n)]

        self.body = ReversibleUNet(
            down=[couplings(channels[i], depth) for i in range(layout.levels)],
            bottom=couplings(channels[-1], 2 * depth),
            up=[couplings(channels[i], depth) for i in range(layout.levels)],
            downsample=[OrthogonalDownsampling(r, dim=dim, method=method) for r in rests],  # type: ignore[arg-type]
            upsample=[OrthogonalUpsampling(r, dim=dim, method=method) for r in rests],  # type: ignore[arg-type]
            splits=layout.splits,
            memory_saving=memory_saving,
        )
        self.head = SegmentationHead(dim, width, num_classes)

    @property
    def memory_saving(self) -> bool:
        """Whether the U rebuilds its activations in backward."""
        return self.body.memory_saving

    @memory_saving.setter
    def memory_saving(self, value: bool) -> None:
        self.body.memory_saving = value

    def features(self, x: Tensor) -> Tensor:
        """The invertible features ``(batch, width, *spatial)`` of ``x``."""
        check_volume(x, self.in_channels, self.layout)
        return self.body(lift(x, self.width))  # type: ignore[no-any-return]

    def inverse(self, z: Tensor) -> Tensor:
        """The input whose features are ``z``: ``inverse(features(x)) == x`` up to rounding.

        Features that did not come from an input (edited ones) give the input of their
        first ``in_channels`` lifted channels."""
        check_volume(z, self.width, self.layout)
        return lift_inverse(self.body.inverse(z), self.in_channels)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(batch, num_classes, *spatial)``."""
        return self.head(self.features(x))  # type: ignore[no-any-return]


@register_model
def iunet(num_classes: int = 2, memory_saving: bool = True, **options: Any) -> IUNet:
    """A 2D iUNet: 3 levels above the bottom, width 16, 2 couplings per level and path
    (``dim=3`` for volumes, ``depth=30`` for the paper's deepest)."""
    return IUNet(num_classes=num_classes, memory_saving=memory_saving, **options)


@register_model
def iunet3d(num_classes: int = 2, memory_saving: bool = True, **options: Any) -> IUNet:
    """A 3D iUNet for volumes: 3 levels above the bottom, width 8 (8, 16, 32, 64 channels),
    2 couplings per level and path."""
    config: dict[str, Any] = {"dim": 3, "width": 8, **options}
    return IUNet(num_classes=num_classes, memory_saving=memory_saving, **config)
