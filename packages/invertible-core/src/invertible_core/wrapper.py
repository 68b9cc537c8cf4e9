"""InvertibleModuleWrapper: memory saving around one invertible module (MemCNN's API).

The trade-off: a wrapped module keeps no activation of its own while training. Its output
is kept (autograd needs *something* to start from) until the next wrapped module takes it
over; that module rebuilds it in its own backward pass and hands it back. A chain of
wrapped blocks therefore holds one block's output at a time, whatever its depth. The cost
is one recompute per block: for couplings the fused RevNet step (``Gm(y1)`` and ``Fm(x2)``
once each, with grad); for any other module with an ``inverse`` the inverse plus a
re-forward (two calls).

How this differs from MemCNN's wrapper, on purpose:

- No tensor's storage is ever freed or refilled. MemCNN shrinks the caller's input to zero
  bytes and rewrites it in backward, which corrupts tensors that other ops saved (a ReLU
  feeding the block: MemCNN issue 70), destroys inputs under ``no_grad``/eval, and breaks
  DDP and ``torch.compile``. Here the caller's tensors are left intact, always: memory is
  saved by not *keeping* references, never by destroying them.
- ``preserve_rng_state`` defaults to ``True`` (as in ``torch.utils.checkpoint``): dropout
  inside the module draws the same masks in the recompute, so gradients are exact.
- BatchNorm statistics are updated once per forward (MemCNN: three times).
- Leaf inputs receive their gradient once (MemCNN: twice); ``torch.autograd.grad`` works.
- The recompute runs under the forward pass's autocast settings (MemCNN forces float32).
- The deprecated ``implementation_*`` arguments of the couplings are accepted and ignored.

- The module runs through ``nn.Module.__call__`` in the forward pass and in the recompute,
  and gradients flow through the forward pass's own autograd graph: hooks, FSDP (a wrapped
  block may itself be a ``fully_shard`` unit), DDP and ``torch.autograd.grad`` see what
  they would see without the wrapper. The hand-over between wrapped blocks finds the
  producer of an input by its memory, whatever autograd node FSDP or a hook put between.

For whole chains of blocks prefer :class:`~invertible_core.ReversibleSequence`: the same
engine (:mod:`invertible_core.engine`), with the chain's order known in advance.

Limits: if a wrapped block's output is modified in place after the call, backward raises
(the output is version-checked, like any saved tensor). The backward pass is not itself
differentiable (no double backward).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from invertible_core._layer import InvertibleLayer
from invertible_core.couplings import Coupling, create_coupling
from invertible_core.engine import Direction, Frame, Run, claim_inputs, offer_outputs, saving_hooks
from invertible_core.recompute import (
    compile_context,
    engine_only,
    entry_frame,
    guarded_call,
    protecting,
    tensor_devices,
)
from invertible_core.sequence import ReversibleSequence

__all__ = ["InvertibleModuleWrapper", "ReversibleBlock"]

#: blocks of this library that take one invertible tensor (the rest are side inputs)
_ONE_INPUT = (Coupling, InvertibleLayer, ReversibleSequence)


class InvertibleModuleWrapper(nn.Module):
    """Save memory around an invertible module by rebuilding its input in backward.

    Args:
        fn: a module with ``forward(*x)`` and ``inverse(*y)``, taking and returning tensors
            (a one-element output comes back as a bare tensor). Couplings get the fused
            one-recompute backward; other modules inverse + re-forward.
        keep_input: keep the input of ``forward()`` for backward (no rebuild: exact, costs
            its memory). ``False`` (default) rebuilds it from the output.
        keep_input_inverse: the same for ``inverse()``.
        num_bwd_passes: how many backward passes may run through the block (for
            ``retain_graph=True``); one more raises an error that says so.
        disable: plain autograd, no saving (for debugging and comparisons).
        preserve_rng_state: reproduce random ops in the recompute (default ``True``; MemCNN
            defaulted to ``False``, which gives wrong gradients with dropout).

    Saving is active only in training mode, with grad enabled and something requiring a
    gradient; otherwise ``fn`` is called directly. The caller's tensors are never freed.
    """

    def __init__(
        self,
        fn: nn.Module,
        keep_input: bool = False,
        keep_input_inverse: bool = False,
        num_bwd_passes: int = 1,
        disable: bool = False,
        preserve_rng_state: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(fn, nn.Module):
            raise TypeError(
                f"InvertibleModuleWrapper: fn must be an nn.Module, got {type(fn).__name__}"
            )
        if not callable(getattr(fn, "inverse", None)):
            raise TypeError(
                f"InvertibleModuleWrapper: fn ({type(fn).__name__}) has no inverse() method; "
                "wrap an invertible module, e.g. AdditiveCoupling(Fm, Gm)"
            )
        if not isinstance(num_bwd_passes, int) or num_bwd_passes < 1:
            raise ValueError(f"num_bwd_passes must be an int >= 1, got {num_bwd_passes!r}")
        self.disable = disable
        self.keep_input = keep_input
        self.keep_input_inverse = keep_input_inverse
        self.num_bwd_passes = num_bwd_passes
        self.preserve_rng_state = preserve_rng_state
        self._fn = fn

    def forward(self, *xin: Tensor, **side: Any) -> Tensor | tuple[Tensor, ...]:
        """``fn(*xin, **side)``; while training, keeps no activation of its own.

        Positional tensors are ``fn``'s invertible inputs (MemCNN's semantics); keyword
        arguments are side inputs (a mask, an embedding), passed to ``fn`` and, for a
        coupling, to its ``Fm``/``Gm``; tensors among them that require grad get theirs.
        """
        return self._memory_saving_entry(xin, side, inverse=False)

    def inverse(self, *yin: Tensor, **side: Any) -> Tensor | tuple[Tensor, ...]:
        """``fn.inverse(*yin, **side)``; while training, keeps no activation of its own."""
        return self._memory_saving_entry(yin, side, inverse=True)

    @entry_frame  # eager under torch.compile (a graph break); the module's code compiles
    def _memory_saving_entry(
        self, inputs: tuple[Tensor, ...], kwargs: dict[str, Any], inverse: bool
    ) -> Tensor | tuple[Tensor, ...]:
        return self._run_eagerly(inputs, kwargs, inverse, compile_context())

    @engine_only
    def _run_eagerly(
        self, inputs: tuple[Tensor, ...], kwargs: dict[str, Any], inverse: bool, compiled: Any
    ) -> Tensor | tuple[Tensor, ...]:
        name = "inverse" if inverse else "forward"
        if len(inputs) == 0:
            raise TypeError(f"InvertibleModuleWrapper.{name}() needs at least one tensor")
        for i, x in enumerate(inputs):
            if not isinstance(x, Tensor):
                raise TypeError(
                    f"InvertibleModuleWrapper.{name}() takes tensors only as positional "
                    f"arguments; argument {i} is a {type(x).__name__} (pass side inputs such "
                    "as masks by keyword)"
                )
        fn = self._fn
        if len(inputs) > 1 and isinstance(fn, _ONE_INPUT):
            raise TypeError(
                f"InvertibleModuleWrapper.{name}() got {len(inputs)} positional tensors, but "
                f"{type(fn).__name__} inverts one tensor: positional tensors are the wrapped "
                "module's invertible inputs (MemCNN's meaning). Pass side inputs (an "
                "embedding, a mask) by keyword, e.g. wrapper(x, emb=emb); the coupling hands "
                "them to Fm and Gm."
            )
        side = [v for v in kwargs.values() if isinstance(v, Tensor)]
        saving = (
            not self.disable
            and self.training
            and torch.is_grad_enabled()
            and (
                any(x.requires_grad for x in inputs)
                or any(t.requires_grad for t in side)
                or any(p.requires_grad for p in fn.parameters())
            )
        )
        direction = Direction.INVERSE if inverse else Direction.FORWARD
        with protecting(inputs):
            if not saving:
                call: Any = fn.inverse if inverse else fn
                out = guarded_call(call, inputs, kwargs, compiled=compiled)
                _check_outputs(out, fn, name)
                return out  # type: ignore[no-any-return]
            run = Run("InvertibleModuleWrapper", self.num_bwd_passes)
            frame = Frame(
                run,
                fn,
                direction=direction,
                kwargs=kwargs,
                devices=tensor_devices([*inputs, *side]),
                preserve_rng=self.preserve_rng_state,
                keep_input=self.keep_input_inverse if inverse else self.keep_input,
                n_inputs=len(inputs),
                compiled=compiled,
            )
            claim_inputs(frame, inputs)
            with saving_hooks():
                out = frame.forward(inputs)
        offer_outputs(frame, _check_outputs(out, fn, name))
        return out  # type: ignore[no-any-return]


def _check_outputs(out: Any, fn: nn.Module, name: str) -> tuple[Tensor, ...]:
    outputs = out if isinstance(out, tuple) else (out,)
    for i, t in enumerate(outputs):
        if not isinstance(t, Tensor):
            raise TypeError(
                f"InvertibleModuleWrapper: {type(fn).__name__}.{name} returned a "
                f"{type(t).__name__} at position {i}; it must return tensors"
            )
    return outputs


class ReversibleBlock(InvertibleModuleWrapper):
    """Deprecated (MemCNN): ``InvertibleModuleWrapper(create_coupling(Fm, Gm, coupling))``."""

    def __init__(
        self,
        Fm: nn.Module,
        Gm: nn.Module | None = None,
        coupling: str = "additive",
        keep_input: bool = False,
        keep_input_inverse: bool = False,
        implementation_fwd: int = -1,
        implementation_bwd: int = -1,
        adapter: Any = None,
    ) -> None:
        warnings.warn(
            "ReversibleBlock is deprecated: use InvertibleModuleWrapper(AdditiveCoupling(Fm, Gm)) "
            "or, for chains, ReversibleSequence",
            DeprecationWarning,
            stacklevel=2,
        )
        fn = create_coupling(
            Fm,
            Gm,
            coupling=coupling,
            implementation_fwd=implementation_fwd,
            implementation_bwd=implementation_bwd,
            adapter=adapter,
        )
        super().__init__(fn, keep_input=keep_input, keep_input_inverse=keep_input_inverse)
