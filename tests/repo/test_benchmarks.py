"""The benchmarks still run: each script, at smoke-test size, prints a table and writes JSON.

Speed and memory targets are judged from full benchmark runs (`tox -e bench`), never here;
this only keeps the scripts from rotting as the packages change.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

CASES = {
    "bench_core.py": (["--quick"], "--json", {"results", "ratios"}),
    "bench_models.py": (
        [
            "--quick",
            "--only",
            "revnet38",
            "revnet38 nosave",
            "revvit_tiny d6",
            "vit_tiny d6",
            "irevnet d3",
            "irevnet reconstruction",
        ],
        "--json",
        {"profiles", "ratios"},
    ),
    "bench_train.py": (
        ["--iterations", "4", "--repeats", "1", "--image-size", "8"],
        "--output",
        {"hand_images_per_second", "harness_images_per_second", "overhead_percent"},
    ),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_runs_and_writes_json(script: str, tmp_path: Path) -> None:
    args, json_flag, keys = CASES[script]
    out = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args, json_flag, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip(), "a benchmark prints a table"
    assert keys <= set(json.loads(out.read_text()))
