"""Log-determinants through a memory-saving chain (normalizing flows).

``forward_with_logdet(x) -> (y, logdet)``: ``logdet`` of shape ``(batch,)`` is the sum over
blocks of ``log|det dy/dx|`` per sample, checked against the brute-force Jacobian; the
inverse's is the negative; a flow's negative log-likelihood trains with memory saving on and
the gradients of plain autograd.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from conftest import assert_grads_close, leaf_copy, peak_memory, plain_copy
from invertible_core import (
    ActNorm,
    AdditiveCoupling,
    AffineAdapterSigmoid,
    AffineCoupling,
    InvertibleConv1x1,
    InvertibleDownsampling,
    Permutation,
    ReversibleSequence,
)


class ScaleShift(nn.Module):
    """``(scale, shift)`` for an affine coupling of ``(B, F)`` features, kept well scaled."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.lin = nn.Linear(a, 2 * b)
        self.b = b

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.lin(x)
        return torch.exp(0.5 * torch.tanh(h[:, : self.b])), h[:, self.b :]


def affine_chain(
    depth: int = 3, features: int = 5, sizes: tuple[int, int] = (2, 3)
) -> ReversibleSequence:
    torch.manual_seed(0)
    a, b = sizes
    blocks = [
        AffineCoupling(ScaleShift(b, a), ScaleShift(a, b), split_dim=1, split_sizes=sizes)
        for _ in range(depth)
    ]
    return ReversibleSequence(blocks).double()


def brute_force_logdet(seq: nn.Module, x: Tensor, inverse: bool = False) -> Tensor:
    seq.eval()  # plain autograd for the jacobian (it backpropagates many times)
    try:
        fn = seq.inverse if inverse else seq
        out = []
        for i in range(x.shape[0]):
            jac = torch.autograd.functional.jacobian(lambda v: fn(v[None])[0], x[i])
            n = x[i].numel()
            out.append(torch.linalg.slogdet(jac.reshape(n, n))[1])
        return torch.stack(out)
    finally:
        seq.train()


def test_affine_chain_logdet_equals_the_jacobians() -> None:
    seq = affine_chain()
    x = torch.randn(3, 5, dtype=torch.float64)
    y, logdet = seq.forward_with_logdet(x)
    assert logdet.shape == (3,)
    torch.testing.assert_close(logdet, brute_force_logdet(seq, x))
    torch.testing.assert_close(y, seq(x), rtol=0, atol=0)


def test_inverse_logdet_is_the_negative_and_inverse_undoes_forward() -> None:
    seq = affine_chain()
    x = torch.randn(3, 5, dtype=torch.float64)
    with torch.no_grad():
        y, logdet = seq.forward_with_logdet(x)
        x_back, inverse_logdet = seq.inverse_with_logdet(y)
    torch.testing.assert_close(x_back, x)
    torch.testing.assert_close(inverse_logdet, -logdet)
    torch.testing.assert_close(inverse_logdet, brute_force_logdet(seq, y, inverse=True))


def test_additive_chain_reports_zero_logdet() -> None:
    seq = ReversibleSequence(AdditiveCoupling(nn.Linear(2, 2)) for _ in range(3)).double()
    x = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    y, logdet = seq.forward_with_logdet(x)
    torch.testing.assert_close(logdet, torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(y, seq(x))


def _nll(y: Tensor, logdet: Tensor) -> Tensor:
    prior = -0.5 * y.flatten(1).square().sum(1) - 0.5 * y[0].numel() * math.log(2 * math.pi)
    return -(prior + logdet).mean()


@pytest.mark.parametrize("inverse", [False, True])
def test_nll_gradients_with_memory_saving_equal_plain_autograd(inverse: bool) -> None:
    seq = affine_chain(depth=4)
    ref = plain_copy(seq)
    x = torch.randn(6, 5, dtype=torch.float64)
    xs, xr = leaf_copy(x), leaf_copy(x)
    run = (
        (lambda m, v: m.inverse_with_logdet(v))
        if inverse
        else (lambda m, v: m.forward_with_logdet(v))
    )
    _nll(*run(seq, xs)).backward()
    _nll(*run(ref, xr)).backward()
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-10, atol=1e-12)
    assert_grads_close(seq, ref)


def test_a_loss_of_the_logdet_alone_trains_the_scales() -> None:
    seq = affine_chain()
    ref = plain_copy(seq)
    x = torch.randn(4, 5, dtype=torch.float64)
    seq.forward_with_logdet(x)[1].sum().backward()
    ref.forward_with_logdet(x)[1].sum().backward()
    assert_grads_close(seq, ref)


