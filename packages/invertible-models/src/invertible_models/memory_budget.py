"""Memory budgets for the zoo: plan a model's training step, find the largest batch that fits.

``invertible-profile MODEL --budget 6GiB`` plans one training step of the model on a batch
of ``--batch-size`` images with :func:`invertible_core.fit_memory_budget` (which reversible
blocks to keep, which non-reversible blocks to checkpoint) and prints the plan with its
measured peak and step time; ``--fit-batch`` finds the largest batch whose leanest plan
(everything rebuilt or checkpointed) fits the budget, and plans that batch. A budget counts
everything the step holds at its peak: parameters, gradients, the optimizer's state (SGD's
momentum: :func:`optimizer_state_bytes`), the batch, and the activations.

The batch search (:func:`largest_fitting_batch`) doubles the batch while it fits, then
closes in on the boundary: peak memory is nearly linear in the batch, so it tries the batch
the line through its two nearest measurements predicts, alternating with the midpoint, until
the answer is exact or its tries run out (it then reports the largest batch it saw fit).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from invertible_core import (
    MemoryBudgetError,
    MemoryPlan,
    fit_memory_budget,
    format_bytes,
    measure_minimum_peak,
)

if TYPE_CHECKING:  # the profiler imports this module: it hands its step in, see run_budget
    from invertible_models.profiler import TrainingStep

__all__ = [
    "BatchSearch",
    "largest_fitting_batch",
    "minimum_step_peak",
    "optimizer_state_bytes",
    "plan_training_step",
    "run_budget",
]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of ``optimizer``'s state: measured when it has stepped, else what it will hold
    (SGD with momentum: one buffer per parameter; Adam and AdamW: two, three with amsgrad;
    other optimizers: nothing known, 0)."""
    held = [t for state in optimizer.state.values() for t in state.values()]
    tensors = [t for t in held if isinstance(t, torch.Tensor)]
    if tensors:
        return sum(t.numel() * t.element_size() for t in tensors)
    copies = 0
    for group in optimizer.param_groups:
        if isinstance(optimizer, torch.optim.SGD):
            copies = 1 if group.get("momentum", 0) else 0
        elif isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            copies = 3 if group.get("amsgrad", False) else 2
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return copies * sum(p.numel() * p.element_size() for p in params if p.requires_grad)


def plan_training_step(
    step: TrainingStep,
    budget: int | str,
    *,
    repeats: int = 3,
    measure: bool = True,
) -> MemoryPlan:
    """:func:`invertible_core.fit_memory_budget` for a prepared training step: its model,
    batch, loss and autocast, with the optimizer's state reserved in the budget. Leaves the
    model with the plan applied; the plan's ``extra`` records the batch shape."""
    plan = fit_memory_budget(
        step.model,
        step.images,
        budget=budget,
        loss_fn=lambda out: step.loss_fn(out, step.labels),
        reserved_bytes=optimizer_state_bytes(step.optimizer),
        autocast_dtype=step.amp_dtype,
        repeats=repeats,
        measure=measure,
    )
    return replace(plan, extra={**plan.extra, "input_shape": list(step.images.shape)})


def minimum_step_peak(step: TrainingStep, warmup: bool = True) -> int:
    """Peak bytes of ``step`` with everything rebuilt or checkpointed, the optimizer's state
    included: what a budget must at least hold for this batch (``warmup=False``: the model
    has trained a step already, see :func:`invertible_core.measure_minimum_peak`)."""
    return measure_minimum_peak(
        step.model,
        step.images,
        loss_fn=lambda out: step.loss_fn(out, step.labels),
        reserved_bytes=optimizer_state_bytes(step.optimizer),
        autocast_dtype=step.amp_dtype,
        warmup=warmup,
    )


@dataclass
class BatchSearch:
    """The outcome of :func:`largest_fitting_batch`.

    Attributes:
        fit_batch: the largest batch measured to fit (``None``: not even the smallest tried).
        exact: whether ``fit_batch + 1`` was measured not to fit.
        tries: every try: ``{"batch", "peak_bytes" (None: out of memory), "fits"}``.
    """

    fit_batch: int | None
    exact: bool
    tries: list[dict[str, Any]] = field(default_factory=list)


