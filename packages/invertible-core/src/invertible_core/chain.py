"""The chain: one call of a sequence of steps, its forward pass and its backward pass.

The chain, not the blocks, owns how state passes between blocks: a fused block takes its
state as the two parts of its :class:`~invertible_core.Partition`; a generic block takes the
whole tensor (and may change its shape). :func:`~invertible_core.steps.convert` merges and
splits only where consecutive blocks disagree, so a chain of couplings never concatenates.
Couplings with ``fixed_point_bits`` need their input on the grid: the chain rounds the state
where it enters such a coupling from anything that is not on the same grid (layers that only
move values around, such as :class:`~invertible_core.InvertibleDownsampling`, say so with
``preserves_grid = True`` and keep the grid). Both passes advance one step at a time, so a
front end can give each block its own autograd node; the backward pass can overlap one
block's recompute with the next block's gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from invertible_core.contract import Partition, State
from invertible_core.module_state import BufferState, frozen_norm_statistics
from invertible_core.recompute import AutocastState, RecomputeContext, _Mode, forked_rng
from invertible_core.side_inputs import SideInputs
from invertible_core.steps import Step, _on_grid, convert

__all__ = ["Chain", "relative_error"]


@dataclass
class Chain:
    """One call of a chain of steps: the forward pass and what its backward pass needs.

    Both passes advance one step at a time (:meth:`step_forward`, :meth:`step_backward`),
    so a front end may give each step its own autograd node; :meth:`forward` and
    :meth:`backward` run all steps at once.
    """

    steps: Sequence[Step]
    inverse: bool
    side: SideInputs
    who: str
    preserve: Sequence[bool]
    wants_logdet: bool = False
    devices: tuple[torch.device, ...] = ()
    #: overlap each block's recompute with the next block's gradients (see the NOTE)
    overlap: bool = False
    contexts: list[RecomputeContext] = field(default_factory=list)
    #: partition of the state entering / leaving each step (None: a whole tensor)
    layouts: list[Partition | None] = field(default_factory=list)
    #: exact states after chosen steps (anchors) or before every step (truths, for checks)
    anchors: dict[int, State] = field(default_factory=dict)
    truths: dict[int, State] = field(default_factory=dict)

    # -- forward ---------------------------------------------------------------------------
    def begin_forward(
        self,
        state: State,
        mode: int,
        *,
        anchor_every: int = 0,
        keep_truths: bool = False,
        protected: frozenset[int] = frozenset(),
    ) -> None:
        self._mode = mode
        self._autocast = AutocastState.capture(self.devices) if mode == _Mode.RECORD else None
        self._anchor_every = anchor_every
        self._keep_truths = keep_truths
        self._protected = protected
        self._state: State = state
        self._part: Partition | None = None
        self._grid: int | None = None
        self._logdet: Tensor | None = None
        self._previous: RecomputeContext | None = None

    def step_forward(self, i: int) -> None:
        """Run step ``i`` on the current state."""
        step = self.steps[i]
        record = self._mode == _Mode.RECORD
        state = convert(self._state, self._part, step.partition, step.name)
        self._state = ()
        part = self._part = step.partition
        if step.grid_bits is not None and self._grid != step.grid_bits:
            state = _on_grid(state, step.grid_bits)
        if step.grid_bits is not None:
            self._grid = step.grid_bits
        elif not step.preserves_grid:
            self._grid = None
        if self._keep_truths:
            self.truths[i] = state
        ctx = RecomputeContext(
            mode=self._mode,
            side=self.side,
            devices=self.devices,
            preserve_rng=self.preserve[i],
            autocast=self._autocast,
            wants_logdet=self.wants_logdet,
            previous=self._previous,
            protected=self._protected,
        )
        if record:
            watch = BufferState.watch(step.block)
            state = step.run(state, ctx, self.inverse)
            ctx.buffers = watch.finish()
            self.contexts.append(ctx)
            self.layouts.append(part)
            self._previous = ctx
        else:
            state = step.run(state, ctx, self.inverse)
        if self.wants_logdet:
            ld = ctx._take_logdet()
            if ld is not None:
                self._logdet = ld if self._logdet is None else self._logdet + ld
        every = self._anchor_every
        if record and every and (i + 1) % every == 0 and i < len(self.steps) - 1:
            self.anchors[i] = state
        self._state = state

    def finish_forward(self) -> tuple[State, Partition | None, Tensor | None]:
        """The final state, its partition and the summed log-det; the chain keeps none."""
        state, self._state = self._state, ()
        logdet, self._logdet = self._logdet, None
        self._previous = None
        return state, self._part, logdet

    def forward(
        self,
        state: State,
        mode: int,
        *,
        anchor_every: int = 0,
        keep_truths: bool = False,
        protected: frozenset[int] = frozenset(),
    ) -> tuple[State, Partition | None, Tensor | None]:
        """Run every step; returns the final state, its partition and the summed log-det."""
        self.begin_forward(
            state, mode, anchor_every=anchor_every, keep_truths=keep_truths, protected=protected
        )
        for i in range(len(self.steps)):
            self.step_forward(i)
        return self.finish_forward()

    # -- backward --------------------------------------------------------------------------
    def begin_backward(
        self,
        state: list[Tensor],
        grads: list[Tensor],
        grad_logdet: Tensor | None,
        final: bool,
        errors: dict[int, float] | None = None,
    ) -> None:
        """Start a backward pass from the last step's output state and its gradient."""
        self._b_state = state
        self._b_grads = grads
        self._grad_logdet = grad_logdet
        self._final = final
        self._errors = errors
        self._side_leaves = self.side.differentiable()
        self._prefetched: dict[int, tuple[State, Any]] = {}
        self._events: dict[str, Any] = {}
        self._b_grads_inflight: list[Tensor] = []

    def step_backward(
        self, i: int, params: Sequence[Tensor]
    ) -> tuple[list[Tensor | None], list[Tensor | None]]:
        """Step ``i`` backward: rebuilds its input state and its gradient (kept by the
        chain for step ``i - 1``); returns the gradients of ``params`` and of the side
        inputs' differentiable tensors (this step's share)."""
        step = self.steps[i]
        if self.overlap and step.phased:
            return self._step_backward_overlapped(i, params)
        ctx = self.contexts[i]
        state, grads = self._take_state(i)
        side = self._side_leaves
        acc: list[Tensor | None] = [None] * (len(params) + len(side.tensors))
        with self._recompute_env(i), ctx._replaying(side, params, acc, self._grad_logdet):
            rebuilt, rebuilt_grads = step.backward(state, grads, ctx, self.inverse)
        del state, grads
        self._check_truth(i, rebuilt)
        self._hand_down(i, rebuilt, rebuilt_grads)
        return acc[: len(params)], acc[len(params) :]

    # NOTE [overlapped recompute]
    # A block's backward step is two halves: the recompute (rebuild the input, recording
    # the graph of Fm/Gm) and the backprop through that graph. Block i-1's recompute needs
    # only block i's rebuilt input, not its gradients, so it can run while block i's
    # gradients are computed (PaReprop, Zhu et al. 2023). On CUDA the two halves of one
    # block run on the same stream (autograd runs a backward op on the stream of its
    # forward op), and consecutive blocks alternate between two streams, so the recompute
    # of i-1 overlaps the backprop of i; events order what depends on what, and every
    # tensor that crosses streams is recorded with the caching allocator for the stream
    # that uses it. The CPU runs the same schedule in order. Cost: the graphs of two
    # blocks are alive at once (one block's recompute above the sequential schedule).
    def _step_backward_overlapped(
        self, i: int, params: Sequence[Tensor]
    ) -> tuple[list[Tensor | None], list[Tensor | None]]:
        prefetched = self._prefetched.pop(i, None)
        if prefetched is None:
            state, grads = self._take_state(i)
            self._streams_wait_for_caller((*state, *grads))
            rebuilt, pending = self._recompute(i, state)
        else:
            rebuilt, pending = prefetched
            grads = self._b_grads
            self._b_state, self._b_grads = [], []
        del prefetched
        # the step's backprop takes the only reference to its graphs, so that it can free
        # the first function's graph before the next block's recompute starts
        handed = [pending]
        del pending
        before = self.layouts[i - 1] if i > 0 else None
        name = self.steps[i].name
        between: Callable[[], None] | None = None
        if i > 0 and self.steps[i - 1].phased:
            # the state block i-1 starts from, made on block i's stream before its backprop
            anchor = self.anchors.pop(i - 1, None) if self._final else self.anchors.get(i - 1)
            with self._stream(i):
                down = list(
                    anchor
                    if anchor is not None
                    else convert(rebuilt, self.layouts[i], before, name)
                )
            self._hand_over(i, i - 1, down)

            def between() -> None:
                # block i-1's recompute, while block i's second function is backpropagated
                self._prefetched[i - 1] = self._recompute(i - 1, down)
                down.clear()

        side = self._side_leaves
        acc: list[Tensor | None] = [None] * (len(params) + len(side.tensors))
        ctx = self.contexts[i]
        with self._stream(i), ctx._backpropagating(side, params, acc, self._grad_logdet):
            self._after_grads(i)
            rebuilt_grads = self.steps[i].backprop(handed.pop(), grads, ctx, self.inverse, between)
            del grads
            self._b_grads = list(convert(rebuilt_grads, self.layouts[i], before, name))
            if between is None:  # the next step starts from here, on the caller's stream
                self._b_state = list(convert(rebuilt, self.layouts[i], before, name))
        del rebuilt, rebuilt_grads
        self._grads_done(i, (*self._b_state, *self._b_grads, *(g for g in acc if g is not None)))
        return acc[: len(params)], acc[len(params) :]

    def _recompute(self, i: int, state: list[Tensor]) -> tuple[State, Any]:
        ctx = self.contexts[i]
        with self._stream(i), self._recompute_env(i), ctx._recomputing(self._side_leaves):
            rebuilt, pending = self.steps[i].recompute(state, ctx, self.inverse)
        self._check_truth(i, rebuilt)
        return rebuilt, pending

    def _take_state(self, i: int) -> tuple[list[Tensor], list[Tensor]]:
        state, grads = self._b_state, self._b_grads
        self._b_state, self._b_grads = [], []
        anchor = self.anchors.pop(i, None) if self._final else self.anchors.get(i)
        if anchor is not None:
            state[:] = anchor
        return state, grads

    def _check_truth(self, i: int, rebuilt: State) -> None:
        if self._errors is not None and i in self.truths:
            self._errors[i] = relative_error(rebuilt, self.truths[i])

    def _hand_down(self, i: int, rebuilt: State, rebuilt_grads: State) -> None:
        before = self.layouts[i - 1] if i > 0 else None
        name = self.steps[i].name
        self._b_state = list(convert(rebuilt, self.layouts[i], before, name))
        self._b_grads = list(convert(rebuilt_grads, self.layouts[i], before, name))

    @contextmanager
    def _recompute_env(self, i: int) -> Iterator[None]:
        """The caller's random streams restored afterwards; norm statistics frozen."""
        with (
            forked_rng(self.devices, enabled=self.preserve[i]),
            frozen_norm_statistics([self.steps[i].block]),
        ):
            yield

    # -- streams (CUDA, overlap only; no-ops elsewhere) ---------------------------------
    def _streams(self) -> tuple[Any, Any] | None:
        if not self.overlap or not self.devices or self.devices[0].type != "cuda":
            return None
        return _side_streams(self.devices[0])

    def _stream(self, i: int) -> Any:
        streams = self._streams()
        if streams is None:
            return nullcontext()
        return torch.cuda.stream(streams[(len(self.steps) - 1 - i) % 2])

    def _stream_of(self, i: int) -> Any:
        streams = self._streams()
        return None if streams is None else streams[(len(self.steps) - 1 - i) % 2]

    def _streams_wait_for_caller(self, tensors: Iterable[Tensor]) -> None:
        """Both streams wait for the caller's (autograd's): everything the forward pass and
        the backward above made (outputs, anchors, side inputs, gradients) is ready."""
        streams = self._streams()
        if streams is None:
            return
        caller = torch.cuda.current_stream(self.devices[0])
        tensors = list(tensors)
        for stream in streams:
            stream.wait_stream(caller)
            for t in tensors:
                t.record_stream(stream)

    def _hand_over(self, done: int, i: int, tensors: Iterable[Tensor]) -> None:
        """Step ``i`` will use ``tensors``, made so far on step ``done``'s stream."""
        producer, consumer = self._stream_of(done), self._stream_of(i)
        if producer is None or consumer is None:
            return
        consumer.wait_event(producer.record_event())
        for t in tensors:
            t.record_stream(consumer)

    def _after_grads(self, i: int) -> None:
        """Step ``i``'s backprop waits for the gradients of step ``i + 1``'s."""
        stream = self._stream_of(i)
        event = self._events.get(f"b{i + 1}")
        if stream is None or event is None:
            return
        stream.wait_event(event)
        for t in self._b_grads_inflight:
            t.record_stream(stream)

    def _grads_done(self, i: int, tensors: tuple[Tensor, ...]) -> None:
        stream = self._stream_of(i)
        if stream is None:
            return
        self._events[f"b{i}"] = stream.record_event()
        # the caller's stream (autograd's) takes this step's gradients from here on
        caller = torch.cuda.current_stream(self.devices[0])
        caller.wait_event(self._events[f"b{i}"])
        for t in tensors:
            t.record_stream(caller)
        self._b_grads_inflight = [t for t in tensors]

    def finish_backward(self) -> tuple[State, State]:
        """The rebuilt input state of the chain and its gradient."""
        state, grads = tuple(self._b_state), tuple(self._b_grads)
        self._b_state, self._b_grads = [], []
        self._grad_logdet = None
        return state, grads

    def backward(
        self,
        state: list[Tensor],
        grads: list[Tensor],
        params: Sequence[Sequence[Tensor]],
        grad_logdet: Tensor | None,
        final: bool,
        errors: dict[int, float] | None = None,
    ) -> tuple[State, State, list[list[Tensor | None]], list[Tensor | None]]:
        """From the last step's output state and its gradient down to the chain's input.

        Returns the rebuilt input state, its gradient, the gradients of each step's
        ``params`` and of the side inputs' differentiable tensors (summed over steps).
        """
        self.begin_backward(state, grads, grad_logdet, final, errors)
        state, grads = [], []
        side_grads: list[Tensor | None] = [None] * len(self._side_leaves.tensors)
        param_grads: list[list[Tensor | None]] = [[] for _ in self.steps]
        for i in range(len(self.steps) - 1, -1, -1):
            param_grads[i], side_part = self.step_backward(i, params[i])
            for j, g in enumerate(side_part):
                if g is not None:
                    summed = side_grads[j]
                    side_grads[j] = g if summed is None else summed + g
        rebuilt, input_grads = self.finish_backward()
        return rebuilt, input_grads, param_grads, side_grads

    def reforward(
        self,
        i: int,
        inputs: State,
        grads: State,
        params: Sequence[Tensor],
        grad_logdet: Tensor | None,
    ) -> tuple[State, tuple[Tensor | None, ...], list[Tensor | None], list[Tensor | None]]:
        """Step ``i`` from its known (kept) input: run it again with grad, backpropagate.

        Returns the input state, its gradient, the gradients of ``params`` and of the side
        inputs' differentiable tensors. ``inputs``/``grads`` come as whole tensors and go
        back as such.
        """
        step, ctx = self.steps[i], self.contexts[i]
        side = self.side.differentiable()
        part = self.layouts[i]
        state = convert(inputs, None, part, step.name)
        out_grads = convert(grads, None, part, step.name)
        acc: list[Tensor | None] = [None] * (len(params) + len(side.tensors))
        with self._recompute_env(i), ctx._replaying(side, params, acc, grad_logdet):
            rebuilt, input_grads = step.reforward(state, out_grads, ctx, self.inverse)
        if part is not None:
            filled = tuple(
                torch.zeros_like(x) if g is None else g for x, g in zip(rebuilt, input_grads)
            )
            input_grads = (part.merge(filled),)
        return inputs, input_grads, acc[: len(params)], acc[len(params) :]


_STREAMS: dict[torch.device, tuple[Any, Any]] = {}


def _side_streams(device: torch.device) -> tuple[Any, Any]:
    """Two CUDA streams per device for the overlapped schedule, made once and reused."""
    if device not in _STREAMS:
        _STREAMS[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
    return _STREAMS[device]


def relative_error(rebuilt: Sequence[Tensor], true: Sequence[Tensor]) -> float:
    """Relative L2 error of a rebuilt state (float64 arithmetic)."""
    num = sum(float((r.double() - t.double()).pow(2).sum()) for r, t in zip(rebuilt, true))
    den = sum(float(t.double().pow(2).sum()) for t in true)
    return (num / den) ** 0.5 if den > 0 else num**0.5
