"""What a short run means: the recipe's schedule and intervals fit its length; threads and
memory saving are options of their own."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from invertible_core import TrainingStep, measure_step_memory
from invertible_train.checkpoint import load_checkpoint
from invertible_train.config import apply_values, load_experiment
from invertible_train.trainer import Trainer

Run = Callable[..., int]


def records(results: Path, kind: str) -> list[dict]:
    lines = (results / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_the_recipe_decays_halfway_and_at_three_quarters_of_a_short_run(
    run_cli: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 4 epochs of 16 batches: 64 iterations, lr x0.1 after 32 and after 48
    assert run_cli("tiny", "synthetic", "--epochs", "4", "--set", "train.log_every=1") == 0
    lr = {r["iteration"]: r["lr"] for r in records(tmp_path / "results/tiny-synthetic", "train")}
    assert len(lr) == 64
    assert all(lr[i] == pytest.approx(0.1) for i in range(1, 32))
    assert all(lr[i] == pytest.approx(0.01) for i in range(32, 48))
    assert all(lr[i] == pytest.approx(0.001) for i in range(48, 65))
    assert "warning" not in capsys.readouterr().err


def test_a_milestone_past_the_end_of_the_run_is_one_warning_line(
    run_cli: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    milestones = ["--set", "scheduler.unit=iteration", "--set", "scheduler.milestones=[40000]"]
    assert run_cli("tiny", "synthetic", "--iterations", "20", *milestones) == 0
    err = capsys.readouterr().err
    assert err == (
        "invertible-train: warning: scheduler.milestones [40000] lie past the end of the run "
        "(20 iterations): the learning rate never decays there. Use fractions of the run "
        "(scheduler.unit = 'fraction', e.g. milestones = [0.5, 0.75]) or earlier iterations\n"
    )


def test_default_intervals_give_a_short_run_curves(run_cli: Run, tmp_path: Path) -> None:
    assert run_cli("tiny", "synthetic", "--iterations", "40") == 0
    results = tmp_path / "results" / "tiny-synthetic"
    assert [r["iteration"] for r in records(results, "train")] == list(range(1, 41))
    assert [r["iteration"] for r in records(results, "eval")] == list(range(2, 41, 2))


def test_threads_sets_torchs_intra_op_threads_and_may_change_on_resume(
    run_cli: Run, tmp_path: Path
) -> None:
    before = torch.get_num_threads()
    try:
        assert run_cli("tiny", "synthetic", "--iterations", "4", "--threads", "2") == 0
        assert torch.get_num_threads() == 2
        config = (tmp_path / "results/tiny-synthetic/config.toml").read_text()
        assert "threads = 2" in config
        assert run_cli("tiny", "synthetic", "--iterations", "6", "--threads", "1") == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert run_cli("tiny", "synthetic", "--threads", "0") == 2


REVNET = ["--set", "train.log_every=2", "--set", "scheduler.name=constant"]


@pytest.mark.slow
def test_memory_saving_may_change_when_a_run_resumes(run_cli: Run, tmp_path: Path) -> None:
    """Checkpoints are the same with saving on or off, and so are the gradients (the zoo's
    fixed-point couplings): switching mid-run ends with the weights of a run that never did."""
    results = tmp_path / "results"
    assert run_cli("revnet38", "synthetic", "--iterations", "6", "--name", "saving", *REVNET) == 0
    assert run_cli("revnet38", "synthetic", "--iterations", "3", "--name", "mixed", *REVNET) == 0
    mixed = ["--iterations", "6", "--name", "mixed", "--no-memory-saving", *REVNET]
    assert run_cli("revnet38", "synthetic", *mixed) == 0
    summary = json.loads((results / "mixed" / "summary.json").read_text())
    assert summary["memory_saving"] is False and summary["iterations"] == 6
    assert [r["iteration"] for r in records(results / "mixed", "resumed")] == [3]
    saving = json.loads((results / "saving" / "summary.json").read_text())
    assert saving["memory_saving"] is True
    a = load_checkpoint(results / "saving/checkpoints/last.pt")["model"]
    b = load_checkpoint(results / "mixed/checkpoints/last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_memory_saving_is_recorded_only_for_models_that_have_it(
    run_cli: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("tiny", "synthetic", "--iterations", "2", "--no-memory-saving") == 0
    assert capsys.readouterr().err == (
        "invertible-train: warning: model.memory_saving = false changes nothing: tiny has no "
        "memory_saving switch\n"
    )
    summary = json.loads((tmp_path / "results/tiny-synthetic/summary.json").read_text())
    assert "memory_saving" not in summary


def test_the_summary_memory_is_the_profilers_measurement(tmp_path: Path) -> None:
    cfg = apply_values(
        load_experiment("tiny"),
        {
            "data.dataset": "synthetic", "data.image_size": 8, "data.synthetic_train_size": 64,
            "data.synthetic_test_size": 32, "data.batch_size": 16, "train.iterations": 4,
            "train.tensorboard": False, "train.measure_memory": True,
        },
    )  # fmt: skip
    trainer = Trainer(cfg, tmp_path / "run")
    summary = trainer.fit()
    images, labels = next(iter(trainer.evaluator.loader))
    model = copy.deepcopy(trainer.model)
    # the run's own step: a copy of its optimizer, with its state (momentum), on the copy
    optimizer = type(trainer.optimizer)(model.parameters(), **trainer.optimizer.defaults)
    optimizer.load_state_dict(trainer.optimizer.state_dict())
    step = TrainingStep(
        model,
        trainer.transform.test(images[:16]),
        targets=labels[:16],
        loss_fn=F.cross_entropy,
        optimizer=optimizer,
    )
    expected = measure_step_memory(step)
    assert summary["activation_bytes"] == expected.activation_bytes > 0
    assert summary["step_peak_bytes"] == expected.step_peak_bytes > 0
