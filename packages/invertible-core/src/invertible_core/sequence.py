"""ReversibleSequence: a chain of invertible blocks trained with memory flat in depth.

The trade-off: plain autograd stores every intermediate activation of a chain of N blocks,
so memory grows with N. A :class:`ReversibleSequence` keeps none of them: in the backward
pass each block's input is rebuilt from its output, block by block from the last, and what
autograd saved is recomputed from it (see :mod:`invertible_core.engine`). Couplings do that
with one recompute: ``Gm(y1)`` and ``Fm(x2)`` are computed once, with grad, and each result
serves both to rebuild the input and to backpropagate (the RevNet paper's algorithm). Any
other invertible block (:class:`~invertible_core.InvertibleDownsampling`, your own module
with ``forward`` and ``inverse``) is rebuilt by its inverse and recomputed by its forward.
The cost is about one extra forward pass of the chain; the memory is that of the output
plus one block's recompute, whatever N is. Blocks may change the shape (downsampling).

Every block runs through ``nn.Module.__call__``, with grad, in the forward pass and in the
recompute, as under ``torch.utils.checkpoint``: forward hooks fire once per forward and once
per recompute (:func:`~invertible_core.is_recomputing` tells them apart), gradients reach
the parameters a module holds when it runs through ordinary autograd edges, and sharding
works at any granularity: ``fully_shard`` (FSDP2) or ``FullyShardedDataParallel`` (FSDP1)
on each block, on each ``Fm``/``Gm``, on the sequence or only on the root, with one
all-gather per unit in backward. ``DistributedDataParallel``, ``torch.autograd.grad``,
parameter hooks and ``torch.compile``'d sub-modules work as in plain code. Nothing here
rewrites a tensor's storage: the caller's tensors are never freed, refilled or modified.

Side inputs: ``forward(x, *args, **kwargs)`` passes ``args``/``kwargs`` to every block (a
coupling passes them to ``Fm`` and ``Gm``; see its ``side_inputs`` option to send them to
one only). Tensors among them that require grad get their gradient, summed over all blocks;
other values (masks, ints, ``None``) pass through untouched. Flows:
:meth:`~ReversibleSequence.forward_with_logdet` also returns the summed per-sample
log-determinant, with memory saving on.

Options and their costs:

- ``memory_saving=False`` turns the sequence into plain autograd (faster, memory grows with
  depth). It is an attribute, so it can change at any time; it changes no parameter and no
  ``state_dict`` key, so checkpoints move freely between the two modes. Saving is also off
  (plain autograd) in eval mode and when no gradient is needed.
- ``keep_blocks``: blocks that keep their activations (plain autograd, no recompute); each
  is also an exact anchor for the blocks below it. :func:`~invertible_core.fit_memory_budget`
  chooses them for a memory budget.
- ``preserve_rng_state`` (default on, per block or for all): captures the random state
  around each ``Fm``/``Gm`` call so dropout draws the same masks in the recompute; about
  5 KB per call, restored afterwards so the caller's random stream is unaffected.
- autocast: the recompute runs under the autocast settings of the forward pass, so fp16 and
  bf16 training computes the same function twice.
- Module state: every buffer a block writes in its forward pass (BatchNorm's running
  statistics, ``spectral_norm``, parametrizations) is shown to the recompute as it was
  before the forward pass, and moves once per step.
- Reconstruction drift: rebuilt inputs differ from the true ones by float rounding, which
  grows with depth and activation magnitude. A cheap check (``drift_check``, on by default)
  compares a few hundred entries of the chain's input with their rebuilt values and warns
  once if they drifted far. ``fixed_point_bits`` on the couplings removes drift (bit-exact);
  ``anchor_every=k`` keeps the exact activation after every k-th block (memory: N/k
  activations) and restarts the reconstruction from it. ``check_reconstruction='warn'|
  'raise'`` keeps every true input (memory as plain autograd: a debugging aid), measures the
  relative error of each rebuilt input, stores the errors in
  :attr:`ReversibleSequence.reconstruction_errors` and warns or raises above
  ``reconstruction_tolerance``.

The backward pass is not itself differentiable (no double backward; use
``memory_saving=False`` for that).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal, cast, overload

import torch
from torch import Tensor, nn

from invertible_core.couplings import Coupling, Partition
from invertible_core.engine import Direction, Frame, Run, claim_inputs, offer_outputs, saving_hooks
from invertible_core.fixed_point import round_to_grid
from invertible_core.recompute import (
    call_with_logdet,
    compile_context,
    engine_only,
    entry_frame,
    fsdp_forward_method,
    guarded_call,
    protecting,
    register_with_fsdp,
    report_logdet,
    tensor_devices,
    wants_logdet,
    with_logdet,
)

__all__ = ["ReversibleSequence"]

CheckMode = Literal["off", "warn", "raise"]

#: relative error of the rebuilt chain input above which the drift check warns
DRIFT_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3}
DRIFT_TOLERANCE_LOW_PRECISION = 5e-2
_DRIFT_SAMPLES = 256


def _kept_indices(value: int | Iterable[int] | None, n: int) -> tuple[int, ...]:
    """``keep_blocks`` as sorted block indices; clear errors for anything else."""
    if value is None:
        return ()
    if isinstance(value, bool):
        raise TypeError("keep_blocks must be a count or block indices, not a bool")
    if isinstance(value, int):
        if not 0 <= value <= n:
            raise ValueError(
                f"keep_blocks={value} is not a count of blocks of this {n}-block sequence "
                f"(0..{n}); pass a count of last blocks to keep, or their indices"
            )
        return tuple(range(n - value, n))
    indices = list(value)
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"keep_blocks indices must be ints, got {i!r}")
        if not -n <= i < n:
            raise ValueError(f"keep_blocks index {i} is out of range for {n} blocks")
    return tuple(sorted({i % n for i in indices}))


def _check_block(block: object, index: int) -> nn.Module:
    where = f"block {index} ({type(block).__name__})"
    if not isinstance(block, nn.Module):
        raise TypeError(
            f"ReversibleSequence: {where} is a {type(block).__name__}, not an nn.Module; pass "
            "invertible modules such as AdditiveCoupling(Fm, Gm), InvertibleDownsampling(), or "
            "your own nn.Module with forward(x) and inverse(y)"
        )
    if not callable(getattr(block, "inverse", None)):
        raise TypeError(
            f"ReversibleSequence: {where} has no inverse() method, so its input cannot be "
            "rebuilt. Wrap a residual function in AdditiveCoupling(Fm, Gm), or give the module "
            "an inverse(y) (see invertible_core.InvertibleBlock)"
        )
    return block


def relative_error(rebuilt: Sequence[Tensor], true: Sequence[Tensor]) -> float:
    """Relative L2 error of a rebuilt state (float64 arithmetic)."""
    num = sum(float((r.double() - t.double()).pow(2).sum()) for r, t in zip(rebuilt, true))
    den = sum(float(t.double().pow(2).sum()) for t in true)
    return (num / den) ** 0.5 if den > 0 else num**0.5


def _sample_indices(t: Tensor) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(t.numel())
    return tuple(
        torch.randint(0, size, (_DRIFT_SAMPLES,), generator=g).to(t.device) for size in t.shape
    )


class ReversibleSequence(nn.Module):
    """A chain of invertible blocks whose training memory does not grow with its length.

    Args:
        *blocks: invertible blocks: couplings (:class:`~invertible_core.AdditiveCoupling`,
            :class:`~invertible_core.AffineCoupling`), invertible layers
            (:class:`~invertible_core.InvertibleDownsampling`, ...), or any ``nn.Module`` with
            ``forward(x)`` and ``inverse(y)`` (:class:`~invertible_core.InvertibleBlock`); or
            a single list of them.
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
            ``retain_graph=True``). The chain releases its output during the last allowed
            pass; one pass more raises an error that says so.
        drift_check: compare a sample of the chain's input with its rebuilt values after
            each backward pass and warn once if the reconstruction drifted (relative error
            above 1e-3 in float32, 5e-2 in half precision). Costs a few KB.
        keep_blocks: blocks that keep their activations while saving memory: plain
            autograd for them, no recompute (faster, costs their activations). A count
            ``k`` keeps the last ``k`` blocks (the backward pass needs them first); a list
            gives the indices. A kept block is also an exact anchor: the blocks below it are
            rebuilt from its exactly stored input. See
            :func:`~invertible_core.fit_memory_budget` for choosing them by a memory budget.
        overlap: deprecated and ignored (it never measured faster, and the recompute now
            runs where autograd asks for it; see the CHANGELOG).

    ``forward(x, *args, **kwargs)`` runs the blocks in order, ``inverse(y, *args, **kwargs)``
    undoes them in reverse order; both save memory while training. Indexing with a slice
    returns a new ``ReversibleSequence`` of the same blocks (shared, not copied).
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
        drift_check: bool = True,
        keep_blocks: int | Iterable[int] | None = None,
        overlap: bool | None = None,
    ) -> None:
        super().__init__()
        if len(blocks) == 1 and not isinstance(blocks[0], nn.Module):
            only = blocks[0]
            if not isinstance(only, Iterable) or isinstance(only, (str, bytes, Tensor)):
                raise TypeError(
                    f"ReversibleSequence: got a {type(only).__name__}, not an invertible block "
                    "or a list of them; pass nn.Modules with forward(x) and inverse(y), such as "
                    "AdditiveCoupling(Fm, Gm)"
                )
            blocks = tuple(only)
        if len(blocks) == 0:
            raise ValueError(
                "ReversibleSequence needs at least one block, got none; pass couplings such as "
                "AdditiveCoupling(Fm, Gm)"
            )
        for i, block in enumerate(blocks):
            self.add_module(str(i), _check_block(block, i))
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
        if overlap is not None:
            warnings.warn(
                "ReversibleSequence(overlap=...) is deprecated and ignored: the overlapped "
                "recompute never measured faster, and the recompute now runs where autograd "
                "asks for it (which is what lets FSDP and hooks see it). Remove the argument.",
                DeprecationWarning,
                stacklevel=2,
            )
        self.num_bwd_passes = num_bwd_passes
        self.memory_saving = memory_saving
        self.preserve_rng_state = preserve
        self.anchor_every = anchor_every
        self.check_reconstruction: CheckMode = mode
        self.reconstruction_tolerance = float(reconstruction_tolerance)
        self.drift_check = bool(drift_check)
        self.reconstruction_errors = []
        self._drift_warned = False
        self._keep_blocks: tuple[int, ...] = ()
        self.keep_blocks = keep_blocks

    # -- container behaviour -----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())  # type: ignore[arg-type]

    @overload
    def __getitem__(self, index: int) -> nn.Module: ...

    @overload
    def __getitem__(self, index: slice) -> ReversibleSequence: ...

    def __getitem__(self, index: int | slice) -> nn.Module | ReversibleSequence:
        blocks = list(self)
        if isinstance(index, slice):
            chosen = blocks[index]
            preserve = self.preserve_rng_state[index]
            if not chosen:
                raise IndexError(f"ReversibleSequence[{index}] selects no block")
            sub = ReversibleSequence(
                chosen,
                memory_saving=self.memory_saving,
                preserve_rng_state=preserve,
                anchor_every=self.anchor_every,
                check_reconstruction=self.check_reconstruction,
                reconstruction_tolerance=self.reconstruction_tolerance,
                num_bwd_passes=self.num_bwd_passes,
                drift_check=self.drift_check,
                keep_blocks=[
                    j for j, i in enumerate(range(len(blocks))[index]) if i in self._keep_blocks
                ],
            )
            sub.train(self.training)
            return sub
        return blocks[index]

    # -- running -------------------------------------------------------------------------------
    #: :meth:`forward` reports the chain's log-determinant to :meth:`forward_with_logdet`
    reports_logdet = True

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Run the blocks in order (side inputs go to every block); saves memory while
        training with grad enabled."""
        if not torch.compiler.is_compiling() and wants_logdet(self):  # by forward_with_logdet
            y, logdet = cast(
                tuple[Tensor, Tensor], self._run(x, args, kwargs, Direction.FORWARD, logdet=True)
            )
            report_logdet(self, logdet)
            return y
        return cast(Tensor, self._run(x, args, kwargs, Direction.FORWARD, logdet=False))

    def inverse(self, y: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Undo the blocks in reverse order; saves memory the same way as :meth:`forward`.

        A ``fully_shard`` (FSDP2) sequence registers this method with FSDP on first use, so
        that it unshards the parameters as a forward does."""
        if register_with_fsdp(self, "inverse"):
            return self.inverse(y, *args, **kwargs)  # now through FSDP's hooks
        return cast(Tensor, self._run(y, args, kwargs, Direction.INVERSE, logdet=False))

    def forward_with_logdet(self, x: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """:meth:`forward` and the per-sample ``log|det dy/dx|`` summed over the blocks
        (shape ``(batch,)``), for normalizing flows; memory saving stays on. Runs through
        ``__call__``, so hooks (FSDP's among them) see it as a forward."""
        return with_logdet(self, self, x, *args, **kwargs)

    def inverse_with_logdet(self, y: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """:meth:`inverse` and the per-sample ``log|det dx/dy|`` (the forward's, negated)."""
        if register_with_fsdp(self, "inverse_with_logdet"):
            return self.inverse_with_logdet(y, *args, **kwargs)
        out = self._run(y, args, kwargs, Direction.INVERSE, logdet=True)
        return cast(tuple[Tensor, Tensor], out)

    # -- which blocks keep their activations ------------------------------------------------
    @property
    def keep_blocks(self) -> tuple[int, ...]:
        """Indices of the blocks that keep their activations (plain autograd, no recompute)."""
        return self._keep_blocks

    @keep_blocks.setter
    def keep_blocks(self, value: int | Iterable[int] | None) -> None:
        self._keep_blocks = _kept_indices(value, len(self))

    def _run(
        self,
        x: Tensor,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        direction: Direction,
        logdet: bool,
    ) -> Tensor | tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor):
            raise TypeError(f"ReversibleSequence expects a tensor, got {type(x).__name__}")
        if torch.compiler.is_compiling() and not self._saving(x, args, kwargs):
            # dynamo traces plain autograd into the graph (eval, no grad, memory_saving=False)
            return self._traced(x, args, kwargs, direction, logdet)
        return self._memory_saving_entry(x, args, kwargs, direction, logdet)

    def _saving(self, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether this call saves memory: training, with grad, and something needs one."""
        return bool(
            self.memory_saving
            and self.training
            and torch.is_grad_enabled()
            and (
                x.requires_grad
                or any(isinstance(v, Tensor) and v.requires_grad for v in (*args, *kwargs.values()))
                or any(p.requires_grad for p in self.parameters())
            )
        )

    @entry_frame
    def _memory_saving_entry(
        self,
        x: Tensor,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        direction: Direction,
        logdet: bool,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Eager under torch.compile (a graph break), with dynamo's callback noted for the
        blocks' code (see the NOTE [torch.compile and the recompute])."""
        return self._run_eagerly(x, args, kwargs, direction, logdet, compile_context())

    def _traced(
        self,
        x: Tensor,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        direction: Direction,
        logdet: bool,
    ) -> Tensor | tuple[Tensor, Tensor]:
        # the blocks from _modules: dynamo before torch 2.5 cannot trace a module's __iter__
        in_order = [b for b in self._modules.values() if b is not None]
        blocks = in_order if direction is Direction.FORWARD else in_order[::-1]
        total: Tensor | None = None
        for block in blocks:
            if direction is Direction.FORWARD:
                with_ld: Any = block.forward_with_logdet
                out = with_ld(x, *args, **kwargs) if logdet else block(x, *args, **kwargs)
            else:
                name = "inverse_with_logdet" if logdet else "inverse"
                out = getattr(block, name)(x, *args, **kwargs)
            if logdet:
                x, ld = out
                total = ld if total is None else total + ld
            else:
                x = out
        if not logdet:
            return x
        return x, total if total is not None else x.new_zeros(x.shape[0])

    @engine_only
    def _run_eagerly(
        self,
        x: Tensor,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        direction: Direction,
        logdet: bool,
        compiled: Any,
    ) -> Tensor | tuple[Tensor, Tensor]:
        if logdet and x.dim() == 0:
            raise ValueError("forward_with_logdet needs a batch dimension (dim 0) in its input")
        blocks = list(self)
        order = list(range(len(blocks)))
        if direction is Direction.INVERSE:
            order.reverse()
        saving = self._saving(x, args, kwargs)
        with protecting([x]):
            if not saving:
                return self._run_plain(
                    x, args, kwargs, direction, logdet, [blocks[i] for i in order], compiled
                )
            return self._run_saving(x, args, kwargs, direction, logdet, blocks, order, compiled)

    def _run_plain(
        self,
        x: Tensor,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        direction: Direction,
        logdet: bool,
        blocks: list[nn.Module],
        compiled: Any = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        total: Tensor | None = None
        state: State = (x,)
        layout: Partition | None = None
        for i, block in enumerate(blocks):
            want = _layout(block)
            state, layout = _convert(state, layout, want, block), want
            given: Any = state if want is not None else state[0]
            if direction is Direction.FORWARD and logdet:
                if not callable(getattr(block, "forward_with_logdet", None)):
                    raise _no_logdet(block, direction)
                out = guarded_call(
                    call_with_logdet,
                    (block, given, *args),
                    kwargs,
                    key=(block, "forward_with_logdet"),
                    compiled=compiled,
                )
            else:
                if direction is Direction.FORWARD:
                    fn: Any = block
                else:
                    name = "inverse_with_logdet" if logdet else "inverse"
                    if not callable(getattr(block, name, None)):
                        raise _no_logdet(block, direction)
                    fn = fsdp_forward_method(block, name)
                out = guarded_call(fn, (given, *args), kwargs, compiled=compiled)
            state, ld = _split_output(out, block, i, logdet, want)
            if ld is not None:
                total = ld if total is None else total + ld
        y = _convert(state, layout, None, None)[0]
        if not logdet:
            return y
        return y, total if total is not None else y.new_zeros(y.shape[0])

    def _run_saving(
        self,
        x: Tensor,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        direction: Direction,
        logdet: bool,
        blocks: list[nn.Module],
        order: list[int],
        compiled: Any,
    ) -> Tensor | tuple[Tensor, Tensor]:
        devices = tensor_devices([x, *args, *kwargs.values()])
        kept = set(self._keep_blocks)
        every = self.anchor_every
        checking = self.check_reconstruction != "off"
        truths: dict[int, State] = {}
        sample: tuple[tuple[Tensor, ...], Tensor] | None = None
        first = blocks[order[0]]
        first_layout = _layout(first)
        if self.drift_check and not checking and x.numel() and order[0] not in kept:
            idx = _sample_indices(x)
            bits = getattr(first, "fixed_point_bits", None)
            sample = (idx, round_to_grid(x[idx].detach(), bits))

        def on_rebuilt(frame: Frame, inputs: tuple[Tensor, ...]) -> None:
            truth = truths.get(frame.index)
            if truth is not None:
                self._report_reconstruction(frame.index, relative_error(inputs, truth))
            if sample is not None and frame.index == order[0]:
                whole = _convert(inputs, first_layout, None, None)[0]
                self._check_drift(whole, sample)

        run = Run("ReversibleSequence", self.num_bwd_passes, on_rebuilt)
        frames: list[Frame] = []
        total: Tensor | None = None
        state: State = (x,)
        outputs: State = ()
        layout: Partition | None = None
        with saving_hooks():
            for pos, index in enumerate(order):
                block = blocks[index]
                name = (
                    "forward_with_logdet"
                    if direction is Direction.FORWARD
                    else "inverse_with_logdet"
                )
                if logdet and not callable(getattr(block, name, None)):
                    raise _no_logdet(block, direction)
                want = _layout(block)
                state = _convert(state, layout, want, block)
                frame = Frame(
                    run,
                    block,
                    direction=direction,
                    logdet=logdet,
                    args=args,
                    kwargs=kwargs,
                    devices=devices,
                    preserve_rng=self.preserve_rng_state[index],
                    keep_activations=index in kept,
                    keep_input=bool(every) and pos > 0 and pos % every == 0,
                    index=index,
                    n_inputs=len(state),
                    parts=want is not None,
                    compiled=compiled,
                )
                if frames:
                    before = frames[-1]
                    before.set_outputs(outputs)
                    for position in range(len(outputs)):
                        before.hand_to(position, frame, position, _converter(want, layout))
                else:
                    claim_inputs(frame, (x,), _converter(want, None))
                if checking:  # what the block saw: a fixed-point coupling rounds its input
                    bits = getattr(block, "fixed_point_bits", None)
                    truths[index] = tuple(round_to_grid(t.detach(), bits) for t in state)
                outputs, ld = _split_output(frame.forward(state), block, index, logdet, want)
                state, layout = outputs, want
                if ld is not None:
                    total = ld if total is None else total + ld
                frames.append(frame)
        y = _convert(state, layout, None, None)[0]
        # the output is kept as the caller gets it (one tensor; the parts would be a copy)
        offer_outputs(frames[-1], (y,), _converter(None, layout))
        if not logdet:
            return y
        return y, total if total is not None else y.new_zeros(y.shape[0])

    def _report_reconstruction(self, block: int, error: float) -> None:
        if len(self.reconstruction_errors) != len(self):
            self.reconstruction_errors = [0.0] * len(self)  # kept blocks: exact
        self.reconstruction_errors[block] = error
        if error <= self.reconstruction_tolerance:
            return
        message = (
            f"ReversibleSequence: the input of block {block} was rebuilt with relative error "
            f"{error:.3g} > reconstruction_tolerance={self.reconstruction_tolerance:g}. The "
            "block is ill-conditioned for reconstruction in this precision; bound the drift "
            "with anchor_every=k, use couplings with fixed_point_bits, or train in float64."
        )
        if self.check_reconstruction == "raise":
            raise RuntimeError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)

    def _check_drift(self, rebuilt: Tensor, sample: tuple[tuple[Tensor, ...], Tensor]) -> None:
        if self._drift_warned:
            return
        idx, true = sample
        error = relative_error([rebuilt[idx]], [true])
        dtype = true.dtype
        tolerance = DRIFT_TOLERANCE.get(dtype, DRIFT_TOLERANCE_LOW_PRECISION)
        if error <= tolerance:
            return
        self._drift_warned = True
        warnings.warn(
            f"ReversibleSequence: the chain's input was rebuilt with relative error {error:.3g} "
            f"(sampled; tolerance {tolerance:g} in {dtype}), so the gradients of memory "
            "saving are unreliable. Either the blocks amplify rounding errors, or the "
            "recompute computes something else than the forward pass did (random ops with "
            "preserve_rng_state=False, state the blocks change). Bound the drift with "
            "anchor_every=k (keeps every k-th activation), use couplings with "
            "fixed_point_bits=16 (bit-exact), normalise the blocks' outputs, or debug with "
            "check_reconstruction='warn'. (Warned once; drift_check=False silences it.)",
            RuntimeWarning,
            stacklevel=2,
        )

    def extra_repr(self) -> str:
        keep = f", keep_blocks={list(self._keep_blocks)}" if self._keep_blocks else ""
        return (
            f"memory_saving={self.memory_saving}, anchor_every={self.anchor_every}, "
            f"check_reconstruction={self.check_reconstruction!r}{keep}"
        )


def _no_logdet(block: nn.Module, direction: Direction) -> TypeError:
    name = f"{direction.value}_with_logdet"
    return TypeError(
        f"{type(block).__name__} has no {name}() method, so it cannot report its "
        "log-determinant; give it forward_with_logdet and inverse_with_logdet (see "
        "invertible_core.LogDetBlock)"
    )


#: what passes from block to block: one tensor, or the two parts of a coupling
State = tuple[Tensor, ...]


def _layout(block: nn.Module) -> Partition | None:
    """How ``block`` takes its input: a coupling its two parts, anything else one tensor."""
    return block.partition if isinstance(block, Coupling) else None


def _convert(
    state: State, frm: Partition | None, to: Partition | None, block: nn.Module | None
) -> State:
    """``state`` re-cut from layout ``frm`` to ``to``: consecutive couplings that cut alike
    pass their parts on as they are; a merge or a split happens only where they differ."""
    if frm == to:
        return state
    whole = frm.merge((state[0], state[1])) if frm is not None else state[0]
    if to is None:
        return (whole,)
    return to.split(whole, type(block).__name__ if block is not None else "ReversibleSequence")


def _converter(consumer: Partition | None, producer: Partition | None) -> Any:
    """For the backward pass: a producer's outputs from its consumer's rebuilt inputs."""
    if consumer == producer:
        return None
    return lambda inputs: _convert(inputs, consumer, producer, None)


def _split_output(
    out: Any, block: nn.Module, index: int, logdet: bool, layout: Partition | None
) -> tuple[State, Tensor | None]:
    name = type(block).__name__
    if logdet:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(
                f"ReversibleSequence: block {index} ({name}) must return (output, logdet) from "
                f"its *_with_logdet method, got {type(out).__name__}"
            )
        y, ld = out
    else:
        y, ld = out, None
    if layout is not None:
        if isinstance(y, tuple) and len(y) == 2 and all(isinstance(t, Tensor) for t in y):
            return y, ld
        got = f"a tuple of {len(y)}" if isinstance(y, tuple) else f"a {type(y).__name__}"
        raise TypeError(
            f"ReversibleSequence: block {index} ({name}) returned {got}; given the two parts "
            "of its input, a coupling returns the two parts of its output"
        )
    if not isinstance(y, Tensor):
        raise TypeError(
            f"ReversibleSequence: block {index} ({name}) returned a {type(y).__name__}; a block "
            "of a sequence takes one tensor and returns one tensor"
        )
    return (y,), ld
