"""The autograd nodes of a memory-saving ReversibleSequence call: one per block.

See the NOTE below for why each block has its own node. The nodes keep the chain's output
(not through ``save_for_backward``, so that it can be released as soon as it is split), run
the chain's backward one block at a time, and check reconstruction drift at the end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from invertible_core._autograd import once_differentiable
from invertible_core.chain import Chain
from invertible_core.contract import Partition
from invertible_core.fixed_point import round_to_grid
from invertible_core.recompute import _Mode
from invertible_core.steps import convert

if TYPE_CHECKING:
    from invertible_core.sequence import ReversibleSequence

__all__ = ["DRIFT_TOLERANCE", "SequenceRun", "apply_chain"]

DRIFT_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3}
DRIFT_TOLERANCE_LOW_PRECISION = 5e-2
_DRIFT_SAMPLES = 256

_DOUBLE_BACKWARD = (
    "ReversibleSequence: double backward (create_graph=True, e.g. a gradient penalty) is not "
    "supported while saving memory, because the backward pass rebuilds activations outside "
    "autograd. Run this step with memory_saving=False (plain autograd: memory grows with "
    "depth) for higher-order gradients."
)


class SequenceRun:
    """One call of a sequence: the chain, and what passes between its autograd nodes."""

    def __init__(
        self,
        owner: ReversibleSequence,
        chain: Chain,
        params: list[list[Tensor]],
        blocks: list[int],
    ) -> None:
        self.owner = owner
        self.chain = chain
        self.params = params
        self.blocks = blocks  # the sequence's index of each step's block
        self.n_side = len(chain.side.tensors)
        self.sample: tuple[tuple[Tensor, ...], Tensor] | None = None
        self.out: Tensor | None = None
        self.out_version = 0
        self.out_part: Partition | None = None
        self.passes = 0
        self.final = False
        self.errors: dict[int, float] | None = None


def _sample_indices(t: Tensor) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(t.numel())
    return tuple(
        torch.randint(0, size, (_DRIFT_SAMPLES,), generator=g).to(t.device) for size in t.shape
    )


# NOTE [one autograd node per block]
# The chain's activations pass from block to block outside autograd (the chain object holds
# them), but every block gets its own autograd node, linked to the next by an empty tensor.
# Autograd then runs the nodes last to first, and each node returns its block's parameter
# gradients as soon as the block is done: they reach the parameters' ``.grad`` (and DDP's
# buckets, which can start reducing) while the blocks below are still being rebuilt. One
# node for the whole chain would hold every parameter gradient until the end, a second copy
# of all of them whenever ``.grad`` is already allocated (DDP, ``zero_grad(set_to_none=
# False)``), and the peak would grow with depth by the parameters' size. The first node
# takes the chain's input, the last returns the chain's output; side inputs that need a
# gradient are inputs of every node, so autograd sums their gradients over the blocks.
class _StepFunction(torch.autograd.Function):
    """The autograd node of block ``i`` of a memory-saving chain."""

    @staticmethod
    def forward(ctx: Any, run: SequenceRun, i: int, link: Tensor, *tensors: Tensor) -> Any:
        ctx.set_materialize_grads(False)
        ctx.run, ctx.i = run, i
        chain = run.chain
        last = len(chain.steps) - 1
        if i == 0:
            owner = run.owner
            protected = frozenset({link.untyped_storage().data_ptr()})
            if owner.drift_check and owner.check_reconstruction == "off" and link.numel():
                # a few entries of the chain's input (on the grid, if the chain starts on
                # one), to compare with their rebuilt values: a drift check for a few KB
                idx = _sample_indices(link)
                run.sample = (idx, round_to_grid(link[idx].detach(), chain.steps[0].grid_bits))
            chain.begin_forward(
                (link,),
                _Mode.RECORD,
                anchor_every=owner.anchor_every,
                keep_truths=owner.check_reconstruction != "off",
                protected=protected,
            )
            ctx.input_meta = (link.shape, link.dtype, link.device)
        chain.step_forward(i)
        if i < last:
            return link.new_empty(0)
        state, part, logdet = chain.finish_forward()
        out = part.merge(state) if part is not None else state[0]
        del state
        # The output is kept as a plain reference, not through save_for_backward, so that
        # the backward pass can drop it once it has been split: the chain's output is then
        # freed as soon as the first block is rebuilt (unless the caller still holds it).
        # In-place changes are caught by its version counter, as save_for_backward would.
        run.out = out.detach()
        run.out_version = out._version
        run.out_part = part
        if not chain.wants_logdet:
            return out
        if logdet is None:
            logdet = out.new_zeros(out.shape[0])
        return out, logdet

    @staticmethod
    @once_differentiable(_DOUBLE_BACKWARD)
    def backward(
        ctx: Any, grad_out: Tensor | None, *rest: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        run: SequenceRun = ctx.run
        chain = run.chain
        i = ctx.i
        if i == len(chain.steps) - 1:
            _begin_backward(run, grad_out, rest[0] if rest else None)
        needs = ctx.needs_input_grad
        params = run.params[i]
        wanted = [j for j in range(len(params)) if needs[3 + j]]
        param_grads, side_grads = chain.step_backward(i, [params[j] for j in wanted])
        result: list[Tensor | None] = [None] * (3 + len(params) + run.n_side)
        for j, g in zip(wanted, param_grads):
            result[3 + j] = g
        base = 3 + len(params)
        for j, g in enumerate(side_grads):
            if needs[base + j]:
                result[base + j] = g
        if i > 0:
            result[2] = grad_out.new_zeros(0) if grad_out is not None else None
            return tuple(result)
        rebuilt, input_grads = chain.finish_backward()
        if run.errors is not None:
            run.owner._report_reconstruction({run.blocks[k]: e for k, e in run.errors.items()})
        if run.sample is not None:
            run.owner._check_drift(rebuilt[0], run.sample)
            if run.final:
                run.sample = None
        result[2] = input_grads[0] if needs[2] else None
        return tuple(result)


def _begin_backward(run: SequenceRun, grad_out: Tensor | None, grad_logdet: Tensor | None) -> None:
    """At the last block's node: check the kept output, split it and its gradient."""
    passes = run.owner.num_bwd_passes
    run.passes += 1
    if run.passes > passes:
        raise RuntimeError(
            f"ReversibleSequence: backward pass {run.passes} through the chain, but it was "
            f"built with num_bwd_passes={passes}, so it released its output after the last "
            f"allowed pass; construct it with num_bwd_passes={run.passes} (or more) to "
            "backpropagate through it that often"
        )
    out = run.out
    assert out is not None
    if out._version != run.out_version:
        raise RuntimeError(
            "ReversibleSequence: its output was modified in place after the forward pass, so "
            "the activations cannot be rebuilt from it. Clone the output before modifying it."
        )
    run.final = run.passes == passes
    if run.final:
        run.out = None
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    part = run.out_part
    # the incoming gradient is often expanded (from a mean) or strided: make the parts
    # dense once, so every kernel below runs its fast path
    state = list(convert((out,), None, part, "ReversibleSequence"))
    grads = [
        g.contiguous() for g in convert((grad_out.to(out.dtype),), None, part, "ReversibleSequence")
    ]
    del out, grad_out
    run.errors = {} if run.chain.truths else None
    run.chain.begin_backward(state, grads, grad_logdet, run.final, run.errors)


@torch.compiler.disable
def apply_chain(run: SequenceRun, x: Tensor) -> Any:
    """The chain's autograd nodes, kept out of ``torch.compile``'s graphs on purpose.

    Their backward replays random states and calls autograd itself, which graphs cannot
    express; compiled models run the chain eagerly (one graph break) and compile what
    surrounds it, and compiled modules inside the blocks run compiled in both passes.
    """
    side = run.chain.side.tensors
    link: Any = x
    for i, params in enumerate(run.params):
        link = _StepFunction.apply(run, i, link, *params, *side)
    return link
