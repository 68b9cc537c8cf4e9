"""Stage 5 of the GPU suite: overlapped recompute (PaReprop) on and off.

When this checkout's ``invertible_core.ReversibleSequence`` accepts ``overlap=``, two chains
run with it off and on, sharing the same blocks: a RevNet-like chain of additive couplings
(conv3x3 + BatchNorm + ReLU) and a transformer chain (pre-norm attention as ``F``, pre-norm
MLP as ``G``, halves split along the features). For each: the gradients of one step with
overlap on against off (the same blocks, input and loss: they must agree), the median time
of a training step (forward and backward, interleaved off/on rounds, synchronised), and
the peak memory of a step beyond what was allocated before it. Without ``overlap=`` the
stage says "not available in this build".
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from common import (
    StageResult,
    run_rows,
    start_stage,
    synchronize,
)
from plan import OVERLAP_CHAINS
from record import NOT_AVAILABLE
from torch import nn

#: relative L2 error of the gradients, overlap on against off, above which a row fails
GRAD_TOLERANCE = 1e-5

SIZES: dict[str, dict[str, dict[str, int]]] = {
    "gpu": {
        "conv": {"blocks": 16, "channels": 32, "batch": 128, "size": 32},
        "transformer": {"blocks": 8, "width": 256, "heads": 4, "batch": 32, "tokens": 256},
        "timing": {"warmup": 2, "rounds": 20},
    },
    "dry": {
        "conv": {"blocks": 3, "channels": 4, "batch": 2, "size": 8},
        "transformer": {"blocks": 2, "width": 16, "heads": 2, "batch": 2, "tokens": 8},
        "timing": {"warmup": 1, "rounds": 2},
    },
}

SequenceFactory = Callable[[list[nn.Module], bool], nn.Module]


def overlap_supported() -> bool:
    """Whether ``ReversibleSequence`` takes ``overlap=`` in this checkout."""
    from invertible_core import ReversibleSequence

    return "overlap" in inspect.signature(ReversibleSequence.__init__).parameters


def overlapping_sequence(blocks: list[nn.Module], overlap: bool) -> nn.Module:
    from invertible_core import ReversibleSequence

    return ReversibleSequence(*blocks, overlap=overlap)  # type: ignore[call-arg]


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention (``scaled_dot_product_attention``)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.norm(x)).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


def mlp(width: int) -> nn.Module:
    """Pre-norm MLP, four times wider inside."""
    return nn.Sequential(
        nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
    )


def conv_residual(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
    )


def conv_chain(sizes: dict[str, int]) -> tuple[list[nn.Module], tuple[int, ...]]:
    from invertible_core import AdditiveCoupling

    c = sizes["channels"]
    blocks: list[nn.Module] = [
        AdditiveCoupling(Fm=conv_residual(c), Gm=conv_residual(c)) for _ in range(sizes["blocks"])
    ]
    return blocks, (sizes["batch"], 2 * c, sizes["size"], sizes["size"])


def transformer_chain(sizes: dict[str, int]) -> tuple[list[nn.Module], tuple[int, ...]]:
    from invertible_core import AdditiveCoupling

    w, h = sizes["width"], sizes["heads"]
    blocks: list[nn.Module] = [
        AdditiveCoupling(Fm=SelfAttention(w, h), Gm=mlp(w), split_dim=-1)
        for _ in range(sizes["blocks"])
    ]
    return blocks, (sizes["batch"], sizes["tokens"], 2 * w)


CHAINS = {"conv": conv_chain, "transformer": transformer_chain}


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(b.double().norm())
    num = float((a.double() - b.double()).norm())
    return num / den if den > 0 else num


def gradients(sequence: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Input and parameter gradients of ``mean(sequence(x) ** 2)``."""
    sequence.zero_grad(set_to_none=True)
    leaf = x.detach().clone().requires_grad_()
    sequence(leaf).square().mean().backward()
    assert leaf.grad is not None
    grads = [leaf.grad]
    grads += [p.grad.detach().clone() for p in sequence.parameters() if p.grad is not None]
    return grads


def step_seconds(sequence: nn.Module, x: torch.Tensor, device: torch.device) -> float:
    """Wall time of one forward and backward, synchronised before and after on CUDA."""
    synchronize(device)
    start = time.perf_counter()
    sequence(x).square().mean().backward()
    synchronize(device)
    return time.perf_counter() - start


def measure_chain(
    chain: str,
    sizes: dict[str, dict[str, int]],
    device: torch.device,
    make_sequence: SequenceFactory = overlapping_sequence,
) -> dict[str, Any]:
    """Gradients, step time and peak memory of one chain with overlap off and on."""
    from invertible_core import measure_memory

    torch.manual_seed(0)
    blocks, shape = CHAINS[chain](sizes[chain])
    blocks = [b.to(device) for b in blocks]
    sequential = make_sequence(blocks, False).train()
    overlapped = make_sequence(blocks, True).train()
    x = torch.randn(shape, device=device)

    off, on = gradients(sequential, x), gradients(overlapped, x)
    if len(off) != len(on):
        raise RuntimeError(f"overlap on gave {len(on)} gradients, off {len(off)}")
    errors = [_relative_error(a, b) for a, b in zip(on, off)]
    identical = all(torch.equal(a, b) for a, b in zip(on, off))

    leaf = x.detach().clone().requires_grad_()
    timing = sizes["timing"]
    for _ in range(timing["warmup"]):
        step_seconds(sequential, leaf, device)
        step_seconds(overlapped, leaf, device)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(timing["rounds"]):  # interleaved: both see the same clocks and load
        times[False].append(step_seconds(sequential, leaf, device))
        times[True].append(step_seconds(overlapped, leaf, device))
    peaks = {}
    for flag, sequence in ((False, sequential), (True, overlapped)):
        _, stats = measure_memory(lambda: sequence(leaf).square().mean().backward(), device=device)
        peaks[flag] = stats.peak_bytes
    off_s, on_s = statistics.median(times[False]), statistics.median(times[True])
    worst = max(errors)
    row: dict[str, Any] = {
        "shape": list(shape),
        "blocks": len(blocks),
        "overlap_off_seconds": off_s,
        "overlap_on_seconds": on_s,
        "speedup": off_s / on_s,
        "grads_identical": identical,
        "grad_max_rel_error": worst,
        "peak_off_bytes": peaks[False],
        "peak_on_bytes": peaks[True],
    }
    if worst > GRAD_TOLERANCE:
        row["status"] = "failed"
        row["note"] = f"gradients differ: relative error {worst:.3g} > {GRAD_TOLERANCE:g}"
    return row


def main(argv: list[str] | None = None) -> int:
    args, box, device, kind = start_stage(__doc__, argv)
    sizes = SIZES[kind]
    result = StageResult(args.result, conditions={**sizes, "device": str(device)})
    specs = [{"chain": chain} for chain in OVERLAP_CHAINS]
    if not overlap_supported():
        for spec in specs:
            result.add_row({**spec, "status": "not available", "note": NOT_AVAILABLE})
        result.finish("not available", NOT_AVAILABLE)
        return 0
    run_rows(result, box, specs, lambda spec: measure_chain(spec["chain"], sizes, device), device)
    result.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
