"""The training loop: a :class:`Trainer` trains one experiment into one results folder.

A run's life has three places, one file each:

1. building: :class:`~invertible_train.run.Run` makes the data, model, task, optimizer,
   schedule, loader and evaluator in memory (a ``Trainer`` is a run that trains);
2. checking: :func:`~invertible_train.preflight.check_start` decides how the run begins
   (from iteration 0, from a checkpoint, or not at all because it had finished) and
   refuses, before anything is written, what cannot go on;
3. training, here: :meth:`Trainer.fit` carries out that start (``--fresh``, the folder and
   its marker, the logs), then runs the loop, :meth:`Trainer.train_step` after
   :meth:`Trainer.train_step`, logging, evaluating and checkpointing at its intervals, and
   writes the summary.

A trainer is given two collaborators and holds no branch on either: a
:class:`~invertible_train.tasks.Task` (what is learned: classification, or density
estimation) and a :class:`~invertible_train.strategy.Distribution` (how the work is shared:
one process, or one rank of a torchrun job).

Rerunning the same command resumes from the newest usable checkpoint (``last.pt``, else
``previous.pt``; under ``--fsdp`` the sharded folders ``last.dcp`` and ``previous.dcp``,
:mod:`invertible_train.sharded_checkpoint`): same iteration, same position in the epoch's data order, same random
states, so on the CPU the resumed run ends with bit-for-bit the weights of an uninterrupted
one. A run that had finished is reported, not trained or rewritten. SIGINT (Ctrl-C) and
SIGTERM are caught while training (:mod:`invertible_train.interrupts`): the step in
progress finishes, a checkpoint is written, the run records where it stopped and
:class:`Interrupted` is raised (the CLI exits 130 or 143). A non-finite loss stops the run
with :class:`NonFiniteLossError` before anything is saved over the last good checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import torch

from invertible_core import MemoryPlan
from invertible_train.checkpoint import (
    CheckpointError,
    CheckpointStore,
    capture_rng_state,
    restore_rng_state,
)
from invertible_train.config import ExperimentConfig, config_to_dict
from invertible_train.data import ImageData
from invertible_train.interrupts import Interrupted, StopSignals
from invertible_train.model import has_memory_saving
from invertible_train.preflight import Start, check_start, plan_record
from invertible_train.progress import Progress, ProgressMode
from invertible_train.results import RunLog, Throughput, package_versions, prepare_results
from invertible_train.results import remove_results as remove_written_results
from invertible_train.resume import set_aside_skipped
from invertible_train.run import Run, TaskFactory, TrainingWarning
from invertible_train.sharded_checkpoint import LAYOUT as SHARDED
from invertible_train.sharded_checkpoint import ShardedCheckpointStore, load_sharded_state
from invertible_train.strategy import Distribution, SingleProcess
from invertible_train.tasks import task_for

__all__ = [
    "NonFiniteLossError",
    "TaskFactory",
    "Trainer",
    "TrainingWarning",
]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint was kept."""


