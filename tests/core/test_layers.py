"""The invertible layers: exact inverses, log-determinants against the brute-force Jacobian.

InvertibleDownsampling, HaarDownsampling, OrthogonalDownsampling, OrthogonalUpsampling,
InvertibleConv1x1, ActNorm and Permutation, each honouring the LogDetBlock contract, on 1D,
2D and 3D data (3-, 4- and 5-D tensors). Float64 throughout where precision is asserted.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from invertible_core import (
    ActNorm,
    HaarDownsampling,
    InvertibleConv1x1,
    InvertibleDownsampling,
    LogDetBlock,
    OrthogonalDownsampling,
    OrthogonalUpsampling,
    Permutation,
    ReversibleSequence,
    is_invertible_module,
)
from invertible_core.recompute import recomputing

DTYPE = torch.float64


def _perturbed(layer: nn.Module, scale: float = 0.3) -> nn.Module:
    """``layer`` in float64 with every parameter moved off its initial value (seeded)."""
    generator = torch.Generator().manual_seed(7)
    layer = layer.to(DTYPE)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=DTYPE))
    return layer


def _initialised_actnorm(channels: int, shape: tuple[int, ...], dim: int = 1) -> ActNorm:
    layer = ActNorm(channels, dim=dim).to(DTYPE).train()
    generator = torch.Generator().manual_seed(3)
    layer(3.0 * torch.randn(shape, generator=generator, dtype=DTYPE) + 1.5)
    return layer


# (name, layer builder, input shape): every layer, and every kind of input it accepts
CASES: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("downsampling", lambda: InvertibleDownsampling().to(DTYPE), (2, 3, 4, 4)),
    ("downsampling-3", lambda: InvertibleDownsampling(3).to(DTYPE), (2, 2, 3, 6)),
    ("downsampling-1d", lambda: InvertibleDownsampling(2).to(DTYPE), (2, 3, 6)),
    ("downsampling-3d", lambda: InvertibleDownsampling(2).to(DTYPE), (2, 2, 2, 4, 2)),
    ("downsampling-3d-221", lambda: InvertibleDownsampling((2, 2, 1)).to(DTYPE), (2, 2, 2, 4, 3)),
    ("downsampling-2d-13", lambda: InvertibleDownsampling((1, 3)).to(DTYPE), (2, 2, 2, 6)),
    ("haar", lambda: HaarDownsampling().to(DTYPE), (2, 3, 4, 2)),
    ("haar-1d", lambda: HaarDownsampling().to(DTYPE), (2, 3, 6)),
    ("haar-3d", lambda: HaarDownsampling().to(DTYPE), (2, 2, 2, 4, 2)),
    ("haar-3d-122", lambda: HaarDownsampling((1, 2, 2)).to(DTYPE), (2, 2, 3, 2, 4)),
    ("orthogonal-1d-exp", lambda: _perturbed(OrthogonalDownsampling(3, dim=1)), (2, 3, 6)),
    (
        "orthogonal-2d-cayley",
        lambda: _perturbed(OrthogonalDownsampling(2, dim=2, method="cayley")),
        (2, 2, 4, 2),
    ),
    (
        "orthogonal-3d-221-random",
        lambda: _perturbed(OrthogonalDownsampling(2, dim=3, factor=(2, 2, 1), init="random")),
        (2, 2, 2, 4, 3),
    ),
    (
        "orthogonal-2d-factor-3",
        lambda: _perturbed(OrthogonalDownsampling(1, dim=2, factor=3, init="squeeze")),
        (2, 1, 3, 3),
    ),
    ("upsampling-2d-exp", lambda: _perturbed(OrthogonalUpsampling(2, dim=2)), (2, 8, 2, 1)),
    (
        "upsampling-3d-cayley",
        lambda: _perturbed(OrthogonalUpsampling(1, dim=3, method="cayley")),
        (2, 8, 1, 2, 1),
    ),
    ("conv1x1-lu", lambda: _perturbed(InvertibleConv1x1(3, seed=0)), (2, 3, 2, 3)),
    ("conv1x1-full", lambda: _perturbed(InvertibleConv1x1(3, lu=False, seed=0)), (2, 3, 2, 3)),
    ("conv1x1-vectors", lambda: _perturbed(InvertibleConv1x1(4, seed=1)), (2, 4)),
    ("conv1x1-sequence", lambda: _perturbed(InvertibleConv1x1(3, seed=2)), (2, 3, 5)),
    ("conv1x1-channels-last", lambda: _perturbed(InvertibleConv1x1(3, dim=-1, seed=3)), (2, 5, 3)),
    ("conv1x1-volume", lambda: _perturbed(InvertibleConv1x1(2, seed=4)), (2, 2, 2, 2, 2)),
    ("actnorm", lambda: _initialised_actnorm(3, (4, 3, 2, 3)), (2, 3, 2, 3)),
    ("actnorm-vectors", lambda: _initialised_actnorm(4, (8, 4)), (2, 4)),
    ("actnorm-1d", lambda: _initialised_actnorm(3, (4, 3, 5)), (2, 3, 4)),
    ("actnorm-3d", lambda: _initialised_actnorm(2, (4, 2, 2, 3, 2)), (2, 2, 2, 2, 3)),
    ("actnorm-channels-last", lambda: _initialised_actnorm(3, (2, 5, 3), dim=-1), (2, 5, 3)),
    ("permutation", lambda: Permutation(5, seed=1).to(DTYPE), (2, 5, 2, 2)),
    ("permutation-channels-last", lambda: Permutation(4, seed=2, dim=-1).to(DTYPE), (2, 3, 4)),
]
IDS = [name for name, _, _ in CASES]


@pytest.fixture(params=CASES, ids=IDS)
def case(request: pytest.FixtureRequest) -> tuple[nn.Module, Tensor]:
    _, build, shape = request.param
    torch.manual_seed(0)
    return build(), torch.randn(shape, dtype=DTYPE)


def _jacobian_logdets(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``log|det d fn(x)_b / d x_b|`` per sample, from the full Jacobian (must be block-diagonal)."""
    y = fn(x)
    batch = x.shape[0]
    jac = torch.autograd.functional.jacobian(fn, x)
    jac = jac.reshape(batch, y[0].numel(), batch, x[0].numel())
    for b in range(batch):
        for c in range(batch):
            if b != c:
                assert torch.count_nonzero(jac[b, :, c, :]) == 0, "samples must not interact"
    return torch.stack([torch.linalg.slogdet(jac[b, :, b, :]).logabsdet for b in range(batch)])


