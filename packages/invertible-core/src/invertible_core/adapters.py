"""Adapters: turn a module with one output into the ``(scale, shift)`` of an affine coupling."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["AffineAdapterNaive", "AffineAdapterSigmoid"]


class AffineAdapterNaive(nn.Module):
    """Turn a single-output module into ``(scale, shift) = (exp(h), h)``, ``h = module(x)``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.f = module

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        h = self.f(x, *args, **kwargs)
        return torch.exp(h), h


class AffineAdapterSigmoid(nn.Module):
    """Turn a module with twice the part's channels into a bounded ``(scale, shift)``.

    ``h = module(x)``; along ``split_dim`` (the coupling's; dim 1 by default), scale ``=
    sigmoid(h[1::2] + 2)`` (in (0, 1), near 0.88 at zero, which keeps deep stacks stable)
    and shift ``= h[0::2]``.
    """

    def __init__(self, module: nn.Module, split_dim: int = 1) -> None:
        super().__init__()
        self.f = module
        self.split_dim = split_dim

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        h = self.f(x, *args, **kwargs)
        dim = self.split_dim
        if h.dim() == 0 or not -h.dim() <= dim < h.dim() or h.shape[dim] % 2 != 0:
            raise ValueError(
                f"AffineAdapterSigmoid: the wrapped module must return twice the channels of "
                f"its input along split_dim={dim} (an even size there), got shape "
                f"{tuple(h.shape)}"
            )
        # interleaved along split_dim: shift at even, scale at odd positions
        shift, scale = h.unflatten(dim, (-1, 2)).unbind(dim + 1 if dim >= 0 else dim)
        return torch.sigmoid(scale + 2.0), shift