class Trainer(Run):
    """Trains one experiment into one results directory (see the module docstring).

    Args:
        cfg: the experiment.
        results_dir: its results folder (``RESULTS_DIR/NAME``).
        device: where to train in one process (ignored when ``distribution`` is given: it
            names the device).
        quiet: print nothing (no progress, no resume or finish notice).
        data: the dataset, when the caller has built it already.
        distribution: how work is shared (default: :class:`SingleProcess` on ``device``).
        task: builds the task from the model (default:
            :func:`~invertible_train.tasks.task_for`).
        progress: ``bar`` (a progress bar when stderr is a terminal), ``lines`` (a line on
            stdout per logged iteration) or ``none``; see :mod:`invertible_train.progress`.

    Building writes nothing (:class:`~invertible_train.run.Run`); :meth:`fit` checks, then
    writes and trains.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        results_dir: str | Path,
        device: torch.device | str = "cpu",
        quiet: bool = False,
        data: ImageData | None = None,
        distribution: Distribution | None = None,
        task: TaskFactory = task_for,
        progress: ProgressMode = "bar",
    ) -> None:
        super().__init__(
            cfg, distribution if distribution is not None else SingleProcess(device), data, task
        )
        self.results_dir = Path(results_dir)
        self.quiet = quiet
        self.progress: ProgressMode = "none" if quiet else progress
        self.iteration = 0
        self.epoch = 0
        self.position = 0  # batches of the current epoch already trained
        #: the best value of the task's metric so far (None before the first evaluation).
        self.best: float | None = None
        folder = self.results_dir / "checkpoints"
        #: ``last``, ``previous`` and ``best``: files, or under ``--fsdp`` sharded folders.
        self.checkpoints: CheckpointStore | ShardedCheckpointStore = (
            ShardedCheckpointStore(folder) if self.sharded else CheckpointStore(folder)
        )
        self.log = RunLog(
            self.results_dir, self.distribution.is_main_process, cfg.train.tensorboard
        )
        self._stop = StopSignals()
        #: the memory plan applied to the model (``train.memory_budget``), once planned.
        self.memory_plan: MemoryPlan | None = None
        #: training seconds of the run before this session, and the iteration they start at
        #: (restored from a checkpoint, so that a summary's images/s is the whole run's).
        self._trained = {"seconds": 0.0, "since_iteration": 0}
        self._clock = Throughput()

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a bit-exact resume needs, as weights-only-loadable data (of an
        unsharded model: a sharded one's tensors go to its sharded checkpoints)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            **self.run_state(),
        }

    def run_state(self) -> dict[str, Any]:
        """:meth:`state_dict` but the model's and the optimizer's state."""
        return {
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "epoch": self.epoch,
            "position": self.position,
            "sampler": {
                "epoch": self.epoch,
                "start_index": self.position * self.local_batch_size,
                "seed": self.sampler.seed,
                "num_replicas": self.distribution.world_size,
            },
            "rng": capture_rng_state(self.device),
            "config": config_to_dict(self.cfg),
            "task": self.task.name,
            "num_classes": self.data.num_classes,
            "normalization": {"mean": list(self.data.mean), "std": list(self.data.std)},
            "best_test_metric": self.best,
            "memory_plan": None if self.memory_plan is None else self.memory_plan.to_dict(),
            "train_time": {
                "seconds": self._clock.so_far(),
                "since_iteration": self._trained["since_iteration"],
            },
        }

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        """Restore :meth:`state_dict`; contents that do not fit raise :class:`CheckpointError`.

        A sharded checkpoint's ``state`` (its ``state.pt``) brings the run's state; the
        model's and the optimizer's load from its folder ``source``
        (:func:`~invertible_train.sharded_checkpoint.load_sharded_state`: every process of a
        sharded run calls this, or one process with the whole model). Whether the
        checkpoint belongs to this experiment is
        :func:`~invertible_train.resume.find_resume_point`'s question.
        """
        try:
            if state.get("layout") == SHARDED:
                load_sharded_state(source, state, self.model, self.optimizer)
            else:
                self.model.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.iteration = int(state["iteration"])
            self.epoch = int(state["epoch"])
            self.position = int(state["position"])
            best = state.get("best_test_metric")
            self.best = None if best is None else float(best)
            restore_rng_state(state["rng"], self.device)
            timed = state.get("train_time")
            self._trained = (
                {
                    "seconds": float(timed["seconds"]),
                    "since_iteration": int(timed["since_iteration"]),
                }
                if isinstance(timed, dict)
                else {"seconds": 0.0, "since_iteration": self.iteration}  # not recorded
            )
        except CheckpointError:
            raise
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint {source} does not fit this experiment ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}); rerun with --fresh to start over, or "
                "use another --results-dir"
            ) from None

    # -- training -------------------------------------------------------------------
    def train_step(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step; returns the detached loss and the task's batch sums,
        without synchronising the device."""
        if self.closed:
            raise RuntimeError(
                "this Trainer was closed (its process group ended, or close() was called); "
                "build a new one to train again"
            )
        x = self.task.train_view(images, self.iteration, self.distribution.rank)
        with self._autocast():
            output = self.wrapped_model(x)
            loss = self.task.loss(output, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach().float(), self.task.sums(output, labels, loss)

    def fit(self, fresh: bool = False) -> dict[str, Any]:
        """Train to ``total_iterations``, resuming when possible; returns the summary.

        ``fresh``: delete what the harness wrote in the results folder and start over.
        Everything that could refuse the run is checked before anything is written
        (:func:`~invertible_train.preflight.check_start`). A run that had already finished
        returns its ``summary.json`` as it is. Raises :class:`Interrupted` after saving a
        checkpoint when SIGINT or SIGTERM arrives during training (installed in the main
        thread only).
        """
        start = check_start(self, self.results_dir, self.checkpoints, fresh, self.load_state_dict)
        if start.finished is not None:
            assert start.point is not None
            self._say(
                f"{self.cfg.run_name()}: finished earlier (iteration {self.iteration} of "
                f"{self.total_iterations}, {start.point.source}); nothing was trained or "
                "rewritten, --fresh trains it again"
            )
            return start.finished
        self._begin(start)
        try:
            with self._stop.installed():  # a signal during the summary is remembered, unused
                return self._summarize(self._loop())
        finally:
            self.log.close()

    def _begin(self, start: Start) -> None:
        """Carry out ``start``: the first writes of the run (every check has passed)."""
        writes = ["checkpoints", "config.toml", "metrics.jsonl", "summary.json", *self.task.writes]
        if self.cfg.train.tensorboard:
            writes.append("tensorboard")
        point = start.point

        def on_main() -> None:
            if start.fresh:
                remove_written_results(self.results_dir)
            prepare_results(self.results_dir, writes)
            self.checkpoints.remove_stale()
            if point is not None:
                set_aside_skipped(point, self.checkpoints)

        self.distribution.run_on_main(on_main)
        self.memory_plan = start.plan
        self._clock = Throughput(self._trained["seconds"])
        self.log.open(config_to_dict(self.cfg), None if point is None else self.iteration)
        if start.plan is not None:
            self.log.log(plan_record(start.plan, start.plan_reused, self.iteration))
        if point is not None:
            checkpoint = str(point.source.relative_to(self.results_dir))
            self.log.log(
                {
                    "kind": "resumed",
                    "iteration": self.iteration,
                    "epoch": self.epoch,
                    "checkpoint": checkpoint,
                }
            )
            self._say(
                f"{self.cfg.run_name()}: resuming from {checkpoint} at iteration "
                f"{self.iteration} of {self.total_iterations}"
            )

    def _batches(self) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
        """Training batches from the saved position onwards, epoch after epoch."""
        while True:
            if self.position >= self.batches_per_epoch:
                self.epoch += 1
                self.position = 0
            self.sampler.set_epoch(self.epoch, self.position * self.local_batch_size)
            yield from self.loader
            if self.position < self.batches_per_epoch:  # pragma: no cover - defensive
                self.position = self.batches_per_epoch

    def _loop(self) -> dict[str, float]:
        """The loop, from the current iteration to ``total_iterations``; the last evaluation.

        After each step the loop may do four things, in this order: learn whether any
        process saw a non-finite loss or was asked to stop (one small reduction, at the
        points where the processes synchronise anyway: every step on the CPU, else the
        logging, evaluation and checkpoint points and a stop request), then log, evaluate
        and save. A stop request is acted on in that one place.
        """
        every = self.intervals
        cpu = self.device.type == "cpu"
        one_process = self.distribution.world_size == 1
        sums = torch.zeros(self.task.sums_size, dtype=torch.float64, device=self.device)
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        checked = self.iteration
        last_eval: dict[str, float] | None = None
        clock = self._clock  # counts everything but evaluation and saving ("paused")
        self.wrapped_model.train()
        progress = Progress(
            self.progress if self.distribution.is_main_process else "none",
            self.total_iterations,
            self.iteration,
            self.cfg.run_name(),
            self.task.train_metric,
            self.task.abbreviation,
        )
        batches = self._batches()
        with progress:
            try:
                while self.iteration < self.total_iterations:
                    try:
                        images, labels = next(batches)
                        stepped = True
                    except Exception:
                        if self._stop.received is None:
                            raise
                        stepped = False  # a Ctrl-C reaches loader workers too, and ends them
                    if stepped:
                        images = images.to(self.device, non_blocking=True)
                        labels = labels.to(self.device, non_blocking=True)
                        loss, batch_sums = self.train_step(images, labels)
                        self.iteration += 1
                        self.position += 1
                        sums += batch_sums
                        bad |= ~torch.isfinite(loss)
                        progress.update()
                    last = self.iteration >= self.total_iterations
                    log_now = self.iteration % every["log_every"] == 0 or last
                    eval_now = self.iteration % every["eval_every"] == 0 or last
                    save_now = self.iteration % every["checkpoint_every"] == 0 or last
                    stop_asked = not stepped or (one_process and self._stop.received is not None)
                    # on the CPU the check is free: stop at the very step that diverged
                    if not (cpu or log_now or eval_now or save_now or stop_asked):
                        continue
                    if self._check(bad, checked) and not last:  # never save a diverged model
                        self._interrupt()
                    checked = self.iteration
                    if log_now:
                        progress.show(self._log_train(sums, clock.window(self.device)))
                    with clock.paused():
                        if eval_now:
                            last_eval = self._evaluate_and_log()
                        if save_now:
                            self._save()
            finally:
                batches.close()  # shuts down loader workers now rather than at garbage collection
        if last_eval is None:  # the run had trained its last step, but not written its summary
            last_eval = self.evaluate()
        return last_eval

    def _save(self, best: bool = False) -> None:
        """Write ``last`` (or ``best``): the main process writes a file, or under ``--fsdp``
        every process its shards (with the main process's buffers, as under DDP)."""
        if isinstance(self.checkpoints, ShardedCheckpointStore):
            self.distribution.broadcast_buffers(self.model)
            save = self.checkpoints.save_best if best else self.checkpoints.save_last
            save(self.run_state(), self.model, self.optimizer)
        elif self.distribution.is_main_process:
            if best:
                self.checkpoints.save_best(self.state_dict())
            else:
                self.checkpoints.save_last(self.state_dict())

    def _check(self, bad: torch.Tensor, since: int) -> bool:
        """Stop every process on a non-finite loss seen by any; True when any process was
        asked to stop (SIGINT, SIGTERM), so that every rank stops at the same iteration."""
        flags = torch.stack(
            [bad.to(torch.int32), torch.tensor(int(self._stop.received is not None)).to(bad.device)]
        )
        nonfinite, stop = self.distribution.reduce(flags).tolist()
        if nonfinite:
            where = (
                f"at iteration {self.iteration}"
                if since == self.iteration - 1
                else f"between iterations {since + 1} and {self.iteration}"
            )
            kept = (
                f"the last good checkpoint {self.checkpoints.last} is kept"
                if self.checkpoints.last.exists()
                else "no checkpoint had been written yet"
            )
            message = (
                f"non-finite training loss {where}; stopped, {kept}. Lower optimizer.lr "
                "(--lr or --set optimizer.lr=...), or use --amp bf16/off instead of fp16"
            )
            self.log.log({"kind": "stopped", "iteration": self.iteration, "reason": message})
            raise NonFiniteLossError(message)
        return bool(stop)

    def _interrupt(self) -> None:
        """Save a checkpoint at this iteration, record the stop, raise :class:`Interrupted`."""
        self._save()
        self.log.log(
            {
                "kind": "stopped",
                "iteration": self.iteration,
                "epoch": self.epoch,
                "reason": f"interrupted by {self._stop.name}",
                "checkpoint": str(self.checkpoints.last.relative_to(self.results_dir)),
            }
        )
        raise Interrupted(
            self._stop.number, self.iteration, self.total_iterations, self.checkpoints.last
        )

    # -- what the run reports ---------------------------------------------------------
    def _say(self, line: str) -> None:
        """One line on stdout for the user (main process, unless quiet)."""
        if not self.quiet and self.distribution.is_main_process:
            print(line, flush=True)

    def _log_train(self, sums: torch.Tensor, seconds: float) -> dict[str, Any]:
        # figures of the global batch, images/s of the whole job
        totals = self.distribution.reduce(sums.clone())
        record = {
            "kind": "train",
            "iteration": self.iteration,
            "epoch": self.epoch,
            **self.task.figures(totals),
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_second": float(totals[2]) / max(seconds, 1e-9),
            "time": time.time(),
        }
        if self.device.type == "cuda":
            record["memory_bytes"] = torch.cuda.max_memory_allocated(self.device)
        self.log.log(record)
        sums.zero_()
        return record

    def _evaluate_and_log(self) -> dict[str, float]:
        figures = self.evaluate()
        self.log.log({"kind": "eval", "iteration": self.iteration, "epoch": self.epoch, **figures})
        if self.task.better(figures[self.task.metric], self.best):
            self.best = figures[self.task.metric]
            self._save(best=True)
        main = self.distribution.is_main_process
        if main or self.sharded:  # a sharded model's forward is every process's
            image = self.task.after_evaluation(
                self.model, self.results_dir, self.iteration, write=main
            )
            if image is not None:
                self.log.log_image("samples", image, self.iteration)
        return figures

    def _summarize(self, last_eval: dict[str, float]) -> dict[str, Any]:
        memory: dict[str, int | None] = {"activation_bytes": None, "step_peak_bytes": None}
        if self.cfg.train.measure_memory and not self.sharded:  # (Run warned when sharded)
            memory.update(
                self.evaluator.step_memory(
                    self.model,
                    self.local_batch_size,
                    self.amp_dtype,
                    optimizer=self.optimizer,
                    scaler=self.scaler,
                )
            )
        # images/s of the whole job over the run's training time (the main process's clock)
        seconds = self._clock.total_seconds
        timed = (self.iteration - self._trained["since_iteration"]) * self.cfg.data.batch_size
        saving = (
            {"memory_saving": bool(self.model.memory_saving)}
            if has_memory_saving(self.model)
            else {}
        )
        plan = {} if self.memory_plan is None else {"memory_plan": self.memory_plan.to_dict()}
        summary: dict[str, Any] = {
            "experiment": self.cfg.run_name(),
            "model": self.cfg.model.name,
            "task": self.task.name,
            **saving,
            "dataset": self.cfg.data.dataset,
            "iterations": self.iteration,
            "epochs": self.iteration / self.batches_per_epoch,
            **last_eval,
            f"best_{self.task.metric}": self.best,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            **memory,
            **plan,
            "images_per_second": timed / seconds if timed and seconds > 0 else None,
            "train_seconds": seconds,
            "wall_seconds": time.perf_counter() - self._clock.started,
            "device": str(self.device),
            "amp": self.cfg.train.amp,
            "world_size": self.distribution.world_size,
            "versions": package_versions(),
        }
        self.log.write_summary(summary)
        return summary