# -- every layer ----------------------------------------------------------------------------
def test_inverse_undoes_forward(case: tuple[nn.Module, Tensor]) -> None:
    layer, x = case
    torch.testing.assert_close(layer.inverse(layer(x)), x, rtol=0, atol=1e-12)


def test_forward_undoes_inverse(case: tuple[nn.Module, Tensor]) -> None:
    layer, x = case
    y = torch.randn_like(layer(x))
    torch.testing.assert_close(layer(layer.inverse(y)), y, rtol=0, atol=1e-12)


def test_forward_logdet_is_that_of_the_jacobian(case: tuple[nn.Module, Tensor]) -> None:
    layer, x = case
    y, logdet = layer.forward_with_logdet(x)
    assert logdet.shape == (x.shape[0],)
    torch.testing.assert_close(y, layer(x), rtol=0, atol=0)
    torch.testing.assert_close(logdet, _jacobian_logdets(layer, x), rtol=0, atol=1e-10)


def test_inverse_logdet_is_that_of_the_jacobian_and_the_negative_of_the_forwards(
    case: tuple[nn.Module, Tensor],
) -> None:
    layer, x = case
    y, forward_logdet = layer.forward_with_logdet(x)
    x_back, logdet = layer.inverse_with_logdet(y)
    assert logdet.shape == (x.shape[0],)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(logdet, _jacobian_logdets(layer.inverse, y), rtol=0, atol=1e-10)
    torch.testing.assert_close(logdet, -forward_logdet, rtol=0, atol=1e-12)


def test_a_layer_in_a_volume_changing_state_reports_a_nonzero_logdet() -> None:
    # guards the Jacobian tests against comparing zeros with zeros only (the orthogonal
    # resampling layers learn, and preserve volume whatever they learn)
    for name, build, shape in CASES:
        layer = build()
        if any(True for _ in layer.parameters()) and not name.startswith(("orth", "upsampl")):
            _, logdet = layer.forward_with_logdet(torch.randn(shape, dtype=DTYPE))
            assert logdet.abs().min() > 1e-3, name