def flow(levels_depth: int, channels: int = 4) -> ReversibleSequence:
    """Glow-like steps, a squeeze in the middle: ActNorm, 1x1 conv, affine coupling."""
    torch.manual_seed(0)

    def step(c: int) -> list[nn.Module]:
        net = nn.Sequential(nn.Conv2d(c // 2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, c, 1))
        return [ActNorm(c), InvertibleConv1x1(c), AffineCoupling(net, adapter=AffineAdapterSigmoid)]

    blocks: list[nn.Module] = []
    for _ in range(levels_depth):
        blocks += step(channels)
    blocks.append(InvertibleDownsampling(2))
    for _ in range(levels_depth):
        blocks += step(4 * channels)
    blocks.append(Permutation(4 * channels))
    return ReversibleSequence(blocks)


def test_flow_with_downsampling_nll_gradients_equal_plain_autograd() -> None:
    seq = flow(2).double()
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    seq.forward_with_logdet(x)  # ActNorm's data-dependent initialisation, then compare
    ref = plain_copy(seq)
    xs, xr = leaf_copy(x), leaf_copy(x)
    ys, ld = seq.forward_with_logdet(xs)
    yr, ldr = ref.forward_with_logdet(xr)
    assert ys.shape == (3, 16, 2, 2)
    torch.testing.assert_close(ld, ldr, rtol=1e-10, atol=1e-10)
    _nll(ys, ld).backward()
    _nll(yr, ldr).backward()
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-8, atol=1e-10)
    assert_grads_close(seq, ref, rtol=1e-8, atol=1e-10)


def test_flow_logdet_equals_the_jacobians() -> None:
    seq = flow(1, channels=2).double()
    x = torch.randn(2, 2, 2, 2, dtype=torch.float64)
    seq.forward_with_logdet(x)  # initialise ActNorm
    _, logdet = seq.forward_with_logdet(x)
    torch.testing.assert_close(logdet, brute_force_logdet(seq, x))


def test_actnorm_initialises_on_the_first_memory_saving_step() -> None:
    seq = flow(1)
    x = torch.randn(8, 4, 4, 4) * 3 + 2
    y, logdet = seq.forward_with_logdet(x)
    _nll(y, logdet).backward()  # the recompute must not re-initialise nor raise
    first = seq[0]
    assert isinstance(first, ActNorm) and first.is_initialized()
    normalised = first(x)
    torch.testing.assert_close(normalised.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4, rtol=0)


def test_flow_memory_is_flat_in_depth() -> None:
    x = torch.randn(8, 4, 16, 16)

    def peak(depth: int) -> int:
        seq = flow(depth)

        def step() -> None:
            _nll(*seq.forward_with_logdet(x)).backward()

        step()
        seq.zero_grad(set_to_none=False)
        return peak_memory(step)

    assert peak(8) <= 1.1 * peak(2)


def test_logdet_needs_every_block_to_report_one() -> None:
    class NoLogdet(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x * 2

        def inverse(self, y: Tensor) -> Tensor:
            return y / 2

    seq = ReversibleSequence(AdditiveCoupling(nn.Linear(1, 1)), NoLogdet())
    with pytest.raises(TypeError, match=r"NoLogdet has no forward_with_logdet\(\)"):
        seq.forward_with_logdet(torch.randn(3, 2))


def test_a_custom_coupling_law_without_logdet_says_what_to_implement() -> None:
    from invertible_core import Coupling

    class Law(Coupling):
        def _couple(self, x, h):  # type: ignore[no-untyped-def]
            return x * torch.exp(h)

        def _decouple(self, y, h):  # type: ignore[no-untyped-def]
            return y * torch.exp(-h)

    seq = ReversibleSequence(Law(nn.Linear(1, 1)))
    assert seq(torch.randn(3, 2)).shape == (3, 2)
    with pytest.raises(NotImplementedError, match="implement _logdet"):
        seq.forward_with_logdet(torch.randn(3, 2))


def test_standalone_coupling_reports_its_logdet() -> None:
    torch.manual_seed(0)
    coupling = AffineCoupling(ScaleShift(3, 2), ScaleShift(2, 3), split_sizes=(2, 3)).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    y, logdet = coupling.forward_with_logdet(x)
    torch.testing.assert_close(logdet, brute_force_logdet(coupling, x))
    x_back, inverse_logdet = coupling.inverse_with_logdet(y)
    torch.testing.assert_close(x_back, x)
    torch.testing.assert_close(inverse_logdet, -logdet)
