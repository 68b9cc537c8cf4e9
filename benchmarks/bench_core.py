"""Benchmark: training-step memory, time and gradient error of reversible chains, beside the peers.

Two chains of additive couplings (see ``chains.py`` for their layouts):

- **conv**: N couplings (default N=16) of conv3x3 + BatchNorm + ReLU at half the channels,
  input ``(32, 32, 32, 32)`` split along the channels;
- **transformer**: 8 couplings of pre-norm attention (``F``) and MLP (``G``) at width 128,
  input ``(B, T, C) = (8, 256, 256)`` split along the last dim into two streams.

On each, one training step (forward, loss, backward, SGD step) under every method, all
built around the same ``F``/``G`` modules (the same weights):

- ours: ``plain`` (plain autograd: a ReversibleSequence with memory_saving=False, which
  passes the halves from block to block; the baseline), ``plain_blocks`` (plain autograd on
  an nn.Sequential of the couplings), ``wrapper`` (an InvertibleModuleWrapper per
  coupling), ``sequence`` (one ReversibleSequence), ``sequence_fixed16`` (the same with
  ``fixed_point_bits=16`` couplings: bit-exact reconstruction), ``checkpoint``
  (torch.utils.checkpoint, non-reentrant, per coupling);
- the peers (``peers.py``): ``memcnn``, ``revlib``, ``revtorch``, ``reformer``; one that is
  not installed or cannot run a chain is reported with the reason.

Per method (``measure.py`` says how): peak memory, exact, with the gradients freed before
each step and with them kept allocated (the peak beyond the model state), each over the
leanest peer's; step time (median of interleaved rounds) over plain's and over the fastest
peer's with correct gradients; the gradient error against plain autograd (relative L2 over
the input's and every parameter's gradient), in float32 and on a float64 copy of the chain,
where rounding vanishes and an error above 1e-6 is a wrong gradient. ``sequence_fixed16``
is compared with plain autograd on the same fixed-point couplings: exactly 0 expected.

Then the flatness checks (``flatness.py``): peak memory at N=4 and N=32 of a conditioned
transformer chain (timestep embedding from a learnable MLP and a boolean mask as side
inputs) and of a flow chain with downsampling (NLL through ``forward_with_logdet``); and,
with ``--compile``, ``torch.compile``d ``F``/``G`` inside the sequence against eager
(``compiled.py``). Prints tables and writes JSON (default benchmarks/results/core.json).

    python benchmarks/bench_core.py [--quick] [--compile] [--device cpu] [--json F]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import textwrap
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import invertible_core
from chains import Chain, conv_chain, transformer_chain
from compiled import bench_compile, print_compile
from flatness import bench_flatness, print_flatness
from invertible_core import (
    AdditiveCoupling,
    InvertibleModuleWrapper,
    ReversibleSequence,
    TrainingStep,
)
from measure import (
    chain_step,
    describe,
    gradients,
    peak_mib,
    relative_error,
    round_robin,
    square_loss,
)
from peers import Peer, load_peers

OURS = ("plain", "plain_blocks", "wrapper", "sequence", "sequence_fixed16", "checkpoint")

#: a float64 gradient error above this is a wrong gradient, not float rounding
CORRECT = 1e-6


class CheckpointChain(nn.Module):
    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return x


def couplings(chain: Chain, fixed_point_bits: int | None = None) -> list[nn.Module]:
    return [
        AdditiveCoupling(f, g, split_dim=chain.split_dim, fixed_point_bits=fixed_point_bits)
        for f, g in chain.pairs
    ]


def build_ours(method: str, chain: Chain) -> nn.Module:
    if method == "plain":
        return ReversibleSequence(couplings(chain), memory_saving=False)
    if method == "plain_fixed16":  # the reference of sequence_fixed16
        return ReversibleSequence(couplings(chain, 16), memory_saving=False)
    if method == "plain_blocks":
        return nn.Sequential(*couplings(chain))
    if method == "wrapper":
        return nn.Sequential(*(InvertibleModuleWrapper(c) for c in couplings(chain)))
    if method == "sequence":
        return ReversibleSequence(couplings(chain))
    if method == "sequence_fixed16":
        return ReversibleSequence(couplings(chain, 16))
    if method == "checkpoint":
        return CheckpointChain(couplings(chain))
    raise ValueError(method)


def method_step(model: nn.Module, x: Tensor, keep_grads: bool = False) -> TrainingStep:
    """One training step of ``model`` on a fresh copy of ``x`` that requires grad, as the
    output of a stem would (:func:`measure.chain_step`)."""
    return chain_step(square_loss(model), model.parameters(), x, keep_grads)


def build_models(
    chain: Chain, peers: dict[str, Peer], rows: dict[str, dict[str, Any]]
) -> dict[str, nn.Module]:
    """Every method around ``chain``'s pairs; a peer that is missing or fails to build gets
    its row (status and reason) instead of a model."""
    models: dict[str, nn.Module] = {m: build_ours(m, chain) for m in OURS}
    for m in OURS:
        rows.setdefault(m, {"peer": False})
    for name, peer in peers.items():
        row = rows.setdefault(name, {"peer": True, "version": peer.version})
        if row.get("status", "ok") != "ok":  # unavailable, or failed on this chain already
            continue
        if peer.build is None:
            row.update(status=peer.status, error=peer.missing)
            continue
        try:
            models[name] = peer.build(chain.pairs, chain.split_dim)
        except Exception as exc:
            row.update(status="failed", error=describe(exc))
    return models


def gradient_errors(models: dict[str, nn.Module], chain: Chain) -> dict[str, Any]:
    """name -> (grads vs plain autograd: all, input, parameters), or the error it raised.
    ``sequence_fixed16`` is compared with plain autograd on the same fixed-point couplings."""
    params = chain.parameters
    reference = gradients(square_loss(models["plain"]), chain.inputs, params)
    fixed = build_ours("plain_fixed16", chain)
    reference_fixed = gradients(square_loss(fixed), chain.inputs, params)
    out: dict[str, Any] = {}
    for name, model in models.items():
        ref = reference_fixed if name == "sequence_fixed16" else reference
        try:
            grads = gradients(square_loss(model), chain.inputs, params)
        except Exception as exc:  # the peer cannot run this chain: say why
            out[name] = exc
            continue
        out[name] = (
            relative_error(grads, ref),
            relative_error(grads[:1], ref[:1]),
            relative_error(grads[1:], ref[1:]),
        )
    return out


def bench_chain(
    chain: Chain, peers: dict[str, Peer], args: argparse.Namespace, device: torch.device
) -> dict[str, dict[str, Any]]:
    """Every method's row on one chain (see the module docstring)."""
    chain.to(device)
    rows: dict[str, dict[str, Any]] = {}
    models = build_models(chain, peers, rows)
    for name, result in gradient_errors(models, chain).items():
        if isinstance(result, Exception):
            rows[name].update(status="failed", error=describe(result))
            del models[name]
            continue
        error, error_input, error_params = result
        rows[name].update(
            status="ok",
            grad_error=error,
            grad_error_input=error_input,
            grad_error_params=error_params,
        )
    # the same chain in float64: float rounding vanishes, what remains is a wrong gradient
    chain64 = chain.in_float64()
    for name, result in gradient_errors(build_models(chain64, peers, rows), chain64).items():
        if name in models:
            if isinstance(result, Exception):
                rows[name].update(grad_error_float64=None, float64_error=describe(result))
            else:
                rows[name]["grad_error_float64"] = result[0]
    del chain64

    steps = {name: method_step(m, chain.inputs) for name, m in models.items()}
    for name in list(steps):
        try:
            rows[name]["peak_mib"] = peak_mib(steps[name])
            kept = method_step(models[name], chain.inputs, keep_grads=True)
            rows[name]["peak_kept_grads_mib"] = peak_mib(kept)
        except Exception as exc:
            rows[name].update(status="failed", error=describe(exc))
            del steps[name]

    nograd_model = copy.deepcopy(models["plain"])

    def nograd_forward() -> None:
        with torch.no_grad():
            nograd_model(chain.inputs)

    medians, failed = round_robin(
        {**steps, "nograd_forward": nograd_forward}, device, args.warmup, args.repeats
    )
    for name, error in failed.items():
        rows[name].update(status="failed", error=error)
    plain, forward = medians["plain"], medians["nograd_forward"]
    for name, row in rows.items():
        if row.get("status") == "ok" and name in medians:
            t = medians[name]
            row.update(step_s=t, time_vs_plain=t / plain, added_in_forwards=(t - plain) / forward)
    rows["nograd_forward"] = {"peer": False, "status": "ok", "step_s": forward}
    add_peer_ratios(rows)
    return rows


