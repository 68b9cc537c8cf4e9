"""The training loop: one :class:`Trainer` that trains, evaluates, logs and checkpoints.

Its results folder (layout in :mod:`invertible_train.results`) holds the logs, the summary
and the checkpoints.

Rerunning the same command resumes from ``checkpoints/last.pt``: same iteration, same
position in the epoch's data order, same random states, so on the CPU the resumed run ends
with bit-for-bit the weights of an uninterrupted one. A non-finite loss stops the run with
:class:`NonFiniteLossError` before anything is saved over the last good checkpoint.

Distributed training builds on five seams, each in one place: :meth:`Trainer.wrap_model`
(wrap for DDP), :meth:`Trainer.reduce` (all-reduce evaluation sums), the sampler's
``num_replicas``/``rank``, :attr:`Trainer.is_main_process` (who writes files) and
:meth:`Trainer.read_last_checkpoint` (who reads the checkpoint); see
:mod:`invertible_train.distributed`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from invertible_models import create_model, list_models
from invertible_train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from invertible_train.config import ConfigError, ExperimentConfig, config_to_dict
from invertible_train.data import (
    BatchTransform,
    ImageData,
    ResumableSampler,
    build_data,
    make_loader,
)
from invertible_train.optim import build_optimizer, build_scheduler
from invertible_train.results import (
    ResultsDirError,
    RunLog,
    Throughput,
    config_differences,
    package_versions,
)

__all__ = [
    "NonFiniteLossError",
    "Trainer",
    "build_model",
    "select_device",
    "step_memory",
]

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint was kept."""


def select_device(spec: str = "auto", no_cuda: bool = False) -> torch.device:
    """``auto`` picks CUDA when present; ``no_cuda`` forces the CPU whatever ``spec`` says."""
    if no_cuda or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if spec == "auto":
        return torch.device("cuda")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {spec!r} but CUDA is not available; use cpu or auto")
    return device


def build_model(cfg: ExperimentConfig, num_classes: int) -> nn.Module:
    """The network named in the config, from ``invertible_models``' registry."""
    try:
        return create_model(
            cfg.model.name,
            num_classes=num_classes,
            memory_saving=cfg.model.memory_saving,
            **cfg.model.options,
        )
    except (KeyError, ValueError) as exc:
        raise ConfigError(
            f"cannot build model {cfg.model.name!r}: {exc}. Models: {', '.join(list_models())}"
        ) from None


def step_memory(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, int]:
    """Bytes held for backward after one training forward, and the training step's peak.

    ``activation_bytes`` is what the forward pass keeps alive for backward (what memory
    saving reduces); ``step_peak_bytes`` is the peak of forward plus backward. Both are
    measured with ``invertible_core.memory.measure_memory`` (exact on the CPU) on a copy of
    the model with the random state forked, so the measurement changes nothing a run
    depends on (BatchNorm statistics, RNG).
    """
    from invertible_core.memory import measure_memory

    device = images.device
    model = copy.deepcopy(model).train()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):

        def forward() -> torch.Tensor:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                return F.cross_entropy(model(images), labels)

        loss, fwd = measure_memory(forward, device)
        del loss

        def step() -> None:
            forward().backward()

        _, full = measure_memory(step, device)
    return {"activation_bytes": fwd.retained_bytes, "step_peak_bytes": full.peak_bytes}


