"""``invertible-train --memory-budget``: planned before training, recorded, kept on resume."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from invertible_core import MemoryPlan, parse_bytes
from invertible_train.checkpoint import load_checkpoint
from invertible_train.config import ConfigError, apply_values, load_experiment
from invertible_train.resume import RESUMABLE_CHANGES

Run = Callable[..., int]
REVNET = ["--set", "scheduler.name=constant"]


def records(results: Path, kind: str) -> list[dict[str, Any]]:
    lines = (results / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_the_plan_is_made_before_training_and_recorded_in_the_summary(
    run_cli: Run, tmp_path: Path
) -> None:
    results = tmp_path / "results" / "revnet38-synthetic"
    assert (
        run_cli("revnet38", "synthetic", "--iterations", "2", "--memory-budget", "9MiB", *REVNET)
        == 0
    )
    summary = json.loads((results / "summary.json").read_text())
    plan = MemoryPlan.from_dict(summary["memory_plan"])
    assert plan.budget_bytes == 9 * 2**20
    assert plan.measured_peak_bytes is not None and plan.measured_peak_bytes <= plan.budget_bytes
    assert plan.extra["input_shape"] == [16, 3, 8, 8]  # the run's batch, as the model sees it
    assert set(plan.keep) == {"stages.0.blocks", "stages.1.blocks", "stages.2.blocks"}
    (record,) = records(results, "memory_plan")
    assert record["iteration"] == 0 and record["reused"] is False
    assert record["measured_peak_bytes"] == plan.measured_peak_bytes
    saved = load_checkpoint(results / "checkpoints" / "last.pt")
    assert MemoryPlan.from_dict(saved["memory_plan"]) == plan


@pytest.mark.slow  # about 8 s on 2 cores: four runs, three plans
def test_a_resumed_run_reuses_the_plan_of_the_same_budget_and_plans_a_new_one(
    run_cli: Run, tmp_path: Path
) -> None:
    results = tmp_path / "results" / "revnet38-synthetic"
    base = ["revnet38", "synthetic", *REVNET]
    assert run_cli(*base, "--iterations", "2", "--memory-budget", "9MiB") == 0
    assert run_cli(*base, "--iterations", "3", "--memory-budget", "9MiB") == 0
    assert run_cli(*base, "--iterations", "4", "--memory-budget", "12MiB") == 0
    assert run_cli(*base, "--iterations", "5") == 0  # no budget: nothing planned
    plans = records(results, "memory_plan")
    assert [(r["iteration"], r["reused"], r["budget_bytes"]) for r in plans] == [
        (0, False, 9 * 2**20),
        (2, True, 9 * 2**20),
        (3, False, 12 * 2**20),
    ]
    assert "memory_plan" not in json.loads((results / "summary.json").read_text())
    assert "train.memory_budget" in RESUMABLE_CHANGES


def test_a_budget_below_the_minimum_is_a_usage_error_naming_the_minimum_and_writes_nothing(
    run_cli: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("revnet38", "synthetic", "--iterations", "2", "--memory-budget", "1MiB") == 2
    err = capsys.readouterr().err
    assert "train.memory_budget: memory budget 1.00 MiB is below the minimum" in err
    assert "MiB (" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "results").exists()  # checked before the first side effect


def test_a_budget_below_the_minimum_leaves_a_resumable_run_as_it_was(
    run_cli: Run, tmp_path: Path
) -> None:
    results = tmp_path / "results" / "revnet38-synthetic"
    assert run_cli("revnet38", "synthetic", "--iterations", "2", *REVNET) == 0
    before = {p: p.read_bytes() for p in results.rglob("*") if p.is_file()}
    argv = ["revnet38", "synthetic", "--iterations", "3", "--memory-budget", "1MiB", *REVNET]
    assert run_cli(*argv) == 2
    assert {p: p.read_bytes() for p in results.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(("value", "match"), [("9M", "ambiguous"), ("much", "is not a size")])
def test_a_bad_budget_is_refused_before_anything_runs(
    run_cli: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, match: str
) -> None:
    assert run_cli("revnet38", "synthetic", "--memory-budget", value) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
    with pytest.raises(ConfigError, match="train.memory_budget"):
        apply_values(load_experiment("revnet38"), {"train.memory_budget": value})


def test_a_model_without_switches_cannot_be_planned(
    run_cli: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("tiny", "synthetic", "--iterations", "2", "--memory-budget", "1GiB") == 2
    assert "nothing to plan" in capsys.readouterr().err


def test_the_budget_is_a_config_key() -> None:
    cfg = apply_values(load_experiment("revnet38"), {"train.memory_budget": "6GiB"})
    assert parse_bytes(cfg.train.memory_budget) == 6 * 2**30
    assert load_experiment("revnet38").train.memory_budget == ""