def add_peer_ratios(rows: dict[str, dict[str, Any]]) -> None:
    """Each row's peaks over the leanest peer's, and its time over the fastest peer's with
    correct gradients (``None`` where no peer qualifies)."""
    ran = [r for r in rows.values() if r.get("peer") and r.get("status") == "ok" and "step_s" in r]
    correct = [
        r
        for r in ran
        if r.get("grad_error_float64") is not None and r["grad_error_float64"] <= CORRECT
    ]
    leanest = {
        k: min((r[k] for r in ran), default=None) for k in ("peak_mib", "peak_kept_grads_mib")
    }
    fastest = min((r["step_s"] for r in correct), default=None)
    for row in rows.values():
        if row.get("status") != "ok" or "step_s" not in row or "peak_mib" not in row:
            continue
        for key, best in leanest.items():
            row[key.replace("_mib", "_vs_leanest_peer")] = row[key] / best if best else None
        row["time_vs_fastest_peer"] = row["step_s"] / fastest if fastest else None


def _ratio(value: float | None, width: int) -> str:
    return f"{value:>{width}.2f}" if value is not None else f"{'-':>{width}}"


def _error(value: float | None) -> str:
    return f"{value:>9.1e}" if value is not None else f"{'-':>9}"


def print_chain(title: str, rows: dict[str, dict[str, Any]]) -> None:
    print(title)
    header = (
        f"{'method':<17} {'peak MiB':>9} {'x leanest':>9} {'kept-grad':>9} {'x leanest':>9} "
        f"{'step s':>8} {'x plain':>8} {'x fastest':>9} {'grad err':>9} {'params':>9} "
        f"{'float64':>9}"
    )
    print(header)
    print("-" * len(header))
    notes = []
    for name, r in rows.items():
        if name == "nograd_forward":
            continue
        label = f"{name} {r['version']}" if r.get("version") else name
        if r.get("status") != "ok":
            notes.append(f"  {label}: {r['status']}: {r.get('error', '')}")
            print(f"{label:<17} {r['status']}")
            continue
        print(
            f"{label:<17} {r['peak_mib']:>9.1f} {_ratio(r.get('peak_vs_leanest_peer'), 9)} "
            f"{r['peak_kept_grads_mib']:>9.1f} "
            f"{_ratio(r.get('peak_kept_grads_vs_leanest_peer'), 9)} "
            f"{r['step_s']:>8.3f} {r['time_vs_plain']:>8.2f} "
            f"{_ratio(r.get('time_vs_fastest_peer'), 9)} "
            f"{r['grad_error']:>9.1e} {r['grad_error_params']:>9.1e} "
            f"{_error(r.get('grad_error_float64'))}"
        )
        if r.get("float64_error"):
            notes.append(f"  {label}: float64 gradient check failed: {r['float64_error']}")
    print(f"{'(no-grad forward)':<57} {rows['nograd_forward']['step_s']:>8.3f}")
    for note in notes:
        print(note)
    legend = (
        "peak: gradients freed before each step (zero_grad's default); kept-grad: gradients "
        "kept allocated, the peak beyond the model state. grad err: input and parameters, "
        "float32; params: parameters only; float64: input and parameters on a float64 copy "
        "(rounding gone: what remains is a wrong gradient). x fastest: over the fastest peer "
        f"whose float64 error is <= {CORRECT}."
    )
    print(textwrap.fill(legend, width=100, initial_indent="  ", subsequent_indent="  "))
    print()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[16], help="conv chain N")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--tf-depth", type=int, default=8, help="transformer chain N")
    parser.add_argument(
        "--tf-shape", type=int, nargs=3, default=[8, 256, 256], metavar=("B", "T", "C")
    )
    parser.add_argument("--tf-heads", type=int, default=4)
    parser.add_argument("--flat-depths", type=int, nargs=2, default=[4, 32], metavar=("LO", "HI"))
    parser.add_argument(
        "--flow-shape", type=int, nargs=4, default=[16, 4, 32, 32], metavar=("B", "C", "H", "W")
    )
    parser.add_argument("--flow-hidden", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-peers", action="store_true", help="run without the peers")
    parser.add_argument(
        "--compile", action="store_true", help="also torch.compile F/G (slow on a CPU)"
    )
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend (default inductor)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).parent / "results" / "core.json"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.depths, args.batch, args.size, args.channels = [3], 4, 8, 16
        args.tf_depth, args.tf_shape, args.tf_heads = 2, [2, 16, 32], 2
        args.flat_depths, args.flow_shape, args.flow_hidden = [2, 4], [2, 4, 8, 8], 8
        args.repeats, args.warmup = 3, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    # MemCNN's deprecation noise (torch.cuda.amp decorators, TypedStorage), once per run
    warnings.filterwarnings("ignore", category=FutureWarning, module="memcnn")
    warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
    peers = {} if args.no_peers else load_peers()
    print(
        f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads; peers: "
        + ", ".join(f"{p.name} {p.version or '(not installed)'}" for p in peers.values())
        + "\n"
    )
    results: dict[str, dict[str, Any]] = {"conv": {}, "transformer": {}}
    for depth in args.depths:
        chain = conv_chain(depth, args.channels, args.batch, args.size)
        rows = bench_chain(chain, peers, args, device)
        results["conv"][str(depth)] = rows
        print_chain(
            f"conv chain: N={depth} additive couplings, x {tuple(chain.inputs.shape)} split along "
            f"dim 1, F/G conv3x3+BN+ReLU at {args.channels // 2} channels",
            rows,
        )
    b, t, c = args.tf_shape
    chain = transformer_chain(args.tf_depth, c, args.tf_heads, b, t)
    rows = bench_chain(chain, peers, args, device)
    results["transformer"][str(args.tf_depth)] = rows
    print_chain(
        f"transformer chain: N={args.tf_depth} blocks, x (B, T, C) = {(b, t, c)} split along the "
        f"last dim, F attention / G MLP at width {c // 2}, {args.tf_heads} heads",
        rows,
    )
    flatness = bench_flatness(args, device)
    print_flatness(flatness)
    compiled = bench_compile(args, device) if args.compile else None
    if compiled is not None:
        print_compile(compiled)

    ratios: dict[str, float] = {}
    for chain_name, by_depth in results.items():
        for depth, chain_rows in by_depth.items():
            for name, row in chain_rows.items():
                for key in (
                    "time_vs_plain",
                    "peak_vs_leanest_peer",
                    "peak_kept_grads_vs_leanest_peer",
                    "time_vs_fastest_peer",
                ):
                    if row.get(key) is not None:
                        ratios[f"{chain_name}_N{depth}_{name}_{key}"] = row[key]
    for check, entry in flatness.items():
        for method, ratio in entry["peak_hi_over_lo"].items():
            ratios[f"{check}_{method}_peak_hi_over_lo"] = ratio
    payload = {
        "benchmark": "core",
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "environment": {
            "torch": torch.__version__,
            "invertible_core": invertible_core.__version__,
            "peers": {p.name: p.version for p in peers.values()},
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
        "results": results,
        "flatness": flatness,
        "compile": compiled,
        "ratios": ratios,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_name(args.json.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(args.json)  # never a half-written result file
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
