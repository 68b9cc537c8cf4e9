"""Benchmark the zoo: ResNets against RevNets, memory and time of one training step.

Runs resnet32/110/164 (plain, and with ``torch.utils.checkpoint`` per block) and
revnet38/110/164 (memory saving on, and off), batch 32 on the CPU by default, and reports
the ratios issue 5 targets:

* revnet164 peak / resnet164 peak                      (target <= 0.15)
* revnet110 peak / revnet38 peak, memory flat in depth   (target <= 1.10)
* step time with saving / without, revnet110, revnet164  (target <= 1.35)

Memory is exact (``invertible_core.memory.measure_memory``: profiler allocation events on
the CPU, ``max_memory_allocated`` on CUDA), beyond the model state (parameters, gradients,
momentum); time is the median of a few steps measured without the profiler (by default the
process's CPU time, which the other jobs of a shared machine barely disturb), each RevNet
interleaved with its no-saving twin and each ResNet with its checkpointed twin (A, B, A,
B...), so that the ratios hold on a loaded machine. Prints a table and writes JSON to
``benchmarks/results/models.json`` (and ``--json PATH``).

    python benchmarks/bench_models.py            # batch 32, about a few minutes on 2 cores
    python benchmarks/bench_models.py --quick    # batch 8, 3 timed rounds: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

# Idle OpenMP threads sleep instead of spinning, so that CPU time measures work done (set
# before torch loads its OpenMP runtime).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from invertible_models import create_model
from invertible_models.profiler import (
    ModelProfile,
    TrainingStep,
    format_table,
    median_step_seconds,
    profile_model,
)

RESULTS = Path(__file__).resolve().parent / "results" / "models.json"

#: (row label, model name, options), in table order.
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("resnet32", "resnet32", {}),
    ("resnet32 +checkpoint", "resnet32", {"checkpoint_blocks": True}),
    ("resnet110", "resnet110", {}),
    ("resnet110 +checkpoint", "resnet110", {"checkpoint_blocks": True}),
    ("resnet164", "resnet164", {}),
    ("resnet164 +checkpoint", "resnet164", {"checkpoint_blocks": True}),
    ("revnet38", "revnet38", {}),
    ("revnet38 nosave", "revnet38", {"memory_saving": False}),
    ("revnet110", "revnet110", {}),
    ("revnet110 nosave", "revnet110", {"memory_saving": False}),
    ("revnet164", "revnet164", {}),
    ("revnet164 nosave", "revnet164", {"memory_saving": False}),
]

#: (description, numerator label, denominator label, field, target upper bound)
RATIOS: list[tuple[str, str, str, str, float | None]] = [
    ("revnet164 peak / resnet164 peak", "revnet164", "resnet164", "peak_step_mib", 0.15),
    ("revnet110 peak / revnet38 peak", "revnet110", "revnet38", "peak_step_mib", 1.10),
    ("revnet110 step: saving / nosave", "revnet110", "revnet110 nosave", "step_seconds", 1.35),
    ("revnet164 step: saving / nosave", "revnet164", "revnet164 nosave", "step_seconds", 1.35),
    (
        "revnet110 peak / resnet110+ckpt peak",
        "revnet110",
        "resnet110 +checkpoint",
        "peak_step_mib",
        None,
    ),
    (
        "revnet110 step / resnet110+ckpt step",
        "revnet110",
        "resnet110 +checkpoint",
        "step_seconds",
        None,
    ),
    (
        "revnet164 peak / resnet164+ckpt peak",
        "revnet164",
        "resnet164 +checkpoint",
        "peak_step_mib",
        None,
    ),
    (
        "revnet164 step / resnet164+ckpt step",
        "revnet164",
        "resnet164 +checkpoint",
        "step_seconds",
        None,
    ),
]


def _pairs(
    configs: list[tuple[str, str, dict[str, Any]]],
) -> list[list[tuple[str, str, dict[str, Any]]]]:
    """Configurations grouped by model name (plain next to its saving variant)."""
    groups: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for config in configs:
        groups.setdefault(config[1], []).append(config)
    return list(groups.values())


def compute_ratios(profiles: list[ModelProfile]) -> list[dict[str, Any]]:
    """The target ratios of issue 5 (and the comparisons with checkpointing), as records."""
    by_label = {p.label: p for p in profiles}
    rows = []
    for description, num, den, field, target in RATIOS:
        if num not in by_label or den not in by_label:
            continue
        value = getattr(by_label[num], field) / getattr(by_label[den], field)
        rows.append(
            {
                "ratio": description,
                "value": value,
                "target": target,
                "met": None if target is None else value <= target,
            }
        )
    return rows


def format_ratios(rows: list[dict[str, Any]]) -> str:
    """The ratios as a table: value, target, whether it is met."""
    lines = [f"{'ratio':<40} {'value':>7} {'target':>8}  met", "-" * 62]
    for r in rows:
        target = "" if r["target"] is None else f"<= {r['target']:.2f}"
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        lines.append(f"{r['ratio']:<40} {r['value']:>7.3f} {target:>8}  {met}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 8, 3 timed rounds")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 (8 quick)")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default 7)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default=None,
        help="step time as this process's CPU time (default on the CPU: robust on a shared "
        "machine) or wall time (default on CUDA)",
    )
    parser.add_argument("--only", nargs="+", metavar="LABEL", help="run only these rows")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)
    batch_size = args.batch_size or (8 if args.quick else 32)
    steps = args.steps or (3 if args.quick else 7)
    clock = args.clock or ("wall" if args.device == "cuda" else "cpu")

    configs = [c for c in CONFIGS if not args.only or c[0] in args.only]
    # Memory first, one configuration at a time, under the allocation profiler.
    memory = {}
    for label, name, options in configs:
        memory[label] = profile_model(
            name, batch_size=batch_size, device=args.device, steps=0, label=label, **options
        )
        print(f"memory measured: {label}", flush=True)
    # Time separately, without the profiler, each pair (plain / saving) interleaved.
    seconds: dict[str, float] = {}
    for group in _pairs(configs):
        steps_of_group = []
        for _, name, options in group:
            torch.manual_seed(0)
            step = TrainingStep(
                create_model(name, **options),
                batch_size=batch_size,
                image_size=32,
                num_classes=10,
                device=args.device,
            )
            step(), step(), step()  # warm-up: state allocated, kernels created
            steps_of_group.append(step)
        for (label, _, _), value in zip(group, median_step_seconds(steps_of_group, steps, clock)):
            seconds[label] = value
        print(f"time measured: {', '.join(label for label, _, _ in group)}", flush=True)
    profiles = [replace(memory[label], step_seconds=seconds[label]) for label, _, _ in configs]
    ratios = compute_ratios(profiles)
    header = (
        f"batch {batch_size}, 32x32, device {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {steps} steps, {clock} clock"
    )
    print()
    print(header)
    print(format_table(profiles))
    print()
    print(format_ratios(ratios))

    record = {
        "benchmark": "bench_models",
        "conditions": {
            "batch_size": batch_size,
            "image_size": 32,
            "device": args.device,
            "steps": steps,
            "clock": clock,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "quick": args.quick,
        },
        "profiles": [asdict(p) for p in profiles],
        "ratios": ratios,
    }
    paths = [RESULTS] + ([Path(args.json)] if args.json else [])
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
