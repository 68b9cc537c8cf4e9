"""The engine: memory-saving forward and backward of invertible blocks, as autograd sees them.

The shape is that of ``torch.utils.checkpoint`` (non-reentrant): each block runs its ordinary
forward pass, through ``nn.Module.__call__`` and with grad, so autograd builds the same graph
as plain code would, and forward hooks, FSDP, DDP, ``torch.autograd.grad`` and parameter
hooks see what they always see. While a block runs, a ``saved_tensors_hooks`` pair keeps
none of the tensors autograd saves for backward: each is replaced by a small handle. The
difference from checkpointing is where the recompute starts. A checkpoint keeps each
block's *input*; here a block is rebuilt from its *output*, which the block above rebuilt
in turn (or, for the last block, the output kept by the caller's graph), so the memory
does not grow with depth.

One block call is a :class:`Frame`, created by the forward pass and consumed by the backward
pass:

- **record** (forward): the block runs; every saved tensor becomes a handle numbered
  within its *slot* (slot ``k`` for the ``k``-th :func:`~invertible_core.recompute.shared_call`
  of the block, such as a coupling's ``Fm`` and ``Gm``; :data:`OWN` for the block's own
  ops). The random state before and after each call, the autocast settings, the buffers
  the forward writes and whether each input required grad are recorded.
- **rebuild** (backward, when autograd first unpacks one of the block's handles): the
  block's inverse rebuilds its input from its output, without grad, except that its
  shared calls run with grad and keep what they save: a coupling's inverse computes
  ``Gm(y1)`` and ``Fm(x2)`` once, and those results serve both the inverse and the saved
  activations of the forward's ``Fm`` and ``Gm`` (the RevNet paper's one recompute).
- **replay** (backward, right after): the block's forward runs again through ``__call__``
  on the rebuilt input, with grad, its shared calls served from the rebuild; it refills the
  block's own saved tensors. It is skipped when the forward saved nothing of its own and
  the block has no forward hooks (nothing could tell the difference).

Autograd then backpropagates through the forward pass's own graph with the refilled
tensors, so gradients reach exactly the parameters that the modules held when they ran
(FSDP's unsharded parameters included) and every hook fires as in plain autograd. FSDP
unshards a block in its pre-backward hook, before autograd reaches the block's nodes, so
the rebuild, the replay and the backprop share one all-gather.
"""

from __future__ import annotations

import enum
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from invertible_core.module_state import BufferState
from invertible_core.recompute import (
    AutocastState,
    RngState,
    active_site,
    call_with_logdet,
    compiled_as,
    current_site,
    fsdp_forward_method,
    guarded_call,
    recomputing,
    run_compiled,
    without_logdet,
)

__all__ = ["OWN", "Direction", "Frame", "Mode", "Run", "saving_hooks"]

#: The slot of the saved tensors of a block's own ops (outside any shared call).
OWN = -1

_DOUBLE_BACKWARD = (
    "{who}: double backward (differentiating a gradient taken with create_graph=True, e.g. "
    "a gradient penalty) is not supported while saving memory: the activations it would "
    "differentiate through were rebuilt outside autograd. Run this step with "
    "memory_saving=False (the wrapper: disable=True) for higher-order gradients."
)


class _NoDoubleBackward(torch.autograd.Function):
    """Identity; differentiating through it raises (see ``_DOUBLE_BACKWARD``)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, who: str) -> Tensor:
        ctx.who = who
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        raise RuntimeError(_DOUBLE_BACKWARD.format(who=ctx.who))


class Mode(enum.Enum):
    """What a frame is doing when a block's code calls into it."""

    RECORD = "record"  # the forward pass: saved tensors become handles
    REBUILD = "rebuild"  # the inverse, rebuilding the input; shared calls keep what they save
    REPLAY = "replay"  # the forward again, shared calls served from the rebuild


class Direction(enum.Enum):
    """Which map of the block the forward pass ran."""

    FORWARD = "forward"
    INVERSE = "inverse"


