"""bench_core's flatness checks: is training memory flat in depth where chains get harder?

Two chains that go beyond one tensor in, equal halves, no side inputs, no log-det:

- **conditioned transformer** (``conditioned``): the transformer chain whose every ``F``
  and ``G`` takes side inputs, ``seq(x, emb, mask)``: ``emb`` a timestep embedding made by a
  learnable MLP inside the step (its gradient flows back out of the chain into the MLP),
  ``mask`` a boolean key-padding mask (passed through untouched);
- **flow** (``flow``): Glow-like steps with an InvertibleDownsampling in the middle, trained
  with a negative log-likelihood through ``seq.forward_with_logdet(x)``.

Each at a shallow and a deep N (default 4 and 32): the peak memory of one training step
with memory saving (``sequence``) and without (``plain``, for contrast), and the gradient
error of the sequence against plain autograd at the shallow N (input, every parameter, the
embedding MLP's included). The peak is measured both ways of ``measure.py``: with the
gradients freed before each step it includes the parameter gradients the step creates,
which grow with N for any method (``param_grad_mib`` says how much); with them kept
allocated it is the memory beyond the model state, the activations and whatever else the
method holds at once. Flatness (target: deep / shallow <= 1.1 for the sequence) is judged
on the latter.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from chains import conditioned_transformer_chain, flow_chain, flow_nll
from invertible_core import AdditiveCoupling, ReversibleSequence
from measure import chain_step, gradients, peak_mib, relative_error

#: the flatness target: peak at the deep N over the shallow N, with memory saving
FLAT = 1.1

Loss = Callable[[Tensor], Tensor]


def _conditioned(
    depth: int, args: argparse.Namespace, device: torch.device
) -> tuple[dict[str, Loss], list[nn.Parameter], Tensor]:
    b, t, c = args.tf_shape
    cond = conditioned_transformer_chain(depth, c, args.tf_heads, b, t).to(device)
    chain = cond.chain
    losses: dict[str, Loss] = {}
    for method in ("sequence", "plain"):
        seq = ReversibleSequence(
            [AdditiveCoupling(f, g, split_dim=chain.split_dim) for f, g in chain.pairs],
            memory_saving=method == "sequence",
        )

        def loss(x: Tensor, seq: nn.Module = seq) -> Tensor:
            emb = cond.embedding(cond.timesteps)  # made inside the step: its graph is new
            return seq(x, emb, cond.mask).square().mean()

        losses[method] = loss
    params = [*chain.parameters, *cond.embedding.parameters()]
    return losses, params, chain.inputs


def _flow(
    depth: int, args: argparse.Namespace, device: torch.device
) -> tuple[dict[str, Loss], list[nn.Parameter], Tensor]:
    b, c, h, w = args.flow_shape
    seq = flow_chain(depth, c, args.flow_hidden).to(device)
    plain = ReversibleSequence(list(seq), memory_saving=False)  # the same blocks
    torch.manual_seed(1)
    x = torch.randn(b, c, h, w, device=device)
    with torch.no_grad():
        seq.forward_with_logdet(x)  # ActNorm initialises from this batch, once, for both

    def nll(model: ReversibleSequence) -> Loss:
        return lambda inputs: flow_nll(*model.forward_with_logdet(inputs))

    return {"sequence": nll(seq), "plain": nll(plain)}, list(seq.parameters()), x


CHECKS = {"conditioned": _conditioned, "flow": _flow}


#: the two ways a step treats gradients (see measure.py): key in the JSON -> keep_grads
MODES = {"peak_mib": False, "peak_kept_grads_mib": True}


def bench_flatness(args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, Any]]:
    lo, hi = args.flat_depths
    out: dict[str, dict[str, Any]] = {}
    for check, build in CHECKS.items():
        peaks: dict[str, dict[str, dict[str, float]]] = {
            mode: {"sequence": {}, "plain": {}} for mode in MODES
        }
        param_grad_mib: dict[str, float] = {}
        grad_error = None
        for depth in (lo, hi):
            losses, params, x = build(depth, args, device)
            if depth == lo:
                grads = {m: gradients(loss, x, params) for m, loss in losses.items()}
                grad_error = relative_error(grads["sequence"], grads["plain"])
            param_grad_mib[str(depth)] = sum(p.numel() * p.element_size() for p in params) / 2**20
            for mode, keep in MODES.items():
                for method, loss in losses.items():
                    step = chain_step(loss, params, x, keep)
                    peaks[mode][method][str(depth)] = peak_mib(step)
        ratios = {
            mode: {m: p[str(hi)] / p[str(lo)] for m, p in by_method.items()}
            for mode, by_method in peaks.items()
        }
        judged = ratios["peak_kept_grads_mib"]["sequence"]
        out[check] = {
            "depths": [lo, hi],
            **peaks,
            "param_grad_mib": param_grad_mib,
            "peak_hi_over_lo": ratios["peak_mib"],
            "peak_kept_grads_hi_over_lo": ratios["peak_kept_grads_mib"],
            "target": FLAT,
            "flat": judged <= FLAT,
            "grad_error_at_lo": grad_error,
        }
    return out


def print_flatness(flatness: dict[str, dict[str, Any]]) -> None:
    print("flatness: peak MiB of a training step at a shallow and a deep N")
    header = (
        f"{'chain':<12} {'method':<9} {'N lo':>5} {'N hi':>5} {'peak lo':>8} {'peak hi':>8} "
        f"{'hi/lo':>6} {'kept lo':>8} {'kept hi':>8} {'hi/lo':>6} {'grads lo':>8} {'grads hi':>8}"
    )
    print(header)
    print("-" * len(header))
    for check, entry in flatness.items():
        lo, hi = (str(d) for d in entry["depths"])
        grads = entry["param_grad_mib"]
        for method in ("sequence", "plain"):
            freed, kept = entry["peak_mib"][method], entry["peak_kept_grads_mib"][method]
            print(
                f"{check:<12} {method:<9} {lo:>5} {hi:>5} {freed[lo]:>8.1f} {freed[hi]:>8.1f} "
                f"{entry['peak_hi_over_lo'][method]:>6.2f} {kept[lo]:>8.1f} {kept[hi]:>8.1f} "
                f"{entry['peak_kept_grads_hi_over_lo'][method]:>6.2f} {grads[lo]:>8.1f} "
                f"{grads[hi]:>8.1f}"
            )
        verdict = "flat" if entry["flat"] else "NOT flat"
        print(
            f"  {check}: sequence {verdict} (kept-grad peak hi/lo <= {entry['target']}); "
            f"gradient error against plain autograd at N={lo}: {entry['grad_error_at_lo']:.1e}"
        )
    legend = (
        "peak: gradients freed before each step, so it includes the parameter gradients "
        "(grads, MiB), which grow with N for any method; kept: gradients kept allocated, the "
        "peak beyond them."
    )
    print(textwrap.fill(legend, width=100, initial_indent="  ", subsequent_indent="  "))
    print()
