"""The training harness on a GPU: short runs of revnet38 on synthetic data (CUDA only).

Run by the GPU suite (``benchmarks/gpu/run.sh``, stage "tests") and skipped without CUDA:
mixed precision (bf16 autocast; fp16 with the gradient scaler) in process, and a torchrun
job of one process on NCCL with the stock SyncBatchNorm (``--sync-bn``).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from .conftest import FAST

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

Run = Callable[..., int]

#: seconds the torchrun job may take (CUDA start-up, NCCL, 12 iterations)
TORCHRUN_TIMEOUT = 90


def _results(tmp_path: Path, name: str = "revnet38-synthetic") -> tuple[dict, list[dict]]:
    folder = tmp_path / "results" / name
    summary = json.loads((folder / "summary.json").read_text())
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return summary, [r for r in map(json.loads, lines) if r["kind"] == "train"]


def _assert_trained_on_cuda(summary: dict, train: list[dict], amp: str) -> None:
    assert summary["device"].startswith("cuda")
    assert summary["amp"] == amp and summary["iterations"] == 12
    assert math.isfinite(summary["test_loss"]) and summary["images_per_second"] > 0
    assert train and all(math.isfinite(r["loss"]) for r in train)
    assert all(r["memory_bytes"] > 0 for r in train)  # logged from the CUDA allocator


def test_the_harness_trains_revnet38_on_cuda_under_bf16_autocast(
    run_cli: Run, tmp_path: Path
) -> None:
    status = run_cli(
        "revnet38", "synthetic", "--iterations", "12", "--amp", "bf16",
        "--set", "train.measure_memory=true",
    )  # fmt: skip
    assert status == 0
    summary, train = _results(tmp_path)
    _assert_trained_on_cuda(summary, train, "bf16")
    assert summary["activation_bytes"] > 0 and summary["step_peak_bytes"] > 0


def test_the_harness_trains_revnet38_on_cuda_in_fp16_with_the_grad_scaler(
    run_cli: Run, tmp_path: Path
) -> None:
    status = run_cli("revnet38", "synthetic", "--iterations", "12", "--amp", "fp16", "--lr", "0.05")
    assert status == 0
    _assert_trained_on_cuda(*_results(tmp_path), "fp16")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.distributed
def test_a_one_gpu_torchrun_job_trains_with_nccl_and_sync_batchnorm(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "invertible_train", "revnet38", "synthetic", *FAST,
        "--sync-bn", "--iterations", "12", "--results-dir", str(tmp_path / "results"),
    ]  # fmt: skip
    run = subprocess.run(
        command,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=TORCHRUN_TIMEOUT,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    summary, train = _results(tmp_path)
    _assert_trained_on_cuda(summary, train, "off")
    assert summary["world_size"] == 1
