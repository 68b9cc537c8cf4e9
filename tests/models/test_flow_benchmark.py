"""The Glow rows of benchmarks/bench_models.py still run, at smoke size, on the real digits.

They need scikit-learn (the digits), which this package's test environment has and the
repository-level one (tests/repo/test_benchmarks.py) may not; FrEIA's rows need FrEIA, which
only the benchmark environment installs, so they are left to the benchmark runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_models.py"


@pytest.mark.slow  # about 14 s on 2 cores: a benchmark in a fresh interpreter
def test_glow_rows_of_the_model_benchmark_run_and_write_json(tmp_path: Path) -> None:
    out = tmp_path / "models.json"
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--quick",
            "--only",
            "glow K8",
            "glow bpd",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    (profile,) = record["profiles"]
    assert profile["label"] == "glow K8" and profile["image_size"] == 8
    assert profile["step_peak_mib"] > 0 and profile["memory_saving"] is True
    bpd = record["glow_bits_per_dim"]
    assert bpd["adam_steps"] == 2 and bpd["held_out_images"] == 297
    assert 0 < bpd["bits_per_dim"] < 10
    assert "held-out bits per dim" in done.stdout
