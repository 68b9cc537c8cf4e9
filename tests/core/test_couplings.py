"""Couplings: the formulas, their inverses, the adapters, the factory, and clear errors."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch import nn

from conftest import conv_function, make_conv_coupling
from invertible_core import (
    AdditiveCoupling,
    AffineAdapterNaive,
    AffineAdapterSigmoid,
    AffineCoupling,
    Coupling,
    ReversibleBlock,
    create_coupling,
)

F64 = torch.float64


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


class ScaleShift(nn.Module):
    """Returns ``(scale, shift)`` directly, as AffineCoupling expects without an adapter."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv(x)
        return torch.sigmoid(h) + 0.5, h


# -- formulas and round trips ----------------------------------------------------------------
@pytest.mark.parametrize("coupling", ["additive", "affine"])
def test_inverse_undoes_forward(coupling: str) -> None:
    torch.manual_seed(0)
    block = make_conv_coupling(4, coupling)
    x = _x(2, 4, 5, 5)
    with torch.no_grad():
        y = block(x)
        torch.testing.assert_close(block.inverse(y), x)
        torch.testing.assert_close(block(block.inverse(x)), x)
    assert not torch.allclose(y, x), "the coupling must actually transform its input"


def test_additive_coupling_computes_y1_x1_plus_fm_x2_then_y2_x2_plus_gm_y1() -> None:
    torch.manual_seed(0)
    fm, gm = conv_function(2).double(), conv_function(2).double()
    block = AdditiveCoupling(fm, gm)
    x = _x(2, 4, 5, 5)
    x1, x2 = x[:, :2], x[:, 2:]
    y1 = x1 + fm(x2)
    y2 = x2 + gm(y1)
    torch.testing.assert_close(block(x), torch.cat([y1, y2], dim=1))


def test_additive_inverse_computes_x2_y2_minus_gm_y1_then_x1_y1_minus_fm_x2() -> None:
    torch.manual_seed(0)
    fm, gm = conv_function(2).double(), conv_function(2).double()
    block = AdditiveCoupling(fm, gm)
    y = _x(2, 4, 5, 5)
    y1, y2 = y[:, :2], y[:, 2:]
    x2 = y2 - gm(y1)
    x1 = y1 - fm(x2)
    torch.testing.assert_close(block.inverse(y), torch.cat([x1, x2], dim=1))


def test_affine_coupling_computes_x_times_scale_plus_shift() -> None:
    torch.manual_seed(0)
    fm, gm = ScaleShift(2).double(), ScaleShift(2).double()
    block = AffineCoupling(fm, gm)
    x = _x(2, 4, 5, 5)
    x1, x2 = x[:, :2], x[:, 2:]
    s1, t1 = fm(x2)
    y1 = x1 * s1 + t1
    s2, t2 = gm(y1)
    y2 = x2 * s2 + t2
    torch.testing.assert_close(block(x), torch.cat([y1, y2], dim=1))


def test_affine_inverse_computes_y_minus_shift_over_scale() -> None:
    torch.manual_seed(0)
    fm, gm = ScaleShift(2).double(), ScaleShift(2).double()
    block = AffineCoupling(fm, gm)
    y = _x(2, 4, 5, 5)
    y1, y2 = y[:, :2], y[:, 2:]
    s2, t2 = gm(y1)
    x2 = (y2 - t2) / s2
    s1, t1 = fm(x2)
    x1 = (y1 - t1) / s1
    torch.testing.assert_close(block.inverse(y), torch.cat([x1, x2], dim=1))


@pytest.mark.parametrize("coupling_cls", [AdditiveCoupling, AffineCoupling])
def test_gm_none_deep_copies_fm_with_same_weights_and_separate_parameters(coupling_cls) -> None:
    fm = nn.Conv2d(2, 2, 3, padding=1)
    block = (
        coupling_cls(fm, adapter=AffineAdapterNaive)
        if coupling_cls is AffineCoupling
        else coupling_cls(fm)
    )
    f_params = list(block.Fm.parameters())
    g_params = list(block.Gm.parameters())
    assert len(f_params) == len(g_params) == 2
    for f, g in zip(f_params, g_params):
        assert torch.equal(f, g)
        assert f.data_ptr() != g.data_ptr()
    assert {id(p) for p in block.parameters()} == {id(p) for p in (*f_params, *g_params)}
    with torch.no_grad():
        f_params[0].add_(1.0)
    assert not torch.equal(f_params[0], g_params[0])


@pytest.mark.parametrize("split_dim", [0, 1, 2, 3, -1, -2, -3, -4])
def test_split_dim_splits_along_that_dim(split_dim: int) -> None:
    torch.manual_seed(0)
    block = make_conv_coupling(4, split_dim=split_dim)
    x = _x(4, 4, 4, 6)
    x1, x2 = torch.chunk(x, 2, dim=split_dim)
    with torch.no_grad():
        y = block(x)
        y1 = x1 + block.Fm(x2)
        expected = torch.cat([y1, x2 + block.Gm(y1)], dim=split_dim)
        torch.testing.assert_close(y, expected)
        torch.testing.assert_close(block.inverse(y), x)


