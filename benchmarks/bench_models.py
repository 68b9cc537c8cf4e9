"""Benchmark the zoo: memory and time of one training step, plain networks against reversible.

CNNs (batch 32): resnet32/110/164 (plain, and with ``memory_saving``: ``torch.utils.checkpoint``
per block) and revnet38/110/164 (memory saving on, and off), with the ratios issue 5 targets:

* revnet164 peak / resnet164 peak                      (target <= 0.15)
* revnet110 peak / revnet38 peak, memory flat in depth   (target <= 1.10)
* step time with saving / without, revnet110, revnet164  (target <= 1.35)

Transformers (batch 64, issue 11): revvit_tiny against its twin vit_tiny (equal parameters:
width 192, 3 heads, 4x4 patches of 32x32 images) at depth 6, 12 and 24, plus vit_tiny with
``memory_saving`` (checkpointed blocks) at depth 24:

* revvit_tiny peak at depth 24 / depth 6, memory flat in depth   (target <= 1.10)
* the same for the activations a forward pass stores              (target <= 1.10)
* vit_tiny's peak against depth (growing), RevViT against ViT in memory and step time

Invertible networks (issue 11): ``irevnet`` (batch 32, 32x32) with 3 and 9 couplings per
stage (saving on) and 9 without saving, and how exactly the input is rebuilt from the
features (with and without fixed point); Glow on scikit-learn's 8x8 digits (batch 64, 2
levels, 64 hidden channels) at 8 and 32 steps per level, with saving on and off, against
FrEIA 0.2 running the same architecture (``flows.py``), and its held-out bits per dimension
after a fixed budget of Adam steps:

* irevnet peak with 9 couplings per stage / with 3, memory flat in depth (target <= 1.10)
* glow peak with saving / without, 32 steps per level                  (target <= 0.25)

Memory is exact (``invertible_core.memory.measure_memory``: profiler allocation events on
the CPU, ``max_memory_allocated`` on CUDA), beyond the model state (parameters, gradients,
momentum); time is the median of a few steps measured without the profiler (by default the
process's CPU time, which the other jobs of a shared machine barely disturb), each
configuration interleaved with its twin (A, B, A, B...): a RevNet with its no-saving self, a
ResNet with its checkpointed self, a RevViT with the ViT of the same depth, so that the
ratios hold on a loaded machine. Prints a table and writes JSON to
``benchmarks/results/models.json`` (or ``--json PATH``; a ``--quick`` run writes only where
``--json`` says).

    python benchmarks/bench_models.py            # a few minutes on 2 cores
    python benchmarks/bench_models.py --quick    # batch 8, 3 timed rounds: a smoke run
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

from flows import (
    digits,
    format_reconstruction,
    glow_bits_per_dim,
    glow_model,
    irevnet_reconstruction,
    likelihood_step,
)
from invertible_core import TrainingStep, median_step_seconds
from invertible_models import create_model
from invertible_models.profiler import ModelProfile, format_table, profile_step
from invertible_models.step import training_step

RESULTS = Path(__file__).resolve().parent / "results" / "models.json"


@dataclass(frozen=True)
class Config:
    """One row: a label, the registered model and its options, the pair it is timed in."""

    label: str
    name: str
    options: dict[str, Any]
    group: str
    transformer: bool = False
    #: "classifier" (cross-entropy on random images), or a flow on the digits: "glow"
    #: (ours) or "freia" (FrEIA's equivalent)
    kind: str = "classifier"


def _cnn(label: str, name: str, **options: Any) -> Config:
    return Config(label, name, options, group=name)


def _transformer(label: str, name: str, depth: int, **options: Any) -> Config:
    return Config(label, name, {"depth": depth, **options}, f"d{depth}", transformer=True)


def _flow(label: str, kind: str, steps: int, saving: bool = True) -> Config:
    options = {"steps": steps, "memory_saving": saving}
    return Config(label, "glow" if kind == "glow" else "freia_glow", options, "glow", kind=kind)


#: The depths of the transformer comparison (revvit_tiny and vit_tiny at each).
DEPTHS = (6, 12, 24)

#: Rows of the extra measurements, selectable with --only like the table's rows.
RECONSTRUCTION = "irevnet reconstruction"
BITS_PER_DIM = "glow bpd"

#: The rows, in table order.
CONFIGS: list[Config] = [
    _cnn("resnet32", "resnet32", memory_saving=False),
    _cnn("resnet32 +checkpoint", "resnet32", memory_saving=True),
    _cnn("resnet110", "resnet110", memory_saving=False),
    _cnn("resnet110 +checkpoint", "resnet110", memory_saving=True),
    _cnn("resnet164", "resnet164", memory_saving=False),
    _cnn("resnet164 +checkpoint", "resnet164", memory_saving=True),
    _cnn("revnet38", "revnet38"),
    _cnn("revnet38 nosave", "revnet38", memory_saving=False),
    _cnn("revnet110", "revnet110"),
    _cnn("revnet110 nosave", "revnet110", memory_saving=False),
    _cnn("revnet164", "revnet164"),
    _cnn("revnet164 nosave", "revnet164", memory_saving=False),
    *(
        row
        for depth in DEPTHS
        for row in (
            _transformer(f"vit_tiny d{depth}", "vit_tiny", depth, memory_saving=False),
            _transformer(f"revvit_tiny d{depth}", "revvit_tiny", depth),
        )
    ),
    _transformer("vit_tiny d24 +ckpt", "vit_tiny", 24, memory_saving=True),
    _cnn("irevnet d3", "irevnet", stage_blocks=(3, 3, 3)),
    _cnn("irevnet d9", "irevnet"),
    _cnn("irevnet d9 nosave", "irevnet", memory_saving=False),
    _flow("glow K8", "glow", 8),
    _flow("glow K32", "glow", 32),
    _flow("glow K32 nosave", "glow", 32, saving=False),
    _flow("freia glow K8", "freia", 8),
    _flow("freia glow K32", "freia", 32),
]

#: (description, numerator label, denominator label, field, target upper bound)
RATIOS: list[tuple[str, str, str, str, float | None]] = [
    ("revnet164 peak / resnet164 peak", "revnet164", "resnet164", "step_peak_mib", 0.15),
    ("revnet110 peak / revnet38 peak", "revnet110", "revnet38", "step_peak_mib", 1.10),
    ("revnet110 step: saving / nosave", "revnet110", "revnet110 nosave", "step_seconds", 1.35),
    ("revnet164 step: saving / nosave", "revnet164", "revnet164 nosave", "step_seconds", 1.35),
    (
        "revnet110 peak / resnet110+ckpt peak",
        "revnet110",
        "resnet110 +checkpoint",
        "step_peak_mib",
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
        "step_peak_mib",
        None,
    ),
    (
        "revnet164 step / resnet164+ckpt step",
        "revnet164",
        "resnet164 +checkpoint",
        "step_seconds",
        None,
    ),
    ("revvit_tiny peak: d24 / d6", "revvit_tiny d24", "revvit_tiny d6", "step_peak_mib", 1.10),
    (
        "revvit_tiny activ.: d24 / d6",
        "revvit_tiny d24",
        "revvit_tiny d6",
        "activation_mib",
        1.10,
    ),
    ("vit_tiny peak: d24 / d6", "vit_tiny d24", "vit_tiny d6", "step_peak_mib", None),
    *(
        (f"revvit / vit peak, d{d}", f"revvit_tiny d{d}", f"vit_tiny d{d}", "step_peak_mib", None)
        for d in DEPTHS
    ),
    *(
        (f"revvit / vit step, d{d}", f"revvit_tiny d{d}", f"vit_tiny d{d}", "step_seconds", None)
        for d in DEPTHS
    ),
    (
        "revvit / vit+ckpt peak, d24",
        "revvit_tiny d24",
        "vit_tiny d24 +ckpt",
        "step_peak_mib",
        None,
    ),
    (
        "revvit / vit+ckpt step, d24",
        "revvit_tiny d24",
        "vit_tiny d24 +ckpt",
        "step_seconds",
        None,
    ),
    ("irevnet peak: d9 / d3", "irevnet d9", "irevnet d3", "step_peak_mib", 1.10),
    ("irevnet activ.: d9 / d3", "irevnet d9", "irevnet d3", "activation_mib", 1.10),
    ("irevnet peak: saving / nosave, d9", "irevnet d9", "irevnet d9 nosave", "step_peak_mib", None),
    ("irevnet step: saving / nosave, d9", "irevnet d9", "irevnet d9 nosave", "step_seconds", None),
    ("glow peak: saving / nosave, K32", "glow K32", "glow K32 nosave", "step_peak_mib", 0.25),
    ("glow peak / freia peak, K32", "glow K32", "freia glow K32", "step_peak_mib", None),
    ("glow nosave / freia peak, K32", "glow K32 nosave", "freia glow K32", "step_peak_mib", None),
    ("glow peak: K32 / K8", "glow K32", "glow K8", "step_peak_mib", None),
    ("freia peak: K32 / K8", "freia glow K32", "freia glow K8", "step_peak_mib", None),
    ("glow step: saving / nosave, K32", "glow K32", "glow K32 nosave", "step_seconds", None),
    ("glow step / freia step, K32", "glow K32", "freia glow K32", "step_seconds", None),
]


def _pairs(configs: list[Config]) -> list[list[Config]]:
    """Configurations grouped for interleaved timing (a network next to its twin)."""
    groups: dict[str, list[Config]] = {}
    for config in configs:
        groups.setdefault(config.group, []).append(config)
    return list(groups.values())


def compute_ratios(profiles: list[ModelProfile]) -> list[dict[str, Any]]:
    """The target ratios of issues 5 and 11 (and the comparisons), as records."""
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


def depth_growth(profiles: list[ModelProfile]) -> list[dict[str, Any]]:
    """How much each transformer's peak and parameters grow from the first depth to the last.

    RevViT's activations are flat in depth; what its peak still gains per block is the
    block's parameter gradients, which the reversible chain hands to autograd at the end of
    its backward (a transient copy while the step's gradients are kept allocated). These
    records set the two growths side by side.
    """
    by_label = {p.label: p for p in profiles}
    rows = []
    for family in ("revvit_tiny", "vit_tiny"):
        low, high = f"{family} d{DEPTHS[0]}", f"{family} d{DEPTHS[-1]}"
        if low not in by_label or high not in by_label:
            continue
        rows.append(
            {
                "model": family,
                "depths": [DEPTHS[0], DEPTHS[-1]],
                "peak_growth_mib": by_label[high].step_peak_mib - by_label[low].step_peak_mib,
                "parameter_growth_mib": by_label[high].parameter_mib - by_label[low].parameter_mib,
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
    parser.add_argument("--batch-size", type=int, default=None, help="CNNs; default 32 (8 quick)")
    parser.add_argument(
        "--vit-batch-size", type=int, default=None, help="transformers; default 64 (8 quick)"
    )
    parser.add_argument(
        "--glow-batch-size", type=int, default=None, help="Glow on digits; default 64 (8 quick)"
    )
    parser.add_argument(
        "--glow-hidden", type=int, default=None, help="Glow's hidden channels; 64 (16 quick)"
    )
    parser.add_argument(
        "--glow-budget",
        type=int,
        default=None,
        help="Adam steps before Glow's bits per dim; 300 (2 quick)",
    )
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
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="write the JSON here instead (default: benchmarks/results/models.json; a --quick "
        "run writes none unless asked, so a smoke run never replaces the committed record)",
    )
    args = parser.parse_args(argv)
    batch_size = args.batch_size or (8 if args.quick else 32)
    vit_batch_size = args.vit_batch_size or (8 if args.quick else 64)
    glow_batch_size = args.glow_batch_size or (8 if args.quick else 64)
    glow_hidden = args.glow_hidden or (16 if args.quick else 64)
    glow_budget = args.glow_budget if args.glow_budget is not None else (2 if args.quick else 300)
    steps = args.steps or (3 if args.quick else 7)
    clock = args.clock or ("wall" if args.device == "cuda" else "cpu")

    def batch_of(config: Config) -> int:
        return vit_batch_size if config.transformer else batch_size

    def selected(label: str) -> bool:
        return not args.only or label in args.only

    configs = [c for c in CONFIGS if selected(c.label)]
    # the digits (scikit-learn) only when a flow row runs
    flows_selected = any(c.kind != "classifier" for c in configs)
    glow_images = digits()[0][:glow_batch_size] if flows_selected else None

    def build_step(config: Config) -> TrainingStep:
        torch.manual_seed(0)
        if config.kind == "classifier":
            return training_step(
                create_model(config.name, **config.options),
                batch_size=batch_of(config),
                image_size=32,
                num_classes=10,
                device=args.device,
            )
        model = glow_model(
            config.kind, config.options["steps"], glow_hidden, config.options["memory_saving"]
        )
        assert glow_images is not None
        return likelihood_step(model, glow_images, device=args.device)

    # Memory first, one configuration at a time, under the allocation profiler.
    memory = {}
    for c in configs:
        memory[c.label] = profile_step(
            build_step(c), name=c.name, label=c.label, steps=0, options=c.options
        )
        print(f"memory measured: {c.label}", flush=True)
    # Time separately, without the profiler, each group (a network and its twin) interleaved.
    seconds: dict[str, float] = {}
    for group in _pairs(configs):
        steps_of_group = []
        for c in group:
            step = build_step(c)
            step(), step(), step()  # warm-up: state allocated, kernels created
            steps_of_group.append(step)
        for c, value in zip(group, median_step_seconds(steps_of_group, steps, clock)):
            seconds[c.label] = value
        print(f"time measured: {', '.join(c.label for c in group)}", flush=True)
    profiles = [replace(memory[c.label], step_seconds=seconds[c.label]) for c in configs]
    ratios = compute_ratios(profiles)
    growth = depth_growth(profiles)
    reconstruction = (
        irevnet_reconstruction((1, 1, 1) if args.quick else (9, 9, 9), 4 if args.quick else 32)
        if selected(RECONSTRUCTION)
        else []
    )
    bits_per_dim = (
        glow_bits_per_dim(glow_budget, 8, glow_hidden, glow_batch_size)
        if selected(BITS_PER_DIM)
        else None
    )
    header = (
        f"batch {batch_size} (transformers {vit_batch_size}), 32x32 (Glow: batch "
        f"{glow_batch_size}, 8x8 digits, {glow_hidden} hidden), device {args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {steps} "
        f"steps, {clock} clock"
    )
    print()
    print(header)
    print(format_table(profiles))
    print()
    print(format_ratios(ratios))
    for row in growth:
        print(
            f"{row['model']} from depth {row['depths'][0]} to {row['depths'][1]}: peak "
            f"+{row['peak_growth_mib']:.1f} MiB, parameters +{row['parameter_growth_mib']:.1f} MiB"
        )
    if reconstruction:
        print()
        print("irevnet: the input rebuilt from the features (float32)")
        print(format_reconstruction(reconstruction))
    if bits_per_dim is not None:
        print()
        print(
            f"glow on digits ({bits_per_dim['steps_per_level']} steps per level): held-out "
            f"bits per dim {bits_per_dim['bits_per_dim_at_init']:.3f} at initialisation, "
            f"{bits_per_dim['bits_per_dim']:.3f} after {bits_per_dim['adam_steps']} Adam steps"
        )

    record = {
        "benchmark": "bench_models",
        "conditions": {
            "batch_size": batch_size,
            "transformer_batch_size": vit_batch_size,
            "glow_batch_size": glow_batch_size,
            "glow_hidden_channels": glow_hidden,
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
        "depth_growth": growth,
        "irevnet_reconstruction": reconstruction,
        "glow_bits_per_dim": bits_per_dim,
    }
    paths = [Path(args.json)] if args.json else ([] if args.quick else [RESULTS])
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
