"""Invertible downsampling beside FrEIA 0.2: the same outputs, and the memory of a flow.

FrEIA has the two fixed downsamplings the core has, for images only:
``HaarDownsampling`` (``order_by_wavelet=True``: bands in the core's band-major order;
``False``, its default: channel-major) and ``IRevNetDownsampling`` (its convolution backend:
``pixel_unshuffle``'s order, the core's; ``legacy_backend=True``: band-major). This script

1. compares their outputs and inverses with the core's on the same images (the largest
   difference, and whether the caller's tensor was left as it was), and tries them on a
   volume;
2. measures one training step of a small flow built from each (the downsampling, then
   ``steps`` times ActNorm and an affine coupling of both halves, negative log-likelihood):
   in 2D ours with memory saving on and off and FrEIA's (plain autograd, the only kind it
   has), and in 3D ours, and FrEIA's if it can be built.

Memory is exact (``invertible_core.measure_memory``: profiler allocation events on the
CPU): the step's peak and what its forward pass keeps for backward, with the gradients
kept allocated between steps. Prints tables and writes JSON to
``benchmarks/results/resampling.json`` (and ``--json PATH``). FrEIA missing is reported,
not fatal.

    python benchmarks/bench_resampling.py            # under a minute on 2 cores
    python benchmarks/bench_resampling.py --quick    # tiny flows: a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from invertible_core import (
    ActNorm,
    AffineAdapterSigmoid,
    AffineCoupling,
    HaarDownsampling,
    InvertibleDownsampling,
    ReversibleSequence,
    measure_memory,
)

RESULTS = Path(__file__).resolve().parent / "results" / "resampling.json"
MIB = 2**20


def _freia() -> tuple[Any, Any] | str:
    try:
        import FrEIA.framework as Ff
        import FrEIA.modules as Fm
    except ImportError as exc:
        return f"FrEIA is not installed ({exc}); pip install FrEIA==0.2"
    return Ff, Fm


def compare_outputs(freia: tuple[Any, Any]) -> list[dict[str, Any]]:
    """The largest difference between FrEIA's outputs (and inverses) and the core's."""
    _, Fm = freia
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    rows: list[dict[str, Any]] = []

    def band_major(y: Tensor) -> Tensor:  # channel-major (c * 4 + k) to band-major (k * C + c)
        return y.reshape(y.shape[0], -1, 4, *y.shape[2:]).transpose(1, 2).reshape(y.shape)

    def channel_major(y: Tensor) -> Tensor:  # band-major (k * C + c) to channel-major
        return y.reshape(y.shape[0], 4, -1, *y.shape[2:]).transpose(1, 2).reshape(y.shape)

    cases: list[tuple[str, Any, nn.Module, Callable[[Tensor], Tensor]]] = [
        ("HaarDownsampling(order_by_wavelet=True)", Fm.HaarDownsampling([(3, 16, 16)], order_by_wavelet=True), HaarDownsampling(), lambda y: y),
        ("HaarDownsampling (default order)", Fm.HaarDownsampling([(3, 16, 16)]), HaarDownsampling(), band_major),
        ("IRevNetDownsampling", Fm.IRevNetDownsampling([(3, 16, 16)]), InvertibleDownsampling(2), lambda y: y),
        ("IRevNetDownsampling(legacy_backend=True)", Fm.IRevNetDownsampling([(3, 16, 16)], legacy_backend=True), InvertibleDownsampling(2), channel_major),
    ]  # fmt: skip
    for name, theirs, ours, to_ours in cases:
        (y_theirs,), _ = theirs([x])
        y_ours = ours(x)
        given = y_theirs.clone()
        (x_back,), _ = theirs([given], rev=True)
        rows.append(
            {
                "freia": name,
                "ours": type(ours).__name__,
                "forward_max_abs_diff": float((to_ours(y_theirs) - y_ours).abs().max()),
                "bit_identical": bool(torch.equal(to_ours(y_theirs), y_ours)),
                "inverse_max_abs_diff": float((x_back - ours.inverse(y_ours)).abs().max()),
                "freia_inverse_left_its_input_alone": bool(torch.equal(given, y_theirs)),
            }
        )
    for name, module in (
        ("HaarDownsampling", Fm.HaarDownsampling),
        ("IRevNetDownsampling", Fm.IRevNetDownsampling),
    ):
        try:
            module([(3, 8, 8, 8)])([torch.randn(2, 3, 8, 8, 8)])
            result = "ran"
        except Exception as exc:  # the failure is the result
            result = f"{type(exc).__name__}: {exc}"
        rows.append({"freia": f"{name} on a volume (2, 3, 8, 8, 8)", "result": result})
    return rows


def _subnet(dim: int, hidden: int) -> Callable[[int, int], nn.Module]:
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dim - 1]

    def build(c_in: int, c_out: int) -> nn.Module:
        last = conv(hidden, c_out, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        return nn.Sequential(conv(c_in, hidden, 3, padding=1), nn.ReLU(), last)

    return build


def our_flow(channels: int, dim: int, steps: int, hidden: int, saving: bool) -> nn.Module:
    """Haar downsampling, then ``steps`` times ActNorm and an affine coupling of both halves."""
    subnet = _subnet(dim, hidden)
    wide = channels * 2**dim
    blocks: list[nn.Module] = [HaarDownsampling()]
    for _ in range(steps):
        half = wide // 2
        blocks += [
            ActNorm(wide),
            AffineCoupling(
                subnet(half, 2 * half),
                subnet(half, 2 * half),
                adapter=AffineAdapterSigmoid,
            ),
        ]
    return ReversibleSequence(blocks, memory_saving=saving)


def freia_flow(freia: tuple[Any, Any], shape: tuple[int, ...], steps: int, hidden: int) -> Any:
    """The same flow from FrEIA's modules (``GLOWCouplingBlock``: both halves, as ours)."""
    Ff, Fm = freia
    inn = Ff.SequenceINN(*shape)
    inn.append(Fm.HaarDownsampling, order_by_wavelet=True)
    for _ in range(steps):
        inn.append(Fm.ActNorm)
        inn.append(Fm.GLOWCouplingBlock, subnet_constructor=_subnet(len(shape) - 1, hidden))
    return inn