def test_side_inputs_are_accepted_and_ignored(case: tuple[nn.Module, Tensor]) -> None:
    layer, x = case
    mask = torch.ones(x.shape[0], dtype=torch.bool)
    y = layer(x)
    torch.testing.assert_close(layer(x, mask, None, emb=torch.randn(3)), y, rtol=0, atol=0)
    torch.testing.assert_close(layer.inverse(y, mask, step=3), layer.inverse(y), rtol=0, atol=0)
    y_ld, ld = layer.forward_with_logdet(x, mask, emb=None)
    x_ld, ld_inv = layer.inverse_with_logdet(y_ld, mask, emb=None)
    torch.testing.assert_close((y_ld, ld), layer.forward_with_logdet(x), rtol=0, atol=0)
    torch.testing.assert_close((x_ld, ld_inv), layer.inverse_with_logdet(y), rtol=0, atol=0)


def test_is_a_logdet_block_and_passes_the_invertibility_check(
    case: tuple[nn.Module, Tensor],
) -> None:
    layer, x = case
    assert isinstance(layer, LogDetBlock)
    assert is_invertible_module(layer, tuple(x.shape), test_input_dtype=DTYPE, atol=1e-10)


def test_the_logdet_is_a_real_tensor_one_may_add_to_in_place(
    case: tuple[nn.Module, Tensor],
) -> None:
    layer, x = case
    _, logdet = layer.forward_with_logdet(x)
    expected = logdet.detach() + 1
    total = logdet.detach()
    total += torch.ones_like(total)  # a chain summing its blocks' log-dets in place
    torch.testing.assert_close(total, expected, rtol=0, atol=0)


class _WithLogdet(nn.Module):
    """``forward`` runs the layer's forward (or inverse) with log-det: for functional_call."""

    def __init__(self, layer: nn.Module, inverse: bool) -> None:
        super().__init__()
        self.layer = layer
        self.inverse = inverse

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        run = self.layer.inverse_with_logdet if self.inverse else self.layer.forward_with_logdet
        return run(x)


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_gradients_match_finite_differences(case: tuple[nn.Module, Tensor], inverse: bool) -> None:
    layer, x = case
    module = _WithLogdet(layer, inverse)
    names = [name for name, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in module.named_parameters())
    start = (layer(x) if inverse else x).detach().requires_grad_()

    def fn(inp: Tensor, *values: Tensor) -> tuple[Tensor, Tensor]:
        return torch.func.functional_call(module, dict(zip(names, values)), (inp,))

    assert torch.autograd.gradcheck(fn, (start, *params), eps=1e-6, atol=1e-7)


def test_gradients_reach_every_parameter(case: tuple[nn.Module, Tensor]) -> None:
    layer, x = case
    y, logdet = layer.forward_with_logdet(x.requires_grad_())
    x_back, inv_logdet = layer.inverse_with_logdet(y.detach().requires_grad_())
    ((y * y.detach()).sum() + logdet.sum() + x_back.square().sum() + inv_logdet.sum()).backward()
    assert x.grad is not None and torch.count_nonzero(x.grad) > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


# -- InvertibleDownsampling ------------------------------------------------------------------
def test_downsampling_is_space_to_depth() -> None:
    x = torch.arange(2 * 3 * 4 * 6, dtype=DTYPE).reshape(2, 3, 4, 6)
    y = InvertibleDownsampling(2)(x)
    assert y.shape == (2, 12, 2, 3)
    # output channel c*4 + i*2 + j holds input channel c at offset (i, j) of each 2x2 patch
    torch.testing.assert_close(y[:, 5], x[:, 1, 0::2, 1::2], rtol=0, atol=0)
    torch.testing.assert_close(y[:, 11], x[:, 2, 1::2, 1::2], rtol=0, atol=0)


def test_downsampling_is_bit_exact_in_float32() -> None:
    x = torch.randn(2, 3, 6, 6)
    layer = InvertibleDownsampling(3)
    assert torch.equal(layer.inverse(layer(x)), x)


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (2, 3, 4, 5)])
def test_downsampling_refuses_a_size_not_divisible_by_the_factor(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"spatial size divisible by its factor \(2, 2\).*\(2, 3,"):
        InvertibleDownsampling()(torch.randn(shape))


def test_downsampling_inverse_refuses_channels_not_divisible_by_factor_squared() -> None:
    with pytest.raises(ValueError, match="channel count divisible by 9"):
        InvertibleDownsampling(3).inverse(torch.randn(1, 6, 2, 2))


