"""Benchmark: the memory/time frontier of planned training steps, beside torch.utils.checkpoint.

For each network, :func:`invertible_core.fit_memory_budget` plans one training step at a
range of budgets, from the minimum (every block rebuilt or checkpointed) to plain autograd's
peak, plus two budgets the targets name (the peak of ``torch.utils.checkpoint`` per block,
and half of plain autograd's peak). Beside them: ``torch.utils.checkpoint`` every ``k``
blocks (``k = 1 .. N``: each segment of ``k`` blocks keeps only its input and is recomputed
in backward) and plain autograd. The networks:

- **conv**: the conv chain of bench_core, N=16 couplings, input ``(32, 32, 32, 32)``;
- **transformer**: bench_core's transformer chain, 8 couplings, input ``(8, 256, 256)``;
- **revnet110**, **revnet164**: the zoo's RevNets, batch 32 of 32x32 images, cross-entropy
  (``--quick``: revnet38, batch 2 of 8x8 images, and the chains at toy sizes).
  Their checkpoint rows run every stage's couplings as plain autograd in segments of ``k``
  (the stem and the transitions checkpointed, as memory saving does).

A step is the planner's: gradients zeroed in place, forward, loss (the chains: the mean
square of the output, as bench_core; the RevNets: cross-entropy), backward. Its peak is
exact (the CPU profiler's allocation events, ``max_memory_allocated`` on CUDA) and counts
everything the step holds: parameters, gradients, the input and the activations. Times are
medians of interleaved rounds (every configuration of a network one step in turn).

Targets (issue 12), reported per network in the JSON's ``targets``:

- every plan's measured peak within its budget (at most 1.05x);
- at the peak ``torch.utils.checkpoint`` per block needs, the plan's step at least 1.15x
  faster than it;
- at half of plain autograd's peak, the plan's step at most 1.22x plain's (conv chain);
- at the minimum, no slower than full recompute (today's ``ReversibleSequence``, every
  block rebuilt); the plan may store blocks there that cost no peak.

Prints a table per network, writes JSON (default ``benchmarks/results/budget.json``) and a
plot of peak memory against step time (``--plot``, default: the JSON's path with ``.png``;
needs matplotlib, else the plot is skipped with a message saying how to install it).

    python benchmarks/bench_budget.py [--quick] [--only conv revnet110] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from chains import Chain, conv_chain, transformer_chain
from invertible_core import (
    AdditiveCoupling,
    MemoryProfile,
    MemorySwitches,
    ReversibleSequence,
    SwitchState,
    TrainingStep,
    fit_memory_budget,
    measure_step_memory,
)
from invertible_models import create_model
from measure import round_robin

MIB = 2**20
NETWORKS = ("conv", "transformer", "revnet110", "revnet164")
#: the smoke run's networks (``--quick``): small chains and the smallest RevNet
QUICK_NETWORKS = ("conv", "transformer", "revnet38")


class Network:
    """A module, its example input and loss (as the project's one training step, without an
    optimizer: the planner's default), and the sequences its checkpoint rows segment."""

    def __init__(
        self, name: str, module: nn.Module, x: Tensor, loss: Callable[[Any], Tensor]
    ) -> None:
        self.name = name
        self.module = module
        self.step = TrainingStep(module, x, loss_fn=loss)
        self.sequences = [m for m in module.modules() if isinstance(m, ReversibleSequence)]
        #: blocks per sequence at most: the checkpoint rows' k runs over 1 .. this
        self.depth = max(len(s) for s in self.sequences)


def _chain_network(chain: Chain, device: torch.device) -> Network:
    chain.to(device)
    blocks = [AdditiveCoupling(f, g, split_dim=chain.split_dim) for f, g in chain.pairs]
    module = ReversibleSequence(blocks).to(device)
    x = chain.inputs.clone().requires_grad_(True)
    return Network(chain.name, module, x, lambda out: out.square().mean())


def build(name: str, quick: bool, device: torch.device) -> Network:
    """The network ``name`` at its benchmark size (smoke size with ``quick``)."""
    if name == "conv":
        chain = conv_chain(4, 8, 2, 8) if quick else conv_chain(16, 32, 32, 32)
        return _chain_network(chain, device)
    if name == "transformer":
        chain = (
            transformer_chain(2, 32, 2, 2, 16) if quick else transformer_chain(8, 256, 4, 8, 256)
        )
        return _chain_network(chain, device)
    torch.manual_seed(0)
    model = create_model(name).to(device)
    batch, size = (2, 8) if quick else (32, 32)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    return Network(name, model, images, lambda out: F.cross_entropy(out, labels))


def _segments(blocks: list[nn.Module], k: int, x: Tensor) -> Tensor:
    for start in range(0, len(blocks), k):
        segment = nn.Sequential(*blocks[start : start + k])
        x = checkpoint(segment, x, use_reentrant=False)
    return x


@contextmanager
def checkpoint_every(net: Network, k: int) -> Iterator[None]:
    """Every sequence of ``net`` runs its blocks as plain autograd, checkpointed in segments
    of ``k`` blocks (the zoo's other checkpointable blocks checkpointed); then as before."""
    saved = []
    for seq in net.sequences:
        blocks = list(seq)

        def forward(x: Tensor, *args: Any, blocks: list[nn.Module] = blocks, **kw: Any) -> Tensor:
            return _segments(blocks, k, x)

        seq.forward = forward  # type: ignore[method-assign]
        saved.append(seq)
    switches = MemorySwitches(net.module)
    try:
        with switches.restored():
            switches.set(SwitchState(checkpointed=dict.fromkeys(switches.checkpointables, True)))
            yield
    finally:
        for seq in saved:
            del seq.forward


def peak_bytes(net: Network) -> int:
    """Exact ``peak_bytes`` of one step, everything it holds included (after a warm-up)."""
    return measure_step_memory(net.step, warmup=1).peak_bytes


def budgets(profile: MemoryProfile, extra: list[int], points: int) -> list[int]:
    lo, hi = profile.minimum_peak_bytes, profile.plain_peak_bytes
    spaced = [lo + (hi - lo) * i // (points - 1) for i in range(points)]
    return sorted({*spaced, *(b for b in extra if lo <= b <= hi)})


def bench_network(net: Network, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    profile = MemoryProfile.measure(net.step, repeats=args.repeats)
    plain, minimum = profile.plain_peak_bytes, profile.minimum_peak_bytes
    checkpoint_rows = []
    for k in range(1, net.depth + 1) if not args.quick else (1, 2):
        with checkpoint_every(net, k):
            checkpoint_rows.append({"k": k, "peak_bytes": peak_bytes(net)})
    per_block = checkpoint_rows[0]["peak_bytes"]
    half = plain // 2
    plans = []
    for budget in budgets(profile, [per_block, half], args.points):
        plan = fit_memory_budget(net.module, budget=budget, profile=profile, repeats=1)
        plans.append(plan)
    # times: every configuration one step in turn, so that load falls on all alike
    steps: dict[str, Callable[[], object]] = {}
    for i, plan in enumerate(plans):
        steps[f"plan{i}"] = lambda plan=plan: (plan.apply(net.module), net.step())
    for row in checkpoint_rows:

        def ckpt(k: int = row["k"]) -> None:
            with checkpoint_every(net, k):
                net.step()

        steps[f"k{row['k']}"] = ckpt
    everything = plans[-1]
    steps["plain"] = lambda: (everything.apply(net.module), net.step())
    recompute_all = profile.plan_of(frozenset(), profile.minimum_peak_bytes)
    steps["full_recompute"] = lambda: (recompute_all.apply(net.module), net.step())
    seconds, failed = round_robin(steps, device, args.warmup, args.repeats)
    if failed:
        raise RuntimeError(f"{net.name}: {failed}")
    base = seconds["plain"]
    frontier = [
        {
            "budget_bytes": plan.budget_bytes,
            "peak_bytes": plan.measured_peak_bytes,
            "peak_vs_budget": plan.measured_peak_bytes / plan.budget_bytes,
            "predicted_peak_bytes": plan.predicted_peak_bytes,
            "stored": sum(u.stores for u in plan.units),
            "switches": len(plan.units),
            "refinements": plan.refinements,
            "step_s": seconds[f"plan{i}"],
            "time_vs_plain": seconds[f"plan{i}"] / base,
        }
        for i, plan in enumerate(plans)
    ]
    for row in checkpoint_rows:
        row["step_s"] = seconds[f"k{row['k']}"]
        row["time_vs_plain"] = row["step_s"] / base

    def plan_at(budget: int) -> dict[str, Any]:
        return next(p for p in frontier if p["budget_bytes"] == budget)

    at_block = plan_at(per_block) if minimum <= per_block <= plain else None
    at_half = plan_at(half) if minimum <= half <= plain else None
    targets = {
        "max_peak_vs_budget": max(p["peak_vs_budget"] for p in frontier),
        "peak_within_1.05_budget": all(p["peak_vs_budget"] <= 1.05 for p in frontier),
        "checkpoint_per_block_over_plan_time": (
            None if at_block is None else checkpoint_rows[0]["step_s"] / at_block["step_s"]
        ),
        "half_plain_plan_time_vs_plain": None if at_half is None else at_half["time_vs_plain"],
        "minimum_plan_stores": frontier[0]["stored"],
        "minimum_plan_time_vs_full_recompute": frontier[0]["step_s"] / seconds["full_recompute"],
        "full_recompute_time_vs_plain": seconds["full_recompute"] / base,
    }
    return {
        "minimum_peak_bytes": minimum,
        "plain_peak_bytes": plain,
        "plain_step_s": base,
        "checkpoint_per_block_peak_bytes": per_block,
        "frontier": frontier,
        "checkpoint": checkpoint_rows,
        "targets": targets,
    }


def print_network(name: str, result: dict[str, Any]) -> None:
    print(f"\n{name}: plans at budgets from the minimum to plain autograd's peak")
    print(
        f"  {'configuration':<26} {'budget MiB':>10} {'peak MiB':>9} {'peak/budget':>11} "
        f"{'stored':>8} {'step x plain':>12}"
    )
    for p in result["frontier"]:
        print(
            f"  {'plan':<26} {p['budget_bytes'] / MIB:>10.1f} {p['peak_bytes'] / MIB:>9.1f} "
            f"{p['peak_vs_budget']:>11.3f} {p['stored']:>4}/{p['switches']:<3} "
            f"{p['time_vs_plain']:>12.2f}"
        )
    for row in result["checkpoint"]:
        label = f"checkpoint every {row['k']} block" + ("s" if row["k"] > 1 else "")
        print(
            f"  {label:<26} {'':>10} {row['peak_bytes'] / MIB:>9.1f} {'':>11} {'':>8} "
            f"{row['time_vs_plain']:>12.2f}"
        )
    print(f"  {'plain autograd':<26} {'':>10} {result['plain_peak_bytes'] / MIB:>9.1f}")
    print(
        f"  {'full recompute':<26} {'':>10} {result['minimum_peak_bytes'] / MIB:>9.1f} {'':>11} "
        f"{'':>8} {result['targets']['full_recompute_time_vs_plain']:>12.2f}"
    )
    t = result["targets"]
    print(f"  targets: {json.dumps(t)}")


def plot(results: dict[str, dict[str, Any]], path: Path) -> bool:
    """Peak memory against step time per network; False (with a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "bench_budget: no plot: matplotlib is not installed (pip install matplotlib, or "
            "the plot extra: pip install 'invertible-models[plot]')",
            file=sys.stderr,
        )
        return False
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 4), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items()):
        frontier = result["frontier"]
        ax.plot(
            [p["time_vs_plain"] for p in frontier],
            [p["peak_bytes"] / MIB for p in frontier],
            marker="o",
            label="planned (fit_memory_budget)",
        )
        ckpt = result["checkpoint"]
        ax.plot(
            [r["time_vs_plain"] for r in ckpt],
            [r["peak_bytes"] / MIB for r in ckpt],
            marker="s",
            linestyle="none",
            label="torch.utils.checkpoint every k blocks",
        )
        for r in ckpt:
            ax.annotate(
                str(r["k"]), (r["time_vs_plain"], r["peak_bytes"] / MIB), fontsize=6,
                xytext=(3, 3), textcoords="offset points",
            )  # fmt: skip
        ax.scatter([1.0], [result["plain_peak_bytes"] / MIB], marker="*", s=120, label="plain")
        ax.set_title(name)
        ax.set_xlabel("step time / plain autograd")
        ax.set_ylabel("peak MiB")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes")
    parser.add_argument(
        "--only", nargs="+", choices=sorted({*NETWORKS, *QUICK_NETWORKS}), help="networks to run"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--points", type=int, default=None, help="evenly spaced budgets")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds")
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).parent / "results" / "budget.json"
    )
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default: next to --json)")
    args = parser.parse_args(argv)
    args.points = args.points or (3 if args.quick else 9)
    args.repeats = args.repeats or (1 if args.quick else 5)
    device = torch.device(args.device)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results: dict[str, dict[str, Any]] = {}
    for name in args.only or (QUICK_NETWORKS if args.quick else NETWORKS):
        net = build(name, args.quick, device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # float32 drift notes
            results[name] = bench_network(net, args, device)
        print_network(name, results[name])
        del net
    payload = {
        "results": results,
        "targets": {name: r["targets"] for name, r in results.items()},
        "environment": {
            "torch": torch.__version__,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "quick": args.quick,
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"\nJSON: {args.json}")
    path = args.plot or args.json.with_suffix(".png")
    if plot(results, path):
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
