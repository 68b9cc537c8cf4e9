"""Fixed-point arithmetic for couplings: bit-exact inverses in floating point.

An additive coupling ``y1 = x1 + f`` is inverted as ``x1 = y1 - f``; in floating point that
is exact only when the sum was. Rebuilt activations otherwise drift by an ulp per block, and
in a deep train-mode network one drifted pre-activation that crosses a ReLU's zero changes
the gradient by about 1e-3. Rounding ``Fm``/``Gm``'s outputs and the chain's input to
multiples of ``2**-bits`` makes every sum and difference exact while
``|values| < 2**(24 - bits)`` (float32; ``2**(53 - bits)`` in float64), so a chain rebuilds
its inputs bit for bit and memory saving changes no gradient, at no memory cost. The
rounding moves a value by at most ``2**-(bits + 1)`` and passes gradients straight through.
Half-precision tensors are left alone (a 16-bit float cannot hold such a grid).

Couplings take ``fixed_point_bits``; :class:`GridRange` warns once when values leave the
exact range, so exactness is never lost silently.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "GridRange",
    "exact_limit",
    "grid_of",
    "mark_on_grid",
    "round_term_to_grid",
    "round_to_grid",
]

_MANTISSA_BITS = {torch.float32: 24, torch.float64: 53}


class _RoundToGrid(torch.autograd.Function):
    """Round to a multiple of ``2**-bits``; the gradient passes straight through."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bits: int) -> Tensor:
        scale = float(2**bits)
        # Scaling by a power of two and rounding are exact in binary floating point; one
        # buffer, rounded and rescaled in place.
        return x.mul(scale).round_().div_(scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


#: Tensors known to lie on a grid (their bits): a fixed-point coupling that receives one need
#: not round it again. Keyed by identity, so an alias (a view, a hook's copy) is rounded once
#: more, which changes nothing but time.
_ON_GRID: WeakIdKeyDictionary = WeakIdKeyDictionary()


def mark_on_grid(t: Tensor, bits: int | None) -> Tensor:
    """Note that ``t`` lies on the grid of ``bits`` fractional bits; returns ``t``."""
    if bits is not None:
        _ON_GRID[t] = bits
    return t


def grid_of(t: Tensor) -> int | None:
    """The bits of the grid ``t`` is known to lie on (``None``: not known)."""
    bits = _ON_GRID.get(t)
    return None if bits is None else int(bits)


def round_to_grid(x: Tensor, bits: int | None) -> Tensor:
    """``x`` rounded to the grid of ``bits`` fractional bits (float32/64; others unchanged).

    The gradient passes through unchanged. ``bits=None`` returns ``x`` itself.
    """
    if bits is None or x.dtype not in _MANTISSA_BITS:
        return x
    out = _RoundToGrid.apply(x, bits)
    assert isinstance(out, Tensor)
    return out


# Ops whose backward does not use their output: rounding their fresh output in place keeps
# autograd's graph valid (what the op saved is untouched) and saves a buffer.
_OUTPUT_FREE_NODES = frozenset(
    {
        "ConvolutionBackward0",
        "MkldnnConvolutionBackward0",
        "CudnnConvolutionBackward0",
        "AddmmBackward0",
        "MmBackward0",
        "BmmBackward0",
        "AddBackward0",
        "SubBackward0",
        "NativeBatchNormBackward0",
        "CudnnBatchNormBackward0",
    }
)


def round_term_to_grid(
    h: Tensor, bits: int, dtype: torch.dtype, inputs: tuple[Tensor, ...]
) -> Tensor:
    """A coupling term ``h`` (a function's output) on the grid, in the coupling's ``dtype``.

    A term computed in lower precision (autocast) is cast up first: the grid lives in the
    dtype of the parts it is added to. In a recompute (with grad) a term that an op just made
    and does not keep for its backward (convolutions, linear layers, sums, batch norm; not a
    view, not sharing memory with ``inputs``) is rounded in place, which saves a buffer where
    the step's memory peaks; anything else (a term without a graph might be a module's own
    buffer) is rounded out of place. Either way the gradient passes straight through.
    """
    if h.dtype != dtype and dtype in _MANTISSA_BITS and h.is_floating_point():
        h = h.to(dtype)
    if h.dtype not in _MANTISSA_BITS:
        return h
    made_here = (
        h.requires_grad
        and h.grad_fn is not None
        and type(h.grad_fn).__name__ in _OUTPUT_FREE_NODES
        and h._base is None
        and all(h.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in inputs)
    )
    if made_here:
        scale = float(2**bits)
        with torch.no_grad():
            h.mul_(scale).round_().div_(scale)
        return h
    return round_to_grid(h, bits)


def exact_limit(dtype: torch.dtype, bits: int) -> float:
    """The magnitude below which sums on the ``2**-bits`` grid are exact in ``dtype``."""
    return float(2 ** (_MANTISSA_BITS[dtype] - bits))


class GridRange:
    """Watches a coupling's values, in every use (training, eval, inverse, no grad), and
    warns when they leave the exact range. The message names the coupling class, the grid
    and the dtype, not the value, so Python's warning filter shows it once per place in the
    process, not once per coupling of a deep network.

    Reading a maximum back from a GPU waits for it, so values are checked on the first
    observed call and then on every ``every``-th: a network whose activations grow past the
    range during training is reported within that many steps.
    """

    __slots__ = ("_calls", "_every", "_name", "_warned")

    def __init__(self, name: str, every: int = 64) -> None:
        self._name = name
        self._every = every
        self._calls = 0
        self._warned = False

    def observe(self, x: Tensor, bits: int) -> None:
        if self._warned or x.dtype not in _MANTISSA_BITS or torch.compiler.is_compiling():
            return
        self._calls += 1
        if (self._calls - 1) % self._every:
            return
        limit = exact_limit(x.dtype, bits)
        biggest = float(x.detach().abs().amax()) if x.numel() else 0.0
        if biggest >= limit:
            self._warned = True
            warnings.warn(
                f"{self._name}: values left the exact range of fixed_point_bits={bits} in "
                f"{x.dtype} (|v| < {limit:g}): sums are rounded again, so inverse(forward(x)) "
                "and the inputs memory saving rebuilds are no longer bit-exact, and the error "
                "grows with the magnitude. Use fewer bits, normalise the activations, or "
                "float64.",
                RuntimeWarning,
                stacklevel=5,
            )