class _Saved:
    """What autograd keeps in place of a saved tensor: where the recompute will put it, and
    what it must look like."""

    __slots__ = ("dtype", "frame", "index", "shape", "slot")

    def __init__(self, frame: Frame, slot: int, index: int, t: Tensor) -> None:
        self.frame, self.slot, self.index = frame, slot, index
        self.shape, self.dtype = t.shape, t.dtype


class Source(NamedTuple):
    """Where a frame's output comes from in backward: a later frame's rebuilt input."""

    consumer: Frame
    slot: int
    convert: Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]] | None


class _Call:
    """What the forward pass recorded of one shared call."""

    __slots__ = ("layouts", "rng_after", "rng_before")

    def __init__(self) -> None:
        self.rng_before: RngState | None = None
        self.rng_after: RngState | None = None
        self.layouts: tuple[Layout, ...] = ()


def _tensors_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Tensor]:
    return [v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)]


#: what a call recorded of each tensor it was given: whether it required grad, and its
#: strides (some ops save different tensors, or in another order, for another layout)
Layout = tuple[bool, tuple[int, ...]]


def _leaves(values: Sequence[Any], layouts: Sequence[Layout]) -> list[Any]:
    """``values`` with each tensor detached, laid out and requiring grad as recorded."""
    recorded = iter(layouts)
    out = []
    for v in values:
        if isinstance(v, Tensor):
            requires_grad, stride = next(recorded, (True, v.stride()))
            if not requires_grad and not v.requires_grad and v.stride() == stride:
                out.append(v)  # a mask, an index: handed on as it is
                continue
            v = v.detach()
            if v.stride() != stride and v.dim() and 0 not in stride:
                v = torch.empty_strided(v.shape, stride, dtype=v.dtype, device=v.device).copy_(v)
            v.requires_grad_(requires_grad and v.is_floating_point())
        out.append(v)
    return out


def _layouts(values: Sequence[Any]) -> tuple[Layout, ...]:
    return tuple((v.requires_grad, v.stride()) for v in values if isinstance(v, Tensor))


def _has_forward_hooks(module: nn.Module) -> bool:
    from torch.nn.modules import module as m

    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or m._global_forward_hooks
        or m._global_forward_pre_hooks
    )


_PLAIN = (Tensor, nn.Parameter)


def _pack(t: Tensor) -> Any:
    frame = current_site()
    if not isinstance(frame, Frame) or type(t) not in _PLAIN or torch.compiler.is_compiling():
        # Only the run's own tensors are dropped and rebuilt. A tensor subclass is kept as it
        # is: the fake and functional tensors torch.compile traces with (AOTAutograd of torch
        # 2.4 traces under the caller's saved-tensor hooks), or a user's subclass.
        return t
    return frame.pack(t)


def _unpack(saved: Any) -> Tensor:
    if isinstance(saved, _Saved):
        t = saved.frame.unpack(saved.slot, saved.index)
        if t.shape != saved.shape or t.dtype != saved.dtype:
            raise RuntimeError(
                saved.frame._mismatch(
                    saved.slot,
                    f"a tensor of shape {tuple(t.shape)} ({t.dtype}) came back where the "
                    f"forward pass saved one of shape {tuple(saved.shape)} ({saved.dtype})",
                )
            )
        return t
    return saved  # type: ignore[no-any-return]


@contextmanager
def saving_hooks() -> Iterator[None]:
    """The saved-tensor hooks of the engine, active for a memory-saving call."""
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        yield


def _graph_task() -> int:
    return int(torch._C._current_graph_task_id())