@pytest.mark.parametrize("split_dim", [0, 2, -1])
def test_create_coupling_passes_split_dim(split_dim: int) -> None:
    block = create_coupling(nn.Identity(), coupling="additive", split_dim=split_dim)
    assert block.split_dim == split_dim
    x = _x(4, 4, 4, 4)
    x1, x2 = torch.chunk(x, 2, dim=split_dim)
    torch.testing.assert_close(block(x), torch.cat([x1 + x2, x1 + 2 * x2], dim=split_dim))


# -- adapters --------------------------------------------------------------------------------
def test_affine_adapter_naive_returns_exp_h_and_h() -> None:
    torch.manual_seed(0)
    module = nn.Conv2d(2, 2, 3, padding=1).double()
    x = _x(2, 2, 4, 4)
    scale, shift = AffineAdapterNaive(module)(x)
    h = module(x)
    torch.testing.assert_close(scale, torch.exp(h))
    torch.testing.assert_close(shift, h)


def test_affine_adapter_sigmoid_returns_sigmoid_of_odd_channels_plus_2_and_even_channels() -> None:
    torch.manual_seed(0)
    module = nn.Conv2d(2, 4, 3, padding=1).double()
    x = _x(2, 2, 4, 4)
    scale, shift = AffineAdapterSigmoid(module)(x)
    h = module(x)
    torch.testing.assert_close(scale, torch.sigmoid(h[:, 1::2] + 2.0))
    torch.testing.assert_close(shift, h[:, 0::2])
    assert scale.shape == shift.shape == x.shape


@pytest.mark.parametrize("adapter", [AffineAdapterNaive, AffineAdapterSigmoid])
def test_affine_coupling_with_adapter_round_trips(adapter) -> None:
    torch.manual_seed(0)
    out = 4 if adapter is AffineAdapterSigmoid else 2
    block = AffineCoupling(nn.Conv2d(2, out, 3, padding=1), adapter=adapter).double()
    assert isinstance(block.Fm, adapter) and isinstance(block.Gm, adapter)
    x = _x(2, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(block.inverse(block(x)), x)


# -- factory and deprecations ----------------------------------------------------------------
def test_create_coupling_builds_additive_and_affine_by_name() -> None:
    additive = create_coupling(nn.Identity(), coupling="additive")
    affine = create_coupling(nn.Identity(), coupling="affine", adapter=AffineAdapterNaive)
    assert type(additive) is AdditiveCoupling
    assert type(affine) is AffineCoupling
    assert isinstance(affine.Fm, AffineAdapterNaive)
    assert type(create_coupling(nn.Identity())) is AdditiveCoupling


def test_create_coupling_rejects_an_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"'bogus'.*additive.*affine"):
        create_coupling(nn.Identity(), coupling="bogus")


def test_create_coupling_ignores_an_adapter_for_additive_with_a_warning() -> None:
    # MemCNN ignores the adapter of an additive coupling; migrated code must keep working
    with pytest.warns(UserWarning, match="adapter applies only to coupling='affine'"):
        coupling = create_coupling(nn.Identity(), coupling="additive", adapter=AffineAdapterNaive)
    assert isinstance(coupling, AdditiveCoupling)
    assert isinstance(coupling.Fm, nn.Identity)


@pytest.mark.parametrize("coupling_cls", [AdditiveCoupling, AffineCoupling])
@pytest.mark.parametrize("argument", ["implementation_fwd", "implementation_bwd"])
def test_deprecated_implementation_arguments_warn(coupling_cls, argument: str) -> None:
    with pytest.warns(DeprecationWarning, match="implementation_fwd/implementation_bwd"):
        coupling_cls(nn.Identity(), **{argument: 0})


def test_default_implementation_arguments_do_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdditiveCoupling(nn.Identity())
        AffineCoupling(nn.Identity(), adapter=AffineAdapterNaive)
        create_coupling(nn.Identity(), coupling="affine", adapter=AffineAdapterNaive)


def test_create_coupling_forwards_deprecated_arguments_with_a_warning() -> None:
    with pytest.warns(DeprecationWarning):
        create_coupling(nn.Identity(), implementation_fwd=1)


def test_reversible_block_is_deprecated_but_builds_a_working_wrapper() -> None:
    with pytest.warns(DeprecationWarning, match="ReversibleBlock is deprecated"):
        block = ReversibleBlock(nn.Conv2d(2, 2, 3, padding=1), coupling="additive")
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(block.inverse(block(x)), x, atol=1e-5, rtol=1e-5)