def _nll(z: Tensor, logdet: Tensor) -> Tensor:
    prior = (-0.5 * (z.square() + math.log(2 * math.pi))).flatten(1).sum(1)
    return -(prior + logdet).mean() / z[0].numel()


def measure_flow(model: nn.Module, x: Tensor, freia: bool) -> dict[str, float]:
    """Peak and forward-retained memory of a training step (gradients kept allocated)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def forward() -> Tensor:
        if freia:
            z, logdet = model(x)
        else:
            z, logdet = model.forward_with_logdet(x)  # type: ignore[operator]
        return _nll(z, logdet)

    def step() -> None:
        optimizer.zero_grad(set_to_none=False)
        forward().backward()
        optimizer.step()

    model.train()
    step()
    step()
    _, stats = measure_memory(step)
    loss, forward_stats = measure_memory(forward)
    del loss
    return {
        "peak_mib": stats.peak_bytes / MIB,
        "activation_mib": forward_stats.retained_bytes / MIB,
        # trainable ones (FrEIA keeps its fixed Haar kernel as a frozen parameter)
        "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def flows(
    freia: tuple[Any, Any] | str, steps: int, hidden: int, batch: int, size: int
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for dim in (2, 3):
        shape = (2, *([size] * dim))
        torch.manual_seed(0)
        x = torch.randn(batch, *shape)
        for saving in (True, False):
            torch.manual_seed(0)
            model = our_flow(2, dim, steps, hidden, saving)
            label = f"ours {dim}D" + ("" if saving else " nosave")
            rows.append({"flow": label, **measure_flow(model, x, freia=False)})
        if isinstance(freia, str):
            rows.append({"flow": f"FrEIA {dim}D", "result": freia})
            continue
        try:
            torch.manual_seed(0)
            theirs = freia_flow(freia, shape, steps, hidden)
            rows.append({"flow": f"FrEIA {dim}D", **measure_flow(theirs, x, freia=True)})
        except Exception as exc:  # the failure is the result
            rows.append({"flow": f"FrEIA {dim}D", "result": f"{type(exc).__name__}: {exc}"})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny flows")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    steps, hidden, batch, size = (2, 8, 2, 8) if args.quick else (8, 32, 8, 32)
    freia = _freia()
    outputs = (
        [{"freia": "every layer", "result": freia}]
        if isinstance(freia, str)
        else compare_outputs(freia)
    )
    flow_rows = flows(freia, steps, hidden, batch, size)

    print(f"torch {torch.__version__}; FrEIA against the core, images (4, 3, 16, 16)")
    for row in outputs:
        print("  " + ", ".join(f"{k}={v}" for k, v in row.items()))
    print(
        f"\nflows: downsampling + {steps} x (ActNorm, affine coupling), hidden {hidden}, "
        f"batch {batch} of 2 x {size}^dim"
    )
    print(f"{'flow':<16} {'params':>9} {'peak MiB':>9} {'activ. MiB':>10}")
    for row in flow_rows:
        if "result" in row:
            print(f"{row['flow']:<16} {row['result']}")
        else:
            print(
                f"{row['flow']:<16} {row['parameters']:>9,} {row['peak_mib']:>9.2f} "
                f"{row['activation_mib']:>10.2f}"
            )
    record = {
        "environment": {"torch": torch.__version__, "python": platform.python_version()},
        "flow_sizes": {"steps": steps, "hidden": hidden, "batch": batch, "size": size},
        "outputs": outputs,
        "flows": flow_rows,
    }
    paths = [Path(args.json)] if args.json else ([] if args.quick else [RESULTS])
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