class Run:
    """What the frames of one memory-saving call share: who owns them, how often backward
    may run through them, and what to tell the owner after a rebuild."""

    def __init__(
        self,
        who: str,
        num_bwd_passes: int = 1,
        on_rebuilt: Callable[[Frame, tuple[Tensor, ...]], None] | None = None,
    ) -> None:
        self.who = who
        self.num_bwd_passes = num_bwd_passes
        self.on_rebuilt = on_rebuilt
        self.tasks: list[int] = []
        #: a backward pass ran with create_graph=True (a later pass is a double backward)
        self.differentiable = False

    def begin_pass(self, task: int) -> bool:
        """Note backward pass ``task``; returns whether it is the last one allowed."""
        if task not in self.tasks:
            self.tasks.append(task)
            if len(self.tasks) > self.num_bwd_passes:
                if self.differentiable:
                    raise RuntimeError(_DOUBLE_BACKWARD.format(who=self.who))
                raise RuntimeError(
                    f"{self.who}: backward pass {len(self.tasks)} through one forward pass, "
                    f"but it was built with num_bwd_passes={self.num_bwd_passes}, so it "
                    "released what rebuilds its activations after the last allowed pass; "
                    f"construct it with num_bwd_passes={len(self.tasks)} (or more) to "
                    "backpropagate through it that often"
                )
        return len(self.tasks) == self.num_bwd_passes


