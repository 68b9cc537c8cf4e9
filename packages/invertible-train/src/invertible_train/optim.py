"""Optimizers and learning-rate schedules, looked up by name in two registries.

Experiment files name an entry (``optimizer.name = "sgd"``); they never name a Python
path, so a config file cannot make the harness import or run arbitrary code. To add an
entry, put a builder in :data:`OPTIMIZERS` or :data:`SCHEDULERS`; configs are validated
against these keys on load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from invertible_train.config import OptimizerConfig, SchedulerConfig

__all__ = ["OPTIMIZERS", "SCHEDULERS", "build_optimizer", "build_scheduler"]

Params = Iterable[torch.nn.Parameter]


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


#: name -> builder(parameters, OptimizerConfig). ``momentum``/``nesterov`` apply to SGD only.
OPTIMIZERS: dict[str, Callable[[Params, OptimizerConfig], Optimizer]] = {
    "sgd": _sgd,
    "adam": _adam,
    "adamw": _adamw,
}


def _multistep(opt: Optimizer, cfg: SchedulerConfig, total: int) -> LRScheduler:
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=cfg.milestones, gamma=cfg.gamma)


def _cosine(opt: Optimizer, cfg: SchedulerConfig, total: int) -> LRScheduler:
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))


def _constant(opt: Optimizer, cfg: SchedulerConfig, total: int) -> LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=_one)


def _one(iteration: int) -> float:
    return 1.0


#: name -> builder(optimizer, SchedulerConfig, total_iterations); stepped once per iteration.
SCHEDULERS: dict[str, Callable[[Optimizer, SchedulerConfig, int], LRScheduler]] = {
    "multistep": _multistep,
    "cosine": _cosine,
    "constant": _constant,
}


def build_optimizer(params: Params, cfg: OptimizerConfig) -> Optimizer:
    """The optimizer named by ``cfg.name`` over ``params``."""
    return OPTIMIZERS[cfg.name](params, cfg)


def build_scheduler(opt: Optimizer, cfg: SchedulerConfig, total_iterations: int) -> LRScheduler:
    """The schedule named by ``cfg.name``; ``total_iterations`` sizes the cosine schedule."""
    return SCHEDULERS[cfg.name](opt, cfg, total_iterations)
