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

For whole chains of couplings prefer :class:`~invertible_core.ReversibleSequence`: one
autograd node for the chain, a little faster, and nothing to hand over between blocks.

Limits: if a wrapped block's output is modified in place after the call, backward raises
(the output is version-checked, like any saved tensor). If block k's output feeds wrapped
block k+1 whose own output does not reach the loss, block k cannot be rebuilt and backward
raises with advice (use ``keep_input=True`` on block k+1). The backward pass is not itself
differentiable (no double backward).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from invertible_core._autograd import once_differentiable
from invertible_core.chain import Chain
from invertible_core.couplings import create_coupling
from invertible_core.recompute import _Mode, tensor_devices
from invertible_core.side_inputs import SideInputs
from invertible_core.steps import FusedStep, GenericStep, Step, convert, make_step

__all__ = ["InvertibleModuleWrapper", "ReversibleBlock"]

_DOUBLE_BACKWARD = (
    "InvertibleModuleWrapper: double backward (create_graph=True) is not supported while "
    "saving memory, because the backward pass rebuilds the input outside autograd. Use "
    "disable=True (plain autograd) for higher-order gradients."
)


class _WrapperRun:
    """Per-call settings and state shared by forward and backward."""

    def __init__(
        self,
        wrapper: InvertibleModuleWrapper,
        chain: Chain,
        n_inputs: int,
        params: list[Tensor],
    ) -> None:
        self.chain = chain
        self.n_inputs = n_inputs
        self.keep_input = wrapper.keep_input_inverse if chain.inverse else wrapper.keep_input
        self.num_bwd_passes = wrapper.num_bwd_passes
        self.params = params


def _step_for(fn: nn.Module, n_inputs: int) -> Step:
    step = make_step(fn, "InvertibleModuleWrapper")
    if isinstance(step, FusedStep) and n_inputs != 1:
        return GenericStep(fn)
    return step


class _WrapperFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, run: _WrapperRun, *args: Tensor) -> tuple[Tensor, ...]:
        inputs = args[: run.n_inputs]
        chain = run.chain
        protected = frozenset(t.untyped_storage().data_ptr() for t in inputs)
        state, part, _ = chain.forward(tuple(inputs), _Mode.RECORD, protected=protected)
        outputs: tuple[Tensor, ...] = (part.merge(state),) if part is not None else state
        del state
        ctx.run = run
        ctx.passes = 0
        ctx.rebuilt = [None] * len(outputs)
        ctx.promises = []
        ctx.output_meta = [(t.shape, t.dtype, t.device) for t in outputs]
        ctx.outputs = None
        if run.keep_input:
            ctx.save_for_backward(*inputs)
        else:
            # Keep our outputs until a wrapped consumer takes them over; take over the
            # inputs that a wrapped producer kept, promising to hand them back rebuilt.
            ctx.outputs = [(t.detach(), t._version) for t in outputs]
            for j, x in enumerate(inputs):
                producer: Any = x.grad_fn
                from_wrapper = type(producer) is _WrapperFunction._backward_cls  # type: ignore[attr-defined]
                if from_wrapper:
                    slot = x.output_nr
                    if producer.outputs is not None and producer.outputs[slot] is not None:
                        producer.outputs[slot] = None
                        ctx.promises.append((producer, slot, j))
        return outputs

    @staticmethod
    @once_differentiable(_DOUBLE_BACKWARD)
    def backward(ctx: Any, *grad_outputs: Tensor | None) -> tuple[Tensor | None, ...]:
        run: _WrapperRun = ctx.run
        chain = run.chain
        ctx.passes += 1
        if ctx.passes > run.num_bwd_passes:
            raise RuntimeError(
                f"InvertibleModuleWrapper: backward pass {ctx.passes} through this block, but "
                f"it was built with num_bwd_passes={run.num_bwd_passes}; construct it with "
                f"num_bwd_passes={ctx.passes} (or more) to backpropagate through it that often"
            )
        grads = tuple(
            torch.zeros(shape, dtype=dtype, device=device) if g is None else g.to(dtype)
            for g, (shape, dtype, device) in zip(grad_outputs, ctx.output_meta)
        )
        needs = ctx.needs_input_grad
        n = run.n_inputs
        wanted = [i for i, p in enumerate(run.params) if needs[1 + n + i]]
        params = [run.params[i] for i in wanted]
        if run.keep_input:
            inputs, input_grads, param_grads, side_grads = chain.reforward(
                0, tuple(ctx.saved_tensors), grads, params, None
            )
        else:
            part = chain.layouts[0]
            state = list(convert(_held_outputs(ctx), None, part, "InvertibleModuleWrapper"))
            grad_state = list(convert(grads, None, part, "InvertibleModuleWrapper"))
            inputs, input_grads_, all_param_grads, side_grads = chain.backward(
                state, grad_state, [params], None, final=True
            )
            input_grads = tuple(input_grads_)
            param_grads = all_param_grads[0]
        if not run.keep_input:
            for producer, slot, j in ctx.promises:
                producer.rebuilt[slot] = inputs[j].detach()
        if ctx.passes == run.num_bwd_passes:
            ctx.outputs = None
            ctx.promises = []
        result: list[Tensor | None] = [None] * (1 + n + len(run.params) + len(side_grads))
        for j, g in enumerate(input_grads):
            if needs[1 + j]:
                result[1 + j] = g
        for i, g in zip(wanted, param_grads):
            result[1 + n + i] = g
        base = 1 + n + len(run.params)
        for j, g in enumerate(side_grads):
            if needs[base + j]:
                result[base + j] = g
        return tuple(result)