class Frame:
    """One block call of a memory-saving forward pass, and how backward rebuilds it.

    Made by a container (:class:`~invertible_core.ReversibleSequence`,
    :class:`~invertible_core.InvertibleModuleWrapper`) and run by :meth:`forward`; the
    backward pass reaches it through the handles autograd holds. ``inputs``/outputs are
    tuples of tensors (a sequence passes one tensor; MemCNN's wrapper any number).
    """

    def __init__(
        self,
        run: Run,
        block: nn.Module,
        *,
        direction: Direction = Direction.FORWARD,
        logdet: bool = False,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        devices: tuple[torch.device, ...] = (),
        preserve_rng: bool = True,
        keep_activations: bool = False,
        keep_input: bool = False,
        index: int = 0,
        n_inputs: int = 1,
        parts: bool = False,
        compiled: Any = None,
    ) -> None:
        self.run = run
        self.n_inputs = n_inputs
        #: the block takes its inputs as one tuple, and returns one (a coupling's two parts)
        self.parts = parts
        #: dynamo's frame callback when the call began (torch.compile), for the recompute
        self.compiled = compiled
        self.block = block
        self.index = index
        self.direction = direction
        self.logdet = logdet
        self.args = args
        self.kwargs = {} if kwargs is None else kwargs
        self.devices = devices
        self.preserve_rng = preserve_rng
        #: plain autograd for this block (its saved tensors stay in the graph)
        self.keep_activations = keep_activations
        #: keep this block's input, exactly: no inverse needed (an anchor)
        self.keep_input = keep_input or keep_activations
        self.mode = Mode.RECORD
        # recorded by the forward pass
        self.input_layouts: tuple[Layout, ...] = ()
        self.side_layouts: tuple[Layout, ...] = ()
        self.rng: RngState | None = None
        self.autocast: AutocastState | None = None
        self.buffers = BufferState()
        self.calls: dict[int, _Call] = {}
        self.packed: dict[int, int] = {}
        #: shape and dtype of every saved tensor, per slot, for checking the recompute
        self.metadata: dict[int, list[tuple[torch.Size, torch.dtype]]] = {}
        self.kept_input: tuple[Tensor, ...] | None = None
        #: where the output comes from in backward: the next frame's rebuilt input
        #: (``(frame, position)`` per output) or the output itself, kept
        self.sources: list[Source | None] = []
        self.kept_output: list[Tensor | None] = []
        self.output_unpack: Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]] | None = None
        self.output_versions: list[int] = []
        #: the frames (by id) that take this frame's rebuilt input as their output, and those
        #: that have not taken it yet in the current backward pass: it is released when
        #: the last of them has
        self.claimants: set[int] = set()
        self.pending: set[int] = set()
        # filled by the backward pass
        self.storage: dict[int, list[Tensor | None]] | None = None
        self.storage_task = -1
        self.remaining = 0
        self.cache: dict[int, Any] = {}
        self.rebuilt: tuple[Tensor, ...] | None = None
        self.rebuilt_task = -1

    # -- the forward pass -----------------------------------------------------------------
    def forward(self, inputs: tuple[Tensor, ...]) -> Any:
        """Run the block on ``inputs`` (record mode); returns what the block returned."""
        self.input_layouts = _layouts(inputs)
        self.side_layouts = _layouts((*self.args, *self.kwargs.values()))
        if self.keep_input:
            self.kept_input = tuple(t.detach() for t in inputs)
        self.autocast = AutocastState.capture(self.devices)
        if self.preserve_rng:
            self.rng = RngState.capture(self.devices)
        watch = BufferState.watch(self.block)
        with active_site(None if self.keep_activations else self), without_logdet():
            out = self._run_block(inputs, self.args, self.kwargs, self.direction)
        self.buffers = watch.finish()
        if self.rng is not None and self.rng.equals(RngState.capture(self.devices)):
            # the block drew no random number: its recompute draws none either, and nothing
            # needs replaying (no state is kept: about 5 KB per capture on the CPU)
            self.rng = None
            for record in self.calls.values():
                record.rng_before = record.rng_after = None
        return out

    def _run_block(
        self,
        inputs: Sequence[Any],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        direction: Direction,
    ) -> Any:
        """The block's map (``forward`` through ``__call__``, or ``inverse``), with log-det."""
        block = self.block
        given = (tuple(inputs),) if self.parts else tuple(inputs)
        if direction is Direction.FORWARD:
            if self.logdet:
                return guarded_call(
                    partial(call_with_logdet, block),
                    (*given, *args),
                    kwargs,
                    key=(block, "forward_with_logdet"),
                    compiled=self.compiled,
                )
            return guarded_call(block, (*given, *args), kwargs, compiled=self.compiled)
        name = "inverse_with_logdet" if self.logdet else "inverse"
        fn = fsdp_forward_method(block, name) if self.mode is Mode.RECORD else getattr(block, name)
        return guarded_call(fn, (*given, *args), kwargs, compiled=self.compiled)

    def set_outputs(
        self,
        outputs: tuple[Tensor, ...],
        unpack: Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]] | None = None,
    ) -> None:
        """Keep the block's outputs until a consumer promises to rebuild them (:meth:`hand_to`).

        ``unpack`` turns what is kept into what the block returned (the caller got the
        merged parts of a coupling: keep that one tensor, split it again in backward)."""
        self.kept_output = [t.detach() for t in outputs]
        self.output_versions = [t._version for t in outputs]
        self.sources = [None] * len(outputs)
        self.output_unpack = unpack

    def hand_to(
        self,
        position: int,
        consumer: Frame,
        slot: int,
        convert: Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]] | None = None,
    ) -> None:
        """Output ``position`` is ``consumer``'s input ``slot``, where ``convert`` (if given)
        turns the consumer's inputs as it takes them into the tensors it was handed (the two
        parts of a coupling merged into one tensor, or a tensor split into them): the
        consumer rebuilds it in backward, so this frame need not keep it."""
        self.sources[position] = Source(consumer, slot, convert)
        self.kept_output[position] = None
        consumer.claimants.add(id(self))

    # -- what the block's code calls ---------------------------------------------------------
    def pack(self, t: Tensor) -> Any:
        slot = self._slot
        if self.mode is Mode.RECORD:
            index = self.packed.get(slot, 0)
            self.packed[slot] = index + 1
            saved = _Saved(self, slot, index, t)
            self.metadata.setdefault(slot, []).append((saved.shape, saved.dtype))
            return saved
        assert self.storage is not None
        # detached: a recomputed op's saved output would otherwise hold its own graph in a
        # cycle that only autograd (not Python's collector) could break
        t = t.detach() if t.requires_grad else t
        self.storage.setdefault(slot, []).append(t)
        self.remaining += 1
        return t

    _slot: int = OWN

    def call(
        self, slot: int, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """A :func:`~invertible_core.recompute.shared_call` of the block, by mode."""
        values = (*args, *kwargs.values())
        if self.mode is Mode.RECORD:
            record = self.calls[slot] = _Call()
            record.layouts = _layouts(values)
            if self.preserve_rng:
                record.rng_before = RngState.capture(self.devices)
            before, self._slot = self._slot, slot
            try:
                out = guarded_call(fn, args, kwargs, compiled=self.compiled)
            finally:
                self._slot = before
            if self.preserve_rng:
                record.rng_after = RngState.capture(self.devices, record.rng_before)
            return out
        if self.mode is Mode.REBUILD:
            record = self.calls.get(slot) or _Call()
            leaves = _leaves(values, record.layouts)
            n = len(args)
            if record.rng_before is not None:
                record.rng_before.restore()
            with torch.enable_grad(), self._in_slot(slot), compiled_as(self.compiled):
                out = run_compiled(fn, tuple(leaves[:n]), dict(zip(kwargs, leaves[n:])))
            self.cache[slot] = out
            return out
        # REPLAY
        if slot in self.cache:
            record = self.calls[slot]
            if record.rng_after is not None:
                record.rng_after.restore()
            return self.cache.pop(slot)
        with self._in_slot(slot), compiled_as(self.compiled):
            return run_compiled(fn, args, kwargs)

    @contextmanager
    def _in_slot(self, slot: int) -> Iterator[None]:
        before, self._slot = self._slot, slot
        try:
            yield
        finally:
            self._slot = before

    # -- the backward pass --------------------------------------------------------------------
    def unpack(self, slot: int, index: int) -> Tensor:
        t = self._take(slot, index)
        if torch.is_grad_enabled():
            self.run.differentiable = True
            # create_graph=True: first-order gradients are right, but a second
            # differentiation would treat the rebuilt activations as constants
            return _NoDoubleBackward.apply(
                t.detach().requires_grad_(t.is_floating_point()), self.run.who
            )  # type: ignore[no-any-return]
        return t

    def _take(self, slot: int, index: int) -> Tensor:
        task = _graph_task()
        entries = None if self.storage is None else self.storage.get(slot)
        if (
            self.storage_task != task
            or entries is None
            or index >= len(entries)
            or entries[index] is None
        ):
            self.recompute(task)
            entries = None if self.storage is None else self.storage.get(slot)
        if entries is None or index >= len(entries) or entries[index] is None:
            raise RuntimeError(
                self._mismatch(
                    slot,
                    f"it saved {len(entries or ())} tensors where the forward pass saved "
                    f"{self.packed.get(slot, 0)}",
                )
            )
        t = entries[index]
        assert t is not None
        entries[index] = None
        self.remaining -= 1
        if self.remaining == 0:
            self.storage = None
        return t

    def _mismatch(self, slot: int, what: str) -> str:
        where = "its own ops" if slot == OWN else f"shared call {slot}"
        return (
            f"{self.run.who}: the recompute of block {self.index} ({type(self.block).__name__}) "
            f"differs from its forward pass in {where}: {what}. "
            "A block must compute the same function in the recompute: no control flow on "
            "is_recomputing() around tensor ops, the same shared_call slots in forward and "
            "inverse, and no torch.compile'd code that the recompute runs uncompiled (compile "
            "Fm/Gm themselves with torch.compile(module) instead)."
        )

    def _check_refill(self) -> None:
        """The recompute must save what the forward pass saved, slot by slot; say where it
        did not (rather than let autograd differentiate with other tensors)."""
        storage = self.storage or {}
        for slot, recorded in self.metadata.items():
            got = [(t.shape, t.dtype) for t in storage.get(slot, ()) if t is not None]
            if got != recorded:
                if len(got) != len(recorded):
                    what = (
                        f"it saved {len(got)} tensors where the forward pass saved {len(recorded)}"
                    )
                else:
                    i = next(k for k, (a, b) in enumerate(zip(got, recorded)) if a != b)
                    what = (
                        f"saved tensor {i} has shape {tuple(got[i][0])} ({got[i][1]}) where the "
                        f"forward pass saved one of shape {tuple(recorded[i][0])} ({recorded[i][1]})"
                    )
                raise RuntimeError(self._mismatch(slot, what))

    def output_value(self, task: int) -> tuple[Tensor, ...]:
        """The block's output in backward pass ``task``."""
        values = []
        converted: dict[int, tuple[Tensor, ...]] = {}
        for position, source in enumerate(self.sources):
            if source is not None:
                inputs = source.consumer.rebuilt_input(task)
                if source.convert is not None:
                    key = id(source.consumer)
                    if key not in converted:
                        converted[key] = source.convert(inputs)
                    inputs = converted[key]
                values.append(inputs[source.slot])
                continue
            kept = self.kept_output[position]
            if kept is None:
                raise RuntimeError(
                    f"{self.run.who}: the output of block {self.index} was released after the "
                    "last backward pass allowed (num_bwd_passes); construct it with more"
                )
            if kept._version != self.output_versions[position]:
                raise RuntimeError(
                    f"{self.run.who}: its output was modified in place after the forward "
                    "pass, so the activations cannot be rebuilt from it. Clone the output "
                    "before modifying it, or keep the input (keep_input=True on the wrapper, "
                    "keep_blocks on a sequence)."
                )
            values.append(kept)
        if self.output_unpack is not None:
            return self.output_unpack(tuple(values))
        return tuple(values)

    def rebuilt_input(self, task: int) -> tuple[Tensor, ...]:
        """The block's input in backward pass ``task``: kept, or rebuilt from its output."""
        if self.kept_input is not None:
            return self.kept_input
        if self.rebuilt is None or self.rebuilt_task != task:
            self.recompute(task)
        assert self.rebuilt is not None
        return self.rebuilt

    def recompute(self, task: int) -> None:
        """Rebuild the block's input from its output and refill its saved tensors."""
        last_pass = self.run.begin_pass(task)
        outputs = self.output_value(task) if self.kept_input is None else ()
        side = _leaves((*self.args, *self.kwargs.values()), self.side_layouts)
        args, kwargs = side[: len(self.args)], dict(zip(self.kwargs, side[len(self.args) :]))
        self.storage, self.storage_task, self.remaining = {}, task, 0
        self.cache = {}
        try:
            inputs = self._rebuild_and_replay(outputs, args, kwargs)
        finally:
            self.mode = Mode.RECORD
            self.cache = {}
        del outputs
        self._check_refill()
        if self.remaining == 0:
            self.storage = None
        self.rebuilt, self.rebuilt_task = inputs, task
        self.pending = set(self.claimants)
        for consumer in {
            id(s.consumer): s.consumer for s in self.sources if s is not None
        }.values():
            consumer.pending.discard(id(self))
            if not consumer.pending and consumer.kept_input is None:
                consumer.rebuilt = None  # taken by every frame that needed it
        if last_pass:
            self.kept_output = [None] * len(self.kept_output)
        if self.run.on_rebuilt is not None:
            self.run.on_rebuilt(self, inputs)
        if not self.pending and self.kept_input is None:
            self.rebuilt = None

    def _rebuild_and_replay(
        self, outputs: tuple[Tensor, ...], args: Sequence[Any], kwargs: dict[str, Any]
    ) -> tuple[Tensor, ...]:
        with self._replaying():
            if self.kept_input is not None:
                inputs = self.kept_input
            else:
                self.mode = Mode.REBUILD
                inverse = (
                    Direction.INVERSE if self.direction is Direction.FORWARD else Direction.FORWARD
                )
                with torch.no_grad(), active_site(self):
                    rebuilt = self._invert(outputs, args, kwargs, inverse)
                inputs = tuple(t.detach() for t in rebuilt)
            if self._needs_replay():
                self.mode = Mode.REPLAY
                leaves = _leaves(inputs, self.input_layouts)
                if self.rng is not None:
                    self.rng.restore()
                with torch.enable_grad(), active_site(self):
                    self._run_block(leaves, args, kwargs, self.direction)
        return inputs

    def _invert(
        self,
        outputs: tuple[Tensor, ...],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        direction: Direction,
    ) -> tuple[Tensor, ...]:
        block = self.block
        fn: Callable[..., Any] = block if direction is Direction.FORWARD else block.inverse  # type: ignore[assignment]
        given = (tuple(outputs),) if self.parts else tuple(outputs)
        with compiled_as(self.compiled):
            out = run_compiled(fn, (*given, *args), kwargs)
        rebuilt = out if isinstance(out, tuple) else (out,)
        for i, t in enumerate(rebuilt):
            if not isinstance(t, Tensor):
                raise TypeError(
                    f"{self.run.who}: {type(block).__name__}.{direction.value} returned a "
                    f"{type(t).__name__} at position {i}; it must return tensors"
                )
        if len(rebuilt) != self.n_inputs:
            raise RuntimeError(
                f"{self.run.who}: {type(block).__name__}.{direction.value} rebuilt "
                f"{len(rebuilt)} tensors for a call with {self.n_inputs} positional tensor "
                "inputs, so the inputs cannot be rebuilt. Positional tensors are the "
                "invertible inputs; pass side inputs (an embedding, a mask) by keyword."
            )
        return rebuilt

    def _needs_replay(self) -> bool:
        if self.packed.get(OWN, 0) or _has_forward_hooks(self.block):
            return True
        return any(slot not in self.cache for slot in self.packed if slot != OWN)

    @contextmanager
    def _replaying(self) -> Iterator[None]:
        """Everything a recompute replays: random state (the caller's stream restored
        afterwards), autocast, buffers as before, the saved-tensor hooks, the flag."""
        caller_rng = RngState.capture(self.devices) if self.rng is not None else None
        autocast = self.autocast.replay() if self.autocast is not None else None
        try:
            if autocast is not None:
                autocast.__enter__()
            with self.buffers.as_before(), recomputing(), saving_hooks(), without_logdet():
                yield
        finally:
            if autocast is not None:
                autocast.__exit__(None, None, None)
            if caller_rng is not None:
                caller_rng.restore()


# -- handing outputs from one memory-saving call to the next ----------------------------------
# NOTE [hand-off between calls]
# A memory-saving call keeps its outputs (the rebuild starts from them) unless the next
# memory-saving call takes them as inputs: that call rebuilds its inputs in backward anyway,
# so it promises to hand them back, and the first call drops its reference. A chain of
# wrapped blocks therefore holds one block's output at a time. The producer of an input is
# found by the identity of the tensor's memory (storage, offset, shape, strides), not by the
# autograd node that made it: FSDP, hooks and other wrappers may put a node of their own in
# between and pass the same memory on.
_PRODUCERS: weakref.WeakValueDictionary[tuple[Any, ...], Frame] = weakref.WeakValueDictionary()
_PRODUCER_POSITION: dict[tuple[Any, ...], int] = {}


def _memory_key(t: Tensor) -> tuple[Any, ...]:
    return (
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        t.stride(),
        t.dtype,
        t.device,
    )


def offer_outputs(
    frame: Frame,
    outputs: tuple[Tensor, ...],
    unpack: Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]] | None = None,
) -> None:
    """Keep ``frame``'s outputs, and let a later memory-saving call take them over."""
    frame.set_outputs(outputs, unpack)
    for position, t in enumerate(outputs):
        if t.requires_grad:
            key = _memory_key(t)
            _PRODUCERS[key] = frame
            _PRODUCER_POSITION[key] = position


def claim_inputs(
    frame: Frame,
    inputs: tuple[Tensor, ...],
    convert: Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]] | None = None,
) -> None:
    """Take over the inputs of ``frame`` (as the caller handed them: ``convert`` turns the
    frame's own inputs into these) that an earlier memory-saving call still keeps."""
    for slot, t in enumerate(inputs):
        key = _memory_key(t)
        producer = _PRODUCERS.pop(key, None)
        position = _PRODUCER_POSITION.pop(key, None)
        if producer is None or position is None or producer is frame:
            continue
        kept = producer.kept_output[position] if position < len(producer.kept_output) else None
        if kept is None or kept._version != producer.output_versions[position]:
            continue
        producer.hand_to(position, frame, slot, convert)
    if len(_PRODUCER_POSITION) > 4 * len(_PRODUCERS) + 64:
        for key in [k for k in _PRODUCER_POSITION if k not in _PRODUCERS]:
            del _PRODUCER_POSITION[key]
