"""A run killed with SIGKILL and rerun ends with bit-for-bit the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from invertible_train.checkpoint import load_checkpoint

from .conftest import FAST

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


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_sigkill_then_rerun_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    killed_dir = tmp_path / "killed"
    last = killed_dir / "tiny-synthetic" / "checkpoints" / "last.pt"
    victim = subprocess.Popen(command(killed_dir), env=environment())
    deadline = time.monotonic() + 120
    while not last.exists():
        assert victim.poll() is None, "the run ended before writing a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.005)
    time.sleep(0.05)  # land somewhere after the first checkpoint, possibly mid-write
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    interrupted_at = load_checkpoint(last)["iteration"]
    print(f"killed after iteration {interrupted_at} was checkpointed")
    assert 0 < interrupted_at < ITERATIONS

    rerun = subprocess.run(command(killed_dir), env=environment(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    whole_dir = tmp_path / "whole"
    whole = subprocess.run(command(whole_dir), env=environment(), capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr

    resumed = load_checkpoint(last)
    uninterrupted = load_checkpoint(whole_dir / "tiny-synthetic" / "checkpoints" / "last.pt")
    assert resumed["iteration"] == uninterrupted["iteration"] == ITERATIONS
    for name, tensor in uninterrupted["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    for a, b in zip(
        uninterrupted["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()
    ):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
