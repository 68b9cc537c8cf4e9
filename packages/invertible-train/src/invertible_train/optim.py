"""Optimizers and learning-rate schedules, looked up by name in two registries.

Experiment files name an entry (``optimizer.name = "sgd"``); they never name a Python
path, so a config file cannot make the harness import or run arbitrary code. To add an
entry, put a builder in :data:`OPTIMIZERS` or :data:`SCHEDULERS`. This module checks its
own names (:func:`check_optim_config`), so the schema in :mod:`invertible_train.config`
needs to know nothing about the registries.

Schedules are stepped once per iteration. Their positions (``scheduler.milestones``,
``scheduler.warmup``) count in ``scheduler.unit``: fractions of the run (the recipe's
milestones are 0.5 and 0.75, so a 6-epoch run decays after 3 and 4.5 epochs, as an
80,000-iteration one does at 40,000 and 60,000) or iteration numbers. A milestone that lies
past the end of the run would never apply: :func:`build_scheduler` warns
(:class:`ScheduleWarning`). The schedule is fixed when a run starts: its state is in every
checkpoint, so a resumed run continues the schedule it began with, even if its length
changed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from invertible_train.config import ConfigError, OptimizerConfig, SchedulerConfig

__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "ScheduleWarning",
    "WarmupConstant",
    "WarmupCosine",
    "build_optimizer",
    "build_scheduler",
    "check_optim_config",
    "schedule_positions",
]

Params = Iterable[torch.nn.Parameter]


class ScheduleWarning(UserWarning):
    """A schedule that cannot do what it says within the run (a milestone past its end)."""


def _sgd(params: Params, cfg: OptimizerConfig) -> Optimizer:
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov,
    )


def _adam(params: Params, cfg: OptimizerConfig) -> Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _adamw(params: Params, cfg: OptimizerConfig) -> Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


#: name -> builder(parameters, OptimizerConfig). ``momentum``/``nesterov`` apply to SGD only;
#: ``adamw`` decouples the weight decay from the gradient (Loshchilov and Hutter, 2019).
OPTIMIZERS: dict[str, Callable[[Params, OptimizerConfig], Optimizer]] = {
    "sgd": _sgd,
    "adam": _adam,
    "adamw": _adamw,
}


def schedule_positions(values: Iterable[float], unit: str, total_iterations: int) -> list[int]:
    """Schedule positions as iteration numbers: fractions of ``total_iterations`` rounded
    down (``unit="fraction"``: a fraction below 1 always falls inside the run), or the values
    themselves (``"iteration"``).
    """
    if unit == "fraction":
        return [math.floor(value * total_iterations) for value in values]
    return [int(value) for value in values]


class WarmupCosine:
    """lr factor: linear warmup from ``1 / (warmup + 1)`` to 1 over ``warmup`` iterations,
    then half a cosine from 1 down to 0 at ``total`` iterations (the ViT/RevViT recipe).

    A callable object rather than a function so that ``LambdaLR`` saves its two numbers in
    the scheduler state (and a resumed run keeps the schedule it started with).
    """

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup = warmup
        self.total = max(total, 1)

    def __call__(self, iteration: int) -> float:
        if iteration < self.warmup:
            return (iteration + 1) / (self.warmup + 1)
        progress = (iteration - self.warmup) / max(self.total - self.warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class WarmupConstant(WarmupCosine):
    """lr factor: the linear warmup of :class:`WarmupCosine`, then 1 to the end (Glow's
    schedule: Adam at ``optimizer.lr`` after a linear warmup, no decay)."""

    def __call__(self, iteration: int) -> float:
        return super().__call__(iteration) if iteration < self.warmup else 1.0


def _multistep(opt: Optimizer, cfg: SchedulerConfig, total: int) -> LRScheduler:
    milestones = schedule_positions(cfg.milestones, cfg.unit, total)
    late = [m for m in milestones if m >= total]
    if late:
        warnings.warn(
            f"scheduler.milestones {late} lie past the end of the run ({total} iterations): "
            f"the learning rate never decays there. Use fractions of the run "
            f"(scheduler.unit = 'fraction', e.g. milestones = [0.5, 0.75]) or earlier "
            "iterations",
            ScheduleWarning,
            stacklevel=3,
        )
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=cfg.gamma)


def _cosine(opt: Optimizer, cfg: SchedulerConfig, total: int) -> LRScheduler:
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))


def _warmup_cosine(opt: Optimizer, cfg: SchedulerConfig, total: int) -> LRScheduler:
    (warmup,) = schedule_positions([cfg.warmup], cfg.unit, total)
    _warn_long_warmup(warmup, total)
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=WarmupCosine(warmup, total))


def _warn_long_warmup(warmup: int, total: int) -> None:
    if warmup >= total:
        warnings.warn(
            f"scheduler.warmup ({warmup} iterations) lasts the whole run ({total} iterations): "
            "the learning rate never reaches optimizer.lr",
            ScheduleWarning,
            stacklevel=4,
        )


def _warmup_constant(opt: Optimizer, cfg: SchedulerConfig, total: int) -> LRScheduler:
    (warmup,) = schedule_positions([cfg.warmup], cfg.unit, total)
    _warn_long_warmup(warmup, total)
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=WarmupConstant(warmup, total))


def _constant(opt: Optimizer, cfg: SchedulerConfig, total: int) -> LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=_one)


def _one(iteration: int) -> float:
    return 1.0


#: name -> builder(optimizer, SchedulerConfig, total_iterations); stepped once per iteration.
SCHEDULERS: dict[str, Callable[[Optimizer, SchedulerConfig, int], LRScheduler]] = {
    "multistep": _multistep,
    "cosine": _cosine,
    "warmup_cosine": _warmup_cosine,
    "warmup_constant": _warmup_constant,
    "constant": _constant,
}


def check_optim_config(optimizer: OptimizerConfig, scheduler: SchedulerConfig) -> None:
    """Raise :class:`ConfigError` naming the key and the choices for an unknown name."""
    for key, value, registry in (
        ("optimizer.name", optimizer.name, OPTIMIZERS),
        ("scheduler.name", scheduler.name, SCHEDULERS),
    ):
        if value not in registry:
            raise ConfigError(f"{key} must be one of {', '.join(sorted(registry))}; got {value!r}")


def build_optimizer(params: Params, cfg: OptimizerConfig) -> Optimizer:
    """The optimizer named by ``cfg.name`` over ``params``."""
    if cfg.name not in OPTIMIZERS:
        check_optim_config(cfg, SchedulerConfig())
    return OPTIMIZERS[cfg.name](params, cfg)


def build_scheduler(opt: Optimizer, cfg: SchedulerConfig, total_iterations: int) -> LRScheduler:
    """The schedule named by ``cfg.name`` for a run of ``total_iterations``.

    Warns (:class:`ScheduleWarning`) when a milestone or the warmup reaches past the run.
    """
    if cfg.name not in SCHEDULERS:
        check_optim_config(OptimizerConfig(), cfg)
    return SCHEDULERS[cfg.name](opt, cfg, total_iterations)