def largest_fitting_batch(
    peak_of: Callable[[int], int | None], budget: int, start: int = 32, max_tries: int = 12
) -> BatchSearch:
    """The largest batch ``b`` with ``peak_of(b) <= budget`` (``peak_of`` returns ``None``
    for a batch that ran out of memory), in at most ``max_tries`` tries.

    Doubling (or halving) from ``start`` brackets the answer; inside the bracket, the batch
    the line through the two nearest measurements predicts, then its neighbour (one more if
    it fitted, one less if not) to confirm the boundary; every third try bisects, so that a
    line that keeps missing cannot stall the search.
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
    while batch is not None and len(tries) < max_tries:
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
        elif guess is None or inside % 3 == 0:
            batch, kind = (lo + hi) // 2, "bisect"
        else:
            batch, kind = min(max(guess, lo + 1), hi - 1), "line"
    return BatchSearch(lo, lo is not None and hi == lo + 1, tries)


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


def run_budget(
    args: argparse.Namespace,
    names: Sequence[str],
    build: Callable[..., nn.Module],
    make_step: Callable[..., TrainingStep],
) -> int:
    """``invertible-profile ... --budget`` (and ``--fit-batch``): plan each model, print the
    plans, write the JSON; returns the exit status. ``build(name, image_size=...,
    num_classes=..., memory_saving=...)`` makes a model, ``make_step(model, batch_size=...,
    image_size=..., num_classes=..., device=...)`` its training step (the profiler's)."""
    budget: int = args.budget
    device = torch.device(args.device)
    results: list[dict[str, Any]] = []
    status = 0
    print(
        f"budget {format_bytes(budget)}, {args.image_size}x{args.image_size} images, "
        f"device {args.device}, torch {torch.__version__}"
    )
    for name in names:
        torch.manual_seed(0)
        model = build(
            name,
            image_size=args.image_size,
            num_classes=args.num_classes,
            memory_saving=not args.no_memory_saving,
        ).to(device)

        def step_at(batch: int, model: nn.Module = model) -> TrainingStep:
            return make_step(
                model,
                batch_size=batch,
                image_size=args.image_size,
                num_classes=args.num_classes,
                device=device,
            )

        entry: dict[str, Any] = {"model": name}
        batch = args.batch_size
        if args.fit_batch:
            # one training step first (gradients allocated, one-off initialisations done),
            # so that every try measures a single step of the leanest plan
            step_at(args.batch_size)()

            def leanest(b: int, step_at: Callable[[int], TrainingStep] = step_at) -> int | None:
                return _peak_or_none(lambda: minimum_step_peak(step_at(b), warmup=False))

            search = largest_fitting_batch(
                leanest,
                budget,
                start=args.batch_size,
                max_tries=args.max_tries,
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
                results.append(entry)
                status = 1
                continue
            batch = search.fit_batch
            exact = "" if search.exact else " (tries ran out: the largest seen to fit)"
            print(f"\n{name}: largest batch whose leanest step fits: {batch}{exact}")
            print(f"  leanest peak by batch: {shown}")
        try:
            repeats = args.steps if args.steps is not None else (1 if args.fit_batch else 3)
            plan = plan_training_step(step_at(batch), budget, repeats=repeats)
        except MemoryBudgetError as exc:
            print(f"invertible-profile: {name} at batch {batch}: {exc}", file=sys.stderr)
            entry["error"] = str(exc)
            entry["minimum_peak_bytes"] = exc.minimum_bytes
            results.append(entry)
            status = 1
            continue
        entry["batch"] = batch
        entry["plan"] = plan.to_dict()
        results.append(entry)
        print(f"\n{name}, batch {batch}:")
        print(plan)
    if args.json:
        payload = {
            "torch": torch.__version__,
            "device": args.device,
            "budget_bytes": budget,
            "image_size": args.image_size,
            "results": results,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
    return status
