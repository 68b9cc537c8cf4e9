"""``invertible-train glow DATASET``: the zoo's Glow trained by likelihood with its shipped
recipe, at test size: bits per dimension fall, samples are saved at each evaluation, and a
killed run resumes bit-exact (the flow's dequantisation noise included)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from invertible_train.checkpoint import load_checkpoint

from .datasets import trust_written_cifar, write_cifar10
from .processes import wait_for_checkpoint

Run = Callable[..., int]
LAUNCH = Path(__file__).with_name("launch.py")

#: the digits Glow of glow-digits.toml, narrowed and shortened for a test
SMALL_GLOW = ["model.options.hidden_channels=16", "model.options.steps=2"]
QUICK = ["train.tensorboard=false", "train.measure_memory=false", "train.log_every=1"]


def sets(*keys: str) -> list[str]:
    return [arg for key in keys for arg in ("--set", key)]


def records(results: Path, kind: str) -> list[dict]:
    lines = (results / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_glow_learns_the_digits_in_bits_per_dim_and_saves_samples(
    run_cli: Run, tmp_path: Path
) -> None:
    pytest.importorskip("sklearn")
    run = ["--iterations", "40", "--quiet", *sets(*SMALL_GLOW, *QUICK, "train.eval_every=20")]
    assert run_cli("glow", "digits", *run, "--set", "train.tensorboard=true", fast=False) == 0
    results = tmp_path / "results" / "glow-digits"
    summary = json.loads((results / "summary.json").read_text())
    assert summary["task"] == "density" and summary["memory_saving"] is True
    assert {"test_bits_per_dim", "best_test_bits_per_dim", "test_loss"} <= set(summary)
    assert "test_accuracy" not in summary
    trained = [r["bits_per_dim"] for r in records(results, "train")]
    assert len(trained) == 40 and mean(trained[-5:]) < mean(trained[:5]) - 0.5
    evals = records(results, "eval")
    assert [r["iteration"] for r in evals] == [20, 40]
    assert evals[1]["test_bits_per_dim"] < evals[0]["test_bits_per_dim"]
    # below a model uniform over the 17 grey levels
    assert summary["test_bits_per_dim"] == evals[1]["test_bits_per_dim"] < math.log2(17)
    from PIL import Image

    grids = sorted(p.name for p in (results / "samples").iterdir())
    assert grids == ["iteration-0000020.png", "iteration-0000040.png"]
    with Image.open(results / "samples" / grids[-1]) as image:
        assert image.size == (2 + 8 * (8 + 2),) * 2  # 8 x 8 samples of 8 x 8 pixels
        # the samples are images of the 17 grey levels (k / 16, saved as round(255 k / 16)),
        # and not blank
        levels = set(image.convert("L").tobytes())
        assert levels <= {int(255 * k / 16 + 0.5) for k in range(17)} and len(levels) > 4
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(results / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Scalars("eval/test_bits_per_dim")] == [20, 40]
    assert [e.step for e in events.Images("samples")] == [20, 40]


def test_glow_trains_on_cifar_format_data(
    run_cli: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``invertible-train glow cifar10``: the zoo's CIFAR Glow (3 levels on 3x32x32, 256
    levels per value), narrowed, on a CIFAR-10 folder the test writes."""
    write_cifar10(tmp_path / "data")
    trust_written_cifar(monkeypatch, tmp_path / "data")
    narrow = sets("model.options.hidden_channels=8", "model.options.steps=1", *QUICK)
    data = ["--data-dir", str(tmp_path / "data"), "--batch-size", "20"]
    assert (
        run_cli("glow", "cifar10", "--iterations", "10", "--quiet", *data, *narrow, fast=False) == 0
    )
    results = tmp_path / "results" / "glow-cifar10"
    summary = json.loads((results / "summary.json").read_text())
    assert summary["task"] == "density" and math.isfinite(summary["test_bits_per_dim"])
    trained = [r["bits_per_dim"] for r in records(results, "train")]
    assert trained[-1] < trained[0]
    grid = sorted((results / "samples").iterdir())[-1]
    from PIL import Image

    with Image.open(grid) as image:
        assert image.size == (2 + 8 * (32 + 2),) * 2 and image.mode == "RGB"


def command(results: Path) -> list[str]:
    return [
        sys.executable, str(LAUNCH), "glow", "digits", "--iterations", "50", "--quiet",
        *sets(*SMALL_GLOW, *QUICK, "train.checkpoint_every=9", "train.eval_every=25"),
        "--threads", "1", "--results-dir", str(results),
    ]  # fmt: skip


#: one thread: the same reduction order in every process, and fair on a shared machine
ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def run_to_the_end(results: Path) -> dict:
    done = subprocess.run(
        command(results), env=ENVIRONMENT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return load_checkpoint(results / "glow-digits" / "checkpoints" / "last.pt")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_a_killed_glow_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path: Path) -> None:
    """SIGKILL after the first checkpoint (iteration 9, mid-epoch: 22 batches per epoch),
    rerun: the weights, ActNorm's initialisation and Adam's moments equal those of a run
    that was never stopped, bit for bit, across the two epoch boundaries that follow."""
    pytest.importorskip("sklearn")
    whole = run_to_the_end(tmp_path / "whole")
    last = tmp_path / "killed" / "glow-digits" / "checkpoints" / "last.pt"
    victim = subprocess.Popen(
        command(tmp_path / "killed"), env=ENVIRONMENT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for_checkpoint(victim, last)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    stopped_at = load_checkpoint(last)["iteration"]
    assert 0 < stopped_at < 50
    resumed = run_to_the_end(tmp_path / "killed")
    assert resumed["iteration"] == whole["iteration"] == 50
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert any(name.endswith("initialized") for name in whole["model"])
    moments = zip(whole["optimizer"]["state"].values(), resumed["optimizer"]["state"].values())
    for a, b in moments:
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(
            a["exp_avg_sq"], b["exp_avg_sq"]
        )
