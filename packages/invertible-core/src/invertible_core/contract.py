"""The contract every invertible block honours, and how a block learns it is being recomputed.

A block is anything with ``forward(x, *args, **kwargs)`` and ``inverse(y, *args, **kwargs)``
(:class:`InvertibleBlock`). ``args``/``kwargs`` are *side inputs* (a mask, a timestep
embedding, a cross-attention context): they condition the block and are not inverted. A
block that can also report the log-determinant of its Jacobian, as a normalizing flow needs,
adds ``forward_with_logdet`` and ``inverse_with_logdet`` (:class:`LogDetBlock`).

Memory-saving machinery (:class:`~invertible_core.ReversibleSequence`,
:class:`~invertible_core.InvertibleModuleWrapper`) runs a block a second time in the
backward pass. :func:`is_recomputing` tells the block's code which call is which, so that a
one-off side effect (ActNorm's data-dependent initialisation, a counter, logging) happens
once, in the forward pass.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["InvertibleBlock", "LogDetBlock", "is_recomputing"]


@runtime_checkable
class InvertibleBlock(Protocol):
    """An invertible function of one tensor, optionally conditioned on side inputs.

    ``inverse(forward(x, *a, **k), *a, **k) == x`` up to float rounding, for the same side
    inputs ``a``/``k``. Any ``nn.Module`` with these two methods works in a
    :class:`~invertible_core.ReversibleSequence` (rebuilt in backward by an inverse and a
    re-forward); couplings add a fused step that needs one recompute instead of two.
    """

    def forward(self, x: Tensor, /, *args: Any, **kwargs: Any) -> Tensor: ...

    def inverse(self, y: Tensor, /, *args: Any, **kwargs: Any) -> Tensor: ...


@runtime_checkable
class LogDetBlock(InvertibleBlock, Protocol):
    """An invertible block that also reports ``log|det J|`` per sample (normalizing flows).

    ``forward_with_logdet(x) -> (y, logdet)`` with ``logdet`` of shape ``(batch,)``: the
    log-absolute-determinant of ``dy/dx`` for each sample. ``inverse_with_logdet(y) ->
    (x, logdet)`` returns that of the inverse map, i.e. the negative of the forward's at
    ``x``.
    """

    def forward_with_logdet(
        self, x: Tensor, /, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]: ...

    def inverse_with_logdet(
        self, y: Tensor, /, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]: ...


_state = threading.local()


def is_recomputing() -> bool:
    """Whether the code now running is a memory-saving recompute in the backward pass.

    True inside the backward pass of a :class:`~invertible_core.ReversibleSequence` or an
    :class:`~invertible_core.InvertibleModuleWrapper` while it re-runs a block (and while it
    runs a block's inverse to rebuild an input). A block with a one-off side effect guards
    it with ``if not is_recomputing():``. Thread-local: autograd may run backward passes on
    other threads, each answers for itself.
    """
    return getattr(_state, "depth", 0) > 0


@contextmanager
def recomputing() -> Iterator[None]:
    """Mark the enclosed code as a recompute (for :func:`is_recomputing`); nests."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
