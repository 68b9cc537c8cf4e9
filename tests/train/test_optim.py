"""Optimizers and schedules come from registries, by name; schedules fit the run's length."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

from invertible_train.config import ConfigError, OptimizerConfig, SchedulerConfig
from invertible_train.optim import (
    OPTIMIZERS,
    SCHEDULERS,
    ScheduleWarning,
    WarmupCosine,
    build_optimizer,
    build_scheduler,
    check_optim_config,
)


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


def test_adamw_decouples_weight_decay() -> None:
    cfg = OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.05)
    optimizer = build_optimizer([torch.nn.Parameter(torch.ones(1))], cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["weight_decay"] == 0.05


def test_unknown_names_are_config_errors_listing_the_choices() -> None:
    with pytest.raises(ConfigError, match="optimizer.name must be one of adam, adamw, sgd"):
        check_optim_config(OptimizerConfig(name="lion"), SchedulerConfig())
    with pytest.raises(ConfigError, match="scheduler.name must be one of constant, cosine"):
        build_scheduler(
            torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1),
            SchedulerConfig(name="onecycle"),
            10,
        )
    with pytest.raises(ConfigError, match="optimizer.name"):
        build_optimizer([torch.nn.Parameter(torch.ones(1))], OptimizerConfig(name="lion"))


def lrs(cfg: SchedulerConfig, total: int) -> list[float]:
    """The learning rate used at each of ``total`` iterations."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    scheduler = build_scheduler(optimizer, cfg, total)
    seen = []
    for _ in range(total):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize(
    ("name", "lr_after_4"),
    [("multistep", 0.1 * 0.1 * 0.1), ("constant", 0.1), ("cosine", 0.0)],
)
def test_registered_schedules_step_per_iteration(name: str, lr_after_4: float) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    cfg = SchedulerConfig(name=name, milestones=[2, 3], unit="iteration")
    scheduler = build_scheduler(optimizer, cfg, 4)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr_after_4, abs=1e-12)
    assert set(SCHEDULERS) == {
        "multistep", "constant", "cosine", "warmup_cosine", "warmup_constant"
    }  # fmt: skip


def test_fraction_milestones_decay_halfway_and_at_three_quarters_of_any_run() -> None:
    cfg = SchedulerConfig(milestones=[0.5, 0.75], unit="fraction")
    for total in (8, 84, 400):
        seen = lrs(cfg, total)
        half, three_quarters = total // 2, math.floor(0.75 * total)
        assert seen[half - 1] == pytest.approx(0.1) and seen[half] == pytest.approx(0.01)
        assert seen[three_quarters] == pytest.approx(0.001)
        assert seen[-1] == pytest.approx(0.001)


def test_a_milestone_past_the_end_of_the_run_warns() -> None:
    cfg = SchedulerConfig(milestones=[40000, 60000], unit="iteration")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.warns(ScheduleWarning, match=r"\[40000, 60000\] lie past the end of the run"):
        build_scheduler(optimizer, cfg, 840)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fractions below 1 always fall inside the run
        build_scheduler(optimizer, SchedulerConfig(), 3)
        build_scheduler(optimizer, SchedulerConfig(milestones=[300], unit="iteration"), 840)


def test_warmup_cosine_warms_up_linearly_then_follows_half_a_cosine() -> None:
    cfg = SchedulerConfig(name="warmup_cosine", unit="iteration", warmup=4)
    seen = lrs(cfg, 20)
    assert seen[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    # after the warmup: 0.1 * (1 + cos(pi * t)) / 2, t from 0 to 1 over the 16 iterations
    for i in range(4, 20):
        t = (i - 4) / 16
        assert seen[i] == pytest.approx(0.05 * (1 + math.cos(math.pi * t)))
    assert all(a >= b for a, b in itertools.pairwise(seen[4:]))
    fraction = lrs(SchedulerConfig(name="warmup_cosine", warmup=0.2), 20)
    assert fraction == pytest.approx(seen)


def test_warmup_constant_warms_up_linearly_then_stays_at_the_learning_rate() -> None:
    seen = lrs(SchedulerConfig(name="warmup_constant", unit="iteration", warmup=4), 20)
    assert seen == pytest.approx([0.02, 0.04, 0.06, 0.08] + [0.1] * 16)
    assert lrs(SchedulerConfig(name="warmup_constant", warmup=0.2), 20) == pytest.approx(seen)


@pytest.mark.parametrize("name", ["warmup_cosine", "warmup_constant"])
def test_warmup_that_lasts_the_whole_run_warns(name: str) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.warns(ScheduleWarning, match="lasts the whole run") as caught:
        build_scheduler(optimizer, SchedulerConfig(name=name, unit="iteration", warmup=50), 20)
    assert caught[0].filename == __file__  # reported where the schedule was asked for


def test_warmup_cosine_state_keeps_its_schedule_through_a_weights_only_round_trip(
    tmp_path,
) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    scheduler = build_scheduler(optimizer, SchedulerConfig(name="warmup_cosine", warmup=0.1), 50)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    torch.save(scheduler.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert state["lr_lambdas"] == [{"warmup": 5, "total": 50}]
    other = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    resumed = build_scheduler(other, SchedulerConfig(name="warmup_cosine", warmup=0.1), 500)
    resumed.load_state_dict(state)
    lambda_ = resumed.lr_lambdas[0]
    assert isinstance(lambda_, WarmupCosine) and (lambda_.warmup, lambda_.total) == (5, 50)
