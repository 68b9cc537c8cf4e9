"""fit_memory_budget: the fastest training step whose peak memory fits a budget.

The trade-off. Every block of a network can either store its activations for backward
(plain autograd: no extra time, memory grows with depth) or recompute them there: a block
of a :class:`~invertible_core.ReversibleSequence` is *rebuilt* from its output, a
checkpointable module (:class:`~invertible_core.Checkpointable`) is *checkpointed*. Either
costs about one more forward of the block. Recomputing everything gives the least memory
and a step of roughly 1.3x to 1.45x plain autograd's; storing everything is plain
autograd. Between the two lies a frontier of plans, and for a given memory budget the
fastest step is the one that stores the blocks that buy the most time per byte and
recomputes the rest. :func:`fit_memory_budget` measures, chooses and verifies:

1. **Costs, on the real input shape.** One forward pass records the input of every
   sequence and checkpointable module. Then each block runs on its own input as plain
   autograd, once to see what it saves for backward (``saved_tensors_hooks``: the bytes of
   every distinct tensor storage it saves, parameters excluded) and a few times for its
   forward time (the recompute it would cost).
2. **When the peak happens.** One step with everything recomputed is measured exactly
   (:func:`~invertible_core.measure_memory_phases`), split into phases at the start of each
   sequence's and checkpointable module's forward and backward. A stored block's
   activations live from its forward to its backward, so a plan's peak is predicted as the
   highest phase of that step plus the activations the plan stores that are alive in that
   phase: storing the last stage of a network may cost nothing when the peak is in the
   backward of the first. A step with everything stored (plain autograd) is measured too;
   the prediction is scaled to meet it there exactly.
3. **The frontier.** Starting from everything recomputed, the block that buys the most
   recompute time per byte of predicted peak is stored, then the next, up to plain
   autograd: a chain of plans, each storing one block more, each predicted faster and no
   smaller. A budget gets the last plan of the chain predicted within it, so more budget
   never gives a slower plan.
4. **Verification.** The chosen plan's step is measured (peak exactly, time as a median of
   a few steps). Above the budget, the plan steps down the chain by the error it saw, and
   is measured again, until it fits.

Peak memory counts everything the step holds at its peak: parameters, buffers, gradients
(kept allocated, as ``zero_grad(set_to_none=False)`` does; with ``set_to_none=True`` a step
peaks no higher), the example inputs, ``reserved_bytes`` (say, the optimizer's state), and
forward's and backward's activations and temporaries. On the CPU it is exact to the byte
(the profiler's allocation events), on CUDA ``torch.cuda.max_memory_allocated``.

What it costs: a few training steps (with the CPU profiler, each several times slower) and
one forward per block. The module's parameters, buffers (BatchNorm statistics, ActNorm's
initialisation), gradients, training flag and the random state are as they were before;
its switches are left as the plan says. The default loss is the sum of the module's
floating outputs; pass ``loss_fn`` for your own (``F.cross_entropy(out, labels)``, a flow's
negative log-likelihood): the loss barely changes activation memory, but the measured peak
is that of the step you describe.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from invertible_core.contract import is_recomputing
from invertible_core.engine import is_fused
from invertible_core.memory import mark_phase, measure_memory, measure_memory_phases
from invertible_core.memory_plan import (
    Checkpointable,
    MemoryBudgetError,
    MemoryPlan,
    UnitCost,
    format_bytes,
    parse_bytes,
    plannable_units,
)
from invertible_core.sequence import ReversibleSequence

__all__ = ["FrontierPoint", "MemoryProfile", "fit_memory_budget", "measure_minimum_peak"]

LossFn = Callable[[Any], Tensor]

#: the methods through which a sequence is run, each an entry the planner watches
_SEQUENCE_METHODS = ("forward", "inverse", "forward_with_logdet", "inverse_with_logdet")


@dataclass(frozen=True)
class FrontierPoint:
    """One plan of the frontier: which switches store, and what that is predicted to cost."""

    stored: frozenset[int]
    predicted_peak_bytes: int
    predicted_step_seconds: float


@dataclass
class _Unit:
    """One switch: a block of a sequence (``index`` set) or a checkpointable module."""

    name: str
    owner: str
    index: int | None
    #: stored bytes per (segment, position in that segment's execution order)
    bytes_at: dict[tuple[int, int], int]
    seconds: float

    @property
    def activation_bytes(self) -> int:
        return sum(self.bytes_at.values())


@dataclass
class _Call:
    """One call of a sequence or checkpointable module during the step (a *segment*)."""

    owner: str
    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class _Step:
    """The training step the planner measures: zero gradients in place, forward, loss,
    backward (no optimizer)."""

    def __init__(
        self,
        module: nn.Module,
        inputs: tuple[Any, ...],
        kwargs: dict[str, Any],
        loss_fn: LossFn | None,
        autocast_dtype: torch.dtype | None,
        device: torch.device,
    ) -> None:
        self.module = module
        self.inputs = inputs
        self.kwargs = kwargs
        self.loss_fn = loss_fn if loss_fn is not None else _sum_of_outputs
        self.autocast_dtype = autocast_dtype
        self.device = device

    def __call__(self) -> None:
        with torch.no_grad():
            for t in self.gradient_holders():
                if t.grad is not None:
                    t.grad.zero_()
        with self.autocast():
            out = self.module(*self.inputs, **self.kwargs)
            loss = self.loss_fn(out)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise TypeError(
                "fit_memory_budget: loss_fn must return a scalar tensor (the loss of the "
                f"step), got {type(loss).__name__}"
                + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else "")
            )
        loss.backward()

    def autocast(self) -> Any:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def input_tensors(self) -> list[Tensor]:
        return [t for t in _tensors((self.inputs, self.kwargs))]

    def gradient_holders(self) -> list[Tensor]:
        leaves = [t for t in self.input_tensors() if t.is_leaf and t.requires_grad]
        return [*self.module.parameters(), *leaves]

    def held_bytes(self) -> int:
        """Bytes of the distinct storages of parameters, buffers, gradients and inputs."""
        tensors = [*self.module.parameters(), *self.module.buffers(), *self.input_tensors()]
        tensors += [t.grad for t in self.gradient_holders() if t.grad is not None]
        return _storage_bytes(tensors)


def _sum_of_outputs(out: Any) -> Tensor:
    """The default loss: the sum of every floating output that requires grad."""
    parts = [t.float().sum() for t in _tensors(out) if t.is_floating_point() and t.requires_grad]
    if not parts:
        raise ValueError(
            "fit_memory_budget: no output of the module requires grad, so a training step "
            "has nothing to backpropagate; pass loss_fn, or inputs/parameters that need grad"
        )
    return torch.stack(parts).sum()


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _tensors(v)


def _storage_key(t: Tensor) -> tuple[int, str]:
    try:
        return t.untyped_storage().data_ptr(), str(t.device)
    except (RuntimeError, NotImplementedError):  # pragma: no cover - storage-less tensors
        return id(t), "id"


def _storage_bytes(tensors: Sequence[Tensor]) -> int:
    seen: dict[tuple[int, str], int] = {}
    for t in tensors:
        key = _storage_key(t)
        try:
            seen[key] = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # pragma: no cover
            seen[key] = t.numel() * t.element_size()
    return sum(seen.values())


def _saved_bytes(fn: Callable[[], Any], exclude: set[tuple[int, str]]) -> tuple[Any, int]:
    """``fn()`` and the bytes of the distinct storages autograd saved for backward during
    it, those in ``exclude`` (parameters, buffers, inputs held anyway) left out."""
    seen: dict[tuple[int, str], int] = {}

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key not in exclude and key[1] != "id":
            try:
                seen[key] = t.untyped_storage().nbytes()
            except (RuntimeError, NotImplementedError):  # pragma: no cover
                seen[key] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _device_of(module: nn.Module, inputs: Any) -> torch.device:
    for p in module.parameters():
        return p.device
    for t in _tensors(inputs):
        return t.device
    return torch.device("cpu")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(
    fn: Callable[[], Any], device: torch.device, repeats: int, warmup: bool = True
) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls (after one untimed call, unless
    ``warmup`` is False: ``fn`` ran just before)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextmanager
def _instrumented(
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
            names = _SEQUENCE_METHODS if isinstance(module, ReversibleSequence) else ("forward",)
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
def _preserved(step: _Step) -> Iterator[None]:
    """Everything the planner's steps change, put back afterwards: parameters (ActNorm
    initialises its own), buffers, gradients, the training flag, the switches, the random
    state. Copies go to the CPU, so that they take no device memory."""
    module = step.module
    params = [(p, p.detach().to("cpu", copy=True)) for p in module.parameters()]
    buffers = [(b, b.detach().to("cpu", copy=True)) for b in module.buffers()]
    grads = [
        (t, None if t.grad is None else t.grad.detach().to("cpu", copy=True))
        for t in step.gradient_holders()
    ]
    sequences, checkpointables = plannable_units(module)
    switches = {name: (seq.memory_saving, seq.keep_blocks) for name, seq in sequences.items()}
    checkpointed = {
        name: cast(Checkpointable, m).checkpointed for name, m in checkpointables.items()
    }
    training = module.training
    devices = [step.device.index or 0] if step.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for t, saved in [*params, *buffers]:
                t.copy_(saved)
            for t, saved_grad in grads:
                t.grad = None if saved_grad is None else saved_grad.to(t.device)
        module.train(training)
        for name, (saving, keep) in switches.items():
            sequences[name].memory_saving = saving
            sequences[name].keep_blocks = keep
        for name, value in checkpointed.items():
            cast(Checkpointable, checkpointables[name]).checkpointed = value


class MemoryProfile:
    """What every switch of a network costs on one input shape, and when the step peaks.

    Made by :meth:`measure` (the measuring part of :func:`fit_memory_budget`); it predicts
    the peak and the step time of any choice of switches (:meth:`predict_peak`,
    :meth:`predict_seconds`), orders them into the :meth:`frontier`, and gives the plan of
    a budget (:meth:`plan`) without measuring again. Pass it to :func:`fit_memory_budget`
    to plan several budgets from one measurement. It holds the module and the example
    inputs (to measure plans).
    """

    def __init__(
        self,
        step: _Step,
        units: list[_Unit],
        phases: list[tuple[Bound, int]],
        held_bytes: int,
        reserved_bytes: int,
        plain_peak_bytes: int,
        minimum_seconds: float,
        plain_seconds: float,
        sequence_lengths: dict[str, int],
        checkpointables: list[str],
        repeats: int,
    ) -> None:
        self._step = step
        self.units = units
        #: (bound of what is alive, peak with everything recomputed) per phase of the step
        self.phases = phases
        #: parameters, buffers, gradients, inputs and ``reserved_bytes``
        self.held_bytes = held_bytes + reserved_bytes
        self.reserved_bytes = reserved_bytes
        base = max(peak for _, peak in phases)
        self.minimum_peak_bytes = self.held_bytes + base
        self.plain_peak_bytes = self.held_bytes + plain_peak_bytes
        self.minimum_step_seconds = minimum_seconds
        self.plain_step_seconds = plain_seconds
        self.sequence_lengths = sequence_lengths
        self.checkpointable_names = checkpointables
        self.device = step.device
        self.repeats = repeats
        # what each unit adds to each phase when stored
        self._adds = [
            [
                sum(b for (g, pos), b in u.bytes_at.items() if g < q or (g == q and pos <= j))
                for (q, j), _ in self.phases
            ]
            for u in units
        ]
        model_all = self._model([True] * len(units))
        span = self.plain_peak_bytes - self.minimum_peak_bytes
        model_span = model_all - base
        # NOTE [calibration]: a block's saved bytes are measured on its own, its input as one
        # tensor; inside a chain of kept blocks the halves pass on separately and one of them
        # is already saved by the block before, so the sum over-counts a little (a tenth, on
        # a conv chain). The increments are scaled to meet the measured plain step exactly;
        # where that leaves a plan above its budget, the measured step says so and the plan
        # steps down (fit_memory_budget).
        self._scale = max(span, 0) / model_span if model_span > 0 else 1.0
        self._frontier: list[FrontierPoint] | None = None

    @property
    def module(self) -> nn.Module:
        return self._step.module

    # -- measuring ------------------------------------------------------------------------
    @classmethod
    def measure(
        cls,
        module: nn.Module,
        *example_inputs: Any,
        loss_fn: LossFn | None = None,
        reserved_bytes: int = 0,
        autocast_dtype: torch.dtype | None = None,
        repeats: int = 3,
        **forward_kwargs: Any,
    ) -> MemoryProfile:
        """Measure ``module`` on ``module(*example_inputs, **forward_kwargs)``.

        Args:
            loss_fn: ``loss_fn(output) -> scalar``; default: the sum of the floating outputs.
            reserved_bytes: memory outside the step that a budget must cover too (an
                optimizer's state: one copy of the parameters for SGD with momentum, two
                for Adam).
            autocast_dtype: run forward and loss under ``torch.autocast`` in this dtype.
            repeats: timed runs per measurement (medians are taken).
        """
        if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
            raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
        step = _make_step(
            module, example_inputs, forward_kwargs, loss_fn, reserved_bytes, autocast_dtype
        )
        device = step.device
        sequences, checkpointables = plannable_units(module)
        if not sequences and not checkpointables:
            raise ValueError(
                f"fit_memory_budget: {type(module).__name__} has no ReversibleSequence and no "
                "checkpointable module (a module with a bool 'checkpointed' switch), so there "
                "is nothing to plan"
            )
        owners: dict[str, nn.Module] = {**sequences, **checkpointables}
        with _preserved(step):
            module.train()
            _configure(sequences, checkpointables, None)
            calls: list[_Call] = []

            def record(
                owner: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], run: Any
            ) -> Any:
                calls.append(_Call(owner, method, _detached(args), _detached(kwargs)))
                return run()

            with _instrumented(owners, record):
                step()  # also allocates the gradients: the steady state of a training loop
            if not calls:
                raise ValueError(
                    "fit_memory_budget: the step never called a reversible sequence or a "
                    "checkpointable module of the module, so there is nothing to plan"
                )
            units = _unit_costs(step, calls, sequences, checkpointables, repeats)
            calls.clear()  # the recorded inputs are no longer needed
            held = step.held_bytes()
            phases, _ = _phase_peaks(step, owners)
            everything = [True] * len(units)
            _configure(sequences, checkpointables, everything, units)
            plain = _peak(step)  # no warm-up needed: gradients exist, shapes are known
            seconds: dict[str, list[float]] = {"min": [], "plain": []}
            for _ in range(repeats):  # interleaved, so that load falls on both alike
                for key, stored in (("min", None), ("plain", everything)):
                    _configure(sequences, checkpointables, stored, units)
                    seconds[key].append(_seconds(step, device, 1, warmup=False))
        return cls(
            step,
            units,
            phases,
            held,
            reserved_bytes,
            plain,
            statistics.median(seconds["min"]),
            statistics.median(seconds["plain"]),
            {name: len(seq) for name, seq in sequences.items()},
            list(checkpointables),
            repeats,
        )

    def measure_plan(self, stored: frozenset[int]) -> tuple[int, float]:
        """Measure one step with the units in ``stored`` storing: ``(peak bytes, seconds)``."""
        if not stored:
            return self.minimum_peak_bytes, self.minimum_step_seconds
        if len(stored) == len(self.units):
            return self.plain_peak_bytes, self.plain_step_seconds
        step = self._step
        sequences, checkpointables = plannable_units(step.module)
        with _preserved(step):
            step.module.train()
            _configure(sequences, checkpointables, self._mask(stored), self.units)
            step()
            peak = _peak(step)
            seconds = _seconds(step, step.device, self.repeats, warmup=False)
        return self.held_bytes + peak, seconds

    # -- predicting -----------------------------------------------------------------------
    def _mask(self, stored: frozenset[int]) -> list[bool]:
        return [i in stored for i in range(len(self.units))]

    def _model(self, mask: Sequence[bool]) -> int:
        levels = [peak for _, peak in self.phases]
        for adds, on in zip(self._adds, mask):
            if on:
                levels = [level + a for level, a in zip(levels, adds)]
        return max(levels)

    def predict_peak(self, stored: frozenset[int]) -> int:
        """Predicted peak bytes (the budget's measure) when the units in ``stored`` store
        their activations (indices into :attr:`units`)."""
        if len(stored) == len(self.units):
            return self.plain_peak_bytes
        base = self.minimum_peak_bytes - self.held_bytes
        rise = (self._model(self._mask(stored)) - base) * self._scale
        return min(self.minimum_peak_bytes + math.ceil(rise), self.plain_peak_bytes)

    def predict_seconds(self, stored: frozenset[int]) -> float:
        """Predicted step time: plain autograd's plus the recompute of the units not in
        ``stored``, in proportion to their measured forward times."""
        total = sum(u.seconds for u in self.units)
        extra = max(0.0, self.minimum_step_seconds - self.plain_step_seconds)
        if total <= 0:
            share = 0.0 if len(stored) == len(self.units) else 1.0
        else:
            share = sum(u.seconds for i, u in enumerate(self.units) if i not in stored) / total
        return self.plain_step_seconds + extra * share

    def frontier(self) -> list[FrontierPoint]:
        """The chain of plans from everything recomputed to everything stored, each storing
        one unit more: the one that buys the most recompute time per byte of predicted
        peak (units that cost no peak first)."""
        if self._frontier is not None:
            return self._frontier
        levels = [peak for _, peak in self.phases]
        stored: set[int] = set()
        points = [self._point(frozenset())]
        while len(stored) < len(self.units):
            current = max(levels)
            best: tuple[float, int] | None = None
            for i, (unit, adds) in enumerate(zip(self.units, self._adds)):
                if i in stored:
                    continue
                rise = max(level + a for level, a in zip(levels, adds)) - current
                score = unit.seconds / max(rise, 1)
                if best is None or (score, i) > best:
                    best = (score, i)
            assert best is not None
            chosen = best[1]
            stored.add(chosen)
            levels = [level + a for level, a in zip(levels, self._adds[chosen])]
            points.append(self._point(frozenset(stored)))
        self._frontier = points
        return points

    def _point(self, stored: frozenset[int]) -> FrontierPoint:
        return FrontierPoint(stored, self.predict_peak(stored), self.predict_seconds(stored))

    def frontier_index(self, budget: int | str) -> int:
        """The position on :meth:`frontier` of a budget's plan: the last one predicted
        within it. Raises :class:`MemoryBudgetError` below the minimum."""
        budget_bytes = parse_bytes(budget)
        if budget_bytes < self.minimum_peak_bytes:
            raise MemoryBudgetError(
                f"memory budget {format_bytes(budget_bytes)} is below the minimum of this "
                f"step, {format_bytes(self.minimum_peak_bytes)} ({self.minimum_peak_bytes:,} "
                "bytes: every block rebuilt or checkpointed, parameters, gradients and inputs "
                "included); raise the budget or make the step smaller (a smaller batch)",
                budget_bytes,
                self.minimum_peak_bytes,
            )
        points = self.frontier()
        return max(k for k, p in enumerate(points) if p.predicted_peak_bytes <= budget_bytes)

    def plan(self, budget: int | str) -> MemoryPlan:
        """The predicted plan of ``budget`` (not measured); see :meth:`frontier_index`."""
        budget_bytes = parse_bytes(budget)
        return self.plan_of(self.frontier()[self.frontier_index(budget_bytes)].stored, budget_bytes)

    def plan_of(
        self,
        stored: frozenset[int],
        budget: int,
        measured: tuple[int, float] | None = None,
        refinements: int = 0,
    ) -> MemoryPlan:
        """The plan that stores the units in ``stored``, as a :class:`MemoryPlan`."""
        keep: dict[str, list[int]] = {name: [] for name in self.sequence_lengths}
        checkpointed = {name: True for name in self.checkpointable_names}
        costs = []
        for i, unit in enumerate(self.units):
            on = i in stored
            if unit.index is not None:
                if on:
                    keep[unit.owner].append(unit.index)
                choice = "keep" if on else "rebuild"
            else:
                checkpointed[unit.owner] = not on
                choice = "store" if on else "checkpoint"
            costs.append(
                UnitCost(
                    unit.name,
                    "block" if unit.index is not None else "checkpointable",
                    unit.activation_bytes,
                    unit.seconds,
                    choice,  # type: ignore[arg-type]
                )
            )
        return MemoryPlan(
            budget_bytes=budget,
            keep={name: tuple(sorted(v)) for name, v in keep.items()},
            sequence_lengths=dict(self.sequence_lengths),
            checkpointed=checkpointed,
            units=tuple(costs),
            predicted_peak_bytes=self.predict_peak(stored),
            predicted_step_seconds=self.predict_seconds(stored),
            measured_peak_bytes=None if measured is None else measured[0],
            measured_step_seconds=None if measured is None else measured[1],
            minimum_peak_bytes=self.minimum_peak_bytes,
            plain_peak_bytes=self.plain_peak_bytes,
            minimum_step_seconds=self.minimum_step_seconds,
            plain_step_seconds=self.plain_step_seconds,
            reserved_bytes=self.reserved_bytes,
            device=str(self.device),
            refinements=refinements,
        )


def _make_step(
    module: nn.Module,
    inputs: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    loss_fn: LossFn | None,
    reserved_bytes: int,
    autocast_dtype: torch.dtype | None,
) -> _Step:
    if not isinstance(module, nn.Module):
        raise TypeError(f"fit_memory_budget: expected an nn.Module, got {type(module).__name__}")
    if not inputs and not kwargs:
        raise ValueError("fit_memory_budget: pass the example inputs of the step")
    if (
        isinstance(reserved_bytes, bool)
        or not isinstance(reserved_bytes, int)
        or reserved_bytes < 0
    ):
        raise ValueError(f"reserved_bytes must be an int >= 0, got {reserved_bytes!r}")
    device = _device_of(module, (inputs, kwargs))
    return _Step(module, inputs, dict(kwargs), loss_fn, autocast_dtype, device)


def measure_minimum_peak(
    module: nn.Module,
    *example_inputs: Any,
    loss_fn: LossFn | None = None,
    reserved_bytes: int = 0,
    autocast_dtype: torch.dtype | None = None,
    **forward_kwargs: Any,
) -> int:
    """The peak bytes of ``module``'s step with every block rebuilt or checkpointed: the
    smallest budget :func:`fit_memory_budget` accepts, measured alone (two steps, no
    costs per block), as a search for the largest batch that fits needs it. Arguments as
    for :func:`fit_memory_budget`; the module is left as it was."""
    step = _make_step(
        module, example_inputs, forward_kwargs, loss_fn, reserved_bytes, autocast_dtype
    )
    sequences, checkpointables = plannable_units(module)
    with _preserved(step):
        module.train()
        _configure(sequences, checkpointables, None)
        step()
        peak = _peak(step)
        held = step.held_bytes()
    return held + reserved_bytes + peak


def _detached(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    if isinstance(value, list):
        return [_detached(v) for v in value]
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _configure(
    sequences: Mapping[str, ReversibleSequence],
    checkpointables: Mapping[str, nn.Module],
    mask: Sequence[bool] | None,
    units: Sequence[_Unit] = (),
) -> None:
    """Set every switch: ``mask[i]`` says whether unit ``i`` stores (``None``: none does)."""
    keep: dict[str, list[int]] = {name: [] for name in sequences}
    store = dict.fromkeys(checkpointables, False)
    for on, unit in zip(mask or (), units):
        if not on:
            continue
        if unit.index is not None:
            keep[unit.owner].append(unit.index)
        else:
            store[unit.owner] = True
    for name, seq in sequences.items():
        seq.memory_saving = True
        seq.keep_blocks = keep[name]
    for name, module in checkpointables.items():
        cast(Checkpointable, module).checkpointed = not store[name]


def _peak(step: _Step) -> int:
    """Exact peak bytes of one step beyond what exists before it."""
    gc.collect()
    _, stats = measure_memory(step, step.device)
    return stats.peak_bytes


#: a phase's bound ``(q, j)``: the stored activations alive in it are those of every segment
#: before ``q`` and of the positions ``<= j`` of segment ``q`` (positions in execution order)
Bound = tuple[int, int]
_EVERYTHING: Bound = (2**62, 2**62)


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
def _phase_peaks(
    step: _Step, owners: Mapping[str, nn.Module]
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
        first = next((t for t in _tensors(out) if t.requires_grad), None)
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
        with _instrumented(owners, on_call):
            _, _, peaks = measure_memory_phases(step, step.device)
    finally:
        for handle in handles:
            handle.remove()
    if len(peaks) != len(marks) + 1:  # pragma: no cover - a mark from another thread was lost
        return [(_EVERYTHING, max(peaks))], lengths
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


def _unit_costs(
    step: _Step,
    calls: list[_Call],
    sequences: Mapping[str, ReversibleSequence],
    checkpointables: Mapping[str, nn.Module],
    repeats: int,
) -> list[_Unit]:
    """Each switch's stored bytes (per segment) and recompute time, from the calls' inputs.

    Every block runs once on its own input (its saved bytes; a sequence's next block needs
    its output). Twins (blocks of one type, parameters of the same shapes, inputs of the same
    shapes, saving the same bytes) are timed once: they cost the same, so timing noise must
    not decide between them, and a deep stage of twins is timed for the price of one block.
    """
    module = step.module
    held = {_storage_key(t) for t in [*module.parameters(), *module.buffers()]}
    units: dict[tuple[str, int | None], _Unit] = {}
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
            units[key] = _Unit(name, owner, index, {}, 0.0)
        u = units[key]
        u.bytes_at[at] = u.bytes_at.get(at, 0) + saved
        twin = (
            index is None,
            type(block).__qualname__,
            tuple(tuple(p.shape) for p in block.parameters()),
            tuple(tuple(t.shape) for t in _tensors(args)),
            saved,
        )
        if twin not in timed:
            timed[twin] = factor * _seconds(forward, step.device, repeats, warmup=False)
        u.seconds += timed[twin]

    for segment, call in enumerate(calls):
        side = {_storage_key(t) for t in _tensors((call.args[1:], call.kwargs))}
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

                def forward(run: Any = run, state: Tensor = state, call: _Call = call) -> Any:
                    with step.autocast():
                        return run(state, *call.args[1:], **call.kwargs)

                out, saved = _saved_bytes(forward, held | side)
                factor = 1.0 if is_fused(seq[i]) else 2.0  # an inverse, then a forward
                account(call.owner, i, seq[i], (segment, pos), saved, state, forward, factor)
                state = (out[0] if logdet else out).detach()
                del out
        else:
            block = checkpointables[call.owner]
            inputs = {_storage_key(t) for t in _tensors(call.args)}
            cast(Checkpointable, block).checkpointed = False

            def forward_block(block: nn.Module = block, call: _Call = call) -> Any:
                with step.autocast():
                    return block(*call.args, **call.kwargs)

            try:
                out, saved = _saved_bytes(forward_block, held | side | inputs)
                del out
                at = (segment, 0)
                account(call.owner, None, block, at, saved, call.args, forward_block, 1.0)
            finally:
                cast(Checkpointable, block).checkpointed = True
    return list(units.values())


def fit_memory_budget(
    module: nn.Module,
    *example_inputs: Any,
    budget: int | str,
    loss_fn: LossFn | None = None,
    reserved_bytes: int = 0,
    autocast_dtype: torch.dtype | None = None,
    profile: MemoryProfile | None = None,
    measure: bool = True,
    max_refinements: int = 4,
    repeats: int = 3,
    **forward_kwargs: Any,
) -> MemoryPlan:
    """The fastest training step of ``module`` whose peak memory fits ``budget``; applied.

    Measures ``module(*example_inputs, **forward_kwargs)`` (see the module docstring),
    chooses for every :class:`~invertible_core.ReversibleSequence` inside ``module`` which
    blocks to keep and which to rebuild, and for every checkpointable module whether to
    checkpoint it, verifies the choice by one measured step (refining it while the measured
    peak exceeds the budget), leaves ``module`` with the plan applied, and returns the plan.

    Args:
        module: the network (the bare module, not a ``DistributedDataParallel`` wrapper).
        *example_inputs: a batch of the shape to train on (what ``module`` is called with).
        budget: bytes, or a size such as ``"6GiB"``, ``"512MiB"``, ``"1.5GB"``: what the
            step's peak may hold, parameters, gradients and inputs included.
        loss_fn: ``loss_fn(output) -> scalar tensor``; default: the sum of the floating
            outputs. For a classifier, ``lambda out: F.cross_entropy(out, labels)``; for a
            flow, its negative log-likelihood.
        reserved_bytes: memory the budget must also cover that the step does not allocate
            (an optimizer's state).
        autocast_dtype: train under ``torch.autocast`` in this dtype (bf16, fp16).
        profile: a :class:`MemoryProfile` of this module and input, to plan another budget
            without measuring costs again (``example_inputs`` are then ignored).
        measure: verify the plan by a measured step (default); ``False`` returns the
            prediction alone.
        max_refinements: measured steps allowed beyond the first when the measured peak
            exceeds the budget; the minimum plan (measured) is taken when they run out.
        repeats: timed steps per time measurement (the median is reported).
        **forward_kwargs: keyword inputs of ``module``'s forward.

    Raises:
        MemoryBudgetError: ``budget`` is below the minimum (everything rebuilt or
            checkpointed); the message says the minimum.
        ValueError: a malformed budget, or a module with nothing to plan.
    """
    budget_bytes = parse_bytes(budget)
    if profile is None:
        profile = MemoryProfile.measure(
            module,
            *example_inputs,
            loss_fn=loss_fn,
            reserved_bytes=reserved_bytes,
            autocast_dtype=autocast_dtype,
            repeats=repeats,
            **forward_kwargs,
        )
    elif profile.module is not module:
        raise ValueError("fit_memory_budget: the profile was measured on another module")
    points = profile.frontier()
    k = profile.frontier_index(budget_bytes)
    if not measure:
        plan = profile.plan_of(points[k].stored, budget_bytes)
        plan.apply(module)
        return plan
    measured = profile.measure_plan(points[k].stored)
    refinements = 0
    while measured[0] > budget_bytes and k > 0:
        if refinements >= max_refinements:
            k, measured = 0, profile.measure_plan(frozenset())
            break
        # the prediction was short by ``excess`` here: step down by as much
        excess = measured[0] - points[k].predicted_peak_bytes
        k = max(
            (
                j
                for j in range(k)
                if points[j].predicted_peak_bytes + max(excess, 1) <= budget_bytes
            ),
            default=0,
        )
        refinements += 1
        measured = profile.measure_plan(points[k].stored)
    plan = profile.plan_of(points[k].stored, budget_bytes, measured, refinements)
    plan.apply(module)
    return plan
