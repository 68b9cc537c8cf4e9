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
   every distinct tensor storage it saves, parameters excluded) and, once per set of twins
   (same type, shapes and bytes), a few times for its forward time (the recompute it would
   cost).
2. **When the peak happens.** One step with everything recomputed is measured exactly
   (:func:`~invertible_core.measure_memory_phases`), split into phases at the forward and
   the backward of each sequence, each of its blocks and each checkpointable module (see
   the NOTE at :func:`invertible_core.planner.costs.phase_peaks`). A stored block's
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

The step is the project's one :class:`~invertible_core.TrainingStep` (forward, loss,
backward and, given an ``optimizer``, its step; under ``autocast_dtype`` and with a
``scaler``): pass one, or the module and its example inputs. A plan's peak is the step's
``peak_bytes`` (:mod:`invertible_core.planner.step`): everything the step holds at its
highest point, its held state (parameters, buffers, gradients kept allocated, the
optimizer's state, the batch) and ``reserved_bytes`` (what the step does not allocate but
the budget must cover: an optimizer's state when no optimizer is given) included. On the
CPU it is exact to the byte (the profiler's allocation events), on CUDA
``torch.cuda.max_memory_allocated``.

What it costs: a few training steps (with the CPU profiler, each several times slower) and
one forward per block. The module's parameters, buffers (BatchNorm statistics, ActNorm's
initialisation), gradients, the optimizer's and the scaler's state, the training flag and
the random state are as they were before; its switches are left as the plan says. A step
whose loss is not finite stops the planning with :class:`~invertible_core.NonFiniteLossError`. The default loss is the sum of the module's
floating outputs; pass ``loss_fn`` for your own (``F.cross_entropy(out, labels)``, a flow's
negative log-likelihood): the loss barely changes activation memory, but the measured peak
is that of the step you describe.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from invertible_core.planner import costs
from invertible_core.planner.costs import Bound, Unit
from invertible_core.planner.plan import (
    MemoryBudgetError,
    MemoryPlan,
    UnitCost,
    format_bytes,
    parse_bytes,
)
from invertible_core.planner.step import TrainingStep
from invertible_core.planner.switches import MemorySwitches

LossFn = Callable[[Any], torch.Tensor]

__all__ = ["FrontierPoint", "MemoryProfile", "fit_memory_budget", "measure_minimum_peak"]


@dataclass(frozen=True)
class FrontierPoint:
    """One plan of the frontier: which switches store, and what that is predicted to cost."""

    stored: frozenset[int]
    predicted_peak_bytes: int
    predicted_step_seconds: float


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
        step: TrainingStep,
        units: list[Unit],
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
        #: the step's ``held_bytes`` and ``reserved_bytes``
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
        module: nn.Module | TrainingStep,
        *example_inputs: Any,
        loss_fn: LossFn | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scaler: torch.amp.GradScaler | None = None,
        reserved_bytes: int = 0,
        autocast_dtype: torch.dtype | None = None,
        repeats: int = 3,
        **forward_kwargs: Any,
    ) -> MemoryProfile:
        """Measure the step of ``module`` on ``module(*example_inputs, **forward_kwargs)``,
        or the :class:`~invertible_core.TrainingStep` passed instead of a module.

        Args:
            loss_fn: ``loss_fn(output) -> scalar``; default: the sum of the floating outputs.
            optimizer: the optimizer the step takes a step of (``None``: no optimizer step;
                its state then belongs in ``reserved_bytes``).
            scaler: a ``torch.amp.GradScaler`` for fp16 training.
            reserved_bytes: memory outside the step that a budget must cover too (an
                optimizer's state when no optimizer is given: one copy of the parameters
                for SGD with momentum, two for Adam).
            autocast_dtype: run forward and loss under ``torch.autocast`` in this dtype.
            repeats: timed runs per measurement (medians are taken).
        """
        if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
            raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
        _check_reserved(reserved_bytes)
        step = training_step(
            module, example_inputs, forward_kwargs, loss_fn, optimizer, scaler, autocast_dtype
        )
        device = step.device
        switches = MemorySwitches(step.module)
        if not switches:
            raise ValueError(
                f"fit_memory_budget: {type(step.module).__name__} has no ReversibleSequence and "
                "no checkpointable module (a module with a bool 'checkpointed' switch), so "
                "there is nothing to plan"
            )
        owners: dict[str, nn.Module] = {**switches.sequences, **switches.checkpointables}
        with measuring(step):
            costs.configure(switches, None)
            calls: list[costs.Call] = []

            def record(
                owner: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], run: Any
            ) -> Any:
                calls.append(
                    costs.Call(owner, method, costs.detached(args), costs.detached(kwargs))
                )
                return run()

            with costs.instrumented(owners, record):
                step()  # also allocates the gradients: the steady state of a training loop
            if not calls:
                raise ValueError(
                    "fit_memory_budget: the step never called a reversible sequence or a "
                    "checkpointable module of the module, so there is nothing to plan"
                )
            units = costs.unit_costs(step, calls, switches, repeats)
            calls.clear()  # the recorded inputs are no longer needed
            held = step.held_bytes()
            phases, _ = costs.phase_peaks(step, owners)
            everything = [True] * len(units)
            costs.configure(switches, everything, units)
            plain = costs.peak(step)  # no warm-up needed: gradients exist, shapes are known
            seconds: dict[str, list[float]] = {"min": [], "plain": []}
            for _ in range(repeats):  # interleaved, so that load falls on both alike
                for key, stored in (("min", None), ("plain", everything)):
                    costs.configure(switches, stored, units)
                    seconds[key].append(costs.seconds(step, device, 1, warmup=False))
        return cls(
            step,
            units,
            phases,
            held,
            reserved_bytes,
            plain,
            statistics.median(seconds["min"]),
            statistics.median(seconds["plain"]),
            {name: len(seq) for name, seq in switches.sequences.items()},
            list(switches.checkpointables),
            repeats,
        )

    def measure_plan(self, stored: frozenset[int]) -> tuple[int, float]:
        """Measure one step with the units in ``stored`` storing: ``(peak bytes, seconds)``."""
        if not stored:
            return self.minimum_peak_bytes, self.minimum_step_seconds
        if len(stored) == len(self.units):
            return self.plain_peak_bytes, self.plain_step_seconds
        step = self._step
        with measuring(step):
            costs.configure(MemorySwitches(step.module), self._mask(stored), self.units)
            step()
            peak = costs.peak(step)
            took = costs.seconds(step, step.device, self.repeats, warmup=False)
        return self.held_bytes + peak, took

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
        their activations (indices into ``units``)."""
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
                    unit.stored_bytes,
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


def measure_minimum_peak(
    module: nn.Module | TrainingStep,
    *example_inputs: Any,
    loss_fn: LossFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    reserved_bytes: int = 0,
    autocast_dtype: torch.dtype | None = None,
    warmup: bool = True,
    **forward_kwargs: Any,
) -> int:
    """The peak bytes of ``module``'s step with every block rebuilt or checkpointed: the
    smallest budget :func:`fit_memory_budget` accepts, measured alone (two steps, no
    costs per block), as a search for the largest batch that fits needs it. Arguments as
    for :func:`fit_memory_budget`; the module is left as it was.

    ``warmup=False`` measures the first step: right only when the module has trained a step
    before (its gradients allocated, one-off initialisations such as ActNorm's done), as a
    search over batch sizes on one module has; it then costs one step instead of two."""
    _check_reserved(reserved_bytes)
    step = training_step(
        module, example_inputs, forward_kwargs, loss_fn, optimizer, scaler, autocast_dtype
    )
    if not warmup and any(t.grad is None for t in step.gradient_holders() if t.requires_grad):
        raise ValueError(
            "measure_minimum_peak(warmup=False) needs every gradient allocated already (a "
            "step trained before it, with zero_grad(set_to_none=False)); warm up instead"
        )
    with measuring(step):
        costs.configure(MemorySwitches(step.module), None)
        if warmup:
            step()
        held = step.held_bytes()
        peak = costs.peak(step)
    return held + reserved_bytes + peak


def fit_memory_budget(
    module: nn.Module | TrainingStep,
    *example_inputs: Any,
    budget: int | str,
    loss_fn: LossFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
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
        module: the network (the bare module, not a ``DistributedDataParallel`` wrapper), or
            a :class:`~invertible_core.TrainingStep` of it (then pass no example inputs,
            loss, optimizer, scaler or autocast dtype: the step has them).
        *example_inputs: a batch of the shape to train on (what ``module`` is called with).
        budget: bytes, or a size such as ``"6GiB"``, ``"512MiB"``, ``"1.5GB"``: what the
            step's peak may hold, parameters, gradients and inputs included.
        loss_fn: ``loss_fn(output) -> scalar tensor``; default: the sum of the floating
            outputs. For a classifier, ``lambda out: F.cross_entropy(out, labels)``; for a
            flow, its negative log-likelihood.
        optimizer: the optimizer of the training step: its step and its state are measured
            with the rest (``None``: no optimizer step).
        scaler: a ``torch.amp.GradScaler`` (fp16 training).
        reserved_bytes: memory the budget must also cover that the step does not allocate
            (an optimizer's state when no ``optimizer`` is given).
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
        NonFiniteLossError: a measured step's loss was not finite.
    """
    budget_bytes = parse_bytes(budget)
    if profile is None:
        profile = MemoryProfile.measure(
            module,
            *example_inputs,
            loss_fn=loss_fn,
            optimizer=optimizer,
            scaler=scaler,
            reserved_bytes=reserved_bytes,
            autocast_dtype=autocast_dtype,
            repeats=repeats,
            **forward_kwargs,
        )
    elif profile.module is not (module.module if isinstance(module, TrainingStep) else module):
        raise ValueError("fit_memory_budget: the profile was measured on another module")
    points = profile.frontier()
    k = profile.frontier_index(budget_bytes)
    if not measure:
        plan = profile.plan_of(points[k].stored, budget_bytes)
        plan.apply(profile.module)
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
    plan.apply(profile.module)
    return plan


def training_step(
    module: nn.Module | TrainingStep,
    inputs: tuple[Any, ...],
    forward_kwargs: Mapping[str, Any],
    loss_fn: LossFn | None,
    optimizer: torch.optim.Optimizer | None,
    scaler: torch.amp.GradScaler | None,
    autocast_dtype: torch.dtype | None,
) -> TrainingStep:
    """The step to plan: the one given, or one made of the module and its inputs."""
    if isinstance(module, TrainingStep):
        given = [
            name
            for name, value in (
                ("example inputs", inputs or forward_kwargs or None),
                ("loss_fn", loss_fn),
                ("optimizer", optimizer),
                ("scaler", scaler),
                ("autocast_dtype", autocast_dtype),
            )
            if value is not None
        ]
        if given:
            raise ValueError(
                f"fit_memory_budget: a TrainingStep has its own {', '.join(given)}; pass "
                "either the step alone or the module with them"
            )
        return module
    if not isinstance(module, nn.Module):
        raise TypeError(f"fit_memory_budget: expected an nn.Module, got {type(module).__name__}")
    if not inputs and not forward_kwargs:
        raise ValueError("fit_memory_budget: pass the example inputs of the step")
    return TrainingStep(
        module,
        *inputs,
        loss_fn=loss_fn,
        optimizer=optimizer,
        scaler=scaler,
        autocast_dtype=autocast_dtype,
        forward_kwargs=forward_kwargs,
    )


@contextmanager
def measuring(step: TrainingStep) -> Iterator[None]:
    """The planner's steps: the module training, gradients kept allocated between steps;
    everything the steps change put back afterwards (:func:`costs.preserved`)."""
    set_to_none = step.set_to_none
    with costs.preserved(step):
        step.module.train()
        step.set_to_none = False
        try:
            yield
        finally:
            step.set_to_none = set_to_none


def _check_reserved(reserved_bytes: object) -> None:
    if (
        isinstance(reserved_bytes, bool)
        or not isinstance(reserved_bytes, int)
        or reserved_bytes < 0
    ):
        raise ValueError(f"reserved_bytes must be an int >= 0, got {reserved_bytes!r}")