# -- clear errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("coupling", ["additive", "affine"])
def test_odd_split_size_names_the_dim_and_its_size(coupling: str) -> None:
    block = make_conv_coupling(4, coupling, split_dim=2)
    with pytest.raises(ValueError, match=r"dim 2 .*odd size 5"):
        block(_x(1, 4, 5, 4))


def test_split_dim_out_of_range_is_a_clear_error() -> None:
    block = AdditiveCoupling(nn.Identity(), split_dim=4)
    with pytest.raises(ValueError, match="split_dim=4 is out of range"):
        block(_x(2, 4, 4, 4))


def test_additive_fm_changing_the_shape_is_a_clear_error() -> None:
    block = AdditiveCoupling(nn.Conv2d(2, 3, 3, padding=1)).double()
    with pytest.raises(ValueError, match=r"Fm returned shape \(1, 3, 4, 4\).*\(1, 2, 4, 4\)"):
        block(_x(1, 4, 4, 4))


def test_additive_gm_changing_the_shape_is_a_clear_error() -> None:
    block = AdditiveCoupling(nn.Identity(), nn.Conv2d(2, 3, 3, padding=1)).double()
    with pytest.raises(ValueError, match="Gm returned shape"):
        block(_x(1, 4, 4, 4))


def test_additive_fm_returning_a_tuple_is_a_clear_error() -> None:
    block = AdditiveCoupling(AffineAdapterNaive(nn.Identity()))
    with pytest.raises(TypeError, match=r"Fm must return a tensor.*AffineCoupling"):
        block(_x(1, 4, 4, 4))


def test_affine_adapter_output_of_wrong_shape_is_a_clear_error() -> None:
    block = AffineCoupling(nn.Conv2d(2, 3, 3, padding=1), adapter=AffineAdapterNaive).double()
    with pytest.raises(ValueError, match=r"Fm returned a scale of shape \(1, 3, 4, 4\)"):
        block(_x(1, 4, 4, 4))


def test_affine_adapter_sigmoid_with_odd_channels_is_a_clear_error() -> None:
    adapter = AffineAdapterSigmoid(nn.Conv2d(2, 3, 3, padding=1).double())
    with pytest.raises(ValueError, match=r"twice the channels.*\(1, 3, 4, 4\)"):
        adapter(_x(1, 2, 4, 4))


def test_affine_fm_returning_one_tensor_is_a_clear_error() -> None:
    block = AffineCoupling(nn.Identity())
    with pytest.raises(TypeError, match=r"\(scale, shift\) pair.*adapter"):
        block(_x(1, 4, 4, 4))


@pytest.mark.parametrize("bad_input", [[1.0, 2.0], 3.0, None])
def test_non_tensor_input_is_a_clear_error(bad_input) -> None:
    block = AdditiveCoupling(nn.Identity())
    with pytest.raises(TypeError, match="AdditiveCoupling expects a tensor, got"):
        block(bad_input)
    with pytest.raises(TypeError, match="expects a tensor"):
        block.inverse(bad_input)


@pytest.mark.parametrize("coupling_cls", [AdditiveCoupling, AffineCoupling])
def test_fm_not_a_module_is_a_clear_error(coupling_cls) -> None:
    with pytest.raises(TypeError, match=r"Fm must be a torch.nn.Module, got function"):
        coupling_cls(lambda x: x)


def test_gm_not_a_module_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match=r"Gm must be a torch.nn.Module or None, got function"):
        AdditiveCoupling(nn.Identity(), lambda x: x)


def test_split_dim_must_be_an_int() -> None:
    with pytest.raises(TypeError, match="split_dim must be an int"):
        AdditiveCoupling(nn.Identity(), split_dim=1.0)  # type: ignore[arg-type]


def test_the_coupling_base_class_has_no_law_of_its_own() -> None:
    block = Coupling(nn.Identity())
    with pytest.raises(NotImplementedError):
        block(_x(1, 4))
    with pytest.raises(NotImplementedError):
        block.inverse(_x(1, 4))


def test_signatures_match_memcnn() -> None:
    """MemCNN's parameters, in MemCNN's order; our additions are keyword-only after them."""

    def names(fn) -> list[str]:
        return [n for n in inspect.signature(fn).parameters if n != "self"]

    def positional(fn) -> list[str]:
        return [
            n
            for n, p in inspect.signature(fn).parameters.items()
            if n != "self" and p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        ]

    assert positional(AdditiveCoupling.__init__) == [
        "Fm",
        "Gm",
        "implementation_fwd",
        "implementation_bwd",
        "split_dim",
    ]
    assert positional(AffineCoupling.__init__) == [
        "Fm",
        "Gm",
        "adapter",
        "implementation_fwd",
        "implementation_bwd",
        "split_dim",
    ]
    assert names(create_coupling)[:6] == [
        "Fm",
        "Gm",
        "coupling",
        "implementation_fwd",
        "implementation_bwd",
        "adapter",
    ]
    assert "split_dim" in names(create_coupling)
