"""What the memory planner measures, and how: the costs of each switch, the phases of a step.

The machinery under :mod:`invertible_core.planner.fit` (read its docstring first): the
calls it watches (:func:`instrumented`), what it puts back afterwards (:func:`preserved`),
each switch's stored bytes and recompute time (:func:`unit_costs`) and the phases of the
step with everything recomputed (:func:`phase_peaks`). The step is the project's one
:class:`~invertible_core.planner.step.TrainingStep`. Nothing here is public API.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from invertible_core.contract import is_recomputing
from invertible_core.couplings import Coupling
from invertible_core.memory import mark_phase, measure_memory, measure_memory_phases
from invertible_core.planner.step import (
    StateSnapshot,
    TrainingStep,
    storage_key,
    synchronize,
    tensors,
)
from invertible_core.planner.switches import MemorySwitches, SwitchState
from invertible_core.sequence import ReversibleSequence

#: the methods through which a sequence is run, each an entry the planner watches
SEQUENCE_METHODS = ("forward", "inverse", "forward_with_logdet", "inverse_with_logdet")


@dataclass
class Unit:
    """One switch: a block of a sequence (``index`` set) or a checkpointable module."""

    name: str
    owner: str
    index: int | None
    #: stored bytes per (segment, position in that segment's execution order)
    bytes_at: dict[tuple[int, int], int]
    seconds: float

    @property
    def stored_bytes(self) -> int:
        return sum(self.bytes_at.values())


@dataclass
class Call:
    """One call of a sequence or checkpointable module during the step (a *segment*)."""

    owner: str
    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def saved_bytes(fn: Callable[[], Any], exclude: set[tuple[int, str]]) -> tuple[Any, int]:
    """``fn()`` and the bytes of the distinct storages autograd saved for backward during
    it, those in ``exclude`` (parameters, buffers, inputs held anyway) left out."""
    seen: dict[tuple[int, str], int] = {}

    def pack(t: Tensor) -> Tensor:
        key = storage_key(t)
        if key not in exclude and key[1] != "id":
            try:
                seen[key] = t.untyped_storage().nbytes()
            except (RuntimeError, NotImplementedError):  # pragma: no cover
                seen[key] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def seconds(
    fn: Callable[[], Any], device: torch.device, repeats: int, warmup: bool = True
) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls (after one untimed call, unless
    ``warmup`` is False: ``fn`` ran just before)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextmanager
def instrumented(
    owners: Mapping[str, nn.Module],
    on_call: Callable[[str, str, tuple[Any, ...], dict[str, Any], Callable[[], Any]], Any],
) -> Iterator[None]:
    """Route every call of the entry methods of ``owners`` through ``on_call(owner, method,
    args, kwargs, run)`` (``run()`` calls the real method) while the block runs.

    The methods are shadowed on the instances, so calls that bypass ``nn.Module.__call__``
    (``seq.forward_with_logdet(x)``) are seen too; nothing is left behind afterwards.
    """
    patched: list[tuple[nn.Module, str]] = []
    try:
        for owner, module in owners.items():
            names = SEQUENCE_METHODS if isinstance(module, ReversibleSequence) else ("forward",)
            for method in names:
                real = getattr(module, method)

                def call(
                    *args: Any,
                    _owner: str = owner,
                    _method: str = method,
                    _real: Any = real,
                    **kwargs: Any,
                ) -> Any:
                    return on_call(_owner, _method, args, kwargs, lambda: _real(*args, **kwargs))

                object.__setattr__(module, method, call)
                patched.append((module, method))
        yield
    finally:
        for module, method in patched:
            module.__dict__.pop(method, None)


@contextmanager
def preserved(step: TrainingStep) -> Iterator[None]:
    """Everything the planner's steps change, put back afterwards: parameters (ActNorm
    initialises its own), buffers, the optimizer's and the scaler's state
    (:class:`~invertible_core.planner.step.StateSnapshot`), gradients, the training flag,
    the switches, the random state. Copies go to the CPU, so that they take no device
    memory."""
    module = step.module
    snapshot = StateSnapshot(step)
    grads = [
        (t, None if t.grad is None else t.grad.detach().to("cpu", copy=True))
        for t in step.gradient_holders()
    ]
    switches = MemorySwitches(module)
    setting = switches.state()
    training = module.training
    calls = step.calls
    devices = [step.device.index or 0] if step.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        snapshot.restore()
        with torch.no_grad():
            for t, saved_grad in grads:
                t.grad = None if saved_grad is None else saved_grad.to(t.device)
        module.train(training)
        switches.set(setting)
        step.calls = calls


def detached(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(detached(v) for v in value)
    if isinstance(value, list):
        return [detached(v) for v in value]
    if isinstance(value, dict):
        return {k: detached(v) for k, v in value.items()}
    return value


def configure(
    switches: MemorySwitches, mask: Sequence[bool] | None, units: Sequence[Unit] = ()
) -> None:
    """Set every switch: ``mask[i]`` says whether unit ``i`` stores (``None``: none does)."""
    keep: dict[str, list[int]] = {name: [] for name in switches.sequences}
    store = dict.fromkeys(switches.checkpointables, False)
    for on, unit in zip(mask or (), units):
        if not on:
            continue
        if unit.index is not None:
            keep[unit.owner].append(unit.index)
        else:
            store[unit.owner] = True
    switches.set(
        SwitchState(
            saving=dict.fromkeys(switches.sequences, True),
            keep={name: tuple(v) for name, v in keep.items()},
            checkpointed={name: not stored for name, stored in store.items()},
        )
    )


def peak(step: TrainingStep) -> int:
    """Exact peak bytes of one step beyond what exists before it."""
    gc.collect()
    _, stats = measure_memory(step, step.device)
    return stats.peak_bytes


#: a phase's bound ``(q, j)``: the stored activations alive in it are those of every segment
#: before ``q`` and of the positions ``<= j`` of segment ``q`` (positions in execution order)
Bound = tuple[int, int]
EVERYTHING: Bound = (2**62, 2**62)


# NOTE [phases of the step]
# A stored block's activations live from its forward to its backward. The planner measures
# the step with everything recomputed, split at every segment's forward and backward and at
# every block's forward and recompute (a pre-hook on the block's submodules: Fm and Gm of a
# coupling fire in the forward pass and, with is_recomputing() true, in the recompute), and
# gives each phase the set of positions whose stored activations would be alive in it:
# forward phases everything up to the blocks running in them, backward phases everything
# below the block being rebuilt (a block that is stored instead holds its activations where
# the recompute would have held them: the same memory, not more). A plan's peak is then the highest phase plus what it stores alive
# there. Blocks without submodules (ActNorm, 1x1 convolutions) mark nothing: their phase is
# their neighbour's, and the bounds count them alive in it, never the other way round.
def phase_peaks(
    step: TrainingStep, owners: Mapping[str, nn.Module]
) -> tuple[list[tuple[Bound, int]], dict[int, int]]:
    """One step with everything recomputed, measured in phases (see the NOTE): each phase's
    bound and its peak beyond what existed before the step; and each segment's length."""
    marks: list[tuple[int, int, str]] = []  # (segment, position or -1, "fwd" | "bwd")
    lengths: dict[int, int] = {}
    calls: dict[int, tuple[str, bool]] = {}  # segment -> (owner, run inverse)
    running: list[int] = []
    backward: list[int] = []

    def mark(segment: int, pos: int, kind: str) -> None:
        if marks and marks[-1] == (segment, pos, kind):
            return  # Gm after Fm: the same block
        marks.append((segment, pos, kind))
        mark_phase()

    def on_call(
        owner: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], run: Any
    ) -> Any:
        segment = len(lengths)
        module = owners[owner]
        lengths[segment] = len(module) if isinstance(module, ReversibleSequence) else 1
        calls[segment] = (owner, method.startswith("inverse"))
        mark(segment, -1, "fwd")
        running.append(segment)
        try:
            out = run()
        finally:
            running.pop()
        first = next((t for t in tensors(out) if t.requires_grad), None)
        if first is not None:

            def backward_starts(grad: Tensor) -> None:
                backward.append(segment)
                mark(segment, -1, "bwd")

            first.register_hook(backward_starts)
        return out

    def on_block(owner: str, index: int) -> None:
        recomputing = is_recomputing()
        where = backward if recomputing else running
        if not where or calls[where[-1]][0] != owner:
            return
        segment = where[-1]
        pos = lengths[segment] - 1 - index if calls[segment][1] else index
        mark(segment, pos, "bwd" if recomputing else "fwd")

    handles = [
        child.register_forward_pre_hook(lambda *_, o=owner, i=i: on_block(o, i))
        for owner, module in owners.items()
        if isinstance(module, ReversibleSequence)
        for i, block in enumerate(module)
        for child in block.children()
    ]
    gc.collect()  # no warm-up: the step that recorded the calls ran in this configuration
    try:
        with instrumented(owners, on_call):
            _, _, peaks = measure_memory_phases(step, step.device)
    finally:
        for handle in handles:
            handle.remove()
    if len(peaks) != len(marks) + 1:  # pragma: no cover - a mark from another thread was lost
        return [(EVERYTHING, max(peaks))], lengths
    phases: list[tuple[Bound, int]] = [((-1, -1), peaks[0])]
    for k, (segment, pos, kind) in enumerate(marks):
        last = lengths[segment] - 1
        if kind == "bwd":
            # a stored block's activations stand in for the recompute its phase measured
            # (a rebuilt block's, a checkpointed module's): only what lies below it counts
            sequence = isinstance(owners[calls[segment][0]], ReversibleSequence)
            bound = (last if sequence else -1) if pos < 0 else pos - 1
        else:
            after = marks[k + 1] if k + 1 < len(marks) else None
            same = after is not None and after[0] == segment and after[2] == "fwd"
            bound = after[1] - 1 if same and after is not None and after[1] >= 0 else last
        phases.append(((segment, bound), peaks[k + 1]))
    return phases, lengths


