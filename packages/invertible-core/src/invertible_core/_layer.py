"""What the built-in invertible layers share: the block contract, side inputs, shape checks.

Every built-in layer (:class:`~invertible_core.InvertibleDownsampling`,
:class:`~invertible_core.HaarDownsampling`, :class:`~invertible_core.InvertibleConv1x1`,
:class:`~invertible_core.ActNorm`, :class:`~invertible_core.Permutation`) is an invertible
*affine* map of each sample: its Jacobian does not depend on the values of ``x``, so
``log|det J|`` is a function of the input's shape and the layer's parameters alone, and
costs nothing to report. :class:`InvertibleLayer` turns three small methods (``_forward``,
``_inverse``, ``_logdet``) into the :class:`~invertible_core.LogDetBlock` contract.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from invertible_core.fixed_point import grid_of, mark_on_grid
from invertible_core.recompute import report_logdet, wants_logdet, with_logdet

__all__ = [
    "InvertibleLayer",
    "channel_dim",
    "check_channel_dim",
    "check_positive_int",
    "per_sample",
    "positions",
    "zero_logdet",
]


class InvertibleLayer(nn.Module, ABC):
    """Base of the built-in layers: ``forward``/``inverse`` and their ``*_with_logdet`` forms.

    Side inputs (``*args``, ``**kwargs``: the conditioning a chain passes to its couplings)
    are accepted and ignored, so that a layer can sit anywhere in a conditioned chain.
    Subclasses implement ``_forward(x)``, ``_inverse(y)`` and ``_logdet(x)`` (the forward
    map's ``log|det dy/dx|`` per sample, shape ``(batch,)``, at an input shaped like ``x``).
    """

    #: :meth:`forward` reports the log-determinant to :meth:`forward_with_logdet`
    reports_logdet = True

    #: the layer only moves values around: an input on a fixed-point grid gives an output on
    #: it (the next fixed-point coupling need not round it again)
    preserves_grid: bool = False

    def forward(self, x: Tensor, /, *args: Any, **kwargs: Any) -> Tensor:
        """The layer applied to ``x``; side inputs are ignored."""
        y = self._forward(_tensor(x, self))
        if self.preserves_grid:
            mark_on_grid(y, grid_of(x))
        if wants_logdet(self):
            report_logdet(self, self._logdet(x))
        return y

    def inverse(self, y: Tensor, /, *args: Any, **kwargs: Any) -> Tensor:
        """The exact inverse: ``inverse(forward(x)) == x`` up to float rounding."""
        return self._inverse(_tensor(y, self))

    def forward_with_logdet(self, x: Tensor, /, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """``(forward(x), log|det dy/dx|)`` with the log-determinant of shape ``(batch,)``;
        runs through ``__call__``, so hooks (FSDP's among them) see it as a forward."""
        return with_logdet(self, self, _tensor(x, self), *args, **kwargs)

    def inverse_with_logdet(self, y: Tensor, /, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """``(inverse(y), log|det dx/dy|)``: the negative of the forward's log-det at ``x``."""
        x = self._inverse(_tensor(y, self))
        return x, -self._logdet(x)

    @abstractmethod
    def _forward(self, x: Tensor) -> Tensor: ...

    @abstractmethod
    def _inverse(self, y: Tensor) -> Tensor: ...

    @abstractmethod
    def _logdet(self, x: Tensor) -> Tensor: ...


def _tensor(x: object, layer: nn.Module) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{type(layer).__name__} expects a tensor, got {type(x).__name__}")
    return x


def check_positive_int(value: object, name: str, layer: str) -> int:
    """``value`` if it is an int >= 1 (not a bool), else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{layer}: {name} must be an int >= 1, got {value!r}")
    return value


def check_channel_dim(dim: object, layer: str) -> int:
    """``dim`` if it can be a channel dimension (an int that is not the batch dim 0)."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{layer}: dim must be an int, got {type(dim).__name__}")
    if dim == 0:
        raise ValueError(
            f"{layer}: dim=0 is the batch dimension; the channel dimension is usually 1 "
            "(NCHW) or -1 (channels last, such as (batch, tokens, channels))"
        )
    return dim


def channel_dim(x: Tensor, dim: int, channels: int, layer: str) -> int:
    """The non-negative index of the channel dim ``dim`` of ``x``, checked against ``channels``.

    ``x`` must have a batch dim (0) and the channel dim must be another one, of size
    ``channels``; the error says which of these failed and how.
    """
    shape = tuple(x.shape)
    if x.dim() < 2:
        raise ValueError(
            f"{layer} needs an input with a batch and a channel dimension, got shape {shape}"
        )
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{layer}: dim={dim} is out of range for an input of shape {shape}")
    d = dim % x.dim()
    if d == 0:
        raise ValueError(
            f"{layer}: dim={dim} is the batch dimension of an input of shape {shape}; "
            "the channel dimension must be another one"
        )
    if shape[d] != channels:
        raise ValueError(
            f"{layer} was built for {channels} channels (dim {dim}), but the input of shape "
            f"{shape} has {shape[d]}"
        )
    return d


def positions(x: Tensor, d: int) -> int:
    """How many times per sample a channel-wise map is applied: the size of every dim but 0, d."""
    return math.prod(s for i, s in enumerate(x.shape) if i not in (0, d))


def per_sample(log_abs_det: Tensor, x: Tensor) -> Tensor:
    """A log-det that is the same for every sample, as a tensor of shape ``(batch,)``.

    A real tensor (not an expanded view), so a caller may add to it in place.
    """
    return log_abs_det.expand(x.shape[0]).clone()


def zero_logdet(x: Tensor) -> Tensor:
    """The log-det of a volume-preserving layer: zeros of shape ``(batch,)``, ``x``'s dtype."""
    return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
