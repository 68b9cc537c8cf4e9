"""ReversibleSequence: a chain of couplings trained with memory flat in depth.

The trade-off: plain autograd stores every intermediate activation of a chain of N blocks,
so memory grows with N. A :class:`ReversibleSequence` runs the whole chain as one autograd
operation that keeps only the chain's *output*. In the backward pass it walks the blocks in
reverse; for each block it recomputes ``Gm(y1)`` and ``Fm(x2)`` once, with grad, and uses
each result twice: to rebuild the block's input from its output, and to backpropagate
(the RevNet paper's algorithm). The cost is about one extra forward pass of the chain's
``Fm``/``Gm`` (the backward of a plain chain already needs roughly two); the memory is that
of the output plus one block's recompute, whatever N is.

Compared with the per-block :class:`~invertible_core.InvertibleModuleWrapper` (MemCNN's
design), nothing here rewrites a tensor's storage: the caller's tensors are never freed or
refilled, so the sequence composes with ops that saved their outputs, with
``DistributedDataParallel`` (parameters receive their gradients through ordinary autograd
edges, once), with ``torch.autograd.grad`` and with ``torch.compile`` (which runs the
sequence's autograd function eagerly: a graph break, by design).

Options and their costs:

- ``memory_saving=False`` turns the sequence into plain autograd (faster, memory grows with
  depth). It is an attribute, so it can change at any time; it changes no parameter and no
  ``state_dict`` key, so checkpoints move freely between the two modes. Saving is also off
  (plain autograd) in eval mode and when no gradient is needed.
- ``preserve_rng_state`` (default on, per block or for all): captures the random state
  before each ``Fm``/``Gm`` call so dropout draws the same masks in the recompute; about
  5 KB per call, restored afterwards so the caller's random stream is unaffected.
- autocast: the recompute runs under the autocast settings of the forward pass, so fp16 and
  bf16 training computes the same function twice.
- BatchNorm layers inside blocks update their running statistics once per forward, as
  without the sequence (the recompute normalises with batch statistics but writes nothing).
- Reconstruction drift: rebuilt inputs differ from the true ones by float rounding, which
  grows with depth and activation magnitude. ``anchor_every=k`` keeps the exact activation
  after every k-th block (memory: N/k activations) and restarts the reconstruction from it.
  ``check_reconstruction='warn'|'raise'`` keeps every true input (memory as plain autograd:
  a debugging aid), measures the relative error of each rebuilt input, stores the errors in
  :attr:`ReversibleSequence.reconstruction_errors` and warns or raises above
  ``reconstruction_tolerance``.

The backward pass is not itself differentiable (no double backward; use
``memory_saving=False`` for that).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from invertible_core.contract import recomputing
from invertible_core.recompute import (
    AutocastState,
    BlockRecord,
    forked_rng,
    frozen_norm_statistics,
    tensor_devices,
)

__all__ = ["COUPLING_PROTOCOL", "ReversibleSequence"]

#: The methods a block of a :class:`ReversibleSequence` must have (see
#: :class:`invertible_core.Coupling`, which implements all of them).
COUPLING_PROTOCOL: tuple[str, ...] = (
    "split",
    "merge",
    "forward_halves",
    "inverse_halves",
    "backward_halves",
    "inverse_backward_halves",
)

CheckMode = Literal["off", "warn", "raise"]


def _relative_error(rebuilt: Sequence[Tensor], true: Sequence[Tensor]) -> float:
    num = sum(float((r.double() - t.double()).pow(2).sum()) for r, t in zip(rebuilt, true))
    den = sum(float(t.double().pow(2).sum()) for t in true)
    return (num / den) ** 0.5 if den > 0 else num**0.5


class _ChainRun:
    """Everything the backward pass of one call needs, besides the saved output."""

    def __init__(
        self,
        owner: ReversibleSequence,
        blocks: list[Any],
        inverse: bool,
        params: list[list[Tensor]],
        preserve: list[bool],
    ) -> None:
        self.owner = owner
        self.blocks = blocks
        self.inverse = inverse
        self.params = params
        self.preserve = preserve
        self.records: list[BlockRecord] = []
        self.anchors: dict[int, tuple[Tensor, Tensor]] = {}
        self.truths: dict[int, tuple[Tensor, Tensor]] = {}
        self.devices: tuple[torch.device, ...] = ()


class _ChainFunction(torch.autograd.Function):
    """One autograd node for a whole chain: keeps the output, rebuilds the rest."""

    @staticmethod
    def forward(ctx: Any, run: _ChainRun, x: Tensor, *params: Tensor) -> Tensor:
        owner = run.owner
        run.devices = tensor_devices([x])
        autocast = AutocastState.capture(run.devices)
        every = owner.anchor_every
        keep_truth = owner.check_reconstruction != "off"
        last = len(run.blocks) - 1
        halves = run.blocks[0].split(x)
        record: BlockRecord | None = None
        for i, block in enumerate(run.blocks):
            if keep_truth:
                run.truths[i] = halves
            record = BlockRecord(run.devices, run.preserve[i], autocast, previous=record)
            run.records.append(record)
            step = block.inverse_halves if run.inverse else block.forward_halves
            halves = _checked(step(*halves, record=record), halves, i, block)
            if every and (i + 1) % every == 0 and i < last:
                run.anchors[i] = halves
        out = run.blocks[-1].merge(*halves)
        # The output is kept as a plain reference, not through save_for_backward, so that
        # the backward pass can drop it once it has been split: the chain's output is then
        # freed as soon as the first block is rebuilt (unless the caller still holds it).
        # In-place changes are caught by its version counter, as save_for_backward would.
        ctx.run = run
        ctx.out = out.detach()
        ctx.out_version = out._version
        ctx.passes = 0
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        run: _ChainRun = ctx.run
        passes = run.owner.num_bwd_passes
        ctx.passes += 1
        if ctx.passes > passes:
            raise RuntimeError(
                f"ReversibleSequence: backward pass {ctx.passes} through the chain, but it was "
                f"built with num_bwd_passes={passes}, so it released its output after the last "
                f"allowed pass; construct it with num_bwd_passes={ctx.passes} (or more) to "
                "backpropagate through it that often"
            )
        out = ctx.out
        if out._version != ctx.out_version:
            raise RuntimeError(
                "ReversibleSequence: its output was modified in place after the forward pass, so "
                "the activations cannot be rebuilt from it. Clone the output before modifying it."
            )
        final = ctx.passes == passes
        if final:
            ctx.out = None
        needs = ctx.needs_input_grad
        last = run.blocks[-1]
        # the incoming gradient is often expanded (from a mean) or strided: make the halves
        # dense once, so every kernel below runs its fast path
        state = [*last.split(out), *(d.contiguous() for d in last.split(grad_out.to(out.dtype)))]
        del out
        offset = 2  # ctx inputs: run, x, *params
        slots: list[tuple[list[Tensor], list[int]]] = []
        for block_params in run.params:
            wanted = [j for j in range(len(block_params)) if needs[offset + j]]
            slots.append(([block_params[j] for j in wanted], [offset + j for j in wanted]))
            offset += len(block_params)
        grads: list[Tensor | None] = [None] * offset
        errors: dict[int, float] = {}
        with (
            forked_rng(run.devices, enabled=any(run.preserve)),
            frozen_norm_statistics(run.blocks),
            recomputing(),
        ):
            for i in range(len(run.blocks) - 1, -1, -1):
                block = run.blocks[i]
                anchor = run.anchors.pop(i, None) if final else run.anchors.get(i)
                if anchor is not None:
                    state[:2] = anchor
                params, positions = slots[i]
                consuming = getattr(block, "backward_consuming", None)
                if consuming is not None:
                    # hands the halves over, so they are freed inside the step
                    a, b, da, db, param_grads = consuming(
                        state, run.records[i], params, run.inverse
                    )
                else:
                    step = block.inverse_backward_halves if run.inverse else block.backward_halves
                    args, state = state, []
                    a, b, da, db, param_grads = step(*args, run.records[i], params)
                    del args
                for pos, g in zip(positions, param_grads):
                    grads[pos] = g
                if i in run.truths:
                    errors[i] = _relative_error((a, b), run.truths[i])
                state = [a, b, da, db]
                del a, b, da, db
        if run.truths:
            run.owner._report_reconstruction([errors[i] for i in sorted(errors)])
        grads[1] = run.blocks[0].merge(*state[2:]) if needs[1] else None
        return tuple(grads)


@torch.compiler.disable
def _apply_chain(run: _ChainRun, x: Tensor, *params: Tensor) -> Tensor:
    """The chain's autograd function, kept out of ``torch.compile``'s graphs on purpose.

    Its backward replays random states and calls autograd itself, which graphs cannot
    express; compiled models run it eagerly (one graph break) and compile what surrounds it.
    """
    return _ChainFunction.apply(run, x, *params)  # type: ignore[no-any-return]


def _checked(
    out: tuple[Tensor, Tensor], inp: tuple[Tensor, Tensor], index: int, block: Any
) -> tuple[Tensor, Tensor]:
    if (
        not isinstance(out, tuple)
        or len(out) != 2
        or out[0].shape != inp[0].shape
        or out[1].shape != inp[1].shape
    ):
        got = (
            [tuple(t.shape) for t in out]
            if isinstance(out, tuple) and all(isinstance(t, Tensor) for t in out)
            else type(out).__name__
        )
        raise ValueError(
            f"ReversibleSequence: block {index} ({type(block).__name__}) turned halves of "
            f"shapes {[tuple(t.shape) for t in inp]} into {got}; every block must keep the "
            "shapes of both halves (put shape-changing layers outside the sequence)"
        )
    return out


class ReversibleSequence(nn.Module):
    """A chain of couplings whose training memory does not grow with its length.

    Args:
        *blocks: couplings (:class:`~invertible_core.AdditiveCoupling`,
            :class:`~invertible_core.AffineCoupling`, or any module with the methods in
            :data:`COUPLING_PROTOCOL`), or a single list of them. All must split along the
            same dimension.
        memory_saving: rebuild activations in backward instead of storing them (default).
            ``False`` gives plain autograd with the same parameters and state_dict keys.
        preserve_rng_state: reproduce random ops (dropout) in the recompute; a bool for all
            blocks or one bool per block.
        anchor_every: keep the exact activation after every k-th block to bound float
            drift (0: keep none).
        check_reconstruction: ``'off'``, ``'warn'`` or ``'raise'``: measure each rebuilt
            input against the true one (costs the memory saving; for debugging).
        reconstruction_tolerance: relative L2 error above which ``check_reconstruction``
            warns or raises.
        num_bwd_passes: how many backward passes may run through one forward (for
            ``retain_graph=True``). The chain frees its output during the last allowed pass;
            one pass more raises an error that says so.

    ``forward(x)`` runs the blocks in order, ``inverse(y)`` undoes them in reverse order;
    both save memory while training.
    """

    reconstruction_errors: list[float]

    def __init__(
        self,
        *blocks: nn.Module | Iterable[nn.Module],
        memory_saving: bool = True,
        preserve_rng_state: bool | Sequence[bool] = True,
        anchor_every: int = 0,
        check_reconstruction: CheckMode | None = "off",
        reconstruction_tolerance: float = 1e-4,
        num_bwd_passes: int = 1,
    ) -> None:
        super().__init__()
        if len(blocks) == 1 and not isinstance(blocks[0], nn.Module):
            blocks = tuple(blocks[0])
        if len(blocks) == 0:
            raise ValueError(
                "ReversibleSequence needs at least one block, got none; pass couplings such as "
                "AdditiveCoupling(Fm, Gm)"
            )
        for i, block in enumerate(blocks):
            _check_protocol(block, i)
            self.add_module(str(i), cast(nn.Module, block))
        split_dims = {getattr(b, "split_dim", None) for b in self}
        if len(split_dims) > 1:
            raise ValueError(
                f"ReversibleSequence: all blocks must split along the same dim, got split_dims "
                f"{[getattr(b, 'split_dim', None) for b in self]}; use one sequence per split_dim"
            )
        if isinstance(preserve_rng_state, bool):
            preserve = [preserve_rng_state] * len(self)
        else:
            preserve = [bool(p) for p in preserve_rng_state]
            if len(preserve) != len(self):
                raise ValueError(
                    f"ReversibleSequence: preserve_rng_state has {len(preserve)} entries for "
                    f"{len(self)} blocks; pass one bool, or one per block"
                )
        if not isinstance(anchor_every, int) or anchor_every < 0:
            raise ValueError(f"anchor_every must be an int >= 0, got {anchor_every!r}")
        mode = "off" if check_reconstruction is None else check_reconstruction
        if mode not in ("off", "warn", "raise"):
            raise ValueError(
                f"check_reconstruction must be 'off', 'warn' or 'raise', got {check_reconstruction!r}"
            )
        if not isinstance(num_bwd_passes, int) or num_bwd_passes < 1:
            raise ValueError(f"num_bwd_passes must be an int >= 1, got {num_bwd_passes!r}")
        self.num_bwd_passes = num_bwd_passes
        self.memory_saving = memory_saving
        self.preserve_rng_state = preserve
        self.anchor_every = anchor_every
        self.check_reconstruction: CheckMode = mode
        self.reconstruction_tolerance = float(reconstruction_tolerance)
        self.reconstruction_errors = []

    # -- container behaviour -----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> nn.Module:
        return list(self)[index]

    # -- running -------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Run the blocks in order; saves memory while training with grad enabled."""
        return self._run(x, inverse=False)

    def inverse(self, y: Tensor) -> Tensor:
        """Undo the blocks in reverse order; saves memory the same way as :meth:`forward`."""
        return self._run(y, inverse=True)

    def _saving_active(self, x: Tensor, params: Iterable[Tensor]) -> bool:
        if not (self.memory_saving and self.training and torch.is_grad_enabled()):
            return False
        return x.requires_grad or any(p.requires_grad for p in params)

    def _run(self, x: Tensor, inverse: bool) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"ReversibleSequence expects a tensor, got {type(x).__name__}")
        blocks: list[Any] = list(self._modules.values())
        preserve = list(self.preserve_rng_state)
        if inverse:
            blocks.reverse()
            preserve.reverse()
        params: list[list[Tensor]] = [
            [p for p in b.parameters() if p.requires_grad] for b in blocks
        ]
        if not self._saving_active(x, (p for ps in params for p in ps)):
            halves = blocks[0].split(x)
            for i, block in enumerate(blocks):
                step = block.inverse_halves if inverse else block.forward_halves
                halves = _checked(step(*halves), halves, i, block)
            return blocks[-1].merge(*halves)
        run = _ChainRun(self, blocks, inverse, params, preserve)
        flat = [p for ps in params for p in ps]
        return _apply_chain(run, x, *flat)

    def _report_reconstruction(self, errors: list[float]) -> None:
        self.reconstruction_errors = errors
        worst = max(errors, default=0.0)
        if worst <= self.reconstruction_tolerance:
            return
        block = errors.index(worst)
        message = (
            f"ReversibleSequence: the input of block {block} was rebuilt with relative error "
            f"{worst:.3g} > reconstruction_tolerance={self.reconstruction_tolerance:g}. The "
            "block is ill-conditioned for reconstruction in this precision; bound the drift "
            "with anchor_every=k, keep activations of the worst blocks, or train in float64."
        )
        if self.check_reconstruction == "raise":
            raise RuntimeError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)

    def extra_repr(self) -> str:
        return (
            f"memory_saving={self.memory_saving}, anchor_every={self.anchor_every}, "
            f"check_reconstruction={self.check_reconstruction!r}"
        )


def _check_protocol(block: object, index: int) -> None:
    if not isinstance(block, nn.Module):
        raise TypeError(
            f"ReversibleSequence: block {index} is a {type(block).__name__}, not an nn.Module; "
            "pass couplings such as AdditiveCoupling(Fm, Gm)"
        )
    missing = [name for name in COUPLING_PROTOCOL if not callable(getattr(block, name, None))]
    if missing or not hasattr(block, "split_dim"):
        missing += [] if hasattr(block, "split_dim") else ["split_dim"]
        raise TypeError(
            f"ReversibleSequence: block {index} ({type(block).__name__}) does not follow the "
            f"coupling protocol: it lacks {', '.join(missing)}. Wrap its residual function in "
            "AdditiveCoupling(Fm, Gm) or AffineCoupling, or subclass invertible_core.Coupling"
        )
