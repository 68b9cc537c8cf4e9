"""Channel split and concatenation as invertible steps: factor-out and skip paths.

A multi-scale flow (Glow, RealNVP) *factors out* part of its channels at each scale: they
leave the chain as latents while the rest goes on at a lower resolution. A fully invertible
U-Net (iUNets) splits off a *skip* at each level on the way down and concatenates it back
on the way up. Both are the same two steps, each the other's inverse, with nothing to
learn and nothing lost:

- :class:`ChannelSplit`: ``x -> (x_1, ..., x_n)``, the channels cut into parts of the given
  sizes; its inverse concatenates them.
- :class:`ChannelConcat`: ``(x_1, ..., x_n) -> x``; its inverse cuts ``x`` again.

Both are exact (a permutation of no values at all), ``log|det J| = 0``, and follow the
block contract with several tensors (MemCNN's convention, as
:class:`~invertible_core.InvertibleModuleWrapper` takes them): positional tensors are the
invertible ones, side inputs come by keyword and are ignored. The parts of a split are
*views* of its input (no copy): as long as any part is alive, so is the input's memory;
clone a part if the rest must be freed before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from invertible_core._layer import check_channel_dim, check_positive_int

__all__ = ["ChannelConcat", "ChannelSplit"]


def _check_sizes(sizes: Sequence[int], layer: str) -> tuple[int, ...]:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or len(sizes) < 2:
        raise ValueError(
            f"{layer}: sizes must be two or more channel counts (one per part), got {sizes!r}"
        )
    return tuple(check_positive_int(s, "every size", layer) for s in sizes)


class _Cut(nn.Module):
    """What split and concatenation share: the sizes, the cut, and the join."""

    def __init__(self, sizes: Sequence[int], dim: int = 1) -> None:
        super().__init__()
        name = type(self).__name__
        self.sizes = _check_sizes(sizes, name)
        self.dim = check_channel_dim(dim, name)
        self.channels = sum(self.sizes)

    def _cut(self, x: Tensor, direction: str) -> tuple[Tensor, ...]:
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}.{direction} expects a tensor, got {type(x).__name__}")
        if x.dim() < 2 or not -x.dim() <= self.dim < x.dim() or self.dim % x.dim() == 0:
            raise ValueError(
                f"{name}.{direction}: dim={self.dim} is not a channel dimension of an input "
                f"of shape {tuple(x.shape)}"
            )
        if x.shape[self.dim] != self.channels:
            raise ValueError(
                f"{name}.{direction} cuts {self.channels} channels into {self.sizes} along "
                f"dim {self.dim}, but got an input of shape {tuple(x.shape)} with "
                f"{x.shape[self.dim]} there"
            )
        return tuple(torch.split(x, list(self.sizes), dim=self.dim))

    def _join(self, parts: tuple[Tensor, ...], direction: str) -> Tensor:
        name = type(self).__name__
        if len(parts) != len(self.sizes) or not all(isinstance(p, Tensor) for p in parts):
            raise TypeError(
                f"{name}.{direction} expects {len(self.sizes)} tensors (parts of "
                f"{self.sizes} channels), got {len(parts)}: "
                f"{', '.join(type(p).__name__ for p in parts)}"
            )
        got = tuple(
            p.shape[self.dim] if p.dim() > 1 and -p.dim() <= self.dim < p.dim() else -1
            for p in parts
        )
        if got != self.sizes:
            raise ValueError(
                f"{name}.{direction} joins parts of {self.sizes} channels along dim "
                f"{self.dim}, got parts of shapes {[tuple(p.shape) for p in parts]}"
            )
        return torch.cat(parts, dim=self.dim)

    @staticmethod
    def _zero_logdet(t: Tensor) -> Tensor:
        return torch.zeros(t.shape[0], dtype=t.dtype, device=t.device)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, dim={self.dim}"


class ChannelSplit(_Cut):
    """``x -> (x_1, ..., x_n)``: the channels along ``dim`` cut into parts of ``sizes``.

    Args:
        sizes: the channels of each part, two or more (``(skip, rest)`` in a U, ``(latent,
            rest)`` for a flow's factor-out); they must add up to the input's channels.
        dim: the channel dimension (1 for ``(B, C, ...)``, -1 for channels last).

    :meth:`inverse` concatenates the parts; ``log|det J| = 0``. The parts are views of
    ``x``. Side inputs (keywords) are accepted and ignored.
    """

    def forward(self, x: Tensor, /, **side: Any) -> tuple[Tensor, ...]:
        """The parts of ``x``, in order (views)."""
        return self._cut(x, "forward")

    def inverse(self, *parts: Tensor, **side: Any) -> Tensor:
        """The parts concatenated again: ``inverse(*forward(x)) == x``, bit for bit."""
        return self._join(parts, "inverse")

    def forward_with_logdet(self, x: Tensor, /, **side: Any) -> tuple[tuple[Tensor, ...], Tensor]:
        """``(forward(x), zeros)``: a split changes no volume."""
        return self(x), self._zero_logdet(x)

    def inverse_with_logdet(self, *parts: Tensor, **side: Any) -> tuple[Tensor, Tensor]:
        """``(inverse(*parts), zeros)``."""
        x = self.inverse(*parts)
        return x, self._zero_logdet(x)


class ChannelConcat(_Cut):
    """``(x_1, ..., x_n) -> x``: parts of ``sizes`` channels concatenated along ``dim``.

    The inverse of :class:`ChannelSplit` with the same arguments (the up path of a U joins a
    skip and the upsampled rest). :meth:`inverse` cuts ``x`` into the parts again (views);
    ``log|det J| = 0``. Side inputs (keywords) are accepted and ignored.
    """

    def forward(self, *parts: Tensor, **side: Any) -> Tensor:
        """The parts joined along ``dim``."""
        return self._join(parts, "forward")

    def inverse(self, y: Tensor, /, **side: Any) -> tuple[Tensor, ...]:
        """``y`` cut into the parts again (views): ``inverse(forward(*parts)) == parts``."""
        return self._cut(y, "inverse")

    def forward_with_logdet(self, *parts: Tensor, **side: Any) -> tuple[Tensor, Tensor]:
        """``(forward(*parts), zeros)``."""
        y = self(*parts)
        return y, self._zero_logdet(y)

    def inverse_with_logdet(self, y: Tensor, /, **side: Any) -> tuple[tuple[Tensor, ...], Tensor]:
        """``(inverse(y), zeros)``."""
        return self.inverse(y), self._zero_logdet(y)
