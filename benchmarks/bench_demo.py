"""How long ``invertible-demo`` takes, by thread count: the second half of the README's first
command.

Runs the demo as a user does, a fresh process each time (imports included), with
``--threads N`` for each N given (``auto``: no ``--threads``, the demo's own choice from
the load average), alternating, ``--repeats`` rounds. Records per run: wall seconds, CPU
seconds of the process, the images/s the demo reports for its training, the threads it
used, and the 1-minute load average just before it started: other work on the machine
changes these figures more than anything here, so a figure is only as quiet as its load
column says. Prints a table; writes JSON (``--json FILE``). ``--quick`` is a smoke run.

    python benchmarks/bench_demo.py --threads 1 2 auto --repeats 2 --json demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

DEMO = "import sys; from invertible_train.demo import main; sys.exit(main())"
QUICK = ["--steps", "3", "--image-size", "8", "--batch-size", "8"]


def run_demo(threads: str, extra: list[str]) -> dict[str, Any]:
    """One demo in a fresh process; ``threads`` is a count or ``auto``."""
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    args = extra if threads == "auto" else [*extra, "--threads", threads]
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", DEMO, *args], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"invertible-demo {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    used = re.search(r"CPU, (\d+) threads? \(", done.stdout)
    speed = re.search(r"([0-9.]+) images/s", done.stdout)
    return {
        "threads": threads,
        "threads_used": int(used.group(1)) if used else None,
        "wall_seconds": wall,
        "cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "images_per_second": float(speed.group(1)) if speed else None,
        "load_before": load,
        "output": done.stdout,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--threads", nargs="+", default=["1", "2"], help="thread counts, or auto (default 1 2)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="rounds (default 1)")
    parser.add_argument("--quick", action="store_true", help="a smoke run (3 steps, 8x8)")
    parser.add_argument("--json", metavar="FILE", help="write the runs as JSON")
    args = parser.parse_args(argv)
    for threads in args.threads:
        if threads != "auto" and not threads.isdigit():
            parser.error(f"--threads takes counts or auto, got {threads!r}")
    extra = ["--quiet", *(QUICK if args.quick else [])]
    runs = [run_demo(threads, extra) for _ in range(args.repeats) for threads in args.threads]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"invertible-demo {' '.join(extra)}: {cpus} cores, torch {torch.__version__}")
    print(f"{'threads':>8}{'used':>6}{'wall s':>9}{'cpu s':>9}{'images/s':>10}{'load before':>13}")
    for run in runs:
        print(
            f"{run['threads']:>8}{run['threads_used'] or '?':>6}{run['wall_seconds']:>9.1f}"
            f"{run['cpu_seconds']:>9.1f}{run['images_per_second'] or float('nan'):>10.0f}"
            f"{run['load_before']:>13.2f}"
        )
    for threads in args.threads:
        walls = [r["wall_seconds"] for r in runs if r["threads"] == threads]
        print(f"threads {threads}: median wall {statistics.median(walls):.1f} s")
    if args.json:
        payload = {
            "runs": runs,
            "environment": {
                "cores": cpus,
                "torch": torch.__version__,
                "python": platform.python_version(),
                "machine": platform.machine(),
            },
        }
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