class Trainer:
    """Trains one experiment into one results directory (see the module docstring).

    ``rank``/``world_size`` describe the process group when training is distributed
    (``data.batch_size`` is the global batch, split evenly across ranks); the defaults
    describe a single process.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        results_dir: str | Path,
        device: torch.device | str = "cpu",
        quiet: bool = False,
        data: ImageData | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.cfg = cfg
        self.results_dir = Path(results_dir)
        self.device = torch.device(device)
        self.quiet = quiet
        self.rank = rank
        self.world_size = world_size
        if cfg.data.batch_size % world_size:
            raise ConfigError(
                f"data.batch_size {cfg.data.batch_size} is not divisible by {world_size} processes"
            )
        self.local_batch_size = cfg.data.batch_size // world_size
        self.data = data if data is not None else build_data(cfg.data, cfg.train.seed)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.backends.cudnn.benchmark = True

        torch.manual_seed(cfg.train.seed)  # model initialisation depends on the seed only
        model = build_model(cfg, self.data.num_classes).to(self.device)
        self.module = model
        self.model = self.wrap_model(model)
        self.optimizer = build_optimizer(self.module.parameters(), cfg.optimizer)

        self.sampler = ResumableSampler(
            len(self.data.train),  # type: ignore[arg-type]
            seed=cfg.train.seed,
            num_replicas=world_size,
            rank=rank,
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
        self.scheduler = build_scheduler(self.optimizer, cfg.scheduler, self.total_iterations)
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
        test_indices = list(range(rank, len(self.data.test), world_size))  # type: ignore[arg-type]
        self.test_loader = make_loader(
            self.data.test,
            cfg.data.eval_batch_size,
            sampler=test_indices,  # type: ignore[arg-type]
            workers=cfg.data.workers,
            pin_memory=cuda,
        )
        self.transform = BatchTransform(
            self.data.mean,
            self.data.std,
            self.device,
            augment=cfg.data.augment,
            padding=cfg.data.crop_padding,
            flip=cfg.data.horizontal_flip,
            seed=cfg.train.seed,
        )
        self.iteration = 0
        self.epoch = 0
        self.position = 0  # batches of the current epoch already trained
        self.best_accuracy = -math.inf
        self.log = RunLog(self.results_dir, self.is_main_process, cfg.train.tensorboard)

    #: whether BatchNorm layers normalise over the global batch of all ranks (a
    #: DistributedTrainer option; recorded in checkpoints, so a resume must match it).
    sync_bn: bool = False

    # -- the seams distributed training overrides -------------------------------------
    @property
    def is_main_process(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        return self.rank == 0

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Where the model is wrapped for training (DistributedDataParallel goes here)."""
        return model

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over processes (identity for one process)."""
        return tensor

    # -- paths ----------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.results_dir / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint_dir / "last.pt"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoint_dir / "best.pt"

    # -- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a bit-exact resume needs, as weights-only-loadable data."""
        return {
            "model": self.module.state_dict(),
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
                "num_replicas": self.world_size,
            },
            "rng": capture_rng_state(self.device),
            "config": config_to_dict(self.cfg),
            "num_classes": self.data.num_classes,
            "sync_bn": self.sync_bn,
            "normalization": {"mean": list(self.data.mean), "std": list(self.data.std)},
            "best_test_accuracy": self.best_accuracy,
        }

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        """Restore :meth:`state_dict`; a mismatch raises :class:`CheckpointError`."""
        self._check_resumable(state, source)
        try:
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.iteration = int(state["iteration"])
            self.epoch = int(state["epoch"])
            self.position = int(state["position"])
            self.best_accuracy = float(state["best_test_accuracy"])
            restore_rng_state(state["rng"], self.device)
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint {source} does not fit this experiment ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}); rerun with --fresh to start over, or "
                "use another --results-dir"
            ) from None

    def _check_resumable(self, state: dict[str, Any], source: Path) -> None:
        differ = config_differences(state.get("config", {}), config_to_dict(self.cfg))
        if differ:
            changes = "; ".join(differ)
            raise ResultsDirError(
                f"{self.results_dir} holds a run of a different experiment ({changes}), saved in "
                f"{source}. Rerun with --fresh to discard it, or choose another --results-dir "
                "or experiment name"
            )

    def save(self, path: Path) -> None:
        """Write a checkpoint (main process only)."""
        if self.is_main_process:
            save_checkpoint(self.state_dict(), path)

    def read_last_checkpoint(self) -> dict[str, Any] | None:
        """``checkpoints/last.pt`` when there is one (stale temporary files removed)."""
        for stale in self.checkpoint_dir.glob(".*.tmp"):  # a write a kill interrupted
            stale.unlink(missing_ok=True)
        if not self.last_checkpoint.exists():
            return None
        return load_checkpoint(self.last_checkpoint)

    def resume(self) -> bool:
        """Load ``checkpoints/last.pt`` when there is one; True when a run was resumed.

        The run must have as many processes as the one that wrote it (the data order of
        each rank depends on their number); evaluating a checkpoint has no such limit.
        """
        state = self.read_last_checkpoint()
        if state is None:
            return False
        saved = state.get("sampler", {}).get("num_replicas", 1)
        if saved != self.world_size:
            raise ResultsDirError(
                f"{self.last_checkpoint} was written by {saved} processes; resume with the "
                f"same number (now {self.world_size}) or rerun with --fresh"
            )
        saved_sync = bool(state.get("sync_bn", False))
        if saved_sync != self.sync_bn:
            raise ResultsDirError(
                f"{self.last_checkpoint} was trained {'with' if saved_sync else 'without'} "
                f"--sync-bn; resume {'with' if saved_sync else 'without'} it (the BatchNorm "
                "statistics would change meaning mid-run) or rerun with --fresh"
            )
        self.load_state_dict(state, self.last_checkpoint)
        return True

    # -- evaluation ------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """``(test_loss, test_accuracy)`` of the current model on the untouched test set.

        Sums are reduced over processes before dividing, so the result is the same for
        any number of processes.
        """
        was_training = self.model.training
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for images, labels in self.test_loader:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            with self._autocast():
                # the bare module: DDP's forward may broadcast buffers, a collective that
                # ranks with different numbers of test batches would not all join
                logits = self.module(self.transform.test(images))
            loss = F.cross_entropy(logits.float(), labels, reduction="sum")
            sums[0] += loss
            sums[1] += (logits.argmax(1) == labels).sum()
            sums[2] += labels.numel()
        self.model.train(was_training)
        loss_sum, correct, count = self.reduce(sums).tolist()
        return loss_sum / max(count, 1), correct / max(count, 1)

    def measure_activation_memory(self) -> dict[str, int]:
        """Activation memory of one training step of this run's model (see step_memory)."""
        images, labels = next(iter(self.test_loader))
        n = min(self.local_batch_size, images.shape[0])
        x = self.transform.test(images[:n].to(self.device))
        return step_memory(self.module, x, labels[:n].to(self.device), self.amp_dtype)

    # -- training ----------------------------------------------------------------------
    def _progress(self) -> Any:
        from tqdm.auto import tqdm

        silent = self.quiet or not self.is_main_process or not sys.stderr.isatty()
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

    def _nonfinite(self, bad: torch.Tensor, since: int) -> None:
        if not bool(bad):
            return
        where = (
            f"at iteration {self.iteration}"
            if since == self.iteration - 1
            else f"between iterations {since + 1} and {self.iteration}"
        )
        kept = (
            f"the last good checkpoint {self.last_checkpoint} is kept"
            if self.last_checkpoint.exists()
            else "no checkpoint had been written yet"
        )
        message = (
            f"non-finite training loss {where}; stopped, {kept}. Lower optimizer.lr "
            "(--lr or --set optimizer.lr=...), or use --amp bf16/off instead of fp16"
        )
        self.log.log({"kind": "stopped", "iteration": self.iteration, "reason": message})
        raise NonFiniteLossError(message)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One optimisation step; returns detached ``(loss, correct)`` without syncing."""
        x = self.transform.train(images, self.iteration, self.rank)
        with self._autocast():
            logits = self.model(x)
            loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach().float(), (logits.detach().argmax(1) == labels).sum()

    def fit(self) -> dict[str, Any]:
        """Train to ``total_iterations`` (resuming when possible); returns the summary."""
        resumed = self.resume()
        self.log.open(config_to_dict(self.cfg), self.iteration if resumed else None)
        try:
            return self._fit(resumed)
        finally:
            self.log.close()

    def _fit(self, resumed: bool) -> dict[str, Any]:
        train = self.cfg.train
        cpu = self.device.type == "cpu"
        last_eval: tuple[float, float] | None = None
        if resumed:
            self.log.log({"kind": "resumed", "iteration": self.iteration, "epoch": self.epoch})
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        checked = self.iteration
        # Throughput counts everything the loop does (data, augmentation, logging, progress)
        # except evaluation and checkpoint writing, which are "paused" time.
        clock = Throughput()
        self.model.train()
        with self._progress() as bar:
            batches = self._batches()
            while self.iteration < self.total_iterations:
                images, labels = next(batches)
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                loss, hits = self.train_step(images, labels)
                self.iteration += 1
                self.position += 1
                loss_sum += loss * labels.shape[0]
                correct += hits
                bad |= ~torch.isfinite(loss)
                clock.images += labels.shape[0]
                bar.update(1)
                if cpu:  # free on the CPU: stop at the very step that diverged
                    self._nonfinite(bad, checked)
                    checked = self.iteration
                last = self.iteration >= self.total_iterations
                log_now = self.iteration % train.log_every == 0 or last
                eval_now = self.iteration % train.eval_every == 0 or last
                save_now = self.iteration % train.checkpoint_every == 0 or last
                if not (log_now or eval_now or save_now):
                    continue
                self._nonfinite(bad, checked)  # never save or report a diverged model
                checked = self.iteration
                if log_now:
                    record = self._log_train(loss_sum, correct, clock.window(self.device))
                    bar.set_postfix(
                        loss=f"{record['loss']:.3f}",
                        acc=f"{record['accuracy']:.3f}",
                        img_s=f"{record['images_per_second']:.0f}",
                        refresh=False,
                    )
                with clock.paused():
                    if eval_now:
                        last_eval = self._evaluate_and_log()
                    if save_now:
                        self.save(self.last_checkpoint)
            batches.close()  # shuts down loader workers now rather than at garbage collection
        if last_eval is None:  # resumed a run that had already finished
            last_eval = self.evaluate()
        return self._summarize(last_eval, clock)

    def _log_train(
        self, loss_sum: torch.Tensor, correct: torch.Tensor, window: tuple[int, float]
    ) -> dict[str, Any]:
        images, seconds = window
        record = {
            "kind": "train",
            "iteration": self.iteration,
            "epoch": self.epoch,
            "loss": loss_sum.item() / images,
            "accuracy": correct.item() / images,
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_second": images / max(seconds, 1e-9),
            "time": time.time(),
        }
        if self.device.type == "cuda":
            record["memory_bytes"] = torch.cuda.max_memory_allocated(self.device)
        self.log.log(record)
        loss_sum.zero_()
        correct.zero_()
        return record

    def _evaluate_and_log(self) -> tuple[float, float]:
        test_loss, test_accuracy = self.evaluate()
        self.log.log(
            {
                "kind": "eval",
                "iteration": self.iteration,
                "epoch": self.epoch,
                "test_loss": test_loss,
                "test_accuracy": test_accuracy,
            }
        )
        if test_accuracy > self.best_accuracy:
            self.best_accuracy = test_accuracy
            self.save(self.best_checkpoint)
        return test_loss, test_accuracy

    def _summarize(self, last_eval: tuple[float, float], clock: Throughput) -> dict[str, Any]:
        memory: dict[str, int | None] = {"activation_bytes": None, "step_peak_bytes": None}
        if self.cfg.train.measure_memory:
            memory.update(self.measure_activation_memory())
        summary: dict[str, Any] = {
            "experiment": self.cfg.run_name(),
            "model": self.cfg.model.name,
            "memory_saving": self.cfg.model.memory_saving,
            "dataset": self.cfg.data.dataset,
            "iterations": self.iteration,
            "epochs": self.iteration / self.batches_per_epoch,
            "test_accuracy": last_eval[1],
            "test_loss": last_eval[0],
            "best_test_accuracy": self.best_accuracy,
            "parameters": sum(p.numel() for p in self.module.parameters()),
            **memory,
            "images_per_second": clock.images_per_second,
            "train_seconds": clock.total_seconds,
            "wall_seconds": time.perf_counter() - clock.started,
            "device": str(self.device),
            "amp": self.cfg.train.amp,
            "world_size": self.world_size,
            "versions": package_versions(),
        }
        self.log.write_summary(summary)
        return summary
