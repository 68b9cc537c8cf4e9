"""Hand-offs between memory-saving calls: a later call takes over an earlier call's output
(it rebuilds it in backward anyway), so that chains of calls keep one output at a time.

Each test trains the same calls with memory saving and without, and compares gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from invertible_core import (
    AdditiveCoupling,
    InvertibleModuleWrapper,
    ReversibleSequence,
    measure_memory,
)


class Scale(nn.Module):
    """An invertible elementwise scale (no coupling: a block that takes a whole tensor)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.linspace(-0.3, 0.3, channels))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.log_scale.exp()

    def inverse(self, y: Tensor) -> Tensor:
        return y * (-self.log_scale).exp()


class Concat(nn.Module):
    """Two tensors in, their concatenation out (a U-Net's join), and back."""

    def __init__(self, first: int) -> None:
        super().__init__()
        self.first = first

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.cat([a, b], dim=-1)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return y[..., : self.first], y[..., self.first :]


def coupling(channels: int) -> AdditiveCoupling:
    half = channels // 2
    return AdditiveCoupling(nn.Sequential(nn.Linear(half, half), nn.Tanh()), split_dim=-1)


def _compare(modules: list[nn.Module], inputs: list[Tensor], run) -> None:  # type: ignore[no-untyped-def]
    run().square().sum().backward()
    saved = [p.grad.clone() for m in modules for p in m.parameters()] + [
        x.grad.clone() for x in inputs
    ]  # type: ignore[union-attr]
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, ReversibleSequence):
                sub.memory_saving = False
            if isinstance(sub, InvertibleModuleWrapper):
                sub.disable = True
        m.zero_grad()
    for x in inputs:
        x.grad = None
    run().square().sum().backward()
    plain = [p.grad for m in modules for p in m.parameters()] + [x.grad for x in inputs]
    for a, b in zip(saved, plain):
        torch.testing.assert_close(a, b)


def test_a_sequence_of_couplings_takes_over_another_sequences_output() -> None:
    # the second sequence takes its input as a coupling's two parts; what it hands back in
    # backward must be the first sequence's whole output
    torch.manual_seed(0)
    first, second = (ReversibleSequence(coupling(4), coupling(4)).double() for _ in range(2))
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    _compare([first, second], [x], lambda: second(first(x)))


def test_a_call_that_joins_two_memory_saving_outputs_takes_both_over() -> None:
    # each producer takes its own part of the join's rebuilt input; the join is rebuilt once
    torch.manual_seed(0)

    def path(channels: int) -> ReversibleSequence:
        return ReversibleSequence(Scale(channels), coupling(channels), Scale(channels)).double()

    a, b, c = path(4), path(4), path(8)
    join = InvertibleModuleWrapper(Concat(4))
    x1 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    _compare([a, b, c, join], [x1, x2], lambda: c(join(a(x1), b(x2))))


def test_chained_sequences_keep_one_output_at_a_time() -> None:
    # each sequence's output is taken over by the next: the forward pass leaves the last
    # output (and bookkeeping), not one output per sequence
    torch.manual_seed(0)

    def chain(n: int) -> list[ReversibleSequence]:
        return [ReversibleSequence(coupling(64), coupling(64)) for _ in range(n)]

    def retained(seqs: list[ReversibleSequence]) -> int:
        x = torch.randn(32, 16, 64, requires_grad=True)

        def run() -> Tensor:
            h = x
            for s in seqs:
                h = s(h)
            return h

        _, stats = measure_memory(run)
        return stats.retained_bytes

    two, eight = retained(chain(2)), retained(chain(8))
    output = 32 * 16 * 64 * 4  # 128 KiB
    # six more sequences: each keeps a little bookkeeping (its drift-check sample), no output
    assert (eight - two) / 6 < output / 10