@pytest.mark.parametrize("layer", [InvertibleDownsampling(), HaarDownsampling()])
@pytest.mark.parametrize("shape", [(3, 4), (1, 1, 2, 2, 4, 4)])
def test_downsampling_needs_one_to_three_spatial_axes(
    layer: nn.Module, shape: tuple[int, ...]
) -> None:
    with pytest.raises(ValueError, match=r"1 to 3 spatial axes.*got shape"):
        layer(torch.randn(shape))
    with pytest.raises(ValueError, match=r"1 to 3 spatial axes.*got shape"):
        layer.inverse(torch.randn(shape))


@pytest.mark.parametrize("layer", [InvertibleDownsampling((2, 2)), HaarDownsampling((2, 1))])
def test_a_factor_per_axis_must_match_the_inputs_axes(layer: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"factor=\(2, \d\), one per axis of 2-dimensional"):
        layer(torch.randn(1, 1, 4, 4, 4))
    with pytest.raises(ValueError, match="one per axis of 2-dimensional data"):
        layer.inverse(torch.randn(1, 4, 2))


def test_downsampling_in_3d_is_space_to_depth_per_axis() -> None:
    x = torch.arange(2 * 3 * 4 * 6 * 2, dtype=DTYPE).reshape(2, 3, 4, 6, 2)
    y = InvertibleDownsampling((2, 3, 1))(x)
    assert y.shape == (2, 18, 2, 2, 2)
    # output channel c*6 + i*3 + j holds input channel c at offset (i, j, 0) of each patch
    torch.testing.assert_close(y[:, 6 + 5], x[:, 1, 1::2, 2::3, :], rtol=0, atol=0)
    torch.testing.assert_close(y[:, 12], x[:, 2, 0::2, 0::3, :], rtol=0, atol=0)
    z = InvertibleDownsampling(2)(torch.arange(8.0).reshape(1, 1, 8))
    assert z.tolist() == [[[0.0, 2.0, 4.0, 6.0], [1.0, 3.0, 5.0, 7.0]]]


@pytest.mark.parametrize("factor", [2, (2, 1, 2)])
def test_downsampling_in_3d_is_bit_exact_in_float32(factor: int | tuple[int, ...]) -> None:
    x = torch.randn(2, 3, 4, 6, 8)
    layer = InvertibleDownsampling(factor)
    assert torch.equal(layer.inverse(layer(x)), x)


@pytest.mark.parametrize("factor", [(), (2, 2, 2, 2), (2, 0)])
def test_downsampling_refuses_a_bad_factor_per_axis(factor: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="factor"):
        InvertibleDownsampling(factor)


@pytest.mark.parametrize("factor", [0, -2, 2.0, True, "2"])
def test_downsampling_refuses_a_bad_factor(factor: object) -> None:
    with pytest.raises(ValueError, match="factor must be an int >= 1"):
        InvertibleDownsampling(factor)  # type: ignore[arg-type]


def test_a_layer_refuses_a_non_tensor() -> None:
    with pytest.raises(TypeError, match="HaarDownsampling expects a tensor, got list"):
        HaarDownsampling()([1.0, 2.0])  # type: ignore[arg-type]


# -- HaarDownsampling ------------------------------------------------------------------------
def test_haar_bands_are_the_average_and_the_three_differences() -> None:
    x = torch.randn(2, 3, 4, 6, dtype=DTYPE)
    y = HaarDownsampling()(x)
    assert y.shape == (2, 12, 2, 3)
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    for band, expected in enumerate([a + b + c + d, a - b + c - d, a + b - c - d, a - b - c + d]):
        torch.testing.assert_close(y[:, 3 * band : 3 * band + 3], expected / 2, rtol=0, atol=1e-15)


def test_haar_is_orthonormal() -> None:
    layer = HaarDownsampling()
    x = torch.randn(1, 2, 2, 4, dtype=DTYPE)
    jac = torch.autograd.functional.jacobian(layer, x).reshape(x.numel(), x.numel())
    torch.testing.assert_close(jac @ jac.T, torch.eye(x.numel(), dtype=DTYPE), rtol=0, atol=1e-15)


def test_haar_detail_bands_of_a_constant_image_are_zero() -> None:
    y = HaarDownsampling()(torch.full((1, 2, 4, 4), 3.0))
    assert torch.all(y[:, :2] == 6.0) and torch.all(y[:, 2:] == 0)


