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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor

if TYPE_CHECKING:
    from invertible_core.recompute import RecomputeContext

__all__ = [
    "FusedInvertibleBlock",
    "InvertibleBlock",
    "LogDetBlock",
    "Partition",
    "State",
    "is_recomputing",
]

#: What passes from block to block inside a chain: ``(x,)`` for a whole tensor, or
#: ``(x1, x2)``, the two parts of a :class:`Partition`.
State = tuple[Tensor, ...]


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


@dataclass(frozen=True)
class Partition:
    """How a fused block wants its state: two parts of the input along ``dim``.

    ``sizes=None`` means two equal halves; ``(a, b)`` gives the parts' sizes. A chain
    passes the parts from block to block as they are while consecutive blocks share the
    partition, and merges/splits only where it changes (or where a block takes a whole
    tensor), so there is no concatenation per block.
    """

    dim: int = 1
    sizes: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.dim, int) or isinstance(self.dim, bool):
            raise TypeError(f"split_dim must be an int, got {type(self.dim).__name__}")
        if self.sizes is not None:
            sizes = tuple(self.sizes)
            if len(sizes) != 2 or not all(
                isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes
            ):
                raise ValueError(
                    f"split_sizes must be two positive ints (a, b), got {self.sizes!r}"
                )
            object.__setattr__(self, "sizes", sizes)

    def split(self, x: Tensor, who: str = "coupling") -> tuple[Tensor, Tensor]:
        """The two parts of ``x`` (views, no copy); clear errors for unsplittable inputs."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{who} expects a tensor, got {type(x).__name__}")
        if x.dim() == 0 or not -x.dim() <= self.dim < x.dim():
            raise ValueError(
                f"{who}: split_dim={self.dim} is out of range for an input of shape "
                f"{tuple(x.shape)}"
            )
        size = x.shape[self.dim]
        if self.sizes is None:
            if size % 2 != 0:
                raise ValueError(
                    f"{who} splits dim {self.dim} into two equal halves, but that dim has odd "
                    f"size {size} (input shape {tuple(x.shape)}); use an even size, choose "
                    "another split_dim, or give split_sizes=(a, b)"
                )
            a, b = torch.chunk(x, 2, dim=self.dim)
            return a, b
        if sum(self.sizes) != size:
            raise ValueError(
                f"{who}: split_sizes={self.sizes} add up to {sum(self.sizes)}, but dim "
                f"{self.dim} of the input has size {size} (input shape {tuple(x.shape)})"
            )
        a, b = torch.split(x, list(self.sizes), dim=self.dim)
        return a, b

    def merge(self, state: State) -> Tensor:
        """The whole tensor from its two parts."""
        return torch.cat(state, dim=self.dim)


@runtime_checkable
class FusedInvertibleBlock(InvertibleBlock, Protocol):
    """A block with a fused backward step: it rebuilds its input and backpropagates with
    one recompute (couplings: ``Gm(y1)`` and ``Fm(x2)`` once each).

    The chain hands the block its state split by :attr:`partition` and calls

    - ``run_state(state, ctx, inverse=False) -> state``: the block (or its inverse) on its
      parts, calling every sub-module through ``ctx.call(slot, module, *inputs)`` and
      adding its log-determinant with ``ctx.add_logdet`` when ``ctx.wants_logdet``;
    - ``backward_state(state, grads, ctx, inverse=False) -> (input_state, input_grads)``:
      from the output parts and their gradients, the rebuilt input parts and theirs,
      backpropagating each recomputed call with ``ctx.backward`` (which also collects the
      gradients of parameters and side inputs). It takes ownership of the two lists.

    A block without these methods works everywhere too, through ``forward``/``inverse``
    (the chain rebuilds its input with ``inverse`` and re-runs ``forward`` with grad).
    """

    partition: Partition

    def run_state(self, state: State, ctx: RecomputeContext, *, inverse: bool = False) -> State: ...

    def backward_state(
        self,
        state: list[Tensor],
        grads: list[Tensor],
        ctx: RecomputeContext,
        *,
        inverse: bool = False,
    ) -> tuple[State, State]: ...


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
