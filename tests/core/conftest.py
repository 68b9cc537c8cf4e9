"""Shared helpers of the invertible-core tests.

Everything here is generic, so any test module of ``tests/core`` can import it
(``from conftest import make_conv_coupling, assert_grads_close``):

- builders of small invertible modules: :func:`make_conv_coupling` (additive or affine, any
  split dim), :class:`ElementwiseAffine` (invertible but *not* a coupling) and
  :class:`TwoWayCoupling` (two inputs, two outputs);
- references for gradient comparisons: :func:`plain_copy` (deep copy with every memory
  saving switched off: plain autograd) and :func:`leaf_copy`;
- comparisons: :func:`assert_grads_close` (parameter gradients, matched by name) and
  :func:`assert_buffers_equal` (BatchNorm statistics and other buffers);
- measurement: :func:`peak_memory` and :func:`retained_memory`, exact CPU byte counts built on
  :func:`invertible_core.measure_memory`.

Tests seed the random generators themselves (``torch.manual_seed``) where values matter; no
fixture reseeds behind their back, so the random-state tests see exactly what they set.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from invertible_core import (
    AffineAdapterNaive,
    Coupling,
    InvertibleModuleWrapper,
    ReversibleSequence,
    create_coupling,
    measure_memory,
)

__all__ = [
    "ElementwiseAffine",
    "TwoWayCoupling",
    "assert_buffers_equal",
    "assert_grads_close",
    "conv_function",
    "leaf_copy",
    "make_conv_coupling",
    "peak_memory",
    "plain_copy",
    "retained_memory",
]


# -- builders --------------------------------------------------------------------------------
def conv_function(
    channels: int, *, batchnorm: bool = False, dropout: float = 0.0, out_channels: int | None = None
) -> nn.Module:
    """A small shape-preserving residual function: conv3x3 [-> BatchNorm] [-> Dropout]."""
    layers: list[nn.Module] = [
        nn.Conv2d(channels, channels if out_channels is None else out_channels, 3, padding=1)
    ]
    if batchnorm:
        layers.append(nn.BatchNorm2d(layers[0].out_channels))  # type: ignore[arg-type]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def make_conv_coupling(
    channels: int,
    coupling: str = "additive",
    *,
    split_dim: int = 1,
    batchnorm: bool = False,
    dropout: float = 0.0,
    dtype: torch.dtype = torch.float64,
) -> Coupling:
    """A coupling for NCHW inputs with ``channels`` channels and conv ``Fm``/``Gm``.

    Splitting along the channel dim (1 or -3) gives each half ``channels // 2`` channels;
    any other split dim keeps ``channels``. ``coupling='affine'`` uses
    :class:`~invertible_core.AffineAdapterNaive`. ``Gm`` is a deep copy of ``Fm``.
    """
    half = channels // 2 if split_dim in (1, -3) else channels
    fm = conv_function(half, batchnorm=batchnorm, dropout=dropout)
    adapter = AffineAdapterNaive if coupling == "affine" else None
    if coupling == "affine":
        # Small weights keep exp(h) near 1, so deep affine chains stay well conditioned.
        with torch.no_grad():
            for p in fm.parameters():
                p.mul_(0.1)
    block = create_coupling(fm, coupling=coupling, adapter=adapter, split_dim=split_dim)
    return block.to(dtype)


class ElementwiseAffine(nn.Module):
    """``y = x * exp(log_scale) + shift``: invertible, with parameters, and not a Coupling.

    The wrapper must fall back to inverse + re-forward for it. ``calls`` counts how often
    ``forward`` and ``inverse`` run.
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(0.3 * torch.randn(shape))
        self.shift = nn.Parameter(torch.randn(shape))
        self.calls = {"forward": 0, "inverse": 0}

    def forward(self, x: Tensor) -> Tensor:
        self.calls["forward"] += 1
        return x * torch.exp(self.log_scale) + self.shift

    def inverse(self, y: Tensor) -> Tensor:
        self.calls["inverse"] += 1
        return (y - self.shift) * torch.exp(-self.log_scale)


class TwoWayCoupling(nn.Module):
    """An invertible module with two inputs and two outputs (not a Coupling).

    ``c = a + f(b)``, ``d = b + g(c)``; inverse ``b = d - g(c)``, ``a = c - f(b)``.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.f = nn.Linear(features, features)
        self.g = nn.Linear(features, features)

    def forward(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        c = a + self.f(b)
        return c, b + self.g(c)

    def inverse(self, c: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        b = d - self.g(c)
        return c - self.f(b), b


# -- references ------------------------------------------------------------------------------
def plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` that runs as plain autograd (every memory saving off).

    Wrappers get ``disable=True`` and sequences ``memory_saving=False``; parameters, buffers
    and modes are copied as they are, so both copies start from the same state.
    """
    plain = copy.deepcopy(module)
    for m in plain.modules():
        if isinstance(m, InvertibleModuleWrapper):
            m.disable = True
        if isinstance(m, ReversibleSequence):
            m.memory_saving = False
    return plain


def leaf_copy(x: Tensor, requires_grad: bool = True) -> Tensor:
    """A fresh leaf with the values of ``x`` (own storage), requiring grad by default."""
    return x.detach().clone().requires_grad_(requires_grad)


# -- comparisons -----------------------------------------------------------------------------
def assert_grads_close(
    model_a: nn.Module, model_b: nn.Module, rtol: float = 1e-10, atol: float = 1e-12
) -> None:
    """Every parameter of ``model_a`` has a gradient close to that of ``model_b``'s twin.

    Parameters are matched by position in ``parameters()`` (wrappers add a prefix to names,
    so names need not agree); a missing gradient on one side and not the other fails.
    The default tolerances suit float64.
    """
    params_a = list(model_a.named_parameters())
    params_b = list(model_b.named_parameters())
    assert len(params_a) == len(params_b), "the two models have different parameter counts"
    for (name_a, a), (name_b, b) in zip(params_a, params_b):
        assert a.shape == b.shape, f"{name_a} and {name_b} differ in shape"
        if a.grad is None or b.grad is None:
            assert a.grad is None and b.grad is None, (
                f"gradient of {name_a} is {a.grad is not None}, of {name_b} {b.grad is not None}"
            )
            continue
        torch.testing.assert_close(
            a.grad, b.grad, rtol=rtol, atol=atol, msg=lambda m, n=name_a: f"grad of {n}: {m}"
        )


def assert_buffers_equal(model_a: nn.Module, model_b: nn.Module) -> None:
    """Every buffer (BatchNorm running_mean/var, num_batches_tracked) is equal, exactly."""
    buffers_a = list(model_a.named_buffers())
    buffers_b = list(model_b.named_buffers())
    assert len(buffers_a) == len(buffers_b)
    for (name, a), (_, b) in zip(buffers_a, buffers_b):
        assert torch.equal(a, b), f"buffer {name} differs: {a} vs {b}"


# -- measurement -----------------------------------------------------------------------------
def peak_memory(fn: Callable[[], Any]) -> int:
    """Peak CPU bytes allocated while ``fn()`` runs (exact, from the profiler's events)."""
    _, stats = measure_memory(fn)
    return stats.peak_bytes


def retained_memory(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()``'s result and the CPU bytes still allocated when it returned (kept alive by it)."""
    result, stats = measure_memory(fn)
    return result, stats.retained_bytes
