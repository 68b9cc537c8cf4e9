"""Steps: how the engine drives one block of a chain, forward and back.

A step knows how to run its block on a state (a tuple of tensors) through a
:class:`~invertible_core.RecomputeContext`, and how to go back: from the block's output
state and its gradient to the input state and its gradient. Fused blocks (couplings) do that
in one recompute (:class:`FusedStep`); any other invertible block goes through
:class:`GenericStep`: its inverse rebuilds the input (no grad), then the forward runs again
with grad and autograd differentiates it (two calls). Both can split their backward into a
recompute and a backprop, which lets a chain overlap them across blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from invertible_core.contract import Partition, State
from invertible_core.fixed_point import round_to_grid
from invertible_core.recompute import RecomputeContext

__all__ = ["FusedStep", "GenericStep", "Step", "convert", "is_fused", "make_step", "trainable"]


def _as_state(out: Any, who: str, name: str) -> State:
    outputs = out if isinstance(out, tuple) else (out,)
    for i, t in enumerate(outputs):
        if not isinstance(t, Tensor):
            raise TypeError(
                f"{who}.{name} returned a {type(t).__name__} at position {i}; it must return "
                "tensors"
            )
    return outputs


class Step:
    """One block of a chain, as the engine drives it."""

    partition: Partition | None = None
    grid_bits: int | None = None
    preserves_grid: bool = False

    def __init__(self, block: nn.Module, where: str | None = None) -> None:
        self.block = block
        self.name = type(block).__name__
        self.where = where or self.name

    def run(self, state: State, ctx: RecomputeContext, inverse: bool) -> State:
        raise NotImplementedError

    def backward(
        self, state: list[Tensor], grads: list[Tensor], ctx: RecomputeContext, inverse: bool
    ) -> tuple[State, State]:
        raise NotImplementedError

    #: whether the step splits its backward into recompute() and backprop() (overlap)
    phased: bool = False

    def recompute(
        self, state: list[Tensor], ctx: RecomputeContext, inverse: bool
    ) -> tuple[State, Any]:
        """Rebuild the input state (first half of :meth:`backward`); takes ``state``."""
        raise NotImplementedError

    def backprop(
        self,
        pending: Any,
        grads: list[Tensor],
        ctx: RecomputeContext,
        inverse: bool,
        between: Callable[[], None] | None = None,
    ) -> State:
        """The input state's gradient (second half of :meth:`backward`); takes ``grads``.
        ``between`` (if given) is called once while the step's graph is partly released."""
        raise NotImplementedError

    def reforward(
        self, inputs: State, grads: State, ctx: RecomputeContext, inverse: bool
    ) -> tuple[State, tuple[Tensor | None, ...]]:
        """From a known input state: run the block again with grad and backpropagate."""
        leaves = tuple(x.detach().requires_grad_(x.is_floating_point()) for x in inputs)
        outputs = self.run(leaves, ctx, inverse)
        terms, term_grads = list(outputs), list(grads)
        logdet = ctx._take_logdet()
        if logdet is not None and ctx.grad_logdet is not None:
            terms.append(logdet)
            term_grads.append(ctx.grad_logdet.to(logdet.dtype))
        differentiable = [x for x in leaves if x.requires_grad]
        got = iter(ctx.backward(terms, term_grads, differentiable))
        input_grads = tuple(next(got) if x.requires_grad else None for x in leaves)
        return tuple(x.detach() for x in leaves), input_grads


class FusedStep(Step):
    """A :class:`~invertible_core.FusedInvertibleBlock`: one recompute per backward step."""

    def __init__(self, block: Any, where: str | None = None) -> None:
        super().__init__(block, where)
        self.fused: Any = block
        self.partition = block.partition
        self.grid_bits = getattr(block, "fixed_point_bits", None)
        self.phased = callable(getattr(block, "recompute_state", None)) and callable(
            getattr(block, "backprop_state", None)
        )

    def recompute(
        self, state: list[Tensor], ctx: RecomputeContext, inverse: bool
    ) -> tuple[State, Any]:
        return self.fused.recompute_state(state, ctx, inverse=inverse)  # type: ignore[no-any-return]

    def backprop(
        self,
        pending: Any,
        grads: list[Tensor],
        ctx: RecomputeContext,
        inverse: bool,
        between: Callable[[], None] | None = None,
    ) -> State:
        if between is None:
            return self.fused.backprop_state(pending, grads, ctx, inverse=inverse)  # type: ignore[no-any-return]
        try:
            return self.fused.backprop_state(  # type: ignore[no-any-return]
                pending, grads, ctx, inverse=inverse, between=between
            )
        except TypeError as exc:
            if "between" not in str(exc):
                raise
            between()  # a user's block without the hook: start the next recompute first
            return self.fused.backprop_state(pending, grads, ctx, inverse=inverse)  # type: ignore[no-any-return]

    def run(self, state: State, ctx: RecomputeContext, inverse: bool) -> State:
        out = self.fused.run_state(state, ctx, inverse=inverse)
        if not (
            isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, Tensor) for t in out)
        ):
            got = f"{len(out)} values" if isinstance(out, tuple) else f"a {type(out).__name__}"
            raise TypeError(
                f"{self.where} returned {got} from run_state; a fused block takes the two parts "
                "of its partition and must return two parts (tensors)"
            )
        return out  # type: ignore[no-any-return]

    def backward(
        self, state: list[Tensor], grads: list[Tensor], ctx: RecomputeContext, inverse: bool
    ) -> tuple[State, State]:
        return self.fused.backward_state(state, grads, ctx, inverse=inverse)  # type: ignore[no-any-return]


