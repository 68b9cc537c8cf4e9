"""The block contract: any module with forward and inverse works in a memory-saving chain;
couplings split unevenly, compute on a fixed-point grid, and accept compiled functions."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from conftest import assert_grads_close, leaf_copy, peak_memory, plain_copy
from invertible_core import (
    AdditiveCoupling,
    AffineAdapterSigmoid,
    AffineCoupling,
    InvertibleBlock,
    InvertibleDownsampling,
    InvertibleModuleWrapper,
    LogDetBlock,
    Partition,
    ReversibleSequence,
)


# The ten lines a user writes: an invertible block with only forward and inverse.
class Leaky(nn.Module):
    """``y = x * exp(a) + b`` where positive, ``* 0.5`` more where negative."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.a = nn.Parameter(0.1 * torch.randn(features))
        self.b = nn.Parameter(0.1 * torch.randn(features))

    def forward(self, x: Tensor) -> Tensor:
        y = x * self.a.exp() + self.b
        return torch.where(y > 0, y, 0.5 * y)

    def inverse(self, y: Tensor) -> Tensor:
        return (torch.where(y > 0, y, 2 * y) - self.b) / self.a.exp()


def mixed_chain(depth: int, features: int = 8) -> ReversibleSequence:
    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for _ in range(depth):
        blocks += [
            Leaky(features),
            AdditiveCoupling(nn.Sequential(nn.Linear(features // 2, features // 2), nn.Tanh())),
        ]
    return ReversibleSequence(blocks)


def test_a_ten_line_user_block_trains_with_memory_saving_and_exact_gradients() -> None:
    assert isinstance(Leaky(2), InvertibleBlock)
    seq = mixed_chain(3).double()
    ref = plain_copy(seq)
    x = torch.randn(5, 8, dtype=torch.float64)
    xs, xr = leaf_copy(x), leaf_copy(x)
    seq(xs).square().sum().backward()
    ref(xr).square().sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-10, atol=1e-12)
    assert_grads_close(seq, ref)
    torch.testing.assert_close(seq.inverse(seq(x)), x)


def test_a_user_block_chain_keeps_memory_flat() -> None:
    x = torch.randn(64, 256)

    def peak(depth: int) -> int:
        seq = mixed_chain(depth, features=256)

        def step() -> None:
            seq(x).square().mean().backward()

        step()
        seq.zero_grad(set_to_none=False)
        return peak_memory(step)

    assert peak(12) <= 1.1 * peak(2)


def test_couplings_and_layers_honour_the_protocols() -> None:
    coupling = AdditiveCoupling(nn.Identity())
    assert isinstance(coupling, InvertibleBlock)
    assert isinstance(coupling, LogDetBlock)
    assert coupling.partition == Partition(1, None)
    assert isinstance(InvertibleDownsampling(2), LogDetBlock)


def test_shape_changing_layers_between_couplings() -> None:
    torch.manual_seed(0)

    def coupling(channels: int) -> AdditiveCoupling:
        return AdditiveCoupling(
            nn.Sequential(nn.Conv2d(channels // 2, channels // 2, 3, padding=1), nn.Tanh())
        )

    seq = ReversibleSequence(
        coupling(4), InvertibleDownsampling(2), coupling(16), coupling(16)
    ).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    ref = plain_copy(seq)
    xs, xr = leaf_copy(x), leaf_copy(x)
    ys = seq(xs)
    assert ys.shape == (2, 16, 4, 4)
    ys.square().sum().backward()
    ref(xr).square().sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-10, atol=1e-12)
    assert_grads_close(seq, ref)
    with torch.no_grad():
        torch.testing.assert_close(seq.inverse(seq(x)), x)


def test_uneven_split_sizes_three_channels_as_one_and_two() -> None:
    torch.manual_seed(0)
    coupling = AdditiveCoupling(
        nn.Conv2d(2, 1, 3, padding=1), nn.Conv2d(1, 2, 3, padding=1), split_sizes=(1, 2)
    ).double()
    seq = ReversibleSequence(coupling)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(coupling.inverse(coupling(x)), x)
    ref = plain_copy(seq)
    xs, xr = leaf_copy(x), leaf_copy(x)
    seq(xs).square().sum().backward()
    ref(xr).square().sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad)
    assert_grads_close(seq, ref)


def test_split_sizes_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="split_sizes must be two positive ints"):
        AdditiveCoupling(nn.Identity(), split_sizes=(0, 3))
    coupling = AdditiveCoupling(nn.Conv2d(2, 1, 1), split_sizes=(1, 2))
    with pytest.raises(ValueError, match=r"split_sizes=\(1, 2\) add up to 3, but dim 1 .* size 4"):
        coupling(torch.randn(1, 4, 2, 2))
    with pytest.raises(ValueError, match="odd size 3.*split_sizes"):
        AdditiveCoupling(nn.Identity())(torch.randn(1, 3, 2, 2))


def test_affine_adapter_sigmoid_honours_split_dim_on_token_data() -> None:
    torch.manual_seed(0)
    coupling = AffineCoupling(nn.Linear(4, 8), adapter=AffineAdapterSigmoid, split_dim=-1).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)  # (B, T, C): the coupling splits C
    y, logdet = coupling.forward_with_logdet(x)
    assert y.shape == x.shape and logdet.shape == (2,)
    with torch.no_grad():
        torch.testing.assert_close(coupling.inverse(y), x)
    s, t = coupling.Fm(x[..., 4:])
    h = coupling.Fm.f(x[..., 4:])
    torch.testing.assert_close(s, torch.sigmoid(h[..., 1::2] + 2.0))
    torch.testing.assert_close(t, h[..., 0::2])