def test_haar_refuses_odd_sizes_and_inverse_refuses_channels_not_divisible_by_4() -> None:
    with pytest.raises(ValueError, match=r"divisible by its factor \(2, 2\)"):
        HaarDownsampling()(torch.randn(1, 1, 3, 4))
    with pytest.raises(ValueError, match="channel count divisible by 4"):
        HaarDownsampling().inverse(torch.randn(1, 6, 2, 2))


def test_haar_in_1d_and_3d_are_the_kronecker_products_of_the_1d_wavelet() -> None:
    signal = torch.randn(2, 3, 8, dtype=DTYPE)
    y = HaarDownsampling()(signal)
    even, odd = signal[..., 0::2], signal[..., 1::2]
    root2 = 2.0**0.5
    torch.testing.assert_close(y[:, :3], (even + odd) / root2, rtol=0, atol=1e-15)
    torch.testing.assert_close(y[:, 3:], (even - odd) / root2, rtol=0, atol=1e-15)
    volume = torch.randn(1, 2, 4, 2, 6, dtype=DTYPE)
    bands = HaarDownsampling()(volume)
    corners = {
        (i, j, k): volume[:, :, i::2, j::2, k::2] for i in (0, 1) for j in (0, 1) for k in (0, 1)
    }
    for band in range(8):
        bits = ((band >> 2) & 1, (band >> 1) & 1, band & 1)  # depth, height, width
        expected = sum(
            (-1) ** sum(b * o for b, o in zip(bits, offset)) * value
            for offset, value in corners.items()
        )
        torch.testing.assert_close(
            bands[:, 2 * band : 2 * band + 2], expected / 2**1.5, rtol=0, atol=1e-14
        )


def test_haar_along_chosen_axes_leaves_the_others_alone() -> None:
    volume = torch.randn(2, 3, 5, 4, 6, dtype=DTYPE)
    y = HaarDownsampling((1, 2, 2))(volume)
    assert y.shape == (2, 12, 5, 2, 3)
    for d in range(5):  # each depth slice is transformed as an image
        torch.testing.assert_close(
            y[:, :, d], HaarDownsampling()(volume[:, :, d]), rtol=0, atol=1e-15
        )


@pytest.mark.parametrize("factor", [4, (2, 3), 1])
def test_haar_refuses_factors_other_than_2(factor: int | tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="factor must be 2 or one factor per axis, each 1 or 2"):
        HaarDownsampling(factor)


def test_haar_is_orthonormal_in_3d() -> None:
    layer = HaarDownsampling()
    x = torch.randn(1, 1, 2, 2, 4, dtype=DTYPE)
    jac = torch.autograd.functional.jacobian(layer, x).reshape(x.numel(), x.numel())
    torch.testing.assert_close(jac @ jac.T, torch.eye(x.numel(), dtype=DTYPE), rtol=0, atol=1e-15)


def test_gradients_with_memory_saving_equal_plain_autograd(case: tuple[nn.Module, Tensor]) -> None:
    layer, x = case
    chain = ReversibleSequence(layer, memory_saving=True)
    grads = []
    for saving in (True, False):
        chain.memory_saving = saving
        layer.zero_grad()
        inp = x.clone().requires_grad_()
        y, logdet = chain.forward_with_logdet(inp)
        (
            (y * torch.linspace(-1, 1, y.numel(), dtype=DTYPE).view_as(y)).sum() + logdet.sum()
        ).backward()
        assert inp.grad is not None
        grads.append(
            [inp.grad] + [p.grad.clone() for p in layer.parameters() if p.grad is not None]
        )
    assert len(grads[0]) == len(grads[1]) == 1 + sum(1 for _ in layer.parameters())
    for saved, plain in zip(*grads):
        torch.testing.assert_close(saved, plain, rtol=1e-10, atol=1e-12)


# -- InvertibleConv1x1 -----------------------------------------------------------------------
@pytest.mark.parametrize("lu", [True, False])
def test_conv1x1_starts_as_a_rotation(lu: bool) -> None:
    layer = InvertibleConv1x1(6, lu=lu, seed=5)
    w = layer.matrix().double()
    torch.testing.assert_close(w @ w.T, torch.eye(6, dtype=DTYPE), rtol=0, atol=1e-6)
    assert abs(layer.log_abs_det().item()) < 1e-5
    assert all(p.dtype == torch.get_default_dtype() for p in layer.parameters())


