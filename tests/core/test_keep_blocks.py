"""``keep_blocks``: chosen blocks keep their activations (plain autograd, no recompute)
while the rest of the chain is rebuilt; the gradients stay those of plain autograd."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from conftest import assert_grads_close, leaf_copy, peak_memory, plain_copy
from invertible_core import AdditiveCoupling, AffineAdapterNaive, AffineCoupling, ReversibleSequence


class Counted(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return torch.tanh(self.conv(x))


def chain(depth: int = 6, channels: int = 4, **options: object) -> ReversibleSequence:
    torch.manual_seed(0)
    blocks = [
        AdditiveCoupling(Counted(channels // 2), Counted(channels // 2)) for _ in range(depth)
    ]
    return ReversibleSequence(blocks, **options)  # type: ignore[arg-type]


def _calls(seq: ReversibleSequence) -> list[int]:
    counts = []
    for block in seq:
        assert isinstance(block, AdditiveCoupling)
        counts.append(block.Fm.calls + block.Gm.calls)  # type: ignore[operator]
    return counts


@pytest.mark.parametrize("keep", [0, 2, 6, [0], [1, 3], [0, 5], [-1]])
@pytest.mark.parametrize("inverse", [False, True])
def test_gradients_equal_plain_autograd_whatever_is_kept(keep: object, inverse: bool) -> None:
    seq = chain(keep_blocks=keep).double()
    ref = plain_copy(seq)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    xs, xr = leaf_copy(x), leaf_copy(x)
    run = (lambda m, v: m.inverse(v)) if inverse else (lambda m, v: m(v))
    run(seq, xs).square().sum().backward()
    run(ref, xr).square().sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-10, atol=1e-12)
    assert_grads_close(seq, ref)


def test_kept_blocks_are_not_recomputed() -> None:
    seq = chain(keep_blocks=[1, 4])
    seq(torch.randn(2, 4, 5, 5, requires_grad=True)).sum().backward()
    # Fm and Gm once each in the forward pass; rebuilt blocks once more each in backward
    assert _calls(seq) == [4, 2, 4, 4, 2, 4]


def test_a_count_keeps_the_last_blocks() -> None:
    seq = chain(depth=5, keep_blocks=2)
    assert seq.keep_blocks == (3, 4)
    seq.keep_blocks = [0, -1, 0]
    assert seq.keep_blocks == (0, 4)
    seq.keep_blocks = None
    assert seq.keep_blocks == ()


def test_keeping_blocks_costs_their_activations_and_keeping_all_is_plain_memory() -> None:
    x = torch.randn(8, 8, 16, 16)

    def peak(**options: object) -> int:
        seq = chain(depth=8, channels=8, **options)

        def step() -> None:
            seq(x).square().mean().backward()

        step()
        seq.zero_grad(set_to_none=False)
        return peak_memory(step)

    none, half, every = peak(), peak(keep_blocks=4), peak(keep_blocks=8)
    plain = peak(memory_saving=False)
    assert none < half < every
    assert every == plain


def test_keep_blocks_with_logdet() -> None:
    torch.manual_seed(0)
    blocks = [AffineCoupling(nn.Linear(2, 2), adapter=AffineAdapterNaive) for _ in range(4)]
    for b in blocks:
        nn.init.normal_(b.Fm.f.weight, std=0.1)  # type: ignore[union-attr]
        nn.init.normal_(b.Gm.f.weight, std=0.1)  # type: ignore[union-attr]
    seq = ReversibleSequence(blocks, keep_blocks=[1, 2]).double()
    ref = plain_copy(seq)
    x = torch.randn(3, 4, dtype=torch.float64)
    xs, xr = leaf_copy(x), leaf_copy(x)
    ys, lds = seq.forward_with_logdet(xs)
    yr, ldr = ref.forward_with_logdet(xr)
    torch.testing.assert_close(lds, ldr)
    (ys.square().sum() - lds.sum()).backward()
    (yr.square().sum() - ldr.sum()).backward()
    torch.testing.assert_close(xs.grad, xr.grad)
    assert_grads_close(seq, ref)


def test_reconstruction_errors_cover_every_block_kept_ones_exact() -> None:
    seq = chain(keep_blocks=[2], check_reconstruction="warn").double()
    seq(torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)).sum().backward()
    assert len(seq.reconstruction_errors) == 6
    assert seq.reconstruction_errors[2] == 0.0


def test_slicing_keeps_the_kept_blocks_that_remain() -> None:
    seq = chain(keep_blocks=[1, 4])
    assert seq[1:5].keep_blocks == (0, 3)
    assert seq[2:4].keep_blocks == ()


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (7, ValueError, "not a count of blocks of this 6-block sequence"),
        (-1, ValueError, "not a count"),
        ([6], ValueError, "index 6 is out of range for 6 blocks"),
        (["0"], TypeError, "indices must be ints"),
        (True, TypeError, "not a bool"),
    ],
)
def test_invalid_keep_blocks_are_clear_errors(value: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        chain(keep_blocks=value)
