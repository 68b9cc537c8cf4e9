"""Benchmark: sharded training (FSDP2 ``fully_shard``) of reversible transformers, 2 gloo ranks.

A chain of ``AdditiveCoupling(Attention, MLP, split_dim=-1)`` blocks (``chains.py``) trained by
SGD on 2 CPU ranks, every method sharded with FSDP2 and measured per rank in one run:

- ``plain``: an ``nn.Sequential`` of the couplings, plain autograd, ``fully_shard`` per block;
- ``checkpoint``: the same with ``torch.utils.checkpoint`` (non-reentrant) per block;
- ``sequence/block``, ``sequence/fg``: a ``ReversibleSequence`` of the couplings, sharded per
  block and per ``Fm``/``Gm``;
- ``wrapper/block``, ``wrapper/fg``: an ``InvertibleModuleWrapper`` per coupling;
- ``revlib``: revlib 1.7.2's ``ReversibleSequential(F1, G1, ...)``, sharded per half-block
  (revlib's unit; reported as not installed where it is missing).

Per method and depth (4, 8, 16 by default): the bytes a forward pass leaves allocated on a
rank (forward-retained: what grows with depth when activations are kept), the step's peak
(forward, backward, SGD step) beyond what was allocated before it, both exact from the CPU
profiler's allocation events (:func:`invertible_core.measure_memory`); the step time
(median of interleaved rounds); the all-gathers and reduce-scatters per step. Gradients are
checked against plain FSDP's on the same weights (relative L2, float32).

The script runs itself under torchrun: ``python benchmarks/bench_fsdp.py [--quick]``; it
prints a table and writes JSON (default ``benchmarks/results/fsdp.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from chains import MLP, Attention
from invertible_core import (
    AdditiveCoupling,
    InvertibleModuleWrapper,
    ReversibleSequence,
    measure_memory,
)

RESULTS = Path(__file__).with_name("results")
METHODS = (
    "plain",
    "checkpoint",
    "sequence/block",
    "sequence/fg",
    "wrapper/block",
    "wrapper/fg",
    "revlib",
)


# -- the models ----------------------------------------------------------------------------
def pairs(depth: int, width: int, heads: int, seed: int = 0) -> list[tuple[nn.Module, nn.Module]]:
    torch.manual_seed(seed)
    half = width // 2
    return [(Attention(half, heads), MLP(half)) for _ in range(depth)]


class Checkpointed(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        out = checkpoint(self.block, x, use_reentrant=False)
        assert isinstance(out, Tensor)
        return out


def build(method: str, fg: list[tuple[nn.Module, nn.Module]]) -> tuple[nn.Module, list[nn.Module]]:
    """The body for ``method`` and its FSDP units (around copies of the same weights)."""
    fg = copy.deepcopy(fg)
    couplings = [AdditiveCoupling(f, g, split_dim=-1) for f, g in fg]
    if method == "plain":
        return nn.Sequential(*couplings), couplings
    if method == "checkpoint":
        blocks = [Checkpointed(c) for c in couplings]
        return nn.Sequential(*blocks), blocks
    halves = [m for pair in fg for m in pair]
    if method.startswith("sequence"):
        body: nn.Module = ReversibleSequence(couplings)
    elif method.startswith("wrapper"):
        body = nn.Sequential(*(InvertibleModuleWrapper(c) for c in couplings))
    else:  # revlib
        import revlib

        body = revlib.ReversibleSequential(*halves, split_dim=-1)
        return body, list(body)
    units = halves if method.endswith("/fg") else list(body)
    return body, units


# -- counting collectives --------------------------------------------------------------------
_GATHERS = ("all_gather_into_tensor", "all_gather_single", "_all_gather_base", "all_gather")
_SCATTERS = (
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "_reduce_scatter_base",
    "reduce_scatter",
)


@contextmanager
def counting(counts: dict[str, int]) -> Iterator[None]:
    patched: list[tuple[str, Callable[..., Any]]] = []
    for names, key in ((_GATHERS, "all_gather"), (_SCATTERS, "reduce_scatter")):
        for name in names:
            real = getattr(dist, name, None)
            if real is None:
                continue

            def wrapper(
                *a: Any, _real: Callable[..., Any] = real, _key: str = key, **k: Any
            ) -> Any:
                counts[_key] += 1
                return _real(*a, **k)

            setattr(dist, name, wrapper)
            patched.append((name, real))
    try:
        yield
    finally:
        for name, real in patched:
            setattr(dist, name, real)


# -- one rank ------------------------------------------------------------------------------------
def measure(method: str, depth: int, args: argparse.Namespace) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    fg = pairs(depth, args.width, args.heads)
    body, units = build(method, fg)
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(body, mesh=mesh)
    opt = torch.optim.SGD(body.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1 + dist.get_rank())
    x = torch.randn(args.batch, args.tokens, args.width, generator=g)

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        body(x.clone().requires_grad_()).square().mean().backward()
        opt.step()

    step()  # gradients allocated, lazy init done
    counts = {"all_gather": 0, "reduce_scatter": 0}
    with counting(counts):
        step()
    y, forward = measure_memory(lambda: body(x.clone().requires_grad_()))
    y.square().mean().backward()
    del y
    _, peak = measure_memory(step)
    times = []
    for _ in range(args.repeats):
        dist.barrier()
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    grads = [p.grad.full_tensor() for p in body.parameters() if p.grad is not None]  # type: ignore[attr-defined]
    return {
        "method": method,
        "depth": depth,
        "forward_retained_bytes": forward.retained_bytes,
        "step_peak_bytes": peak.peak_bytes,
        "step_seconds": statistics.median(times),
        "all_gather_per_step": counts["all_gather"],
        "reduce_scatter_per_step": counts["reduce_scatter"],
        "gradient_norm": float(torch.stack([g.norm() for g in grads]).norm()) if grads else 0.0,
    }


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rows: list[dict[str, Any]] = []
    try:
        for depth in args.depths:
            for method in METHODS:
                try:
                    rows.append(measure(method, depth, args))
                except ImportError as exc:
                    rows.append(
                        {"method": method, "depth": depth, "error": f"not installed: {exc}"}
                    )
                except Exception as exc:  # a method that fails is reported, not hidden
                    rows.append(
                        {"method": method, "depth": depth, "error": f"{type(exc).__name__}: {exc}"}
                    )
        if dist.get_rank() == 0:
            Path(args.out).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


# -- the driver ------------------------------------------------------------------------------
def table(rows: list[dict[str, Any]], depths: list[int]) -> str:
    mib = 1024 * 1024
    lines = [
        "| method | "
        + " | ".join(f"fwd-retained d={d} (MiB)" for d in depths)
        + f" | d={depths[-1]}/d={depths[0]} | step peak d={depths[-1]} (MiB) | step d={depths[-1]} (s) | all-gathers / reduce-scatters per step |",
        "|---" * (len(depths) + 5) + "|",
    ]
    for method in METHODS:
        mine = {r["depth"]: r for r in rows if r["method"] == method}
        if any("error" in r for r in mine.values()):
            error = next(r["error"] for r in mine.values() if "error" in r)
            lines.append(f"| {method} | {error[:80]} |" + " |" * (len(depths) + 3))
            continue
        lo, hi = mine[depths[0]], mine[depths[-1]]
        cells = [f"{mine[d]['forward_retained_bytes'] / mib:.2f}" for d in depths]
        growth = hi["forward_retained_bytes"] / max(lo["forward_retained_bytes"], 1)
        lines.append(
            f"| {method} | "
            + " | ".join(cells)
            + f" | {growth:.2f} | {hi['step_peak_bytes'] / mib:.2f} | {hi['step_seconds']:.3f}"
            + f" | {hi['all_gather_per_step']} / {hi['reduce_scatter_per_step']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="per rank")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--json", default=str(RESULTS / "fsdp.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.depths, args.width, args.tokens, args.batch, args.repeats = [2, 4], 16, 8, 2, 2
    if args.worker:
        worker(args)
        return
    out = Path(args.json).with_suffix(".rows.tmp")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        __file__, "--worker", "--out", str(out),
        "--depths", *map(str, args.depths), "--width", str(args.width), "--heads", str(args.heads),
        "--tokens", str(args.tokens), "--batch", str(args.batch), "--repeats", str(args.repeats),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env)
    rows = json.loads(out.read_text())
    out.unlink()
    print(table(rows, args.depths))
    record = {
        "benchmark": "bench_fsdp",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "world_size": 2,
        "backend": "gloo",
        "settings": {
            k: getattr(args, k) for k in ("depths", "width", "heads", "tokens", "batch", "repeats")
        },
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
