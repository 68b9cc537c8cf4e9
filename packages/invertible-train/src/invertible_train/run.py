"""Building a run: everything an experiment is made of, in memory, nothing written.

:class:`Run` turns an :class:`~invertible_train.config.ExperimentConfig` into the objects a
training loop needs: the data (:func:`~invertible_train.data.build_data`), the model
(:func:`~invertible_train.model.build_model`, seeded by ``train.seed`` alone), the task
(:mod:`invertible_train.tasks`: classification, or density estimation for models with
``log_prob`` and ``sample``), the module the loop calls (``DistributedDataParallel`` under
torchrun; under ``--fsdp`` the model itself, sharded by FSDP2), the optimizer, the
schedule, the grad scaler, the resumable sampler and its loader, the evaluator, and the run's length and intervals in iterations. Building checks
what only the built pieces can tell (a batch larger than the training set, a batch that does
not split across the processes) and writes nothing: a results folder is only touched once
every check has passed (:mod:`invertible_train.preflight`).

:class:`~invertible_train.trainer.Trainer` is a run that trains: it adds the training state
(iteration, position in the epoch, best metric), the loop and the results.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from invertible_train.config import ConfigError, ExperimentConfig, resolve_intervals
from invertible_train.data import ImageData, build_data
from invertible_train.data.loading import ResumableSampler, make_loader
from invertible_train.data.transforms import BatchTransform
from invertible_train.evaluation import Evaluator
from invertible_train.model import build_model, has_memory_saving, initialise_data_dependent_layers
from invertible_train.optim import build_optimizer, build_scheduler, check_optim_config
from invertible_train.sharding import check_fsdp_available
from invertible_train.strategy import Distribution
from invertible_train.tasks import Task, task_for

__all__ = ["AMP_DTYPES", "Run", "TaskFactory", "TrainingWarning"]

#: the autocast dtype of each ``train.amp`` mode (``off``: none).
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

#: builds the task of a run from its model, batch transform and image shape ``(C, H, W)``.
TaskFactory = Callable[[nn.Module, BatchTransform, tuple[int, ...]], Task]


class TrainingWarning(UserWarning):
    """Something the user should know that does not stop the run."""


class Run:
    """The built pieces of one experiment on one process (see the module docstring).

    Args:
        cfg: the experiment.
        distribution: how the work is shared (it names the device).
        data: the dataset, when the caller has built it already.
        task: builds the task from the model (default:
            :func:`~invertible_train.tasks.task_for`).

    ``data.batch_size`` is the global batch, split evenly across the distribution's
    processes. ``model`` is the bare network (its ``state_dict`` is what checkpoints hold),
    as DDP's ``model.module`` is; ``wrapped_model`` is what the loop calls.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        distribution: Distribution,
        data: ImageData | None = None,
        task: TaskFactory = task_for,
    ) -> None:
        self.cfg = cfg
        self.distribution = distribution
        self.device = distribution.device
        world_size = distribution.world_size
        if cfg.data.batch_size % world_size:
            raise ConfigError(
                f"data.batch_size {cfg.data.batch_size} is not divisible by {world_size} processes"
            )
        if cfg.train.memory_budget and cfg.train.sync_bn and world_size > 1:
            raise ConfigError(
                "train.memory_budget cannot plan a model with train.sync_bn under torchrun: "
                "SyncBatchNorm's forward is a collective, which one process cannot measure "
                "alone; drop --sync-bn or --memory-budget"
            )
        if cfg.train.fsdp:
            check_fsdp_available()
            if cfg.train.memory_budget:
                raise ConfigError(
                    "train.memory_budget cannot plan a sharded model (--fsdp): the planner "
                    "measures one process's training step on the whole model, and a sharded "
                    "step is a collective over every process's shards; drop --memory-budget "
                    "(model.memory_saving still chooses saving or not) or --fsdp"
                )
        check_optim_config(cfg.optimizer, cfg.scheduler)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.local_batch_size = cfg.data.batch_size // world_size
        self.data = (
            data
            if data is not None
            else distribution.main_first(lambda: build_data(cfg.data, cfg.train.seed))
        )
        cuda = self.device.type == "cuda"
        if cuda:
            torch.backends.cudnn.benchmark = True

        torch.manual_seed(cfg.train.seed)  # model initialisation depends on the seed only
        model = build_model(cfg.model, self.data.num_classes, self.data.channels).to(self.device)
        if cfg.train.sync_bn:
            model = distribution.sync_batchnorm(model)
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
        if world_size > 1:
            initialise_data_dependent_layers(
                model, self._first_images, self.task.forward_module(model)
            )
        self.amp_dtype = AMP_DTYPES.get(cfg.train.amp)
        #: whether the model is sharded (``--fsdp``): then its every forward is a collective,
        #: which every process runs, and its checkpoints are sharded.
        self.sharded = cfg.train.fsdp
        if self.sharded:
            distribution.shard(model, self.amp_dtype, self.task.model_methods)
        #: what the loop calls: the DDP wrapper under torchrun (the task's module of the
        #: sharded model under ``--fsdp``), else the task's module.
        self.wrapped_model: nn.Module = (
            self.task.forward_module(model)
            if self.sharded
            else distribution.wrap(self.task.forward_module(model))
        )
        self.closed = False
        self.optimizer = build_optimizer(model.parameters(), cfg.optimizer)

        self.sampler = ResumableSampler(
            len(self.data.train),  # type: ignore[arg-type]
            seed=cfg.train.seed,
            num_replicas=world_size,
            rank=distribution.rank,
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
            if not distribution.is_main_process:
                warnings.simplefilter("ignore")  # rank 0 tells the user once
            self.scheduler = build_scheduler(self.optimizer, cfg.scheduler, self.total_iterations)
            if self.sharded and cfg.train.measure_memory:
                warnings.warn(
                    "train.measure_memory: the end-of-run measurement of a training step "
                    "runs one process's step on a copy of the whole model, which a sharded "
                    "model (--fsdp) cannot give; summary.json records no activation_bytes "
                    "or step_peak_bytes (--set train.measure_memory=false says you know)",
                    TrainingWarning,
                    stacklevel=3,
                )
            if cfg.model.memory_saving is False and not has_memory_saving(model):
                warnings.warn(
                    f"model.memory_saving = false changes nothing: {cfg.model.name} has no "
                    "memory_saving switch",
                    TrainingWarning,
                    stacklevel=3,
                )
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
            distribution,
            self._autocast,
            workers=cfg.data.workers,
            collective=self.sharded,
        )
        distribution.track(self)

    def close(self) -> None:
        """Drop the ``DistributedDataParallel`` wrapper; the trained ``model`` stays.

        Called for every run of a torchrun job when its
        :func:`~invertible_train.distributed.process_group` block ends (see
        :meth:`~invertible_train.distributed.DistributedContext.release`); call it yourself
        to free the wrapper earlier. Training a closed run raises an error, because its
        gradients would no longer be averaged across ranks.
        """
        self.wrapped_model = self.task.forward_module(self.model)
        self.closed = True

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context the forward pass runs in: ``torch.autocast`` for ``train.amp``."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _first_images(self) -> Tensor:
        """The model's view of the first training images: the same on every rank."""
        n = min(self.local_batch_size, len(self.data.train))  # type: ignore[arg-type]
        images = torch.stack([self.data.train[i][0] for i in range(n)]).to(self.device)
        return self.task.test_view(images, list(range(n)))

    def evaluate(self) -> dict[str, float]:
        """The task's test figures of the current model (``test_loss`` and ``test_accuracy``
        or ``test_bits_per_dim``), the same for any number of processes."""
        return self.evaluator.evaluate(self.model)
