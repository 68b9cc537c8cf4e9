"""Learnable invertible resampling: an orthogonal kernel per channel (iUNets).

A U-Net changes resolution on the way down and back up. Pooling and strided convolutions
lose information, so a fully invertible U-Net (Etmann et al., "iUNets: Fully invertible
U-Nets with Learnable Up- and Downsampling", 2020) downsamples with a strided convolution
whose kernel is an *orthogonal* ``sigma x sigma`` matrix per channel (``sigma = prod(f)``,
the values of one patch): the patch is rotated into ``sigma`` channels, nothing is lost,
and the inverse is the transposed convolution, the matching upsampling.

:class:`OrthogonalDownsampling` maps ``(B, C, *S) -> (B, C * sigma, *S / f)`` and back;
:class:`OrthogonalUpsampling` is the same map the other way round, with kernels of its
own (a U's up path learns its own). The kernel of channel ``c`` is
``map(W_c - W_c^T) @ B_c``: ``map`` the matrix exponential (``method='exp'``) or the
Cayley transform ``(I - A)^-1 (I + A)`` (``method='cayley'``) of the skew-symmetric part
of the learnable ``W_c``, and ``B_c`` a fixed orthogonal base, by ``init``:

- ``'haar'`` (default): the orthonormal Haar wavelet (factors 1 or 2 per axis), so a fresh
  layer computes :class:`~invertible_core.HaarDownsampling`'s bands, in the channel order
  below; ``'squeeze'``: the identity, a fresh layer is
  :class:`~invertible_core.InvertibleDownsampling` (bit for bit); ``'random'``: a random
  rotation per channel (the exponential of a random skew-symmetric matrix).

``W`` starts at zero, where both maps give the identity exactly, so a fresh layer is its
base exactly. Both maps give orthogonal matrices of determinant 1, so the kernels stay
orthogonal while they learn, in the component of their base. ``W`` has ``sigma**2``
entries per channel, of which ``sigma (sigma - 1) / 2`` are independent (its symmetric
part gets zero gradient), as in the iUNets code.

Output channel ``c * sigma + k`` is band ``k`` of input channel ``c`` (the grouped
convolution's order, the same as :class:`~invertible_core.InvertibleDownsampling`'s).
``log|det J| = 0``; the inverse applies the transposed kernel, exact up to float rounding
(the kernel is orthogonal to rounding: ``|K^T K - I|`` about 1e-7 in float32).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from invertible_core._layer import InvertibleLayer, check_positive_int, zero_logdet
from invertible_core.resampling import (
    Factor,
    check_divisible,
    check_factor,
    check_grouped_channels,
    depth_to_space,
    space_to_depth,
    spatial_factors,
)

__all__ = ["OrthogonalDownsampling", "OrthogonalUpsampling"]

Method = Literal["exp", "cayley"]
Init = Literal["haar", "squeeze", "random"]


def _haar_matrix(factors: tuple[int, ...]) -> Tensor:
    """The orthonormal Haar matrix of a patch (float64): row ``k`` is band ``k``, in
    :class:`~invertible_core.HaarDownsampling`'s order."""
    one = torch.tensor([[1.0]], dtype=torch.float64)
    haar = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2.0)
    matrix = one
    for f in factors:
        matrix = torch.kron(matrix, haar if f == 2 else one)
    return matrix


