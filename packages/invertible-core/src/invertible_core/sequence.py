"""ReversibleSequence: a chain of invertible blocks trained with memory flat in depth.

The trade-off: plain autograd stores every intermediate activation of a chain of N blocks,
so memory grows with N. A :class:`ReversibleSequence` runs the whole chain as one autograd
operation that keeps only the chain's *output*. In the backward pass it walks the blocks in
reverse and rebuilds each block's input from its output. Couplings do that in one fused
step: ``Gm(y1)`` and ``Fm(x2)`` are recomputed once, with grad, and each result is used
twice, to rebuild the input and to backpropagate (the RevNet paper's algorithm). Any other
invertible block (:class:`~invertible_core.InvertibleDownsampling`, your own module with
``forward`` and ``inverse``) is rebuilt by its inverse and differentiated by running its
forward again. The cost is about one extra forward pass of the chain; the memory is that of
the output plus one block's recompute, whatever N is. Blocks may change the shape
(downsampling); the chain passes the two parts of a coupling from block to block without
concatenating them, and merges only where a block wants the whole tensor.

Nothing here rewrites a tensor's storage: the caller's tensors are never freed, refilled or
modified, so the sequence composes with ops that saved their outputs, with
``DistributedDataParallel`` (parameters receive their gradients through ordinary autograd
edges, once), with ``torch.autograd.grad`` and with ``torch.compile`` (the sequence's
autograd function runs eagerly: a graph break, by design; compiled ``Fm``/``Gm`` inside it
stay compiled).

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
- ``preserve_rng_state`` (default on, per block or for all): captures the random state
  before each ``Fm``/``Gm`` call so dropout draws the same masks in the recompute; about
  5 KB per call, restored afterwards so the caller's random stream is unaffected.
- autocast: the recompute runs under the autocast settings of the forward pass, so fp16 and
  bf16 training computes the same function twice.
- Module state: norm layers update their running statistics once per forward; any other
  buffer a block writes in its forward pass (``spectral_norm``, parametrizations) is shown
  to the recompute as it was before the forward pass. Forward hooks of the blocks' modules
  fire twice (forward and recompute); :func:`~invertible_core.is_recomputing` tells them
  apart.
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

from invertible_core.chain import Chain, relative_error
from invertible_core.recompute import _Mode, tensor_devices
from invertible_core.sequence_nodes import (
    DRIFT_TOLERANCE,
    DRIFT_TOLERANCE_LOW_PRECISION,
    SequenceRun,
    apply_chain,
)
from invertible_core.side_inputs import SideInputs
from invertible_core.steps import Step, make_step, trainable

__all__ = ["ReversibleSequence"]

CheckMode = Literal["off", "warn", "raise"]


#: relative error of the rebuilt chain input above which the drift check warns
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
            ``retain_graph=True``). The chain frees its output during the last allowed pass;
            one pass more raises an error that says so.
        drift_check: compare a sample of the chain's input with its rebuilt values after
            each backward pass and warn once if the reconstruction drifted (relative error
            above 1e-3 in float32, 5e-2 in half precision). Costs a few KB.
        keep_blocks: blocks that keep their activations while saving memory: plain
            autograd for them, no recompute (faster, costs their activations). A count
            ``k`` keeps the last ``k`` blocks (the backward pass needs them first); a list
            gives the indices. A kept block is also an exact anchor: the blocks below it are
            rebuilt from its exactly stored input. See
            :func:`~invertible_core.fit_memory_budget` for choosing them by a memory budget.
        overlap: rebuild block ``i - 1`` while block ``i``'s gradients are computed
            (PaReprop): on CUDA the two run on two streams, on the CPU in order (same
            results, no gain). Costs one block's recompute memory more. Off by default until
            measured faster on GPUs (``benchmarks/gpu/run.sh`` measures it).

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
        overlap: bool = False,
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
            make_step(block, "ReversibleSequence", i)
            self.add_module(str(i), cast(nn.Module, block))
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
        self.drift_check = bool(drift_check)
        self.reconstruction_errors = []
        self._drift_warned = False
        self._keep_blocks: tuple[int, ...] = ()
        self.keep_blocks = keep_blocks
        self.overlap = bool(overlap)

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
                overlap=self.overlap,
                keep_blocks=[
                    j for j, i in enumerate(range(len(blocks))[index]) if i in self._keep_blocks
                ],
            )
            sub.train(self.training)
            return sub
        return blocks[index]

    # -- running -------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Run the blocks in order (side inputs go to every block); saves memory while
        training with grad enabled."""
        return cast(Tensor, self._run(x, args, kwargs, inverse=False, logdet=False))

    def inverse(self, y: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Undo the blocks in reverse order; saves memory the same way as :meth:`forward`."""
        return cast(Tensor, self._run(y, args, kwargs, inverse=True, logdet=False))

    def forward_with_logdet(self, x: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """:meth:`forward` and the per-sample ``log|det dy/dx|`` summed over the blocks
        (shape ``(batch,)``), for normalizing flows; memory saving stays on."""
        return cast(tuple[Tensor, Tensor], self._run(x, args, kwargs, inverse=False, logdet=True))

    def inverse_with_logdet(self, y: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """:meth:`inverse` and the per-sample ``log|det dx/dy|`` (the forward's, negated)."""
        return cast(tuple[Tensor, Tensor], self._run(y, args, kwargs, inverse=True, logdet=True))

    # -- which blocks keep their activations ------------------------------------------------
    @property
    def keep_blocks(self) -> tuple[int, ...]:
        """Indices of the blocks that keep their activations (plain autograd, no recompute)."""
        return self._keep_blocks

    @keep_blocks.setter
    def keep_blocks(self, value: int | Iterable[int] | None) -> None:
        self._keep_blocks = _kept_indices(value, len(self))

    def _steps(self, inverse: bool) -> tuple[list[Step], list[bool], list[int]]:
        steps = [make_step(b, "ReversibleSequence", i) for i, b in enumerate(self)]
        preserve = list(self.preserve_rng_state)
        order = list(range(len(steps)))
        if inverse:
            steps.reverse()
            preserve.reverse()
            order.reverse()
        return steps, preserve, order

    # The whole call runs eagerly under torch.compile (one graph break, by design): its
    # backward replays random states and calls autograd itself, which graphs cannot express,
    # and tracing the chain's Python bookkeeping buys nothing. What surrounds the sequence
    # compiles, and compiled modules inside the blocks run compiled in both passes.
    @torch.compiler.disable
    def _run(
        self, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any], inverse: bool, logdet: bool
    ) -> Tensor | tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor):
            raise TypeError(f"ReversibleSequence expects a tensor, got {type(x).__name__}")
        if logdet and x.dim() == 0:
            raise ValueError("forward_with_logdet needs a batch dimension (dim 0) in its input")
        steps, preserve, order = self._steps(inverse)
        side = SideInputs(args, kwargs)
        params = trainable(s.block for s in steps)
        saving = (
            self.memory_saving
            and self.training
            and torch.is_grad_enabled()
            and (x.requires_grad or bool(side.tensors) or any(params))
        )
        devices = tensor_devices([x, *side.all_tensors()])
        # stretches of consecutive blocks: rebuilt ones run as one memory-saving chain, kept
        # ones (keep_blocks) as plain autograd; without saving, everything is one plain stretch
        kept = set(self._keep_blocks) if saving else set()
        stretches: list[tuple[bool, list[int]]] = []
        for pos, index in enumerate(order):
            rebuild = saving and index not in kept
            if stretches and stretches[-1][0] == rebuild:
                stretches[-1][1].append(pos)
            else:
                stretches.append((rebuild, [pos]))
        total: Tensor | None = None
        out = x
        for rebuild, positions in stretches:
            chain = Chain(
                steps=[steps[p] for p in positions],
                inverse=inverse,
                side=side,
                who="ReversibleSequence",
                preserve=[preserve[p] for p in positions],
                wants_logdet=logdet,
                devices=devices,
                overlap=self.overlap and rebuild,
            )
            if rebuild:
                run = SequenceRun(
                    self, chain, [params[p] for p in positions], [order[p] for p in positions]
                )
                result = apply_chain(run, out)
                out, ld = result if logdet else (result, None)
            else:
                protected = frozenset({out.untyped_storage().data_ptr()})
                state, part, ld = chain.forward((out,), _Mode.DIRECT, protected=protected)
                out = part.merge(state) if part is not None else state[0]
            if ld is not None:
                total = ld if total is None else total + ld
        if not logdet:
            return out
        return out, total if total is not None else x.new_zeros(x.shape[0])

    def _report_reconstruction(self, errors: dict[int, float]) -> None:
        if len(self.reconstruction_errors) != len(self):
            self.reconstruction_errors = [0.0] * len(self)  # kept blocks: exact
        for block, error in errors.items():
            self.reconstruction_errors[block] = error
        worst = max(errors.values(), default=0.0)
        if worst <= self.reconstruction_tolerance:
            return
        block = max(errors, key=lambda b: errors[b])
        message = (
            f"ReversibleSequence: the input of block {block} was rebuilt with relative error "
            f"{worst:.3g} > reconstruction_tolerance={self.reconstruction_tolerance:g}. The "
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
