"""Benchmark: training-step memory and time of a chain of N additive couplings.

Compares, on the same chain (conv3x3 + BatchNorm + ReLU residual functions at half the
channels), one training step (forward, loss, backward, SGD step) under:

- ``plain``: plain autograd, halves passed from block to block (a ReversibleSequence with
  memory_saving=False): the fastest plain chain, the baseline of the sequence;
- ``plain_blocks``: plain autograd on the couplings as modules (an nn.Sequential, each
  coupling splitting and concatenating its input): the baseline of the wrapper, which
  wraps exactly these modules;
- ``wrapper``: each coupling in an InvertibleModuleWrapper (MemCNN's API);
- ``sequence``: one ReversibleSequence (whole-chain reversible backprop);
- ``checkpoint``: torch.utils.checkpoint (non-reentrant) around each coupling.

Peak memory is exact (the profiler's allocation events, or CUDA's allocator counter);
time is the median over interleaved repeats (methods take turns, so machine noise hits all
of them alike). Also times a no-grad forward of the chain: the recompute's cost is
reported in units of it. Prints a table and writes JSON (default
benchmarks/results/core.json).

    python benchmarks/bench_core.py [--quick] [--depths 4 16 64] [--device cpu] [--json F]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import invertible_core
from invertible_core import AdditiveCoupling, InvertibleModuleWrapper, ReversibleSequence
from invertible_core.memory import measure_memory

METHODS = ("plain", "plain_blocks", "wrapper", "sequence", "checkpoint")


def residual(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
    )


class CheckpointChain(nn.Module):
    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return x


class WrapperChain(nn.Module):
    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(InvertibleModuleWrapper(b) for b in blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def build(method: str, depth: int, channels: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    blocks = [AdditiveCoupling(residual(channels // 2)) for _ in range(depth)]
    if method == "plain":
        return ReversibleSequence(blocks, memory_saving=False)
    if method == "plain_blocks":
        return nn.Sequential(*blocks)
    if method == "sequence":
        return ReversibleSequence(blocks)
    if method == "wrapper":
        return WrapperChain(blocks)
    if method == "checkpoint":
        return CheckpointChain(blocks)
    raise ValueError(method)


def make_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def bench_depth(
    depth: int, args: argparse.Namespace, device: torch.device
) -> dict[str, dict[str, float]]:
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=device)
    models = {m: build(m, depth, args.channels).to(device) for m in METHODS}
    steps = {m: make_step(model, x) for m, model in models.items()}
    results: dict[str, dict[str, float]] = {}
    for m, step in steps.items():
        step()  # warm up (allocator, BatchNorm, lazy init) before measuring memory
        _, stats = measure_memory(step, device)
        results[m] = {"peak_mib": stats.peak_mib}
    nograd_model = copy.deepcopy(models["plain"])

    def nograd_forward() -> None:
        with torch.no_grad():
            nograd_model(x)

    samples: dict[str, list[float]] = {m: [] for m in (*METHODS, "nograd_forward")}
    for _ in range(args.warmup):
        for m in METHODS:
            steps[m]()
        nograd_forward()
    for _ in range(args.repeats):
        for m in METHODS:
            samples[m].append(timed(steps[m], device))
        samples["nograd_forward"].append(timed(nograd_forward, device))
    fwd = statistics.median(samples["nograd_forward"])
    plain = statistics.median(samples["plain"])
    plain_blocks = statistics.median(samples["plain_blocks"])
    for m in METHODS:
        t = statistics.median(samples[m])
        results[m].update(
            step_s=t,
            time_vs_plain=t / plain,
            time_vs_plain_blocks=t / plain_blocks,
            added_in_forwards=(t - plain) / fwd,
        )
    results["nograd_forward"] = {"step_s": fwd}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).parent / "results" / "core.json"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.depths, args.batch, args.size, args.repeats, args.warmup = [2, 8], 4, 8, 3, 1
    device = torch.device(args.device)
    table = {depth: bench_depth(depth, args, device) for depth in args.depths}

    print(
        f"chain of N additive couplings, batch {args.batch}, {args.channels} channels, "
        f"{args.size}x{args.size}, {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    header = (
        f"{'N':>4} {'method':<13} {'peak MiB':>9} {'step s':>8} {'x plain':>8} "
        f"{'x blocks':>9} {'+fwd':>6}"
    )
    print(header)
    print("-" * len(header))
    for depth, res in table.items():
        for m in METHODS:
            r = res[m]
            print(
                f"{depth:>4} {m:<13} {r['peak_mib']:>9.1f} {r['step_s']:>8.3f} "
                f"{r['time_vs_plain']:>8.2f} {r['time_vs_plain_blocks']:>9.2f} "
                f"{r['added_in_forwards']:>6.2f}"
            )
        print(f"{depth:>4} {'(no-grad forward)':<22} {res['nograd_forward']['step_s']:>8.3f}")
    lo, hi = min(args.depths), max(args.depths)
    ratios = {
        f"{m}_peak_N{hi}_over_N{lo}": table[hi][m]["peak_mib"] / table[lo][m]["peak_mib"]
        for m in METHODS
    }
    print()
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    payload = {
        "benchmark": "core",
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "environment": {
            "torch": torch.__version__,
            "invertible_core": invertible_core.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
        "results": {str(k): v for k, v in table.items()},
        "ratios": ratios,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
