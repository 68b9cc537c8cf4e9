"""The training loop: one :class:`Trainer` that trains, evaluates (through its
:class:`~invertible_train.evaluation.Evaluator`), logs and checkpoints one experiment into
one results folder.

A trainer is given two collaborators and holds no branch on either: a
:class:`~invertible_train.tasks.Task` (what is learned: classification, or density
estimation for models with ``log_prob`` and ``sample``; chosen from the model by
:func:`~invertible_train.tasks.task_for`) and a
:class:`~invertible_train.strategy.Distribution` (how the work is shared: one process, or
one rank of a torchrun job). ``Trainer.model`` is the bare network, as DDP's
``model.module`` is; ``Trainer.wrapped_model`` is what the loop calls (the DDP wrapper
under torchrun, the network itself in one process).

Rerunning the same command resumes from the newest usable checkpoint (``last.pt``, else
``previous.pt``): same iteration, same position in the epoch's data order, same random
states, so on the CPU the resumed run ends with bit-for-bit the weights of an uninterrupted
one. A folder that holds results but no usable checkpoint is never started over silently
(the policy: :mod:`invertible_train.resume`). SIGINT (Ctrl-C) and SIGTERM are caught while
training (:mod:`invertible_train.interrupts`): the step in progress finishes, a checkpoint
is written, the run records where it stopped and :class:`Interrupted` is raised (the CLI
exits 130 or 143). A non-finite loss stops the run
with :class:`NonFiniteLossError` before anything is saved over the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from invertible_core import MemoryPlan
from invertible_train.budget import apply_plan, plan_memory, planning_batch, reusable_plan
from invertible_train.checkpoint import (
    CheckpointError,
    CheckpointStore,
    capture_rng_state,
    restore_rng_state,
)
from invertible_train.config import ConfigError, ExperimentConfig, config_to_dict, resolve_intervals
from invertible_train.data import (
    BatchTransform,
    ImageData,
    ResumableSampler,
    build_data,
    make_loader,
)
from invertible_train.evaluation import Evaluator
from invertible_train.interrupts import Interrupted, StopSignals
from invertible_train.model import build_model, has_memory_saving, initialise_data_dependent_layers
from invertible_train.optim import build_optimizer, build_scheduler, check_optim_config
from invertible_train.results import RunLog, Throughput, package_versions
from invertible_train.resume import find_resume_point
from invertible_train.strategy import Distribution, SingleProcess
from invertible_train.tasks import Task, task_for

__all__ = [
    "NonFiniteLossError",
    "TaskFactory",
    "Trainer",
    "TrainingWarning",
]

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

#: builds the task of a run from its model, batch transform and image shape ``(C, H, W)``.
TaskFactory = Callable[[nn.Module, BatchTransform, tuple[int, ...]], Task]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint was kept."""


class TrainingWarning(UserWarning):
    """Something the user should know that does not stop the run."""


