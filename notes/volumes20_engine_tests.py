"""Two hand-offs between memory-saving calls that fail in backward on the engine branch.

For the lead (engine.py / sequence.py belong to issue 18); found while building issue 20's
ReversibleUNet, which is built so as not to need either. Run with
``python -m pytest notes/volumes20_engine_tests.py``: both fail at ``engine`` cafab93.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from invertible_core import (
    AdditiveCoupling,
    ChannelConcat,
    InvertibleModuleWrapper,
    ReversibleSequence,
)


class Scale(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.linspace(-0.3, 0.3, channels))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.log_scale.exp()

    def inverse(self, y: Tensor) -> Tensor:
        return y * (-self.log_scale).exp()


def coupling(channels: int) -> AdditiveCoupling:
    half = channels // 2
    return AdditiveCoupling(nn.Sequential(nn.Linear(half, half), nn.Tanh()))


def _grads(modules: list[nn.Module], inputs: list[Tensor]) -> list[Tensor]:
    return [p.grad.clone() for m in modules for p in m.parameters()] + [x.grad for x in inputs]  # type: ignore[misc, union-attr]


def test_a_sequence_whose_first_block_is_a_coupling_takes_over_another_calls_output() -> None:
    # claim_inputs (sequence.py, _run_saving) hands the producer slot 0 of the first frame's
    # rebuilt input, but a coupling's frame rebuilds its input as two parts: the producer
    # gets the first half where its output was the whole tensor. Fails today with
    # "RuntimeError: mat1 and mat2 shapes cannot be multiplied (3x1 and 2x2)".
    torch.manual_seed(0)
    first, second = (
        ReversibleSequence(coupling(4)).double(),
        ReversibleSequence(coupling(4)).double(),
    )
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    second(first(x)).square().sum().backward()
    saved = _grads([first, second], [x])
    for m in (first, second):
        m.memory_saving = False
        m.zero_grad()
    x.grad = None
    second(first(x)).square().sum().backward()
    for a, b in zip(saved, _grads([first, second], [x])):
        torch.testing.assert_close(a, b)


def test_a_call_that_joins_the_outputs_of_two_memory_saving_calls() -> None:
    # A U's join: a wrapped ChannelConcat claims inputs from two producers. When the first
    # producer recomputes it clears the consumer's whole rebuilt tuple (Frame.recompute:
    # "source.consumer.rebuilt = None"), so the second producer makes the consumer, and
    # every call after it, recompute again; after the last allowed pass that fails with
    # "ReversibleSequence: the output of block 2 was released after the last backward pass
    # allowed". Expected: each producer releases only its own slot of the consumer's input.
    torch.manual_seed(0)

    def path(channels: int) -> ReversibleSequence:
        return ReversibleSequence(Scale(channels), coupling(channels), Scale(channels)).double()

    a, b, c = path(4), path(4), path(8)
    join = InvertibleModuleWrapper(ChannelConcat((4, 4)))
    x1 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    c(join(a(x1), b(x2))).square().sum().backward()
    saved = _grads([a, b, c], [x1, x2])
    for m in (a, b, c):
        m.memory_saving = False
        m.zero_grad()
    join.disable = True
    x1.grad = x2.grad = None
    c(join(a(x1), b(x2))).square().sum().backward()
    for s, p in zip(saved, _grads([a, b, c], [x1, x2])):
        torch.testing.assert_close(s, p)
