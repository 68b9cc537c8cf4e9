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


@pytest.mark.parametrize(
    "bad_shape",
    [
        None,
        True,
        3,
        "abc",
        ("a", 2),
        (2.5, 3),
        (2, True),
        (-1, 3),
        (2, None),
        ((2, 3), "x"),
        ((2, 3), None),
        ((2, 3), (4, (5,))),
        ((2, 3), (-2, 3)),
        {"shape": (2, 3)},
    ],
)
def test_a_malformed_shape_is_a_clear_error_naming_the_argument(bad_shape) -> None:
    # MemCNN raises ValueError too; ours used to fail inside list() for None or True
    with pytest.raises(ValueError, match=r"test_input_shape must be a tuple of ints.*got "):
        is_invertible_module(ElementwiseAffine((3,)), bad_shape)


def test_integer_scalars_such_as_numpys_are_sizes() -> None:
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    assert is_invertible_module(ElementwiseAffine((3,)), (np.int64(2), 3), atol=1e-5)


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


# -- modules whose outputs differ from their inputs in number or shape -----------------------
class SplitInTwo(nn.Module):
    """One input in, its two channel halves out (views of the input: no copy)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a, b = x.chunk(2, dim=1)
        return a, 2 * b

    def inverse(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.cat([a, b / 2], dim=1)


class MergeTwo(nn.Module):
    """Two inputs in, one output of twice the channels."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.cat([a, b + a], dim=1)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        a, c = y.chunk(2, dim=1)
        return a, c - a


class SpaceToDepth(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.pixel_unshuffle(x, 2)

    def inverse(self, y: Tensor) -> Tensor:
        return nn.functional.pixel_shuffle(y, 2)


class SplitWithWrongInverse(SplitInTwo):
    def inverse(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.cat([a, b], dim=1)


@pytest.mark.parametrize(
    ("module", "shape"),
    [(SplitInTwo(), (2, 4, 3)), (MergeTwo(), ((2, 3), (2, 3))), (SpaceToDepth(), (2, 3, 4, 6))],
    ids=["one-to-two", "two-to-one", "new-shape"],
)
def test_a_module_that_changes_the_number_or_shape_of_tensors_is_invertible(
    module: nn.Module, shape
) -> None:
    # the inverse is tried on the forward's outputs (as MemCNN does), not on tensors shaped
    # like the inputs; views of an input (a chunk) are not reported as shared memory
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert is_invertible_module(module, shape)


def test_a_splitting_module_with_a_wrong_inverse_is_not_invertible() -> None:
    assert not is_invertible_module(SplitWithWrongInverse(), (2, 4, 3))


def test_the_inverse_receives_the_forwards_outputs() -> None:
    forward_outputs: list[Tensor] = []
    inverse_inputs: list[Tensor] = []

    class Recording(SplitInTwo):
        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            out = super().forward(x)
            forward_outputs.extend(t.clone() for t in out)
            return out

        def inverse(self, a: Tensor, b: Tensor) -> Tensor:
            inverse_inputs.extend(t.clone() for t in (a, b))
            return super().inverse(a, b)

    assert is_invertible_module(Recording(), (2, 4, 3))
    assert len(inverse_inputs) == 2
    assert all(torch.equal(u, v) for u, v in zip(inverse_inputs, forward_outputs[:2]))


def test_a_forward_that_returns_no_tensor_is_a_clear_error() -> None:
    class ReturnsAList(SplitInTwo):
        def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
            return list(super().forward(x))

    with pytest.raises(
        TypeError, match="forward must return a tensor or a tuple of tensors, got list"
    ):
        is_invertible_module(ReturnsAList(), (2, 4, 3))


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


def test_parameters_the_forward_sets_are_restored() -> None:
    class FitsItsShiftOnFirstCall(ElementwiseAffine):
        def forward(self, x: Tensor) -> Tensor:
            if self.calls["forward"] == 0:
                with torch.no_grad():
                    self.shift.copy_(-x.mean(0))  # as ActNorm's data-dependent init does
            return super().forward(x)

    torch.manual_seed(0)
    module = FitsItsShiftOnFirstCall((3,))
    before = [p.clone() for p in module.parameters()]
    assert is_invertible_module(module, (4, 3), atol=1e-5)
    assert module.calls["forward"] > 0
    for p, saved in zip(module.parameters(), before):
        assert torch.equal(p, saved)


def test_a_graph_built_before_the_check_can_still_be_backpropagated() -> None:
    # nothing unchanged is written back, so no version counter of a saved tensor moves
    torch.manual_seed(0)
    module = TwoWayCoupling(3)
    a, b = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)
    c, d = module(a, b)
    assert is_invertible_module(module, ((4, 3), (4, 3)), atol=1e-5)
    (c.square().sum() + d.square().sum()).backward()
    assert a.grad is not None


def test_parameters_are_unchanged_and_get_no_gradient() -> None:
    torch.manual_seed(0)
    block = make_conv_coupling(4, dtype=torch.float32)
    before = [p.clone() for p in block.parameters()]
    is_invertible_module(block, SHAPE, atol=1e-5)
    for p, saved in zip(block.parameters(), before):
        assert torch.equal(p, saved)
        assert p.grad is None


# -- warnings --------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*an output of inverse shares memory")  # its inverse is y -> y
def test_all_zero_outputs_warn() -> None:
    with pytest.warns(UserWarning, match="all zeros"):
        assert not is_invertible_module(Zeroes(), (3, 4))


def test_an_ordinary_invertible_module_does_not_warn() -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert is_invertible_module(ElementwiseAffine((3, 4)), (3, 4), atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*an output of inverse shares memory")  # in place too
def test_an_output_sharing_memory_with_its_input_warns() -> None:
    # An in-place module cannot be checked by a round trip: the check must say so.
    with pytest.warns(UserWarning, match="an output of forward shares memory with an input"):
        is_invertible_module(InPlaceDouble(), (3, 4))


class Identity(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x

    def inverse(self, y: Tensor) -> Tensor:
        return y


class InPlaceInverse(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return 2 * x

    def inverse(self, y: Tensor) -> Tensor:
        return y.div_(2)


class Duplicate(nn.Module):
    """``(x, x)``, inverted by taking the first: invertible on its image, but aliased."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = 2 * x
        return y, y

    def inverse(self, a: Tensor, b: Tensor) -> Tensor:
        return a / 2


def test_an_identity_module_warns_that_its_output_is_its_input() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert is_invertible_module(Identity(), (3, 4))
    messages = {str(w.message).split(" (")[0] for w in caught}
    assert messages == {
        "is_invertible_module: an output of forward shares memory with an input",
        "is_invertible_module: an output of inverse shares memory with an input",
    }
    assert {w.filename for w in caught} == {__file__}  # reported at the caller's line


def test_an_inverse_that_works_in_place_warns() -> None:
    with pytest.warns(UserWarning, match="an output of inverse shares memory with an input"):
        assert is_invertible_module(InPlaceInverse(), (3, 4))


def test_outputs_sharing_memory_with_each_other_warn() -> None:
    with pytest.warns(UserWarning, match="outputs of forward share memory with each other"):
        is_invertible_module(Duplicate(), (3, 4))


def test_a_view_of_the_whole_input_counts_as_the_same_memory() -> None:
    class Flatten(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x.view(-1)

        def inverse(self, y: Tensor) -> Tensor:
            return y.view(3, 4)

    with pytest.warns(UserWarning, match="shares memory with an input"):
        assert is_invertible_module(Flatten(), (3, 4))
