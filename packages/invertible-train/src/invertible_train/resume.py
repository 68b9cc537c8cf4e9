"""Resuming a run: which checkpoint, and whether the run in the folder may be continued.

:func:`find_resume_point` is the whole policy, called once per run before anything is
written (:mod:`invertible_train.preflight`; on the main process, the result sent to every
rank). It only reads:

1. the newest usable checkpoint is read: ``last.pt``, else ``previous.pt`` (the one before
   it, kept by the checkpoint rotation), the point saying why ``last.pt`` was passed over
   (:func:`set_aside_skipped` moves it aside, with a warning, once the run begins); under
   ``--fsdp`` the same with the sharded ``last.dcp`` and ``previous.dcp``;
2. without one, the run starts from iteration 0, unless the folder holds what a restart
   would overwrite (checkpoints, of either layout, evaluations, a summary): then
   :class:`ResultsDirError`, and ``--fresh`` is the way to start over;
3. the checkpoint must come from as many processes as this run has (each rank's data order
   depends on their number), and from the same experiment: every config key but
   :data:`RESUMABLE_CHANGES` must be equal (:func:`config_differences`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from invertible_train.checkpoint import CheckpointFolder
from invertible_train.config import ExperimentConfig, config_to_dict
from invertible_train.results import ResultsDirError, holds_results
from invertible_train.strategy import Distribution

__all__ = [
    "RESUMABLE_CHANGES",
    "ResumePoint",
    "ResumeWarning",
    "config_differences",
    "find_resume_point",
    "set_aside_skipped",
]

#: config keys that may change between a run and its resumption (they do not change what
#: is computed, or they only extend it); any other difference refuses to resume.
RESUMABLE_CHANGES = frozenset(
    {
        "data.workers",
        "data.data_dir",
        "data.download",
        "data.eval_batch_size",
        "train.iterations",
        "train.epochs",
        "train.device",
        "train.log_every",
        "train.eval_every",
        "train.checkpoint_every",
        "train.tensorboard",
        "train.measure_memory",
        "train.threads",
        # checkpoints hold the same parameters and state with saving on or off, and a
        # memory plan changes what is stored, not what is computed
        "model.memory_saving",
        "train.memory_budget",
    }
)


class ResumeWarning(UserWarning):
    """The run resumes, but not from the checkpoint it would normally use."""


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run continues from."""

    state: dict[str, Any]
    source: Path
    #: why ``last.pt`` was passed over for ``source`` (None when ``source`` is ``last.pt``).
    skipped: str | None = None


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "options":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def config_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``"key: old -> new"`` for each difference that forbids resuming (nested config dicts).

    A key the saved config lacks (written before the key existed) counts as its default.
    """
    defaults = _flatten(config_to_dict(ExperimentConfig()))
    old, new = {**defaults, **_flatten(saved)}, _flatten(now)
    keys = sorted(k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _read(results_dir: Path, checkpoints: CheckpointFolder) -> ResumePoint | None:
    """Steps 1 and 2 of the policy, on the main process."""
    found = checkpoints.latest()
    foreign = checkpoints.foreign()
    if found is None and foreign:
        sharded = foreign[0].endswith(".dcp")
        raise ResultsDirError(
            f"{results_dir} holds checkpoints of a run {'with' if sharded else 'without'} "
            f"--fsdp ({', '.join(foreign)}), which this run {'without' if sharded else 'with'} "
            f"--fsdp cannot resume; rerun {'with' if sharded else 'without'} --fsdp to "
            "resume it, or with --fresh to start over (deleting it)"
        )
    if found is None:
        valuable = holds_results(results_dir)
        if valuable:
            raise ResultsDirError(
                f"{results_dir} holds results of an earlier run ({', '.join(valuable)}) but "
                "no checkpoint to resume from; rerun with --fresh to start over (deleting "
                "them), or choose another --name or --results-dir"
            )
        return None
    return ResumePoint(found.state, found.path, found.skipped)


def find_resume_point(
    results_dir: Path,
    checkpoints: CheckpointFolder,
    cfg: ExperimentConfig,
    distribution: Distribution,
) -> ResumePoint | None:
    """The checkpoint to resume ``cfg`` from, or None to start from iteration 0; reads only.

    Raises :class:`ResultsDirError` when the folder may be neither resumed nor started over,
    :class:`~invertible_train.checkpoint.CheckpointError` when no checkpoint is usable.
    Every process gets the same answer (the main process reads, the others receive).
    """
    point = distribution.run_on_main(lambda: _read(results_dir, checkpoints))
    if point is None:
        return None
    saved = point.state.get("sampler", {}).get("num_replicas", 1)
    if saved != distribution.world_size:
        raise ResultsDirError(
            f"{point.source} was written by {saved} processes; resume with the same number "
            f"(now {distribution.world_size}) or rerun with --fresh"
        )
    differ = config_differences(point.state.get("config", {}), config_to_dict(cfg))
    if differ:
        raise ResultsDirError(
            f"{results_dir} holds a run of a different experiment ({'; '.join(differ)}), saved "
            f"in {point.source}. Rerun with --fresh to discard it, or choose another "
            "--results-dir or experiment name"
        )
    return point


def set_aside_skipped(point: ResumePoint, checkpoints: CheckpointFolder) -> None:
    """Move the ``last.pt`` that ``point`` passed over aside (numbered, never replacing an
    earlier one) and warn (:class:`ResumeWarning`); main process, once the run begins."""
    if point.skipped is None or not checkpoints.last.exists():
        return
    aside = checkpoints.set_aside(checkpoints.last)
    warnings.warn(
        f"{point.skipped}; moved it to {aside.name}; resuming from {point.source} "
        f"(iteration {point.state.get('iteration')})",
        ResumeWarning,
        stacklevel=2,
    )
