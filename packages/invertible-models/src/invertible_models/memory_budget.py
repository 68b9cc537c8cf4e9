"""Memory budgets for the zoo: plan a model's training step, find the largest batch that fits.

``invertible-profile MODEL --budget 6GiB`` plans one training step of the model (the zoo's
step, :func:`invertible_models.step.training_step`) on a batch of ``--batch-size`` images
with :func:`invertible_core.fit_memory_budget` (which reversible blocks to keep, which
non-reversible blocks to checkpoint) and prints the plan with its measured peak and step
time; ``--fit-batch`` finds the largest batch whose leanest plan (everything rebuilt or
checkpointed) fits the budget, and plans that batch. A budget counts everything the step
holds at its peak (its ``peak_bytes``): parameters, gradients, the optimizer's state (SGD's
momentum, measured), the batch, and the activations.

The batch search (:func:`largest_fitting_batch`) doubles the batch while it fits, then
closes in on the boundary: peak memory is nearly linear in the batch, so it tries the batch
the line through its two nearest measurements predicts, alternating with the midpoint, until
the answer is exact or its tries run out (it then reports the largest batch it saw fit).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from invertible_core import (
    MemoryBudgetError,
    MemoryPlan,
    NonFiniteLossError,
    TrainingStep,
    fit_memory_budget,
    format_bytes,
    measure_minimum_peak,
)
from invertible_models.step import build_model, training_step

__all__ = [
    "BatchSearch",
    "BudgetRequest",
    "largest_fitting_batch",
    "minimum_step_peak",
    "plan_training_step",
    "run_budget",
]


def plan_training_step(
    step: TrainingStep,
    budget: int | str,
    *,
    repeats: int = 3,
    measure: bool = True,
) -> MemoryPlan:
    """:func:`invertible_core.fit_memory_budget` for a prepared training step (its model,
    batch, loss, optimizer and autocast; the optimizer's state measured with the rest).
    Leaves the model with the plan applied; the plan's ``extra`` records the batch shape."""
    plan = fit_memory_budget(step, budget=budget, repeats=repeats, measure=measure)
    shape = list(step.inputs[0].shape)
    return replace(plan, extra={**plan.extra, "input_shape": shape})


def minimum_step_peak(step: TrainingStep, warmup: bool = True) -> int:
    """Peak bytes of ``step`` with everything rebuilt or checkpointed, the optimizer's state
    included: what a budget must at least hold for this batch (``warmup=False``: the model
    and the step's optimizer have trained a step already, see
    :func:`invertible_core.measure_minimum_peak`)."""
    return measure_minimum_peak(step, warmup=warmup)


@dataclass
class BatchSearch:
    """The outcome of :func:`largest_fitting_batch`.

    Attributes:
        fit_batch: the largest batch measured to fit (``None``: not even the smallest tried).
        exact: whether ``fit_batch + 1`` was measured not to fit.
        tries: every try: ``{"batch", "peak_bytes" (None: out of memory), "fits", "how"}``.
        stopped: whether ``stop`` ended the search before it was exact.
    """

    fit_batch: int | None
    exact: bool
    tries: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False


def largest_fitting_batch(
    peak_of: Callable[[int], int | None],
    budget: int,
    start: int = 32,
    max_tries: int = 12,
    stop: Callable[[int, list[dict[str, Any]]], bool] | None = None,
) -> BatchSearch:
    """The largest batch ``b`` with ``peak_of(b) <= budget`` (``peak_of`` returns ``None``
    for a batch that ran out of memory), in at most ``max_tries`` tries; ``stop(batch,
    tries)``, asked before every try but the first, may end the search there (a time box).

    Doubling (or halving) from ``start`` brackets the answer; inside the bracket, the batch
    the line through the two nearest measurements predicts, then its neighbour (one more if
    it fitted, one less if not) to confirm the boundary; every third try bisects, and so
    does a try whose line points outside the bracket (out of memory below the budget), so
    that a line that keeps missing cannot stall the search.
    """
    if start < 1 or max_tries < 1:
        raise ValueError(f"start and max_tries must be >= 1, got {start} and {max_tries}")
    peaks: dict[int, int | None] = {}
    tries: list[dict[str, Any]] = []
    lo: int | None = None
    hi: int | None = None
    batch: int | None = start
    kind = "start"
    inside = 0  # tries made inside the bracket
    stopped = False
    while batch is not None and len(tries) < max_tries:
        if tries and stop is not None and stop(batch, tries):
            stopped = True
            break
        peak = peak_of(batch)
        fits = peak is not None and peak <= budget
        peaks[batch] = peak
        tries.append({"batch": batch, "peak_bytes": peak, "fits": fits, "how": kind})
        if fits:
            lo = batch if lo is None else max(lo, batch)
        else:
            hi = batch if hi is None else min(hi, batch)
        if lo is None:  # nothing fits yet: go down
            assert hi is not None
            batch, kind = (None, "") if hi <= 1 else (max(1, hi // 2), "halve")
            continue
        if hi is None:  # no upper bound yet: go up, to the line's guess once it has one
            guess = _predicted(peaks, budget)
            if guess is not None and lo < guess <= 8 * lo:
                batch, kind = guess, "line"
            elif kind == "line":
                batch, kind = lo + 1, "check"  # the line's guess fitted: is it the boundary?
            else:
                batch, kind = 2 * lo, "double"
            continue
        if hi - lo <= 1:
            break
        inside += 1
        guess = _predicted(peaks, budget)
        if kind == "line" and inside % 3 != 0:
            batch, kind = (lo + 1, "check") if fits else (hi - 1, "check")
        elif guess is None or inside % 3 == 0 or not lo < guess < hi:
            # no line, every third try, or a line that misses the bracket (a batch ran out
            # of device memory below the budget, so memory is not what the line says)
            batch, kind = (lo + hi) // 2, "bisect"
        else:
            batch, kind = min(max(guess, lo + 1), hi - 1), "line"
    return BatchSearch(lo, lo is not None and hi == lo + 1, tries, stopped)


def _predicted(peaks: dict[int, int | None], budget: int) -> int | None:
    """The batch where the line through the two largest measured batches meets the budget."""
    known = sorted((b, p) for b, p in peaks.items() if p is not None)
    if len(known) < 2:
        return None
    (b0, p0), (b1, p1) = known[-2], known[-1]
    slope = (p1 - p0) / (b1 - b0)
    if slope <= 0:
        return None
    return max(1, int(b1 + (budget - p1) / slope))


def _peak_or_none(fn: Callable[[], int]) -> int | None:
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


@dataclass(frozen=True)
class BudgetRequest:
    """What ``invertible-profile --budget`` is asked (see :func:`run_budget`).

    Attributes:
        models: registered model names.
        budget_bytes: the memory budget.
        batch_size: the batch to plan, or the first to try with ``fit_batch``.
        image_size, num_classes, device: the synthetic batch and where it runs.
        fit_batch: find the largest batch whose leanest step fits, and plan that.
        max_tries: batch sizes measured at most when fitting the batch.
        steps: timed steps per measurement (default 3, and 1 when fitting the batch).
        memory_saving: build the models with memory saving on or off (``None``: each
            model's default).
        json_path: also write the results there.
    """

    models: tuple[str, ...]
    budget_bytes: int
    batch_size: int = 32
    image_size: int = 32
    num_classes: int = 10
    device: str = "cpu"
    fit_batch: bool = False
    max_tries: int = 12
    steps: int | None = None
    memory_saving: bool | None = None
    json_path: str | None = None


def run_budget(request: BudgetRequest) -> int:
    """``invertible-profile ... --budget`` (and ``--fit-batch``): plan each model, print the
    plans, write the JSON; returns the exit status (1 when a model could not be planned)."""
    budget = request.budget_bytes
    device = torch.device(request.device)
    results: list[dict[str, Any]] = []
    status = 0
    print(
        f"budget {format_bytes(budget)}, {request.image_size}x{request.image_size} images, "
        f"device {request.device}, torch {torch.__version__}"
    )
    for name in request.models:
        torch.manual_seed(0)
        model = build_model(
            name,
            image_size=request.image_size,
            num_classes=request.num_classes,
            **({} if request.memory_saving is None else {"memory_saving": request.memory_saving}),
        ).to(device)
        first = training_step(
            model,
            batch_size=request.batch_size,
            image_size=request.image_size,
            num_classes=request.num_classes,
            device=device,
        )

        shared = first.optimizer
        assert shared is not None

        def step_at(
            batch: int, first: TrainingStep = first, shared: torch.optim.Optimizer = shared
        ) -> TrainingStep:
            """The step at another batch size, with the same model and optimizer (whose
            state the first step allocated)."""
            if batch == request.batch_size:
                return first
            return training_step(
                first.module,
                batch_size=batch,
                image_size=request.image_size,
                num_classes=request.num_classes,
                device=device,
                optimizer=lambda _: shared,
            )

        entry: dict[str, Any] = {"model": name}
        try:
            status = max(status, _plan_model(request, name, entry, first, step_at))
        except NonFiniteLossError as exc:
            print(f"invertible-profile: {name}: {exc}; nothing recorded", file=sys.stderr)
            entry["error"] = str(exc)
            status = 1
        results.append(entry)
    if request.json_path:
        payload = {
            "torch": torch.__version__,
            "device": request.device,
            "budget_bytes": budget,
            "image_size": request.image_size,
            "results": results,
        }
        with open(request.json_path, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
    return status


def _plan_model(
    request: BudgetRequest,
    name: str,
    entry: dict[str, Any],
    first: TrainingStep,
    step_at: Callable[[int], TrainingStep],
) -> int:
    """Plan one model (fitting its batch first when asked), filling ``entry``; the status."""
    budget = request.budget_bytes
    batch = request.batch_size
    if request.fit_batch:
        # one training step first (gradients and momentum allocated, one-off initialisations
        # done), so that every try measures a single step of the leanest plan
        first()

        def leanest(b: int) -> int | None:
            return _peak_or_none(lambda: minimum_step_peak(step_at(b), warmup=False))

        search = largest_fitting_batch(
            leanest, budget, start=request.batch_size, max_tries=request.max_tries
        )
        entry["fit_batch"] = search.fit_batch
        entry["fit_batch_exact"] = search.exact
        entry["tries"] = search.tries
        shown = ", ".join(
            f"{t['batch']}: "
            + ("out of memory" if t["peak_bytes"] is None else format_bytes(t["peak_bytes"]))
            for t in search.tries
        )
        if search.fit_batch is None:
            print(
                f"invertible-profile: {name}: no batch size fits {format_bytes(budget)} even "
                f"with everything recomputed (leanest peaks: {shown}); raise --budget",
                file=sys.stderr,
            )
            return 1
        batch = search.fit_batch
        exact = "" if search.exact else " (tries ran out: the largest seen to fit)"
        print(f"\n{name}: largest batch whose leanest step fits: {batch}{exact}")
        print(f"  leanest peak by batch: {shown}")
    repeats = request.steps if request.steps is not None else (1 if request.fit_batch else 3)
    try:
        plan = plan_training_step(step_at(batch), budget, repeats=repeats)
    except MemoryBudgetError as exc:
        print(f"invertible-profile: {name} at batch {batch}: {exc}", file=sys.stderr)
        entry["error"] = str(exc)
        entry["minimum_peak_bytes"] = exc.minimum_bytes
        return 1
    entry["batch"] = batch
    entry["plan"] = plan.to_dict()
    print(f"\n{name}, batch {batch}:")
    print(plan)
    return 0