@pytest.mark.parametrize("lu", [True, False])
def test_conv1x1_is_a_1x1_convolution_with_its_matrix(lu: bool) -> None:
    layer = _perturbed(InvertibleConv1x1(4, lu=lu, seed=0))
    x = torch.randn(2, 4, 3, 5, dtype=DTYPE)
    expected = F.conv2d(x, layer.matrix()[:, :, None, None])
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(
        layer.inverse_matrix() @ layer.matrix(), torch.eye(4, dtype=DTYPE), rtol=0, atol=1e-13
    )


@pytest.mark.parametrize(
    ("shape", "dim"),
    [((2, 4, 5), 1), ((2, 4, 3, 5), 1), ((2, 4, 2, 3, 5), 1), ((2, 3, 4), -1), ((2, 3, 4, 5), 2)],
)
def test_conv1x1_outputs_are_tensors_of_their_own_not_views(
    shape: tuple[int, ...], dim: int
) -> None:
    # FSDP2 hooks a unit's outputs for its backward and warns about a view (an in-place op
    # downstream would detach it from the hook); the mixing and its inverse make none
    layer = _perturbed(InvertibleConv1x1(4, seed=0, dim=dim))
    x = torch.randn(shape, dtype=DTYPE, requires_grad=True)
    y = layer(x)
    assert y._base is None and layer.inverse(y)._base is None
    moved = x.detach().movedim(dim, -1)
    torch.testing.assert_close(
        y.detach().movedim(dim, -1), moved @ layer.matrix().detach().T, rtol=0, atol=1e-13
    )


def test_conv1x1_lu_is_the_product_of_its_factors_and_its_logdet_their_log_scales() -> None:
    layer = _perturbed(InvertibleConv1x1(4, seed=0))
    lower = torch.tril(layer.lower, -1) + torch.eye(4, dtype=DTYPE)
    upper = torch.triu(layer.upper, 1) + torch.diag(layer.sign_s * layer.log_s.exp())
    torch.testing.assert_close(layer.matrix(), layer.permutation @ lower @ upper)
    x = torch.randn(3, 4, 2, 5, dtype=DTYPE)
    _, logdet = layer.forward_with_logdet(x)
    torch.testing.assert_close(logdet, torch.full((3,), 10 * layer.log_s.sum().item(), dtype=DTYPE))


def test_conv1x1_lu_gives_zero_gradient_outside_the_triangles() -> None:
    layer = _perturbed(InvertibleConv1x1(4, seed=0))
    y, logdet = layer.forward_with_logdet(torch.randn(2, 4, 3, 3, dtype=DTYPE))
    (y.square().sum() + logdet.sum()).backward()
    assert layer.lower.grad is not None and layer.upper.grad is not None
    assert torch.count_nonzero(torch.triu(layer.lower.grad)) == 0
    assert torch.count_nonzero(torch.tril(layer.upper.grad)) == 0
    assert torch.count_nonzero(torch.tril(layer.lower.grad, -1)) > 0


def test_conv1x1_seed_is_reproducible_and_leaves_the_global_rng_alone() -> None:
    before = torch.get_rng_state()
    a, b, c = (
        InvertibleConv1x1(5, seed=1),
        InvertibleConv1x1(5, seed=1),
        InvertibleConv1x1(5, seed=2),
    )
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a.matrix(), b.matrix())
    assert not torch.equal(a.matrix(), c.matrix())


def test_conv1x1_without_seed_draws_from_the_global_rng() -> None:
    torch.manual_seed(11)
    a = InvertibleConv1x1(5)
    torch.manual_seed(11)
    b = InvertibleConv1x1(5)
    assert torch.equal(a.matrix(), b.matrix())
    assert not torch.equal(a.matrix(), InvertibleConv1x1(5).matrix())


@pytest.mark.parametrize("lu", [True, False])
def test_conv1x1_keeps_a_lower_precision_input_in_its_dtype(lu: bool) -> None:
    layer = InvertibleConv1x1(4, lu=lu, seed=0)
    x = torch.randn(2, 4, 3, 3)
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and layer.inverse(y).dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), rtol=0.02, atol=0.05)


def test_conv1x1_state_dict_holds_the_factors_and_round_trips() -> None:
    layer = _perturbed(InvertibleConv1x1(3, seed=0))
    assert set(layer.state_dict()) == {"permutation", "sign_s", "lower", "upper", "log_s"}
    fresh = InvertibleConv1x1(3, seed=9).to(DTYPE)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.matrix(), layer.matrix())
    assert set(InvertibleConv1x1(3, lu=False).state_dict()) == {"weight"}