# -- fixed point ---------------------------------------------------------------------------
def deep_float_chain(bits: int | None, depth: int = 24) -> ReversibleSequence:
    torch.manual_seed(0)

    def fn() -> nn.Module:
        return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

    return ReversibleSequence(
        AdditiveCoupling(fn(), fn(), fixed_point_bits=bits) for _ in range(depth)
    )


def _grads(seq: nn.Module, x: Tensor) -> list[Tensor]:
    x = leaf_copy(x)
    seq(x).square().mean().backward()
    return [x.grad, *(p.grad for p in seq.parameters())]  # type: ignore[list-item]


def test_fixed_point_couplings_rebuild_bit_exactly_and_change_no_gradient() -> None:
    seq = deep_float_chain(16)
    ref = plain_copy(seq)
    x = torch.randn(4, 8, 8, 8)
    for got, want in zip(_grads(seq, x), _grads(ref, x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    seq.check_reconstruction = "raise"
    seq.reconstruction_tolerance = 0.0
    _grads(seq, x)
    assert max(seq.reconstruction_errors) == 0.0


def test_fixed_point_couplings_invert_bit_exactly() -> None:
    seq = deep_float_chain(16, depth=8).eval()
    x = torch.randn(4, 8, 8, 8)
    with torch.no_grad():
        y = seq(x)
        assert y.abs().max() < 2**8  # inside the exact range of 16 bits in float32
        grid_x = torch.round(x * 2**16) / 2**16
        assert torch.equal(seq.inverse(y), grid_x)


def test_plain_float_couplings_do_drift_where_fixed_point_does_not() -> None:
    # the comparison that makes the test above meaningful
    seq = deep_float_chain(None)
    seq.check_reconstruction = "warn"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _grads(seq, torch.randn(4, 8, 8, 8))
    assert max(seq.reconstruction_errors) > 0.0


def test_values_outside_the_exact_range_are_warned_about_once() -> None:
    seq = ReversibleSequence(AdditiveCoupling(nn.Linear(2, 2), fixed_point_bits=16))
    x = torch.full((3, 4), 300.0, requires_grad=True)  # 300 > 2**(24 - 16) = 256
    with pytest.warns(RuntimeWarning, match="left the exact range of fixed_point_bits=16"):
        seq(x).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seq(x).sum().backward()


def test_fixed_point_bits_is_validated() -> None:
    with pytest.raises(ValueError, match="fixed_point_bits must be an int in 1..40"):
        AdditiveCoupling(nn.Identity(), fixed_point_bits=0)


def test_wrapper_keeps_memcnn_semantics_on_the_engine() -> None:
    # keep_input, several inputs and outputs through the same engine as the sequence
    torch.manual_seed(0)
    wrapped = InvertibleModuleWrapper(AdditiveCoupling(nn.Linear(2, 2)), keep_input=True).double()
    ref = plain_copy(wrapped)
    x = torch.randn(3, 4, dtype=torch.float64)
    xs, xr = leaf_copy(x), leaf_copy(x)
    wrapped(xs).square().sum().backward()
    ref(xr).square().sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad)
    assert_grads_close(wrapped, ref)


def _compiled_copy(seq: ReversibleSequence, saving: bool) -> ReversibleSequence:
    copy = plain_copy(seq)
    copy.memory_saving = saving
    for block in copy:
        assert isinstance(block, AdditiveCoupling)
        block.Fm = torch.compile(block.Fm)  # type: ignore[assignment]
        block.Gm = torch.compile(block.Gm)  # type: ignore[assignment]
    return copy


def _mlp_chain(dropout: float) -> ReversibleSequence:
    torch.manual_seed(0)

    def fn() -> nn.Module:
        return nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Dropout(dropout), nn.Linear(8, 8))

    return ReversibleSequence(AdditiveCoupling(fn(), fn(), split_dim=-1) for _ in range(2))