class _OrthogonalResampling(InvertibleLayer):
    """What the two directions share: the kernels, and the down and up maps."""

    weight: Tensor
    base_generator: Tensor

    def __init__(
        self,
        channels: int,
        dim: int,
        factor: Factor,
        method: Method,
        init: Init,
        seed: int | None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.channels = check_positive_int(channels, "channels", name)
        if isinstance(dim, bool) or dim not in (1, 2, 3):
            raise ValueError(f"{name}: dim must be 1, 2 or 3 (spatial axes), got {dim!r}")
        self.dim = dim
        self.factor = check_factor(factor, name, dims=dim)
        self.factors: tuple[int, ...] = (
            self.factor if isinstance(self.factor, tuple) else (self.factor,) * dim
        )
        if method not in ("exp", "cayley"):
            raise ValueError(f"{name}: method must be 'exp' or 'cayley', got {method!r}")
        self.method: Method = method
        sigma = math.prod(self.factors)
        self.sigma = sigma
        if init == "haar" and any(f not in (1, 2) for f in self.factors):
            raise ValueError(
                f"{name}: init='haar' needs factors of 1 or 2 (the Haar wavelet halves an "
                f"axis), got factor={factor!r}; use init='squeeze' or 'random'"
            )
        if init not in ("haar", "squeeze", "random"):
            raise ValueError(f"{name}: init must be 'haar', 'squeeze' or 'random', got {init!r}")
        self.init: Init = init
        dtype = torch.get_default_dtype()
        if init == "random":
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
                raise TypeError(f"{name}: seed must be an int or None, got {type(seed).__name__}")
            generator = None if seed is None else torch.Generator().manual_seed(seed)
            gaussian = torch.randn(channels, sigma, sigma, generator=generator, dtype=torch.float64)
            # the base is exp of this skew-symmetric matrix, made in the layer's dtype at each
            # call: orthogonal to that dtype's rounding (a stored float32 rotation would not be
            # orthogonal to float64's)
            self.register_buffer("base_generator", (gaussian - gaussian.mT).to(dtype))
        self.weight = nn.Parameter(torch.zeros(channels, sigma, sigma, dtype=dtype))

    def base(self) -> Tensor | None:
        """The fixed orthogonal base the learned rotation starts from (``None``: the identity),
        in the weight's dtype: the Haar matrix, or a random rotation per channel."""
        if self.init == "squeeze":
            return None
        if self.init == "haar":
            haar = _haar_matrix(self.factors)
            return haar.to(dtype=self.weight.dtype, device=self.weight.device)
        return torch.linalg.matrix_exp(self.base_generator)

    def kernel(self) -> Tensor:
        """The orthogonal kernels, ``(channels, sigma, sigma)``: row ``k`` of kernel ``c``
        makes band ``k`` of channel ``c`` from a patch; differentiable in ``weight``."""
        skew = self.weight - self.weight.transpose(-1, -2)
        if self.method == "exp":
            rotation = torch.linalg.matrix_exp(skew)
        else:
            eye = torch.eye(self.sigma, dtype=skew.dtype, device=skew.device)
            rotation = torch.linalg.solve(eye - skew, eye + skew)
        base = self.base()
        return rotation if base is None else rotation @ base

    def _down(self, x: Tensor, direction: str) -> Tensor:
        name = type(self).__name__
        factors = self._factors_of(x, direction)
        check_divisible(x, factors, name)
        self._check_channels(x.shape[1], direction)
        patches = space_to_depth(x, factors)
        batch, _, *coarse = patches.shape
        grouped = patches.reshape(batch, self.channels, self.sigma, -1)
        bands = torch.matmul(self.kernel().to(x.dtype), grouped)
        return bands.reshape(batch, self.channels * self.sigma, *coarse)

    def _up(self, y: Tensor, direction: str) -> Tensor:
        name = type(self).__name__
        factors = self._factors_of(y, direction)
        check_grouped_channels(y, self.sigma, name)
        self._check_channels(y.shape[1] // self.sigma, direction)
        grouped = y.reshape(y.shape[0], self.channels, self.sigma, -1)
        patches = torch.matmul(self.kernel().to(y.dtype).transpose(-1, -2), grouped)
        return depth_to_space(patches.reshape(y.shape), factors)

    def _factors_of(self, x: Tensor, direction: str) -> tuple[int, ...]:
        name = type(self).__name__
        if x.dim() != self.dim + 2:
            raise ValueError(
                f"{name} was built for dim={self.dim} ({self.dim} spatial axes), so "
                f"{direction} expects an input of {self.dim + 2} dims (batch, channels, "
                f"spatial), got shape {tuple(x.shape)}"
            )
        return spatial_factors(x, self.factors, name, direction)

    def _check_channels(self, channels: int, direction: str) -> None:
        if channels != self.channels:
            raise ValueError(
                f"{type(self).__name__} was built for {self.channels} channels at the fine "
                f"resolution, but {direction} got an input with {channels} there"
            )

    def _logdet(self, x: Tensor) -> Tensor:
        return zero_logdet(x)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, dim={self.dim}, factor={self.factor}, "
            f"method={self.method!r}, init={self.init!r}"
        )


class OrthogonalDownsampling(_OrthogonalResampling):
    """Learnable invertible downsampling: ``(B, C, *S) -> (B, C * sigma, *S / f)``.

    Args:
        channels: ``C``, the input's channels.
        dim: spatial axes, 1, 2 or 3 (a ``(B, C, L)`` signal, an image, a volume).
        factor: the downsampling factor, an int for every axis or one per axis (``(2, 2,
            1)``); ``sigma`` is their product.
        method: ``'exp'`` (matrix exponential) or ``'cayley'``: how the kernel is made
            orthogonal from the learnable ``weight`` (see the module docstring).
        init: ``'haar'`` (the orthonormal Haar wavelet; factors 1 or 2), ``'squeeze'``
            (:class:`~invertible_core.InvertibleDownsampling`) or ``'random'``.
        seed: for ``init='random'``: a private generator's seed (the global random state is
            untouched); ``None`` draws from the global one.

    ``inverse`` is the matching upsampling (the transposed convolution), exact up to
    float rounding; ``log|det J| = 0``. Side inputs are accepted and ignored.
    """

    def __init__(
        self,
        channels: int,
        dim: int = 2,
        factor: Factor = 2,
        *,
        method: Method = "exp",
        init: Init = "haar",
        seed: int | None = None,
    ) -> None:
        super().__init__(channels, dim, factor, method, init, seed)

    def _forward(self, x: Tensor) -> Tensor:
        return self._down(x, "forward")

    def _inverse(self, y: Tensor) -> Tensor:
        return self._up(y, "inverse")


class OrthogonalUpsampling(_OrthogonalResampling):
    """Learnable invertible upsampling: ``(B, C * sigma, *S) -> (B, C, *S * f)``.

    The map of :class:`OrthogonalDownsampling` the other way round, with its own kernels:
    ``forward`` is the transposed convolution, ``inverse`` the strided one. ``channels``
    is ``C``, the channels of the *output* (the fine resolution), so that a U's
    ``OrthogonalDownsampling(C, ...)`` and ``OrthogonalUpsampling(C, ...)`` connect the same
    two levels. The arguments are :class:`OrthogonalDownsampling`'s; ``init='haar'`` makes a
    fresh layer the inverse Haar transform. ``log|det J| = 0``.
    """

    def __init__(
        self,
        channels: int,
        dim: int = 2,
        factor: Factor = 2,
        *,
        method: Method = "exp",
        init: Init = "haar",
        seed: int | None = None,
    ) -> None:
        super().__init__(channels, dim, factor, method, init, seed)

    def _forward(self, x: Tensor) -> Tensor:
        return self._up(x, "forward")

    def _inverse(self, y: Tensor) -> Tensor:
        return self._down(y, "inverse")