@pytest.mark.parametrize("layer", [InvertibleConv1x1(3), ActNorm(3), Permutation(3)])
def test_channel_layers_refuse_a_wrong_channel_count(layer: nn.Module) -> None:
    name = type(layer).__name__
    with pytest.raises(ValueError, match=rf"{name} was built for 3 channels \(dim 1\).*has 4"):
        layer.train()(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match=f"{name} was built for 3 channels"):
        layer.inverse(torch.randn(2, 4, 5))


@pytest.mark.parametrize("build", [InvertibleConv1x1, ActNorm, Permutation])
def test_channel_layers_refuse_a_bad_channel_dim(build: Callable[..., nn.Module]) -> None:
    name = build.__name__
    with pytest.raises(ValueError, match="dim=0 is the batch dimension"):
        build(3, dim=0)
    with pytest.raises(TypeError, match="dim must be an int"):
        build(3, dim=1.0)
    with pytest.raises(ValueError, match=rf"{name}: dim=-3 is the batch dimension"):
        build(3, dim=-3)(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match=rf"{name}: dim=5 is out of range"):
        build(3, dim=5)(torch.randn(2, 3))
    with pytest.raises(ValueError, match=rf"{name} needs an input with a batch and a channel"):
        build(3)(torch.randn(3))


@pytest.mark.parametrize("build", [InvertibleConv1x1, ActNorm, Permutation])
@pytest.mark.parametrize("channels", [0, -1, 2.5, True])
def test_channel_layers_refuse_a_bad_channel_number(
    build: Callable[..., nn.Module], channels: object
) -> None:
    with pytest.raises(ValueError, match=f"{build.__name__}: channels must be an int >= 1"):
        build(channels)


def test_conv1x1_refuses_bad_lu_and_seed() -> None:
    with pytest.raises(TypeError, match="lu must be a bool"):
        InvertibleConv1x1(3, lu=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed must be an int or None"):
        InvertibleConv1x1(3, seed=1.5)  # type: ignore[arg-type]


# -- ActNorm ---------------------------------------------------------------------------------
def test_actnorm_first_training_batch_comes_out_with_zero_mean_unit_variance() -> None:
    torch.manual_seed(0)
    layer = ActNorm(4).train()
    assert not layer.is_initialized() and int(layer.initialized) == 0
    x = torch.randn(8, 4, 5, 5) * torch.tensor([0.5, 2.0, 3.0, 10.0]).view(1, 4, 1, 1) + 7.0
    y = layer(x)
    assert layer.is_initialized() and int(layer.initialized) == 1
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), correction=0), torch.ones(4), rtol=0, atol=1e-5)


def test_actnorm_channels_last_normalises_over_batch_and_tokens() -> None:
    torch.manual_seed(0)
    layer = ActNorm(3, dim=-1).double().train()
    y = layer(torch.randn(4, 6, 3, dtype=DTYPE) * 4 - 2)
    torch.testing.assert_close(y.mean(dim=(0, 1)), torch.zeros(3, dtype=DTYPE), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        y.var(dim=(0, 1), correction=0), torch.ones(3, dtype=DTYPE), rtol=0, atol=1e-6
    )


def test_actnorm_initialises_once() -> None:
    torch.manual_seed(0)
    layer = ActNorm(3).train()
    layer(torch.randn(4, 3, 2, 2))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    y = layer(torch.randn(4, 3, 2, 2) * 5)  # a second batch is transformed, not re-fitted
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert y.std() > 2


def test_actnorm_state_dict_carries_the_initialisation() -> None:
    torch.manual_seed(0)
    trained = ActNorm(3).train()
    trained(torch.randn(4, 3, 2, 2) + 3)
    assert set(trained.state_dict()) == {"bias", "logscale", "initialized"}
    loaded = ActNorm(3).train()
    loaded.load_state_dict(trained.state_dict())
    x = torch.randn(4, 3, 2, 2) * 9
    assert torch.equal(loaded(x), trained(x))  # the new batch did not re-initialise it
    assert torch.equal(loaded.bias, trained.bias) and torch.equal(loaded.logscale, trained.logscale)


def test_actnorm_loading_an_uninitialised_state_is_noticed() -> None:
    layer = ActNorm(3).train()
    layer(torch.randn(4, 3) + 1)
    assert layer.is_initialized()
    layer.load_state_dict(ActNorm(3).state_dict())
    assert not layer.is_initialized()
    with pytest.raises(RuntimeError, match="not been initialised"):
        layer.eval()(torch.randn(2, 3))


