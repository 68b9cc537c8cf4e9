"""The contract every invertible block honours: all the engine ever calls on a block.

A block is anything with ``forward(x, *args, **kwargs)`` and ``inverse(y, *args, **kwargs)``
(:class:`InvertibleBlock`). ``args``/``kwargs`` are *side inputs* (a mask, a timestep
embedding, a cross-attention context): they condition the block and are not inverted. A
block that can also report the log-determinant of its Jacobian, as a normalizing flow needs,
adds ``forward_with_logdet`` and ``inverse_with_logdet`` (:class:`LogDetBlock`).

The memory-saving engine calls exactly these methods: the block itself (``forward`` through
``nn.Module.__call__``, so hooks fire) or ``forward_with_logdet`` in the forward pass and in
the recompute, and ``inverse`` to rebuild the block's input in the backward pass (the other
way round for a chain run by its ``inverse``). A block whose inverse calls the same
sub-functions as its forward (a coupling's ``Fm`` and ``Gm``) calls them through
:func:`~invertible_core.shared_call`, and the recompute computes each of them once. The
block's code can ask :func:`~invertible_core.is_recomputing` which pass it is in.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from invertible_core.recompute import is_recomputing

__all__ = ["InvertibleBlock", "LogDetBlock", "is_recomputing"]


@runtime_checkable
class InvertibleBlock(Protocol):
    """An invertible function of one tensor, optionally conditioned on side inputs.

    ``inverse(forward(x, *a, **k), *a, **k) == x`` up to float rounding, for the same side
    inputs ``a``/``k``. Any ``nn.Module`` with these two methods works in a
    :class:`~invertible_core.ReversibleSequence`: in backward its ``inverse`` rebuilds its
    input and its ``forward`` runs again with grad (couplings share their functions between
    the two, so that costs one recompute).
    """

    def forward(self, x: Tensor, /, *args: Any, **kwargs: Any) -> Tensor: ...

    def inverse(self, y: Tensor, /, *args: Any, **kwargs: Any) -> Tensor: ...


@runtime_checkable
class LogDetBlock(InvertibleBlock, Protocol):
    """An invertible block that also reports ``log|det J|`` per sample (normalizing flows).

    ``forward_with_logdet(x) -> (y, logdet)`` with ``logdet`` of shape ``(batch,)``: the
    log-absolute-determinant of ``dy/dx`` for each sample. ``inverse_with_logdet(y) ->
    (x, logdet)`` returns that of the inverse map, i.e. the negative of the forward's at
    ``x``. The built-in blocks run ``forward_with_logdet`` through ``__call__`` (see
    :func:`~invertible_core.with_logdet`), so hooks and FSDP see it as a forward.
    """

    def forward_with_logdet(
        self, x: Tensor, /, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]: ...

    def inverse_with_logdet(
        self, y: Tensor, /, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]: ...
