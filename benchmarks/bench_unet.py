"""Benchmark the iUNet against its plain twin: memory and time of a training step, by depth.

Issue 20's measurement: ``iunet`` (memory saving on: the core's ``ReversibleUNet``) and its
twin ``unet`` (the same layout and parameter count, plain autograd: ``memory_saving=False``)
at depth 5, 10 and 30 (couplings, or residual blocks, per level and path), in 2D and 3D, on
a segmentation step (forward, cross-entropy per position, backward, SGD with momentum):

* iunet peak / unet peak at depth 30                     (target <= 0.10; the iUNet paper's
  3D iUNet measured 12.2% of its conventional backpropagation)
* iunet peak at depth 30 / depth 5, flat beyond parameters (target <= 1.10)
* iunet step time / unet step time at depth 30            (target <= 1.5)

and, beside them, the iUNet itself under plain autograd (``iunet nosave``, the iUNet paper's
"conventional backpropagation"), which splits the step time ratio into what the
architecture costs (``iunet nosave / unet``: four half-width convolutions per coupling
against two in a residual block, the same weights) and what memory saving costs (``iunet /
iunet nosave``: the recompute).

Sizes: 2D, batch 4 of 1 x 64 x 64, width 16, 3 levels above the bottom (16, 32, 64, 128
channels); 3D, batch 2 of 1 x 32 x 32 x 32, width 8 (8, 16, 32, 64 channels); 2 classes.
Memory is exact (``invertible_models.profiler.measure_step_memory``: the profiler's
allocation events on the CPU): *peak* is the step's peak beyond the model state
(parameters, gradients and momentum stay allocated between steps), *activ.* what a forward
pass keeps for backward. The targets are judged on the peak beyond the state (what memory
saving acts on; the state is the same for both twins); the ratio with the state added is
reported beside them (at these CPU sizes the state of a depth-30 network outweighs its
activations). *Step* is the median over interleaved rounds (each iUNet with its
twin), by default the process's CPU time (``--clock wall`` for elapsed time), which other
jobs on a shared machine barely move. Prints a table and writes JSON to
``benchmarks/results/unet.json`` (and ``--json PATH``).

    python benchmarks/bench_unet.py            # a few minutes on 2 cores
    python benchmarks/bench_unet.py --quick    # tiny sizes, depth 1 and 2: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

# Idle OpenMP threads sleep instead of spinning, so that CPU time measures work done (set
# before torch loads its OpenMP runtime).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from invertible_core import TrainingStep
from invertible_models import create_model
from invertible_models.profiler import (
    ModelProfile,
    format_table,
    median_step_seconds,
    profile_step,
)
from invertible_models.step import training_step

RESULTS = Path(__file__).resolve().parent / "results" / "unet.json"

#: per dim: the batch and the model's options (the input is 1 channel, ``size`` per axis)
SIZES: dict[int, dict[str, int]] = {
    2: {"batch": 4, "size": 64, "width": 16, "levels": 3},
    3: {"batch": 2, "size": 32, "width": 8, "levels": 3},
}
QUICK_SIZES: dict[int, dict[str, int]] = {
    2: {"batch": 2, "size": 16, "width": 8, "levels": 2},
    3: {"batch": 1, "size": 8, "width": 4, "levels": 2},
}
DEPTHS = (5, 10, 30)
QUICK_DEPTHS = (1, 2)


@dataclass(frozen=True)
class Row:
    """One configuration: the model, its dim and depth, whether it saves memory (the twin
    never does: it is the plain-autograd baseline; ``iunet nosave`` is the iUNet itself
    under plain autograd, the iUNet paper's "conventional backpropagation")."""

    name: str
    dim: int
    depth: int
    saving: bool = False

    @property
    def label(self) -> str:
        suffix = " nosave" if self.name == "iunet" and not self.saving else ""
        return f"{self.name}{suffix} {self.dim}d d{self.depth}"


def build_step(row: Row, sizes: dict[str, int], seed: int = 0) -> TrainingStep:
    """The training step of ``row``: seeded weights and batch, 2 classes."""
    torch.manual_seed(seed)
    model = create_model(
        row.name,
        num_classes=2,
        memory_saving=row.saving,
        in_channels=1,
        dim=row.dim,
        depth=row.depth,
        width=sizes["width"],
        levels=sizes["levels"],
    )
    return training_step(model, batch_size=sizes["batch"], image_size=sizes["size"])


def ratios(profiles: list[ModelProfile], depths: tuple[int, ...]) -> list[dict[str, Any]]:
    """The targets of issue 20 (and the same comparisons at every depth), as records."""
    by = {p.label: p for p in profiles}
    deep, shallow = depths[-1], depths[0]
    rows: list[dict[str, Any]] = []

    def add(description: str, num: str, den: str, field: str, target: float | None) -> None:
        if num in by and den in by:
            value = getattr(by[num], field) / getattr(by[den], field)
            met = None if target is None else value <= target
            rows.append({"ratio": description, "value": value, "target": target, "met": met})

    for dim in (2, 3):
        for depth in depths:
            target = 0.10 if depth == deep else None
            add(
                f"{dim}D iunet / unet peak, d{depth}",
                f"iunet {dim}d d{depth}",
                f"unet {dim}d d{depth}",
                "step_peak_mib",
                target,
            )
        if f"iunet {dim}d d{deep}" in by and f"unet {dim}d d{deep}" in by:
            ours, twin = by[f"iunet {dim}d d{deep}"], by[f"unet {dim}d d{deep}"]
            value = (ours.step_peak_mib + ours.state_mib) / (twin.step_peak_mib + twin.state_mib)
            rows.append(
                {
                    "ratio": f"{dim}D iunet / unet peak + state, d{deep}",
                    "value": value,
                    "target": None,
                    "met": None,
                }
            )
        for depth in depths:
            add(
                f"{dim}D iunet / unet activ., d{depth}",
                f"iunet {dim}d d{depth}",
                f"unet {dim}d d{depth}",
                "activation_mib",
                None,
            )
        add(
            f"{dim}D iunet peak: d{deep} / d{shallow}",
            f"iunet {dim}d d{deep}",
            f"iunet {dim}d d{shallow}",
            "step_peak_mib",
            1.10,
        )
        add(
            f"{dim}D iunet activ.: d{deep} / d{shallow}",
            f"iunet {dim}d d{deep}",
            f"iunet {dim}d d{shallow}",
            "activation_mib",
            1.10,
        )
        add(
            f"{dim}D unet peak: d{deep} / d{shallow}",
            f"unet {dim}d d{deep}",
            f"unet {dim}d d{shallow}",
            "step_peak_mib",
            None,
        )
        for depth in depths:
            add(
                f"{dim}D iunet / unet step, d{depth}",
                f"iunet {dim}d d{depth}",
                f"unet {dim}d d{depth}",
                "step_seconds",
                1.5 if depth == deep else None,
            )
        for depth in depths:
            add(
                f"{dim}D iunet / iunet nosave step, d{depth}",
                f"iunet {dim}d d{depth}",
                f"iunet nosave {dim}d d{depth}",
                "step_seconds",
                None,
            )
            add(
                f"{dim}D iunet nosave / unet step, d{depth}",
                f"iunet nosave {dim}d d{depth}",
                f"unet {dim}d d{depth}",
                "step_seconds",
                None,
            )
        add(
            f"{dim}D iunet / iunet nosave peak, d{deep}",
            f"iunet {dim}d d{deep}",
            f"iunet nosave {dim}d d{deep}",
            "step_peak_mib",
            None,
        )
    return rows


def format_ratios(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'ratio':<40} {'value':>7} {'target':>7} {'met':>4}", "-" * 61]
    for r in rows:
        target = "" if r["target"] is None else f"{r['target']:.2f}"
        met = "" if r["met"] is None else ("yes" if r["met"] else "no")
        lines.append(f"{r['ratio']:<40} {r['value']:>7.3f} {target:>7} {met:>4}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, depths 1 and 2")
    parser.add_argument("--dims", type=int, nargs="+", choices=(2, 3), default=[2, 3])
    parser.add_argument("--depths", type=int, nargs="+", default=None, help="default 5 10 30")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default 5)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--no-plain-iunet", action="store_true", help="skip the iUNet under plain autograd"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = QUICK_SIZES if args.quick else SIZES
    depths = tuple(args.depths or (QUICK_DEPTHS if args.quick else DEPTHS))
    rounds = args.steps or (2 if args.quick else 5)

    profiles: list[ModelProfile] = []
    for dim in args.dims:
        for depth in depths:
            pair = [Row("iunet", dim, depth, saving=True), Row("unet", dim, depth)]
            if not args.no_plain_iunet:
                pair.append(Row("iunet", dim, depth))
            steps = [build_step(row, sizes[dim]) for row in pair]
            measured = [
                profile_step(step, name=row.name, label=row.label, steps=0)
                for row, step in zip(pair, steps)
            ]
            seconds = median_step_seconds(steps, rounds, clock=args.clock)
            for profile, s in zip(measured, seconds):
                profiles.append(replace(profile, step_seconds=s))
                print(format_table([profiles[-1]]).splitlines()[-1], flush=True)
            del steps

    ratio_rows = ratios(profiles, depths)
    print()
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), clock {args.clock}, "
        f"{rounds} timed rounds; sizes {json.dumps({str(k): sizes[k] for k in args.dims})}"
    )
    print(format_table(profiles))
    print()
    print(format_ratios(ratio_rows))
    record = {
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "threads": args.threads,
            "clock": args.clock,
            "rounds": rounds,
            "quick": args.quick,
        },
        "sizes": {str(k): sizes[k] for k in args.dims},
        "profiles": [asdict(p) for p in profiles],
        "ratios": ratio_rows,
    }
    paths = [Path(args.json)] if args.json else []
    if not args.quick and not args.json:
        paths.append(RESULTS)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
