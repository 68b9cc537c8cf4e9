"""Invertible downsampling: trade resolution for channels without losing a single value.

A fully invertible network (i-RevNet, Glow, iUNets) cannot pool or use strided
convolutions, which discard information. Instead it reshapes: both layers here turn an
input of shape ``(B, C, *S)`` with one, two or three spatial axes ``S`` (a signal
``(L,)``, an image ``(H, W)``, a volume ``(D, H, W)``) into ``(B, C * prod(f), *S / f)``,
keeping every value. ``factor`` is an int (the same factor on every axis, whatever the
number of axes) or one factor per axis, for anisotropic data: CT volumes whose slices are
thicker than their pixels are wide downsample as ``(1, 2, 2)`` or ``(2, 2, 1)``.

- :class:`InvertibleDownsampling` (i-RevNet's space-to-depth) moves each ``f1 x f2 ...``
  patch into the channels (:func:`torch.nn.functional.pixel_unshuffle`'s order for
  images): a pure permutation of the values, so forward and inverse are bit-exact.
- :class:`HaarDownsampling` applies the orthonormal Haar wavelet to each patch of each
  channel (factor 2 on the axes it transforms, 1 on the others): an average band and the
  detail bands. Networks that factor out variables at several scales (Glow-like flows) see
  the low-pass signal in the first ``C`` channels. Its inverse is its transpose, exact up
  to float rounding.

Both maps are orthogonal, so ``log|det J| = 0`` and they cost no more than a copy. The
learnable kind, an orthogonal kernel per channel, is
:class:`~invertible_core.OrthogonalDownsampling`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from invertible_core._layer import InvertibleLayer, zero_logdet

__all__ = [
    "Factor",
    "HaarDownsampling",
    "InvertibleDownsampling",
    "check_factor",
    "depth_to_space",
    "space_to_depth",
    "spatial_factors",
]

#: a resampling factor: the same on every spatial axis, or one per axis
Factor = int | tuple[int, ...]

_AXES = "1 to 3 spatial axes: (batch, channels, length), (batch, channels, height, width) or (batch, channels, depth, height, width)"


def check_factor(factor: object, layer: str, dims: int | None = None) -> Factor:
    """``factor`` if it is an int >= 1 or a tuple of 1 to 3 of them (``dims`` long, if
    given); otherwise a ``ValueError`` that names the layer and the value."""
    if isinstance(factor, list):
        factor = tuple(factor)
    values = factor if isinstance(factor, tuple) else (factor,)
    if not values or any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in values):
        raise ValueError(
            f"{layer}: factor must be an int >= 1 or one such int per spatial axis, got {factor!r}"
        )
    if isinstance(factor, tuple):
        if not 1 <= len(factor) <= 3:
            raise ValueError(
                f"{layer}: factor {factor} has {len(factor)} entries; give one per spatial axis "
                "(1 to 3 axes), or an int for all of them"
            )
        if dims is not None and len(factor) != dims:
            raise ValueError(
                f"{layer}: factor {factor} has {len(factor)} entries for {dims}-dimensional "
                f"data; give {dims} factors, one per spatial axis, or an int for all of them"
            )
    return factor  # type: ignore[return-value]


def spatial_factors(x: Tensor, factor: Factor, layer: str, direction: str) -> tuple[int, ...]:
    """One factor per spatial axis of ``x`` (batch, channels, 1 to 3 spatial axes); a
    ``ValueError`` that says what is wrong with ``x``'s shape for this ``factor``."""
    shape = tuple(x.shape)
    if not 3 <= x.dim() <= 5:
        raise ValueError(f"{layer}.{direction} expects an input with {_AXES}; got shape {shape}")
    axes = x.dim() - 2
    if isinstance(factor, int):
        return (factor,) * axes
    if len(factor) != axes:
        raise ValueError(
            f"{layer} was built with factor={factor}, one per axis of {len(factor)}-dimensional "
            f"data, but got an input of shape {shape} with {axes} spatial axes"
        )
    return factor


