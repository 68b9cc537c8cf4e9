"""Everything a run checks before it writes anything.

A run that is going to be refused is refused before its first side effect: its results
folder is neither created nor touched, no checkpoint is moved, no log is opened. In order,
:func:`check_start`

1. checks the results folder (:func:`~invertible_train.results.check_results`): one that
   cannot be written, or a non-empty folder the harness did not make (no marker), is
   refused; with ``--fresh``, one that ``--fresh`` may not empty;
2. finds the checkpoint to resume from (:func:`~invertible_train.resume.find_resume_point`:
   same experiment, same number of processes, results never started over silently) and
   loads it into the run, which refuses a checkpoint whose contents do not fit;
3. recognises a run that had already finished: its ``summary.json`` is reported as it is,
   and nothing is trained or rewritten;
4. plans the memory of the training step for ``train.memory_budget``
   (:mod:`invertible_train.budget`; a budget below the step's minimum is refused with the
   minimum), or reuses the plan of the checkpoint.

What it decides is a :class:`Start`, which
:meth:`~invertible_train.trainer.Trainer.fit` then carries out: delete what ``--fresh``
deletes, create the folder and its marker, set an unusable ``last.pt`` aside, open the
logs, train. Under torchrun the main process reads and every process gets its answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from invertible_core import MemoryPlan
from invertible_train.budget import apply_plan, plan_memory, planning_batch, reusable_plan
from invertible_train.checkpoint import CheckpointFolder
from invertible_train.results import check_results, read_summary
from invertible_train.resume import ResumePoint, find_resume_point
from invertible_train.run import Run

__all__ = ["Start", "check_start", "plan_record", "plan_run_memory"]


@dataclass(frozen=True)
class Start:
    """How a run begins, decided before anything is written (see the module docstring)."""

    #: the checkpoint the run continues from (already loaded); None: from iteration 0.
    point: ResumePoint | None
    #: delete what the harness wrote in the results folder first (``--fresh``).
    fresh: bool
    #: the summary of a run that had already finished: report it, train and write nothing.
    finished: dict[str, Any] | None = None
    #: the memory plan applied to the model (``train.memory_budget``), or None.
    plan: MemoryPlan | None = None
    #: whether that plan is the checkpoint's (True) or was measured now (False).
    plan_reused: bool = False


def check_start(
    run: Run,
    results_dir: Path,
    checkpoints: CheckpointFolder,
    fresh: bool,
    load_state: Callable[[dict[str, Any], Path], None],
) -> Start:
    """Every check of a run before its first side effect; returns how it begins.

    ``load_state(state, source)`` loads the resume point into the run (raising
    :class:`~invertible_train.checkpoint.CheckpointError` when it does not fit). Raises
    :class:`~invertible_train.config.ConfigError` (the command line or the experiment is
    wrong: a results folder that cannot be written, a budget below the minimum),
    :class:`~invertible_train.results.ResultsDirError` (the folder may not be used as it
    is) or :class:`~invertible_train.checkpoint.CheckpointError`; writes nothing.
    """
    distribution = run.distribution
    distribution.run_on_main(lambda: check_results(results_dir, fresh))
    point = None if fresh else find_resume_point(results_dir, checkpoints, run.cfg, distribution)
    if point is not None:
        load_state(point.state, point.source)
        if int(point.state["iteration"]) >= run.total_iterations:
            summary = distribution.run_on_main(lambda: read_summary(results_dir))
            if summary is not None:
                return Start(point, fresh, finished=summary)
    saved = point.state.get("memory_plan") if point is not None else None
    plan, reused = plan_run_memory(run, saved if isinstance(saved, dict) else None)
    return Start(point, fresh, plan=plan, plan_reused=reused)


def plan_run_memory(run: Run, saved: dict[str, Any] | None) -> tuple[MemoryPlan | None, bool]:
    """Plan and apply what the model stores for ``train.memory_budget`` (see
    :mod:`invertible_train.budget`): the checkpoint's plan ``saved`` when it was made for
    the same budget, batch shape and device kind, else a new one (made by the main
    process). Returns the plan (None without a budget) and whether it was reused."""
    budget = run.cfg.train.memory_budget
    if not budget:
        return None, False
    module = run.task.forward_module(run.model)
    images, labels = planning_batch(
        run.data.train, run.local_batch_size, run.task.test_view, run.device
    )
    plan = reusable_plan(saved, budget, list(images.shape), run.device)
    if plan is not None and apply_plan(plan, module):
        return plan, True

    def make() -> dict[str, Any]:
        return plan_memory(
            module, images, labels, run.task.loss, run.optimizer, budget, run.amp_dtype
        ).to_dict()

    plan = MemoryPlan.from_dict(run.distribution.run_on_main(make))
    plan.apply(module)
    return plan, False


def plan_record(plan: MemoryPlan, reused: bool, iteration: int) -> dict[str, Any]:
    """The ``memory_plan`` record of ``metrics.jsonl``: the budget, the predicted and measured
    peaks, how many switches store, and whether the checkpoint's plan was ``reused``."""
    return {
        "kind": "memory_plan",
        "iteration": iteration,
        "reused": reused,
        "budget_bytes": plan.budget_bytes,
        "predicted_peak_bytes": plan.predicted_peak_bytes,
        "measured_peak_bytes": plan.measured_peak_bytes,
        "minimum_peak_bytes": plan.minimum_peak_bytes,
        "plain_peak_bytes": plan.plain_peak_bytes,
        "stored_switches": sum(1 for unit in plan.units if unit.stores),
        "switches": len(plan.units),
    }
