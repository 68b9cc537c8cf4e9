"""Optimizers and schedules come from registries, by name."""

from __future__ import annotations

import pytest
import torch

from invertible_train.config import OptimizerConfig, SchedulerConfig
from invertible_train.optim import OPTIMIZERS, SCHEDULERS, build_optimizer, build_scheduler


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_registered_optimizer_steps(name: str) -> None:
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = build_optimizer([weight], OptimizerConfig(name=name, lr=0.1))
    weight.sum().backward()
    optimizer.step()
    assert (weight < 1).all()


def test_sgd_follows_the_recipe_settings() -> None:
    cfg = OptimizerConfig(lr=0.1, momentum=0.9, weight_decay=2e-4, nesterov=True)
    group = build_optimizer([torch.nn.Parameter(torch.ones(1))], cfg).param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (
        0.1,
        0.9,
        2e-4,
        True,
    )


@pytest.mark.parametrize(
    ("name", "lr_after_4"),
    [("multistep", 0.1 * 0.1 * 0.1), ("constant", 0.1), ("cosine", 0.0)],
)
def test_registered_schedules_step_per_iteration(name: str, lr_after_4: float) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    scheduler = build_scheduler(optimizer, SchedulerConfig(name=name, milestones=[2, 3]), 4)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr_after_4, abs=1e-12)
    assert set(SCHEDULERS) == {"multistep", "constant", "cosine"}