def space_to_depth(x: Tensor, factors: tuple[int, ...]) -> Tensor:
    """``(B, C, *S) -> (B, C * prod(factors), *S / factors)``: channel ``c * prod(f) + k``
    holds the values at offset ``k`` (row-major over the axes) of each patch of channel
    ``c``; :func:`torch.nn.functional.pixel_unshuffle` for images. A permutation."""
    batch, channels, *sizes = x.shape
    axes = len(sizes)
    split = [batch, channels]
    for size, f in zip(sizes, factors):
        split += [size // f, f]
    # dims of the split view: 0 batch, 1 channels, 2 + 2k the k-th coarse axis, 3 + 2k its offset
    order = [0, 1, *(3 + 2 * k for k in range(axes)), *(2 + 2 * k for k in range(axes))]
    coarse = [size // f for size, f in zip(sizes, factors)]
    return x.reshape(split).permute(order).reshape(batch, channels * math.prod(factors), *coarse)


def depth_to_space(y: Tensor, factors: tuple[int, ...]) -> Tensor:
    """The inverse of :func:`space_to_depth`: ``(B, C * prod(f), *S) -> (B, C, *S * f)``."""
    batch, grouped, *coarse = y.shape
    axes = len(coarse)
    channels = grouped // math.prod(factors)
    # dims of the view: 0 batch, 1 channels, 2 + k the k-th offset, 2 + axes + k the k-th coarse axis
    order = [0, 1]
    for k in range(axes):
        order += [2 + axes + k, 2 + k]
    fine = [size * f for size, f in zip(coarse, factors)]
    return (
        y.reshape(batch, channels, *factors, *coarse).permute(order).reshape(batch, channels, *fine)
    )


def check_divisible(x: Tensor, factors: tuple[int, ...], layer: str) -> None:
    """A ``ValueError`` unless every spatial size of ``x`` is divisible by its factor."""
    if any(size % f for size, f in zip(x.shape[2:], factors)):
        raise ValueError(
            f"{layer} needs every spatial size divisible by its factor {factors}, got an input "
            f"of shape {tuple(x.shape)}; pad or crop it to a multiple first"
        )


def check_grouped_channels(y: Tensor, groups: int, layer: str) -> None:
    """A ``ValueError`` unless ``y``'s channels are a multiple of ``groups``."""
    if y.shape[1] % groups:
        raise ValueError(
            f"{layer}.inverse needs a channel count divisible by {groups} (the forward "
            f"multiplies channels by {groups}), got an input of shape {tuple(y.shape)}"
        )


class InvertibleDownsampling(InvertibleLayer):
    """i-RevNet's invertible downsampling (space-to-depth), in 1D, 2D and 3D.

    ``(B, C, *S) -> (B, C * prod(f), *S / f)`` for one to three spatial axes ``S``, with
    ``factor`` an int (every axis) or one per axis (``(2, 2, 1)``: a volume halved in depth
    and height only). Output channel ``c * prod(f) + k`` holds the values at offset ``k``
    (row-major over the axes) of each patch of input channel ``c``: for images
    ``c * f * f + i * f + j``, the order of :func:`torch.nn.functional.pixel_unshuffle`.
    Forward and inverse are permutations: bit-exact, no parameters, ``log|det J| = 0``.
    Each spatial size must be divisible by its factor. Side inputs (``*args``,
    ``**kwargs``) are accepted and ignored.
    """

    #: only moves values around: a state on a fixed-point grid stays on it
    preserves_grid = True

    def __init__(self, factor: Factor = 2) -> None:
        super().__init__()
        self.factor = check_factor(factor, "InvertibleDownsampling")

    def _forward(self, x: Tensor) -> Tensor:
        name = type(self).__name__
        factors = spatial_factors(x, self.factor, name, "forward")
        check_divisible(x, factors, name)
        return space_to_depth(x, factors)

    def _inverse(self, y: Tensor) -> Tensor:
        name = type(self).__name__
        factors = spatial_factors(y, self.factor, name, "inverse")
        check_grouped_channels(y, math.prod(factors), name)
        return depth_to_space(y, factors)

    def _logdet(self, x: Tensor) -> Tensor:
        return zero_logdet(x)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class HaarDownsampling(InvertibleLayer):
    """The orthonormal Haar wavelet per channel, in 1D, 2D and 3D.

    ``factor`` is 2 (every spatial axis) or one factor per axis, each 1 (left alone) or 2
    (transformed): ``(2, 2, 1)`` halves a volume in depth and height. With ``m`` axes
    transformed, each channel becomes ``2**m`` bands: the patch's values are combined by the
    Kronecker product of the 1D Haar matrix ``[[1, 1], [1, -1]] / sqrt(2)`` per axis. Bands
    are ordered band by band (channels ``[b C, (b + 1) C)`` hold band ``b``), with ``b`` the
    row-major index of the detail bits of the transformed axes: band 0 is the average (a
    low-pass signal, scaled by ``2**(m / 2)``). For images ``[[a, b], [c, d]]``::

        average   (a + b + c + d) / 2       across width   (a - b + c - d) / 2
        across height (a + b - c - d) / 2   diagonal       (a - b - c + d) / 2

    The map of each patch is orthonormal and symmetric, so the inverse applies the same
    map: ``log|det J| = 0``, and the round trip is exact up to float rounding. No
    parameters; each transformed size must be even. Side inputs (``*args``, ``**kwargs``)
    are accepted and ignored.
    """

    def __init__(self, factor: Factor = 2) -> None:
        super().__init__()
        factor = check_factor(factor, "HaarDownsampling")
        values = factor if isinstance(factor, tuple) else (factor,)
        if any(f not in (1, 2) for f in values) or (isinstance(factor, int) and factor != 2):
            raise ValueError(
                f"HaarDownsampling: factor must be 2 or one factor per axis, each 1 or 2 (the "
                f"Haar wavelet halves an axis), got {factor!r}; for other factors use "
                "InvertibleDownsampling or OrthogonalDownsampling"
            )
        self.factor: Factor = factor

    def _forward(self, x: Tensor) -> Tensor:
        name = type(self).__name__
        factors = spatial_factors(x, self.factor, name, "forward")
        check_divisible(x, factors, name)
        batch, channels, *sizes = x.shape
        axes = len(factors)
        patches = space_to_depth(x, factors).unflatten(1, (channels, *factors))
        bands = _butterflies(patches, factors)  # (B, C, f1, ..., coarse...)
        coarse = [size // f for size, f in zip(sizes, factors)]
        out = bands.movedim(1, 1 + axes).reshape(batch, channels * math.prod(factors), *coarse)
        return out * _scale(factors)

    def _inverse(self, y: Tensor) -> Tensor:
        name = type(self).__name__
        factors = spatial_factors(y, self.factor, name, "inverse")
        groups = math.prod(factors)
        check_grouped_channels(y, groups, name)
        batch, grouped, *coarse = y.shape
        axes = len(factors)
        bands = y.reshape(batch, *factors, grouped // groups, *coarse).movedim(1 + axes, 1)
        patches = _butterflies(bands, factors) * _scale(factors)  # the matrix is its own inverse
        return depth_to_space(patches.flatten(1, 1 + axes), factors)

    def _logdet(self, x: Tensor) -> Tensor:
        return zero_logdet(x)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


def _butterflies(t: Tensor, factors: tuple[int, ...]) -> Tensor:
    """The unscaled Haar butterfly ``(even + odd, even - odd)`` along each offset axis of
    ``t`` (dims ``2 + k``) whose factor is 2, the last axis first (for images the same sums,
    in the same order, as the 4-point transform ``(a + b) + (c + d)``, ...)."""
    for k in reversed(range(len(factors))):
        if factors[k] == 2:
            even, odd = t.unbind(2 + k)
            t = torch.stack((even + odd, even - odd), dim=2 + k)
    return t


def _scale(factors: tuple[int, ...]) -> float:
    """``2**(-m / 2)`` for ``m`` transformed axes: what makes the butterflies orthonormal."""
    return 2.0 ** (-sum(f == 2 for f in factors) / 2)
