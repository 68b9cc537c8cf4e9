"""Invertible downsampling: trade resolution for channels without losing a single value.

A fully invertible network (i-RevNet, Glow, iUNets) cannot pool or use strided
convolutions, which discard information. Instead it reshapes: both layers here turn an
input of shape ``(B, C, H, W)`` into ``(B, C * f * f, H / f, W / f)``, keeping every value.

- :class:`InvertibleDownsampling` (i-RevNet's space-to-depth) moves each ``f x f`` patch
  into the channels (:func:`torch.nn.functional.pixel_unshuffle`): a pure permutation of
  the values, so forward and inverse are bit-exact.
- :class:`HaarDownsampling` applies the orthonormal Haar wavelet to each ``2 x 2`` patch of
  each channel: an average band and three detail bands. Networks that factor out
  variables at several scales (Glow-like flows) see the low-pass image in the first ``C``
  channels. Its inverse is its transpose, exact up to one float rounding.

Both maps are orthogonal, so ``log|det J| = 0`` and they cost no more than a copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from invertible_core._layer import InvertibleLayer, check_positive_int, zero_logdet

__all__ = ["HaarDownsampling", "InvertibleDownsampling"]


def _check_image(x: Tensor, layer: str, direction: str) -> None:
    if x.dim() != 4:
        raise ValueError(
            f"{layer}.{direction} expects an input of shape (batch, channels, height, width), "
            f"got shape {tuple(x.shape)}"
        )


def _check_spatial(x: Tensor, factor: int, layer: str) -> None:
    _check_image(x, layer, "forward")
    height, width = x.shape[-2:]
    if height % factor or width % factor:
        raise ValueError(
            f"{layer} needs height and width divisible by {factor}, got an input of shape "
            f"{tuple(x.shape)}; pad or crop it to a multiple of {factor} first"
        )


def _check_channels(y: Tensor, groups: int, layer: str) -> None:
    _check_image(y, layer, "inverse")
    if y.shape[1] % groups:
        raise ValueError(
            f"{layer}.inverse needs a channel count divisible by {groups} (the forward "
            f"multiplies channels by {groups}), got an input of shape {tuple(y.shape)}"
        )


class InvertibleDownsampling(InvertibleLayer):
    """i-RevNet's invertible downsampling (space-to-depth): ``(B, C, H, W) -> (B, C*f*f, H/f, W/f)``.

    Output channel ``c * f * f + i * f + j`` holds the pixels at offset ``(i, j)`` of each
    ``f x f`` patch of input channel ``c`` (the order of
    :func:`torch.nn.functional.pixel_unshuffle`). The inverse is
    :func:`~torch.nn.functional.pixel_shuffle`. Both are permutations: bit-exact, no
    parameters, ``log|det J| = 0``. ``H`` and ``W`` must be divisible by ``factor``.
    Side inputs (``*args``, ``**kwargs``) are accepted and ignored.
    """

    #: only moves values around: a state on a fixed-point grid stays on it
    preserves_grid = True

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = check_positive_int(factor, "factor", "InvertibleDownsampling")

    def _forward(self, x: Tensor) -> Tensor:
        _check_spatial(x, self.factor, type(self).__name__)
        return F.pixel_unshuffle(x, self.factor)

    def _inverse(self, y: Tensor) -> Tensor:
        _check_channels(y, self.factor**2, type(self).__name__)
        return F.pixel_shuffle(y, self.factor)

    def _logdet(self, x: Tensor) -> Tensor:
        return zero_logdet(x)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class HaarDownsampling(InvertibleLayer):
    """The orthonormal Haar wavelet per channel: ``(B, C, H, W) -> (B, 4C, H/2, W/2)``.

    For each ``2 x 2`` patch ``[[a, b], [c, d]]`` of each channel, four bands::

        average   (a + b + c + d) / 2       across width   (a - b + c - d) / 2
        across height (a + b - c - d) / 2   diagonal       (a - b - c + d) / 2

    ordered band by band: channels ``[0, C)`` hold the averages (a half-resolution image,
    scaled by 2), ``[C, 2C)`` the differences across width, ``[2C, 3C)`` across height,
    ``[3C, 4C)`` the diagonal ones. The 4x4 map of each patch is orthonormal and
    symmetric, so the inverse applies the same map to the four bands: ``log|det J| = 0``,
    and the round trip is exact up to one float rounding. No parameters; ``H`` and ``W``
    must be even. Side inputs (``*args``, ``**kwargs``) are accepted and ignored.
    """

    def _forward(self, x: Tensor) -> Tensor:
        _check_spatial(x, 2, type(self).__name__)
        batch, channels, height, width = x.shape
        # pixel_unshuffle puts the patch [[a, b], [c, d]] of channel k at channels 4k..4k+3
        a, b, c, d = (
            F.pixel_unshuffle(x, 2).reshape(batch, channels, 4, height // 2, width // 2).unbind(2)
        )
        return torch.cat(_haar(a, b, c, d), dim=1)

    def _inverse(self, y: Tensor) -> Tensor:
        _check_channels(y, 4, type(self).__name__)
        a, b, c, d = _haar(*y.chunk(4, dim=1))  # the Haar matrix is its own inverse
        return F.pixel_shuffle(torch.stack((a, b, c, d), dim=2).flatten(1, 2), 2)

    def _logdet(self, x: Tensor) -> Tensor:
        return zero_logdet(x)


def _haar(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The 4-point orthonormal Haar transform (a symmetric orthogonal matrix: its own inverse)."""
    s_ab, d_ab, s_cd, d_cd = a + b, a - b, c + d, c - d
    return (s_ab + s_cd) * 0.5, (d_ab + d_cd) * 0.5, (s_ab - s_cd) * 0.5, (d_ab - d_cd) * 0.5