def _held_outputs(ctx: Any) -> tuple[Tensor, ...]:
    """This block's outputs: kept by itself, or rebuilt and handed back by its consumer."""
    held: list[Tensor] = []
    for slot in range(len(ctx.rebuilt)):
        rebuilt = ctx.rebuilt[slot]
        kept = None if ctx.outputs is None else ctx.outputs[slot]
        if rebuilt is not None:
            ctx.rebuilt[slot] = None  # free it as soon as this pass is done with it
            held.append(rebuilt)
        elif kept is not None:
            tensor, version = kept
            if tensor._version != version:
                raise RuntimeError(
                    "InvertibleModuleWrapper: an output of this block was modified in place "
                    "after the call, so its input cannot be rebuilt from it. Clone the output "
                    "before modifying it, or use keep_input=True."
                )
            held.append(tensor)
        else:
            raise RuntimeError(
                "InvertibleModuleWrapper: this block's output was handed to the next wrapped "
                "block to be rebuilt, but that block's backward did not run (its output does "
                "not reach the loss). Construct the next block with keep_input=True."
            )
    return tuple(held)


@torch.compiler.disable
def _apply_wrapper(run: _WrapperRun, *args: Tensor) -> tuple[Tensor, ...]:
    """Run eagerly under ``torch.compile`` (a graph break): see ReversibleSequence."""
    return _WrapperFunction.apply(run, *args)  # type: ignore[no-any-return]


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
        return self._run_direction(xin, side, inverse=False)

    def inverse(self, *yin: Tensor, **side: Any) -> Tensor | tuple[Tensor, ...]:
        """``fn.inverse(*yin, **side)``; while training, keeps no activation of its own."""
        return self._run_direction(yin, side, inverse=True)

    @torch.compiler.disable  # eager under torch.compile, as the sequence (one graph break)
    def _run_direction(
        self, inputs: tuple[Tensor, ...], kwargs: dict[str, Any], inverse: bool
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
        side = SideInputs((), kwargs)
        params: list[Tensor] = [p for p in self._fn.parameters() if p.requires_grad]
        chain = Chain(
            steps=[_step_for(self._fn, len(inputs))],
            inverse=inverse,
            side=side,
            who="InvertibleModuleWrapper",
            preserve=[self.preserve_rng_state],
            devices=tensor_devices([*inputs, *side.all_tensors()]),
        )
        saving = (
            not self.disable
            and self.training
            and torch.is_grad_enabled()
            and (any(x.requires_grad for x in inputs) or bool(params) or bool(side.tensors))
        )
        if not saving:
            protected = frozenset(t.untyped_storage().data_ptr() for t in inputs)
            state, part, _ = chain.forward(inputs, _Mode.DIRECT, protected=protected)
            outputs: tuple[Tensor, ...] = (part.merge(state),) if part is not None else state
        else:
            run = _WrapperRun(self, chain, len(inputs), params)
            outputs = _apply_wrapper(run, *inputs, *params, *side.tensors)
        return outputs[0] if len(outputs) == 1 else outputs


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