@pytest.mark.slow
def test_compiled_functions_inside_a_sequence_give_eager_gradients() -> None:
    eager = _mlp_chain(0.0)
    compiled = _compiled_copy(eager, saving=True)
    x = torch.randn(4, 6, 16)
    xs, xr = leaf_copy(x), leaf_copy(x)
    compiled(xs).square().mean().backward()
    plain_copy(eager)(xr).square().mean().backward()  # plain autograd, eager
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiled_dropout_repeats_its_masks_in_the_recompute() -> None:
    # compiled dropout draws from its own generator, seeded from torch's: replaying torch's
    # random state before the recompute replays the compiled masks too
    chain = _mlp_chain(0.3)
    saving, plain = _compiled_copy(chain, saving=True), _compiled_copy(chain, saving=False)
    x = torch.randn(4, 6, 16)
    xs, xr = leaf_copy(x), leaf_copy(x)
    torch.manual_seed(5)
    saving(xs).square().mean().backward()
    torch.manual_seed(5)
    plain(xr).square().mean().backward()
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-5, atol=1e-7)


def test_downsampling_keeps_the_grid_so_a_fully_invertible_chain_is_bit_exact() -> None:
    torch.manual_seed(0)

    def coupling(channels: int) -> AdditiveCoupling:
        half = channels // 2
        return AdditiveCoupling(
            nn.Sequential(nn.Conv2d(half, half, 3, padding=1), nn.Tanh()), fixed_point_bits=16
        )

    seq = ReversibleSequence(coupling(4), InvertibleDownsampling(2), coupling(16)).eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        grid_x = torch.round(x * 2**16) / 2**16
        assert torch.equal(seq.inverse(seq(x)), grid_x)


@pytest.mark.parametrize("path", ["eval", "no_grad", "inverse"])
def test_leaving_the_exact_range_is_warned_about_on_every_path_not_only_while_saving(
    path: str,
) -> None:
    # an inverse or an eval-mode network relies on the grid as much as memory saving does
    seq = ReversibleSequence(AdditiveCoupling(nn.Linear(2, 2), fixed_point_bits=16))
    x = torch.full((3, 4), 300.0)  # 300 > 2**(24 - 16) = 256
    with pytest.warns(RuntimeWarning, match="left the exact range of fixed_point_bits=16"):
        if path == "eval":
            seq.eval()(x)
        elif path == "no_grad":
            with torch.no_grad():
                seq(x)
        else:
            seq.inverse(x)
