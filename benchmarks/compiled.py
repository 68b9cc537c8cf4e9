"""bench_core's ``--compile`` section: ``torch.compile``d ``F``/``G`` inside the sequence.

Each ``F`` and ``G`` of the transformer chain is compiled on its own (``torch.compile(module)``,
sharing the eager module's parameters); the sequence itself is not compiled (its autograd
function runs eagerly by design), so its forward pass and its recompute in backward both
run the compiled code (``compiled_calls_per_step`` counts the compiled calls: 4 per block
for the sequence, forward and recompute of F and G; 2 for plain autograd). Reported: the
time of the first step (mostly compilation), the step
time of the sequence and of plain autograd, compiled and eager (interleaved rounds,
medians), and the gradient difference compiled / eager (relative L2 over the input and every
parameter; target <= 1e-4: compilation may reorder float operations, never change the
function).

Inductor compiles take minutes on a small CPU, hence the flag; ``--compile-backend
aot_eager`` traces the same graphs without generating code (a quick check of the mechanism).
"""

from __future__ import annotations

import argparse
from typing import Any, cast

import torch
from torch import nn

from chains import Chain, transformer_chain
from invertible_core import AdditiveCoupling, ReversibleSequence
from measure import chain_step, gradients, relative_error, round_robin, square_loss, timed

#: compiled and eager gradients must agree to this relative L2 error
EQUAL = 1e-4


def _allow_recompiles(count: int) -> None:
    """Let dynamo keep ``count`` graphs per code object: on torch releases that guard on the
    module instance, every block's F is a graph of its own (times grad and no-grad modes)."""
    config: Any = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed in torch 2.6
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), count))


class CountingBackend:
    """A torch.compile backend that compiles with another and counts how often the
    compiled graphs run: evidence that the recompute in backward runs compiled code."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.inner = torch._dynamo.lookup_backend(name)
        self.calls = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        compiled = self.inner(gm, example_inputs)

        def run(*args: Any) -> Any:
            self.calls += 1
            return compiled(*args)

        return run


def _sequence(chain: Chain, pairs: list[tuple[nn.Module, nn.Module]], saving: bool) -> nn.Module:
    couplings = [AdditiveCoupling(f, g, split_dim=chain.split_dim) for f, g in pairs]
    return ReversibleSequence(couplings, memory_saving=saving)


def bench_compile(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    b, t, c = args.tf_shape
    chain = transformer_chain(args.tf_depth, c, args.tf_heads, b, t).to(device)
    _allow_recompiles(4 * args.tf_depth + 8)
    backend = CountingBackend(args.compile_backend)
    # torch.compile(module) returns a module sharing the original's parameters
    compiled_pairs = [
        (
            cast(nn.Module, torch.compile(f, backend=backend)),
            cast(nn.Module, torch.compile(g, backend=backend)),
        )
        for f, g in chain.pairs
    ]
    models = {
        "sequence": _sequence(chain, chain.pairs, True),
        "sequence_compiled": _sequence(chain, compiled_pairs, True),
        "plain": _sequence(chain, chain.pairs, False),
        "plain_compiled": _sequence(chain, compiled_pairs, False),
    }
    params = chain.parameters

    eager = gradients(square_loss(models["sequence"]), chain.inputs, params)
    first_step_s = timed(
        lambda: gradients(square_loss(models["sequence_compiled"]), chain.inputs, params), device
    )
    compiled = gradients(square_loss(models["sequence_compiled"]), chain.inputs, params)
    sequence_error = relative_error(compiled, eager)
    plain_error = relative_error(
        gradients(square_loss(models["plain_compiled"]), chain.inputs, params),
        gradients(square_loss(models["plain"]), chain.inputs, params),
    )
    calls = {}
    for name in ("sequence_compiled", "plain_compiled"):
        before = backend.calls
        gradients(square_loss(models[name]), chain.inputs, params)
        calls[name] = backend.calls - before
    steps = {
        name: chain_step(square_loss(model), model.parameters(), chain.inputs)
        for name, model in models.items()
    }
    medians, failed = round_robin(steps, device, args.warmup, args.repeats)
    if failed:
        raise RuntimeError(f"--compile: a step failed: {failed}")
    return {
        "backend": backend.name,
        "compiled_calls_per_step": calls,
        "depth": args.tf_depth,
        "shape": [b, t, c],
        "first_step_s": first_step_s,
        "step_s": medians,
        "sequence_compiled_vs_eager": medians["sequence_compiled"] / medians["sequence"],
        "plain_compiled_vs_eager": medians["plain_compiled"] / medians["plain"],
        "sequence_compiled_vs_plain_compiled": medians["sequence_compiled"]
        / medians["plain_compiled"],
        "grad_error_sequence": sequence_error,
        "grad_error_plain": plain_error,
        "target": EQUAL,
        "equal": sequence_error <= EQUAL and plain_error <= EQUAL,
    }


def print_compile(result: dict[str, Any]) -> None:
    print(
        f"torch.compile ({result['backend']}) of each F and G, transformer chain "
        f"N={result['depth']}, x {tuple(result['shape'])}; first step (compiling) "
        f"{result['first_step_s']:.1f} s"
    )
    calls = result["compiled_calls_per_step"]
    for name, seconds in result["step_s"].items():
        ran = f"  ({calls[name]} compiled F/G calls per step)" if name in calls else ""
        print(f"  {name:<18} {seconds:>8.3f} s{ran}")
    print(
        f"  compiled / eager: sequence {result['sequence_compiled_vs_eager']:.2f}, plain "
        f"{result['plain_compiled_vs_eager']:.2f}; sequence / plain, both compiled "
        f"{result['sequence_compiled_vs_plain_compiled']:.2f}"
    )
    verdict = "equal" if result["equal"] else "NOT equal"
    print(
        f"  gradients compiled vs eager: sequence {result['grad_error_sequence']:.1e}, plain "
        f"{result['grad_error_plain']:.1e} ({verdict}, target <= {result['target']})"
    )
    print()