class GenericStep(Step):
    """Any module with ``forward`` and ``inverse``: inverse, then re-forward with grad."""

    def __init__(self, block: nn.Module, where: str | None = None) -> None:
        super().__init__(block, where)
        self.preserves_grid = bool(getattr(block, "preserves_grid", False))

    def _fn(self, inverse: bool, logdet: bool) -> Any:
        name = ("inverse" if inverse else "forward") + ("_with_logdet" if logdet else "")
        fn = getattr(self.block, name, None)
        if not callable(fn):
            raise TypeError(
                f"{self.name} has no {name}() method, so it cannot report its log-determinant; "
                "give it forward_with_logdet and inverse_with_logdet (see "
                "invertible_core.LogDetBlock)"
            )
        return fn

    def run(self, state: State, ctx: RecomputeContext, inverse: bool) -> State:
        if ctx.wants_logdet:
            out = ctx.call(0, self._fn(inverse, True), *state)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(
                    f"{self.name}.{'inverse' if inverse else 'forward'}_with_logdet must return "
                    f"(output, logdet), got {type(out).__name__}"
                )
            y, logdet = out
            ctx.add_logdet(logdet)
            return _as_state(y, self.name, "forward_with_logdet")
        fn = self._fn(inverse, False)
        return _as_state(ctx.call(0, fn, *state), self.name, fn.__name__)

    phased = True

    def recompute(
        self, state: list[Tensor], ctx: RecomputeContext, inverse: bool
    ) -> tuple[State, Any]:
        outputs = tuple(state)
        state.clear()
        rebuilt = _as_state(
            ctx.rebuild(self._fn(not inverse, False), *outputs),
            self.name,
            "inverse" if not inverse else "forward",
        )
        del outputs
        leaves = tuple(x.detach().requires_grad_(x.is_floating_point()) for x in rebuilt)
        recomputed = self.run(leaves, ctx, inverse)
        return tuple(x.detach() for x in leaves), (leaves, recomputed, ctx._take_logdet())

    def backprop(
        self,
        pending: Any,
        grads: list[Tensor],
        ctx: RecomputeContext,
        inverse: bool,
        between: Callable[[], None] | None = None,
    ) -> State:
        if between is not None:
            between()  # one graph: the next step's recompute goes first
        leaves, outputs, logdet = pending
        terms, term_grads = list(outputs), list(grads)
        grads.clear()
        if logdet is not None and ctx.grad_logdet is not None:
            terms.append(logdet)
            term_grads.append(ctx.grad_logdet.to(logdet.dtype))
        differentiable = [x for x in leaves if x.requires_grad]
        got = iter(ctx.backward(terms, term_grads, differentiable))
        filled: list[Tensor] = []
        for x in leaves:
            g = next(got) if x.requires_grad else None
            filled.append(torch.zeros_like(x) if g is None else g.to(x.dtype))
        return tuple(filled)

    def backward(
        self, state: list[Tensor], grads: list[Tensor], ctx: RecomputeContext, inverse: bool
    ) -> tuple[State, State]:
        rebuilt, pending = self.recompute(state, ctx, inverse)
        return rebuilt, self.backprop(pending, grads, ctx, inverse)


def is_fused(block: object) -> bool:
    return (
        isinstance(getattr(block, "partition", None), Partition)
        and callable(getattr(block, "run_state", None))
        and callable(getattr(block, "backward_state", None))
    )


def make_step(block: object, who: str, index: int | None = None) -> Step:
    """The step for ``block``, or a clear error when it is not an invertible block."""
    where = f"block {index} ({type(block).__name__})" if index is not None else type(block).__name__
    if not isinstance(block, nn.Module):
        raise TypeError(
            f"{who}: {where} is a {type(block).__name__}, not an nn.Module; pass invertible "
            "modules such as AdditiveCoupling(Fm, Gm), InvertibleDownsampling(), or your own "
            "nn.Module with forward(x) and inverse(y)"
        )
    if is_fused(block):
        return FusedStep(block, where)
    if not callable(getattr(block, "inverse", None)):
        raise TypeError(
            f"{who}: {where} has no inverse() method, so its input cannot be rebuilt. Wrap a "
            "residual function in AdditiveCoupling(Fm, Gm), or give the module an inverse(y) "
            "(see invertible_core.InvertibleBlock)"
        )
    return GenericStep(block, where)


def convert(state: State, frm: Partition | None, to: Partition | None, who: str) -> State:
    """``state`` re-cut from partition ``frm`` to ``to`` (``None``: a whole tensor)."""
    if frm == to:
        return state
    whole = frm.merge(state) if frm is not None else state[0]
    if to is None:
        return (whole,)
    return to.split(whole, who)


def _on_grid(state: State, bits: int) -> State:
    return tuple(round_to_grid(t, bits) for t in state)


def trainable(blocks: Iterable[nn.Module]) -> list[list[Tensor]]:
    """Each block's parameters that require grad (the inputs of the chain's autograd nodes)."""
    return [[p for p in b.parameters() if p.requires_grad] for b in blocks]