def test_actnorm_does_not_initialise_while_recomputing() -> None:
    # a chain shows its recompute the flag as it was before the forward pass (0 on the
    # first step): the recompute must use the parameters as they are, never initialise
    layer = ActNorm(3).train()
    with recomputing():
        layer(torch.randn(4, 3, 2, 2) + 5)
    assert not layer.is_initialized()
    assert torch.count_nonzero(layer.bias) == 0 and torch.count_nonzero(layer.logscale) == 0


def test_actnorm_recomputed_after_initialisation_reproduces_the_forward() -> None:
    torch.manual_seed(0)
    layer = ActNorm(3).train()
    x = torch.randn(4, 3, 2, 2) + 5
    y = layer(x)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with recomputing():
        assert torch.equal(layer(x), y)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_actnorm_before_initialisation_refuses_eval_and_inverse() -> None:
    layer = ActNorm(3)
    with pytest.raises(RuntimeError, match=r"ActNorm has not been initialised.*train\(\) mode"):
        layer.eval()(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="ActNorm.inverse before initialisation"):
        layer.train().inverse(torch.randn(2, 3))
    assert not layer.is_initialized()


def test_actnorm_eps_guards_a_constant_channel() -> None:
    layer = ActNorm(2, eps=1e-3).train()
    y = layer(torch.stack([torch.full((4,), 2.0), torch.arange(4.0)], dim=1))
    assert torch.all(torch.isfinite(y)) and torch.all(y[:, 0] == 0)
    with pytest.raises(ValueError, match="eps must be a number > 0"):
        ActNorm(2, eps=0.0)


def test_actnorm_keeps_a_lower_precision_input_in_its_dtype() -> None:
    layer = ActNorm(3).train()
    y = layer(torch.randn(4, 3).bfloat16() * 3)
    assert y.dtype == torch.bfloat16 and layer.inverse(y).dtype == torch.bfloat16
    assert layer.bias.dtype == torch.float32


def test_the_invertibility_check_leaves_actnorm_uninitialised() -> None:
    layer = ActNorm(3).train()
    assert is_invertible_module(layer, (4, 3, 2, 2), atol=1e-5)
    assert not layer.is_initialized()
    assert torch.count_nonzero(layer.bias) == 0 and torch.count_nonzero(layer.logscale) == 0
    # and the next training batch initialises it, from that batch
    y = layer(torch.randn(4, 3, 2, 2) * 3 + 1)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), rtol=0, atol=1e-5)


# -- Permutation -----------------------------------------------------------------------------
def test_permutation_leaves_the_global_rng_alone_and_is_reproducible() -> None:
    before = torch.get_rng_state()
    a, b, c = Permutation(16), Permutation(16), Permutation(16, seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a.perm, b.perm) and not torch.equal(a.perm, c.perm)
    assert torch.equal(torch.sort(a.perm).values, torch.arange(16))


def test_permutation_shuffles_the_channel_dim() -> None:
    layer = Permutation(6, seed=3)
    x = torch.randn(2, 6, 3)
    assert torch.equal(layer(x), x[:, layer.perm])
    assert torch.equal(Permutation(3, seed=3, dim=-1)(x), x[..., Permutation(3, seed=3).perm])


def test_permutation_state_dict_restores_the_trained_permutation() -> None:
    trained = Permutation(8, seed=4)
    loaded = Permutation(8, seed=5)
    assert set(trained.state_dict()) == {"perm", "inverse_perm"}
    loaded.load_state_dict(trained.state_dict())
    x = torch.randn(2, 8)
    assert torch.equal(loaded(x), trained(x))


def test_permutation_refuses_a_bad_seed() -> None:
    with pytest.raises(TypeError, match="seed must be an int"):
        Permutation(3, seed=None)  # type: ignore[arg-type]


def test_the_repr_shows_the_arguments() -> None:
    assert repr(InvertibleDownsampling(3)) == "InvertibleDownsampling(factor=3)"
    assert (
        repr(InvertibleConv1x1(4, lu=False, dim=-1))
        == "InvertibleConv1x1(channels=4, lu=False, dim=-1)"
    )
    assert repr(ActNorm(4, eps=0.5)) == "ActNorm(channels=4, dim=1, eps=0.5)"
    assert repr(Permutation(4, dim=2)) == "Permutation(channels=4, dim=2)"
