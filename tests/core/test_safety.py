"""What the core refuses or protects against: each defect found by trying it as a user would.

The caller's tensors are never modified; module state is not advanced twice by the
recompute; drift and double backward are reported in words that say what to do; slicing,
dtypes and MemCNN's deprecated arguments behave as a user of either library expects.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations, spectral_norm

from conftest import assert_buffers_equal, assert_grads_close, leaf_copy, plain_copy
from invertible_core import (
    AdditiveCoupling,
    AffineCoupling,
    InvertibleModuleWrapper,
    ReversibleSequence,
    is_recomputing,
)


def in_place_first(channels: int) -> nn.Module:
    return nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 3, padding=1))


@pytest.mark.parametrize("mode", ["train", "eval", "no_grad"])
def test_an_in_place_function_never_overwrites_the_callers_input(mode: str) -> None:
    torch.manual_seed(0)
    seq = ReversibleSequence(AdditiveCoupling(in_place_first(2)) for _ in range(2))
    seq.train(mode == "train")
    x = torch.randn(2, 4, 5, 5, requires_grad=mode == "train")
    before = x.detach().clone()
    context = torch.no_grad() if mode == "no_grad" else torch.enable_grad()
    with (
        context,
        pytest.raises(RuntimeError, match="modified one of its inputs in place.*Nothing of yours"),
    ):
        seq(x)
    torch.testing.assert_close(x.detach(), before, rtol=0, atol=0)


def test_an_in_place_function_is_refused_by_the_wrapper_too() -> None:
    torch.manual_seed(0)
    wrapped = InvertibleModuleWrapper(AdditiveCoupling(in_place_first(2)))
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    before = x.detach().clone()
    with pytest.raises(RuntimeError, match="nn.ReLU\\(inplace=False\\)"):
        wrapped(x)
    torch.testing.assert_close(x.detach(), before, rtol=0, atol=0)


def test_a_function_that_writes_a_side_input_is_refused() -> None:
    class WritesMask(nn.Module):
        def forward(self, x: Tensor, mask: Tensor) -> Tensor:
            mask.fill_(0)
            return x

    seq = ReversibleSequence(AdditiveCoupling(WritesMask(), split_dim=-1))
    with pytest.raises(RuntimeError, match="modified one of its inputs in place.*side input"):
        seq(torch.randn(2, 4, requires_grad=True), torch.ones(2, 2))


def test_in_place_ops_inside_a_function_on_its_own_results_are_fine() -> None:
    # only the inputs must stay unchanged: the usual conv -> BN -> ReLU(inplace) is safe
    torch.manual_seed(0)
    fm = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(inplace=True))
    seq = ReversibleSequence(AdditiveCoupling(fm) for _ in range(3)).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    ref = plain_copy(seq)
    xs, xr = leaf_copy(x), leaf_copy(x)
    seq(xs).square().sum().backward()
    ref(xr).square().sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad)
    assert_grads_close(seq, ref)


@pytest.mark.parametrize("api", ["spectral_norm", "parametrizations"])
def test_spectral_norm_inside_fm_gives_the_gradients_of_plain_autograd(api: str) -> None:
    # the recompute must see the power-iteration vectors as the forward pass did, and the
    # step must advance them once
    def function() -> nn.Module:
        lin = nn.Linear(3, 3)
        return spectral_norm(lin) if api == "spectral_norm" else parametrizations.spectral_norm(lin)

    torch.manual_seed(0)
    seq = ReversibleSequence(AdditiveCoupling(function(), function()) for _ in range(3)).double()
    ref = plain_copy(seq)
    x = torch.randn(4, 6, dtype=torch.float64)
    for _ in range(2):  # two steps: the state after the first must match too
        xs, xr = leaf_copy(x), leaf_copy(x)
        seq.zero_grad()
        ref.zero_grad()
        seq(xs).square().sum().backward()
        ref(xr).square().sum().backward()
        torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-10, atol=1e-12)
        assert_grads_close(seq, ref)
        assert_buffers_equal(seq, ref)


def test_forward_hooks_fire_in_the_recompute_and_can_tell() -> None:
    seen: list[bool] = []
    lin = nn.Linear(2, 2)
    lin.register_forward_hook(lambda *_: seen.append(is_recomputing()))
    seq = ReversibleSequence(AdditiveCoupling(lin))
    seq(torch.randn(3, 4, requires_grad=True)).sum().backward()
    # Gm is a deep copy of Fm, hook included: Fm and Gm in the forward pass, then both again
    # in the recompute (documented: hooks fire twice), which is_recomputing() tells apart
    assert seen == [False, False, True, True]


def test_drift_of_an_unnormalised_deep_float32_stack_is_reported() -> None:
    torch.manual_seed(0)
    seq = ReversibleSequence(
        AdditiveCoupling(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)))
        for _ in range(64)
    )
    for p in seq.parameters():
        p.data.mul_(3.0)
    x = torch.randn(16, 16, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="anchor_every.*fixed_point_bits"):
        seq(x).square().mean().backward()
    with warnings.catch_warnings():  # warned once, not at every step
        warnings.simplefilter("error")
        seq(x).square().mean().backward()


def test_no_drift_warning_on_a_well_conditioned_chain() -> None:
    torch.manual_seed(0)
    seq = ReversibleSequence(
        AdditiveCoupling(nn.Sequential(nn.Linear(8, 8), nn.Tanh())) for _ in range(16)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seq(torch.randn(16, 16, requires_grad=True)).square().mean().backward()


def test_drift_check_can_be_switched_off() -> None:
    torch.manual_seed(0)
    seq = ReversibleSequence(
        (
            AdditiveCoupling(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)))
            for _ in range(64)
        ),
        drift_check=False,
    )
    for p in seq.parameters():
        p.data.mul_(3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seq(torch.randn(16, 16, requires_grad=True)).square().mean().backward()


def test_double_backward_says_to_turn_memory_saving_off() -> None:
    seq = ReversibleSequence(AdditiveCoupling(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(seq(x).square().sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward.*memory_saving=False"):
        grad.sum().backward()
    # with memory_saving=False it is plain autograd, and second derivatives work
    seq.memory_saving = False
    (grad,) = torch.autograd.grad(seq(x).square().sum(), [x], create_graph=True)
    grad.sum().backward()
    assert x.grad is not None


def test_slicing_returns_a_sequence_of_the_same_blocks() -> None:
    seq = ReversibleSequence(
        [AdditiveCoupling(nn.Linear(2, 2)) for _ in range(4)],
        anchor_every=2,
        preserve_rng_state=[True, False, True, False],
    )
    part = seq[1:3]
    assert isinstance(part, ReversibleSequence) and len(part) == 2
    assert part[0] is seq[1] and part[1] is seq[2]
    assert part.anchor_every == 2 and part.preserve_rng_state == [False, True]
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(part(seq[0:1](x)), seq[0:3](x))
    with pytest.raises(IndexError, match="selects no block"):
        seq[4:]


def test_fm_returning_a_wider_dtype_is_a_clear_error() -> None:
    class Widening(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x.double() * 2

    coupling = AdditiveCoupling(Widening())
    with pytest.raises(
        TypeError, match="Fm returned dtype torch.float64 for a part of dtype torch.float32"
    ):
        coupling(torch.randn(3, 4))


def test_a_narrower_dtype_under_autocast_is_accepted() -> None:
    coupling = AdditiveCoupling(nn.Linear(2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert coupling(torch.randn(3, 4)).dtype == torch.float32


@pytest.mark.parametrize("value", [-2, 2, 7])
@pytest.mark.parametrize("coupling_cls", [AdditiveCoupling, AffineCoupling])
def test_an_unknown_implementation_is_not_implemented_as_in_memcnn(
    coupling_cls: type, value: int
) -> None:
    with pytest.raises(NotImplementedError, match=f"implementation_fwd={value}"):
        coupling_cls(nn.Identity(), implementation_fwd=value)
    with pytest.raises(NotImplementedError, match=f"implementation_bwd={value}"):
        coupling_cls(nn.Identity(), implementation_bwd=value)


@pytest.mark.parametrize("value", [0, 1])
def test_memcnns_implementations_zero_and_one_are_accepted_and_deprecated(value: int) -> None:
    with pytest.warns(DeprecationWarning, match="deprecated and ignored"):
        AdditiveCoupling(nn.Identity(), implementation_fwd=value, implementation_bwd=value)
