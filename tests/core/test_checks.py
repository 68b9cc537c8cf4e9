"""is_invertible_module: MemCNN's check, but without side effects on the module or the program."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from conftest import ElementwiseAffine, TwoWayCoupling, make_conv_coupling
from invertible_core import AdditiveCoupling, InvertibleModuleWrapper, is_invertible_module

SHAPE = (2, 4, 5, 5)


class WrongInverse(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return 2 * x

    def inverse(self, y: Tensor) -> Tensor:
        return y / 3


class NoInverse(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


class InverseOnlyOneWay(nn.Module):
    """``inverse(forward(x)) == x`` but ``forward(inverse(y)) != y``: not invertible."""

    def forward(self, x: Tensor) -> Tensor:
        return x.abs()

    def inverse(self, y: Tensor) -> Tensor:
        return y - 1


class Zeroes(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)

    def inverse(self, y: Tensor) -> Tensor:
        return y


class InPlaceDouble(nn.Module):
    """Invertible, but works in place: its output shares memory with its input."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mul_(2)

    def inverse(self, y: Tensor) -> Tensor:
        return y.div_(2)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("coupling", ["additive", "affine"])
def test_a_coupling_is_invertible_in_train_and_eval_mode(coupling: str, training: bool) -> None:
    torch.manual_seed(0)
    block = make_conv_coupling(4, coupling, batchnorm=True, dtype=torch.float32).train(training)
    assert is_invertible_module(block, SHAPE, atol=1e-5)


def test_a_coupling_is_invertible_with_memcnns_default_arguments() -> None:
    torch.manual_seed(0)
    fm = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU())
    assert is_invertible_module(AdditiveCoupling(fm), test_input_shape=SHAPE)


def test_a_coupling_is_invertible_in_float64_with_a_tight_tolerance() -> None:
    torch.manual_seed(0)
    block = make_conv_coupling(4)
    assert is_invertible_module(block, SHAPE, test_input_dtype=torch.float64, atol=1e-12)


@pytest.mark.parametrize("training", [True, False])
def test_the_wrapper_is_invertible(training: bool) -> None:
    torch.manual_seed(0)
    wrapped = InvertibleModuleWrapper(make_conv_coupling(4, dtype=torch.float32)).train(training)
    assert is_invertible_module(wrapped, SHAPE, atol=1e-5)


def test_a_generic_invertible_module_is_invertible() -> None:
    torch.manual_seed(0)
    assert is_invertible_module(ElementwiseAffine((3, 4)), (3, 4), atol=1e-5)


def test_a_module_with_a_wrong_inverse_is_not_invertible() -> None:
    assert not is_invertible_module(WrongInverse(), (3, 4))


def test_a_module_whose_inverse_only_works_one_way_is_not_invertible() -> None:
    assert not is_invertible_module(InverseOnlyOneWay(), (3, 4))


def test_a_module_without_inverse_is_not_invertible() -> None:
    assert not is_invertible_module(NoInverse(), (3, 4))


def test_several_inputs_take_a_tuple_of_shapes() -> None:
    torch.manual_seed(0)
    module = TwoWayCoupling(3)
    assert is_invertible_module(module, ((4, 3), (4, 3)), atol=1e-5)
    assert is_invertible_module(InvertibleModuleWrapper(module), ((4, 3), (4, 3)), atol=1e-5)


def test_a_single_shape_may_be_a_list_or_a_torch_size() -> None:
    torch.manual_seed(0)
    block = make_conv_coupling(4, dtype=torch.float32)
    assert is_invertible_module(block, list(SHAPE), atol=1e-5)
    assert is_invertible_module(block, torch.Size(SHAPE), atol=1e-5)


@pytest.mark.parametrize("bad_shape", ["abc", ("a", 2), (2.5, 3), ((2, 3), "x")])
def test_a_malformed_shape_is_a_clear_error(bad_shape) -> None:
    with pytest.raises(ValueError, match="test_input_shape must be a tuple of ints"):
        is_invertible_module(ElementwiseAffine((3,)), bad_shape)


def test_the_check_uses_the_requested_dtype() -> None:
    seen: list[torch.dtype] = []
    module = ElementwiseAffine((3,)).double()
    module.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    assert is_invertible_module(module, (2, 3), test_input_dtype=torch.float64)
    assert seen and set(seen) == {torch.float64}


def test_the_check_is_reproducible_for_a_seed_and_varies_with_it() -> None:
    inputs: list[Tensor] = []
    module = ElementwiseAffine((3,))
    module.register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone()))
    is_invertible_module(module, (2, 3), atol=1e-5, random_seed=1)
    is_invertible_module(module, (2, 3), atol=1e-5, random_seed=1)
    is_invertible_module(module, (2, 3), atol=1e-5, random_seed=2)
    assert torch.equal(inputs[0], inputs[2])
    assert not torch.equal(inputs[0], inputs[4])


# -- no side effects -------------------------------------------------------------------------
def test_the_global_random_state_is_unchanged() -> None:
    # Dropout draws from the global generator; MemCNN's check also reseeded it.
    torch.manual_seed(1234)
    block = make_conv_coupling(4, dropout=0.5, dtype=torch.float32).train()
    before = torch.get_rng_state()
    is_invertible_module(block, SHAPE)
    assert torch.equal(torch.get_rng_state(), before)


def test_batchnorm_statistics_are_unchanged() -> None:
    torch.manual_seed(0)
    block = make_conv_coupling(4, batchnorm=True, dtype=torch.float32).train()
    before = {name: b.clone() for name, b in block.named_buffers()}
    assert {n for n in before if n.endswith("num_batches_tracked")} == {
        "Fm.1.num_batches_tracked",
        "Gm.1.num_batches_tracked",
    }
    assert is_invertible_module(block, SHAPE, atol=1e-5)
    for name, b in block.named_buffers():
        assert torch.equal(b, before[name]), f"{name} changed"


def test_train_and_eval_flags_are_unchanged() -> None:
    class SetsItsOwnMode(ElementwiseAffine):
        def forward(self, x: Tensor) -> Tensor:
            self.eval()  # a module that flips modes as a side effect of running
            return super().forward(x)

    torch.manual_seed(0)
    block = make_conv_coupling(4, batchnorm=True, dtype=torch.float32).train()
    block.Gm.eval()
    modes = [m.training for m in block.modules()]
    is_invertible_module(block, SHAPE, atol=1e-5)
    assert [m.training for m in block.modules()] == modes

    flipper = SetsItsOwnMode((3,)).train()
    is_invertible_module(flipper, (2, 3), atol=1e-5)
    assert flipper.training


def test_parameters_are_unchanged_and_get_no_gradient() -> None:
    torch.manual_seed(0)
    block = make_conv_coupling(4, dtype=torch.float32)
    before = [p.clone() for p in block.parameters()]
    is_invertible_module(block, SHAPE, atol=1e-5)
    for p, saved in zip(block.parameters(), before):
        assert torch.equal(p, saved)
        assert p.grad is None


# -- warnings --------------------------------------------------------------------------------
def test_all_zero_outputs_warn() -> None:
    with pytest.warns(UserWarning, match="all zeros"):
        assert not is_invertible_module(Zeroes(), (3, 4))


def test_an_ordinary_invertible_module_does_not_warn() -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert is_invertible_module(ElementwiseAffine((3, 4)), (3, 4), atol=1e-5)


def test_an_output_sharing_memory_with_its_input_warns() -> None:
    # An in-place module cannot be checked by a round trip: the check must say so.
    with pytest.warns(UserWarning, match="shares memory"):
        is_invertible_module(InPlaceDouble(), (3, 4))