def unit_costs(
    step: TrainingStep,
    calls: list[Call],
    switches: MemorySwitches,
    repeats: int,
) -> list[Unit]:
    """Each switch's stored bytes (per segment) and recompute time, from the calls' inputs.

    Every block runs once on its own input (its saved bytes; a sequence's next block needs
    its output). Twins (blocks of one type, parameters of the same shapes, inputs of the same
    shapes, saving the same bytes) are timed once: they cost the same, so timing noise must
    not decide between them, and a deep stage of twins is timed for the price of one block.
    """
    module = step.module
    sequences, checkpointables = switches.sequences, switches.checkpointables
    held = {storage_key(t) for t in [*module.parameters(), *module.buffers()]}
    units: dict[tuple[str, int | None], Unit] = {}
    timed: dict[Any, float] = {}

    def account(
        owner: str,
        index: int | None,
        block: nn.Module,
        at: tuple[int, int],
        saved: int,
        args: Any,
        forward: Callable[[], Any],
        factor: float,
    ) -> None:
        key = (owner, index)
        if key not in units:
            name = owner if index is None else f"{owner}[{index}]"
            units[key] = Unit(name, owner, index, {}, 0.0)
        u = units[key]
        u.bytes_at[at] = u.bytes_at.get(at, 0) + saved
        twin = (
            index is None,
            type(block).__qualname__,
            tuple(tuple(p.shape) for p in block.parameters()),
            tuple(tuple(t.shape) for t in tensors(args)),
            saved,
        )
        if twin not in timed:
            timed[twin] = factor * seconds(forward, step.device, repeats, warmup=False)
        u.seconds += timed[twin]

    for segment, call in enumerate(calls):
        side = {storage_key(t) for t in tensors((call.args[1:], call.kwargs))}
        if call.owner in sequences:
            seq = sequences[call.owner]
            logdet = call.method.endswith("_with_logdet")
            state = call.args[0]
            order = list(range(len(seq)))
            if call.method.startswith("inverse"):
                order.reverse()
            for pos, i in enumerate(order):
                sub = seq[i : i + 1]
                sub.memory_saving = False
                run = getattr(sub, call.method)

                def forward(run: Any = run, state: Tensor = state, call: Call = call) -> Any:
                    with step.autocast():
                        return run(state, *call.args[1:], **call.kwargs)

                out, saved = saved_bytes(forward, held | side)
                factor = 1.0 if isinstance(seq[i], Coupling) else 2.0  # an inverse, then a forward
                account(call.owner, i, seq[i], (segment, pos), saved, state, forward, factor)
                state = (out[0] if logdet else out).detach()
                del out
        else:
            block = checkpointables[call.owner]
            inputs = {storage_key(t) for t in tensors(call.args)}
            switches.set(SwitchState(checkpointed={call.owner: False}))

            def forward_block(block: nn.Module = block, call: Call = call) -> Any:
                with step.autocast():
                    return block(*call.args, **call.kwargs)

            try:
                out, saved = saved_bytes(forward_block, held | side | inputs)
                del out
                at = (segment, 0)
                account(call.owner, None, block, at, saved, call.args, forward_block, 1.0)
            finally:
                switches.set(SwitchState(checkpointed={call.owner: True}))
    return list(units.values())
