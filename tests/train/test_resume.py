"""A run killed (SIGKILL) or interrupted (SIGINT, SIGTERM) and rerun ends with bit-for-bit the
weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from invertible_train.checkpoint import load_checkpoint
from invertible_train.config import ExperimentConfig, apply_values, load_experiment
from invertible_train.interrupts import Interrupted
from invertible_train.trainer import Trainer

from .conftest import FAST
from .processes import wait_for_checkpoint

LAUNCH = Path(__file__).with_name("launch.py")
ITERATIONS = 400


def command(results: Path) -> list[str]:
    return [
        sys.executable, str(LAUNCH), "tiny", "synthetic", *FAST,
        "--iterations", str(ITERATIONS),
        "--set", "train.checkpoint_every=7",  # not a multiple of the 16 batches per epoch
        "--set", "train.eval_every=50",
        "--set", "train.log_every=10",
        "--results-dir", str(results),
    ]  # fmt: skip


def environment() -> dict[str, str]:
    # one thread: the same reduction order in every process, and fair on a shared machine
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The last checkpoint of the run that nothing stopped."""
    whole_dir = tmp_path_factory.mktemp("whole")
    whole = subprocess.run(command(whole_dir), env=environment(), capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    return load_checkpoint(whole_dir / "tiny-synthetic" / "checkpoints" / "last.pt")


def start_and_wait_for_a_checkpoint(results: Path) -> subprocess.Popen:
    last = results / "tiny-synthetic" / "checkpoints" / "last.pt"
    victim = subprocess.Popen(
        command(results), env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    wait_for_checkpoint(victim, last)
    time.sleep(0.05)  # land somewhere after the first checkpoint, possibly mid-write
    return victim


def assert_same_weights(resumed: dict, uninterrupted: dict) -> None:
    assert resumed["iteration"] == uninterrupted["iteration"] == ITERATIONS
    for name, tensor in uninterrupted["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    for a, b in zip(
        uninterrupted["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()
    ):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_sigkill_then_rerun_matches_an_uninterrupted_run(
    tmp_path: Path, uninterrupted: dict
) -> None:
    killed_dir = tmp_path / "killed"
    last = killed_dir / "tiny-synthetic" / "checkpoints" / "last.pt"
    victim = start_and_wait_for_a_checkpoint(killed_dir)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    interrupted_at = load_checkpoint(last)["iteration"]
    print(f"killed after iteration {interrupted_at} was checkpointed")
    assert 0 < interrupted_at < ITERATIONS

    rerun = subprocess.run(command(killed_dir), env=environment(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert_same_weights(load_checkpoint(last), uninterrupted)


@pytest.mark.parametrize(("name", "status"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_interrupt_saves_records_and_resumes_bit_exact(
    tmp_path: Path, uninterrupted: dict, name: str, status: int
) -> None:
    if not hasattr(signal, name):
        pytest.skip(f"needs {name}")
    results = tmp_path / "stopped"
    run = results / "tiny-synthetic"
    victim = start_and_wait_for_a_checkpoint(results)
    victim.send_signal(getattr(signal, name))
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == status, err
    # one line, no traceback, saying where it stopped and what to do
    assert len(err.strip().splitlines()) == 1, err
    assert f"stopped by {name} at iteration" in err and "rerun the same command" in err
    saved = load_checkpoint(run / "checkpoints" / "last.pt")
    stopped_at = saved["iteration"]
    assert 0 < stopped_at < ITERATIONS and f"iteration {stopped_at} of {ITERATIONS}" in err
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1] == {
        "kind": "stopped", "iteration": stopped_at, "epoch": saved["epoch"],
        "reason": f"interrupted by {name}", "checkpoint": "checkpoints/last.pt",
    }  # fmt: skip

    rerun = subprocess.run(command(results), env=environment(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kinds = [(r["kind"], r["iteration"]) for r in lines]
    assert ("stopped", stopped_at) in kinds and ("resumed", stopped_at) in kinds
    assert_same_weights(load_checkpoint(run / "checkpoints" / "last.pt"), uninterrupted)


def tiny_experiment(**options: object) -> ExperimentConfig:
    return apply_values(
        load_experiment("tiny"),
        {
            "data.dataset": "synthetic", "data.image_size": 8, "data.synthetic_train_size": 64,
            "data.synthetic_test_size": 16, "data.batch_size": 16, "train.iterations": 40,
            "train.tensorboard": False, "train.measure_memory": False, "model.options": options,
        },
    )  # fmt: skip


@pytest.mark.skipif(not hasattr(signal, "raise_signal"), reason="needs signal.raise_signal")
def test_in_a_script_an_interrupt_raises_interrupted_after_saving(tmp_path: Path) -> None:
    trainer = Trainer(tiny_experiment(signal_at=5), tmp_path / "run")
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as stop:
        trainer.fit()
    assert (stop.value.signum, stop.value.iteration) == (signal.SIGINT, 5)
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is back
    assert load_checkpoint(stop.value.checkpoint)["iteration"] == 5


class FailingLoader:
    """Yields ``batches`` batches of ``real``, then fails as a loader whose workers died,
    after ``before_failing()``."""

    def __init__(self, real: object, batches: int, before_failing: object) -> None:
        self.real, self.batches, self.before_failing = real, batches, before_failing

    def __iter__(self):
        for number, batch in enumerate(self.real):
            if number == self.batches:
                self.before_failing()
                raise RuntimeError("DataLoader worker (pid 1234) exited unexpectedly")
            yield batch


def test_a_loader_that_the_interrupt_ended_still_leaves_a_checkpoint(tmp_path: Path) -> None:
    """Ctrl-C in a terminal reaches DataLoader workers too; their loader then fails."""
    trainer = Trainer(tiny_experiment(), tmp_path / "run")

    def ctrl_c() -> None:
        trainer._stop.received = signal.SIGINT

    trainer.loader = FailingLoader(trainer.loader, 3, ctrl_c)  # type: ignore[assignment]
    with pytest.raises(Interrupted, match="stopped by SIGINT at iteration 3 of 40"):
        trainer.fit()
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["iteration"] == 3


def test_a_loader_failure_without_an_interrupt_is_raised(tmp_path: Path) -> None:
    trainer = Trainer(tiny_experiment(), tmp_path / "run")
    trainer.loader = FailingLoader(trainer.loader, 3, lambda: None)  # type: ignore[assignment]
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        trainer.fit()