class Trainer:
    """Trains one experiment into one results directory (see the module docstring).

    Args:
        cfg: the experiment.
        results_dir: its results folder (``RESULTS_DIR/NAME``).
        device: where to train in one process (ignored when ``distribution`` is given: it
            names the device).
        quiet: no progress bar.
        data: the dataset, when the caller has built it already.
        distribution: how work is shared (default: :class:`SingleProcess` on ``device``).
        task: builds the task from the model (default:
            :func:`~invertible_train.tasks.task_for`).

    ``data.batch_size`` is the global batch, split evenly across the distribution's
    processes.
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
    ) -> None:
        self.cfg = cfg
        self.results_dir = Path(results_dir)
        self.distribution = distribution if distribution is not None else SingleProcess(device)
        self.device = self.distribution.device
        self.quiet = quiet
        world_size = self.distribution.world_size
        if cfg.data.batch_size % world_size:
            raise ConfigError(
                f"data.batch_size {cfg.data.batch_size} is not divisible by {world_size} processes"
            )
        check_optim_config(cfg.optimizer, cfg.scheduler)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.local_batch_size = cfg.data.batch_size // world_size
        self.data = (
            data
            if data is not None
            else self.distribution.main_first(lambda: build_data(cfg.data, cfg.train.seed))
        )
        cuda = self.device.type == "cuda"
        if cuda:
            torch.backends.cudnn.benchmark = True

        torch.manual_seed(cfg.train.seed)  # model initialisation depends on the seed only
        model = build_model(cfg.model, self.data.num_classes, self.data.channels).to(self.device)
        if cfg.train.sync_bn:
            model = self.distribution.sync_batchnorm(model)
        #: the bare network (its ``state_dict`` is what checkpoints hold).
        self.model: nn.Module = model
        self.transform = BatchTransform(
            self.data.mean,
            self.data.std,
            self.device,
            augment=cfg.data.augment,
            padding=cfg.data.crop_padding,
            flip=cfg.data.horizontal_flip,
            seed=cfg.train.seed,
            levels=self.data.levels,
        )
        image_shape = tuple(self.data.train[0][0].shape)
        self.task = task(model, self.transform, image_shape)
        if self.distribution.world_size > 1:
            initialise_data_dependent_layers(
                model, self._first_images, self.task.forward_module(model)
            )
        #: what the loop calls: the DDP wrapper under torchrun, else the task's module.
        self.wrapped_model: nn.Module = self.distribution.wrap(self.task.forward_module(model))
        self.closed = False
        self.optimizer = build_optimizer(model.parameters(), cfg.optimizer)

        self.sampler = ResumableSampler(
            len(self.data.train),  # type: ignore[arg-type]
            seed=cfg.train.seed,
            num_replicas=world_size,
            rank=self.distribution.rank,
        )
        self.batches_per_epoch = len(self.sampler) // self.local_batch_size
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"data.batch_size {cfg.data.batch_size} exceeds the {len(self.sampler)} "
                "training images per process"
            )
        self.total_iterations = (
            cfg.train.epochs * self.batches_per_epoch if cfg.train.epochs else cfg.train.iterations
        )
        #: ``log_every``, ``eval_every``, ``checkpoint_every`` of this run, in iterations.
        self.intervals = resolve_intervals(cfg.train, self.total_iterations)
        with warnings.catch_warnings():
            if not self.distribution.is_main_process:
                warnings.simplefilter("ignore")  # rank 0 tells the user once
            self.scheduler = build_scheduler(self.optimizer, cfg.scheduler, self.total_iterations)
            if not cfg.model.memory_saving and not has_memory_saving(model):
                warnings.warn(
                    f"model.memory_saving = false changes nothing: {cfg.model.name} has no "
                    "memory_saving switch",
                    TrainingWarning,
                    stacklevel=2,
                )
        self.amp_dtype = _AMP_DTYPES.get(cfg.train.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.amp == "fp16")
        self.loader = make_loader(
            self.data.train,
            self.local_batch_size,
            sampler=self.sampler,
            workers=cfg.data.workers,
            pin_memory=cuda,
            drop_last=True,
        )
        self.evaluator = Evaluator(
            self.data.test,
            cfg.data.eval_batch_size,
            self.task,
            self.distribution,
            self._autocast,
            workers=cfg.data.workers,
        )
        self.iteration = 0
        self.epoch = 0
        self.position = 0  # batches of the current epoch already trained
        #: the best value of the task's metric so far (None before the first evaluation).
        self.best: float | None = None
        self.checkpoints = CheckpointStore(self.results_dir / "checkpoints")
        self.log = RunLog(
            self.results_dir, self.distribution.is_main_process, cfg.train.tensorboard
        )
        self._stop = StopSignals()
        self._resumed_from: Path | None = None
        #: the memory plan applied to the model (``train.memory_budget``), once planned.
        self.memory_plan: MemoryPlan | None = None
        self._saved_plan: dict[str, Any] | None = None
        if cfg.train.memory_budget and cfg.train.sync_bn and world_size > 1:
            raise ConfigError(
                "train.memory_budget cannot plan a model with train.sync_bn under torchrun: "
                "SyncBatchNorm's forward is a collective, which one process cannot measure "
                "alone; drop --sync-bn or --memory-budget"
            )
        self.distribution.track(self)

    def close(self) -> None:
        """Drop the ``DistributedDataParallel`` wrapper; the trained ``model`` stays.

        Called for every trainer of a torchrun job when its
        :func:`~invertible_train.distributed.process_group` block ends (see
        :meth:`~invertible_train.distributed.DistributedContext.release`); call it yourself
        to free the wrapper earlier. Training a closed trainer raises an error, because its
        gradients would no longer be averaged across ranks.
        """
        self.wrapped_model = self.task.forward_module(self.model)
        self.closed = True

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a bit-exact resume needs, as weights-only-loadable data."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
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
        }

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        """Restore :meth:`state_dict`; contents that do not fit raise :class:`CheckpointError`.

        Whether the checkpoint belongs to this experiment is :meth:`resume`'s question.
        """
        try:
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
            saved_plan = state.get("memory_plan")
            self._saved_plan = saved_plan if isinstance(saved_plan, dict) else None
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint {source} does not fit this experiment ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}); rerun with --fresh to start over, or "
                "use another --results-dir"
            ) from None

    def resume(self) -> bool:
        """Continue from the newest usable checkpoint when there is one; True when it did.

        The policy (``last.pt``, else ``previous.pt``; never starting over on results
        unless ``--fresh``; same experiment, same number of processes) is
        :func:`~invertible_train.resume.find_resume_point`'s.
        """
        point = find_resume_point(self.results_dir, self.checkpoints, self.cfg, self.distribution)
        if point is None:
            return False
        self.load_state_dict(point.state, point.source)
        self._resumed_from = point.source
        return True

    # -- evaluation -------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def evaluate(self) -> dict[str, float]:
        """The task's test figures of the current model (``test_loss`` and ``test_accuracy``
        or ``test_bits_per_dim``), the same for any number of processes."""
        return self.evaluator.evaluate(self.model)

    # -- training -------------------------------------------------------------------
    def _progress(self) -> Any:
        from tqdm.auto import tqdm

        silent = self.quiet or not self.distribution.is_main_process or not sys.stderr.isatty()
        return tqdm(
            total=self.total_iterations,
            initial=self.iteration,
            disable=silent,
            desc=self.cfg.run_name(),
            unit="it",
            dynamic_ncols=True,
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

    def _first_images(self) -> Tensor:
        """The model's view of the first training images: the same on every rank."""
        n = min(self.local_batch_size, len(self.data.train))  # type: ignore[arg-type]
        images = torch.stack([self.data.train[i][0] for i in range(n)]).to(self.device)
        return self.task.test_view(images, list(range(n)))

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

    def fit(self) -> dict[str, Any]:
        """Train to ``total_iterations`` (resuming when possible); returns the summary.

        Raises :class:`Interrupted` after saving a checkpoint when SIGINT or SIGTERM
        arrives during training (installed in the main thread only).
        """
        resumed = self.resume()
        self.log.open(config_to_dict(self.cfg), self.iteration if resumed else None)
        try:
            self.plan_memory()
            with self._stop.installed():
                return self._fit(resumed)
        finally:
            self.log.close()

    def plan_memory(self) -> MemoryPlan | None:
        """Plan and apply what the model stores for ``train.memory_budget`` (see
        :mod:`invertible_train.budget`): the checkpoint's plan when it was made for the same
        budget, batch shape and device kind, else a new one (made by the main process).
        Logs a ``memory_plan`` record; returns the plan (``None`` without a budget)."""
        budget = self.cfg.train.memory_budget
        if not budget:
            return None
        module = self.task.forward_module(self.model)
        images, labels = planning_batch(
            self.data.train, self.local_batch_size, self.task.test_view, self.device
        )
        shape = list(images.shape)
        plan = reusable_plan(self._saved_plan, budget, shape, self.device)
        reused = plan is not None and apply_plan(plan, module)
        if not reused:

            def make() -> dict[str, Any]:
                return plan_memory(
                    module,
                    images,
                    labels,
                    self.task.loss,
                    self.optimizer,
                    budget,
                    self.amp_dtype,
                ).to_dict()

            plan = MemoryPlan.from_dict(self.distribution.run_on_main(make))
            plan.apply(module)
        assert plan is not None
        self.memory_plan = plan
        stored = sum(1 for unit in plan.units if unit.stores)
        self.log.log(
            {
                "kind": "memory_plan",
                "iteration": self.iteration,
                "reused": reused,
                "budget_bytes": plan.budget_bytes,
                "predicted_peak_bytes": plan.predicted_peak_bytes,
                "measured_peak_bytes": plan.measured_peak_bytes,
                "minimum_peak_bytes": plan.minimum_peak_bytes,
                "plain_peak_bytes": plan.plain_peak_bytes,
                "stored_switches": stored,
                "switches": len(plan.units),
            }
        )
        return plan

    def _check(self, bad: torch.Tensor, since: int) -> bool:
        """Stop every process on a non-finite loss seen by any; True when any was signalled.

        One small reduction (a no-op in one process) at the points where the loop
        synchronises anyway (each step on the CPU, logging, evaluation, checkpoints), so
        that every rank stops at the same iteration.
        """
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
        if self.distribution.is_main_process:
            self.checkpoints.save_last(self.state_dict())
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

    def _fit(self, resumed: bool) -> dict[str, Any]:
        every = self.intervals
        cpu = self.device.type == "cpu"
        one_process = self.distribution.world_size == 1
        last_eval: dict[str, float] | None = None
        if resumed:
            record = {"kind": "resumed", "iteration": self.iteration, "epoch": self.epoch}
            if self._resumed_from is not None:
                record["checkpoint"] = str(self._resumed_from.relative_to(self.results_dir))
            self.log.log(record)
        sums = torch.zeros(self.task.sums_size, dtype=torch.float64, device=self.device)
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        checked = self.iteration
        # Throughput counts everything the loop does (data, augmentation, logging, progress)
        # except evaluation and checkpoint writing, which are "paused" time.
        clock = Throughput()
        self.wrapped_model.train()
        with self._progress() as bar:
            batches = self._batches()
            try:
                while self.iteration < self.total_iterations:
                    if one_process and self._stop.received is not None:
                        self._check(bad, checked)
                        self._interrupt()
                    try:
                        images, labels = next(batches)
                    except Exception:
                        if self._stop.received is None:
                            raise
                        # a Ctrl-C reaches loader workers too, and ends them
                        self._check(bad, checked)
                        self._interrupt()
                    images = images.to(self.device, non_blocking=True)
                    labels = labels.to(self.device, non_blocking=True)
                    loss, batch_sums = self.train_step(images, labels)
                    self.iteration += 1
                    self.position += 1
                    sums += batch_sums
                    bad |= ~torch.isfinite(loss)
                    clock.images += labels.shape[0]
                    bar.update(1)
                    last = self.iteration >= self.total_iterations
                    log_now = self.iteration % every["log_every"] == 0 or last
                    eval_now = self.iteration % every["eval_every"] == 0 or last
                    save_now = self.iteration % every["checkpoint_every"] == 0 or last
                    stop_asked = one_process and self._stop.received is not None
                    # on the CPU the check is free: stop at the very step that diverged
                    if not (cpu or log_now or eval_now or save_now or stop_asked):
                        continue
                    stopping = self._check(bad, checked)  # never save or report a diverged model
                    checked = self.iteration
                    if stopping and not last:
                        self._interrupt()
                    if log_now:
                        record = self._log_train(sums, clock.window(self.device))
                        bar.set_postfix(
                            loss=f"{record['loss']:.3f}",
                            **{self.task.abbreviation: f"{record[self.task.train_metric]:.3f}"},
                            img_s=f"{record['images_per_second']:.0f}",
                            refresh=False,
                        )
                    with clock.paused():
                        if eval_now:
                            last_eval = self._evaluate_and_log()
                        if save_now and self.distribution.is_main_process:
                            self.checkpoints.save_last(self.state_dict())
            finally:
                batches.close()  # shuts down loader workers now rather than at garbage collection
        if last_eval is None:  # resumed a run that had already finished
            last_eval = self.evaluate()
        return self._summarize(last_eval, clock)

    def _log_train(self, sums: torch.Tensor, window: tuple[int, float]) -> dict[str, Any]:
        # figures of the global batch, images/s of the whole job
        _, seconds = window
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
            if self.distribution.is_main_process:
                self.checkpoints.save_best(self.state_dict())
        if self.distribution.is_main_process:
            image = self.task.after_evaluation(self.model, self.results_dir, self.iteration)
            if image is not None:
                self.log.log_image("samples", image, self.iteration)
        return figures

    def _summarize(self, last_eval: dict[str, float], clock: Throughput) -> dict[str, Any]:
        memory: dict[str, int | None] = {"activation_bytes": None, "step_peak_bytes": None}
        if self.cfg.train.measure_memory:
            memory.update(
                self.evaluator.step_memory(self.model, self.local_batch_size, self.amp_dtype)
            )
        # images/s of the whole job: every rank's images over the main process's time
        images = torch.tensor(float(clock.total_images), device=self.device)
        clock.total_images = int(self.distribution.reduce(images))
        saving = (
            {"memory_saving": self.cfg.model.memory_saving} if has_memory_saving(self.model) else {}
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
            "images_per_second": clock.images_per_second,
            "train_seconds": clock.total_seconds,
            "wall_seconds": time.perf_counter() - clock.started,
            "device": str(self.device),
            "amp": self.cfg.train.amp,
            "world_size": self.distribution.world_size,
            "versions": package_versions(),
        }
        self.log.write_summary(summary)
        return summary
