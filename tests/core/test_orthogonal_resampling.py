"""OrthogonalDownsampling and OrthogonalUpsampling: learnable, orthogonal, exactly invertible.

The contract every layer honours (round trip, log-det against the Jacobian, gradients, memory
saving) is checked for them in test_layers.py; here what is theirs: the initialisations, the
kernels staying orthogonal while they learn, the two directions, the errors.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from invertible_core import (
    HaarDownsampling,
    InvertibleDownsampling,
    OrthogonalDownsampling,
    OrthogonalUpsampling,
)

DTYPE = torch.float64
SHAPES = {1: (2, 3, 8), 2: (2, 3, 4, 6), 3: (2, 3, 4, 2, 6)}


def _band_major(y: Tensor, channels: int) -> Tensor:
    """``y`` (channel ``c * sigma + k``) in HaarDownsampling's order (channel ``k * C + c``)."""
    batch, grouped, *rest = y.shape
    sigma = grouped // channels
    return y.reshape(batch, channels, sigma, *rest).transpose(1, 2).reshape(y.shape)


def _random_weight(layer: OrthogonalDownsampling | OrthogonalUpsampling, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator, dtype=DTYPE))


@pytest.mark.parametrize(("dim", "factor"), [(1, 2), (2, 2), (3, 2), (3, (2, 2, 1)), (2, (1, 2))])
def test_a_fresh_layer_is_the_haar_transform_in_the_grouped_channel_order(
    dim: int, factor: int | tuple[int, ...]
) -> None:
    x = torch.randn(SHAPES[dim], dtype=DTYPE)
    layer = OrthogonalDownsampling(3, dim=dim, factor=factor).to(DTYPE)
    expected = HaarDownsampling(factor)(x)
    torch.testing.assert_close(_band_major(layer(x), 3), expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("method", ["exp", "cayley"])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_a_fresh_squeeze_layer_is_invertible_downsampling_bit_for_bit(
    method: str, dim: int
) -> None:
    x = torch.randn(SHAPES[dim])
    layer = OrthogonalDownsampling(3, dim=dim, method=method, init="squeeze")  # type: ignore[arg-type]
    assert torch.equal(layer(x), InvertibleDownsampling(2)(x))
    assert torch.equal(layer.inverse(layer(x)), x)


@pytest.mark.parametrize("method", ["exp", "cayley"])
@pytest.mark.parametrize("init", ["haar", "squeeze", "random"])
def test_the_kernels_stay_orthogonal_whatever_the_weight(method: str, init: str) -> None:
    layer = OrthogonalDownsampling(
        4,
        dim=3,
        method=method,
        init=init,
        seed=1,  # type: ignore[arg-type]
    ).to(DTYPE)
    _random_weight(layer, 0)
    kernel = layer.kernel()
    assert kernel.shape == (4, 8, 8)
    eye = torch.eye(8, dtype=DTYPE).expand(4, 8, 8)
    torch.testing.assert_close(kernel @ kernel.mT, eye, rtol=0, atol=1e-12)
    assert not torch.allclose(kernel, layer.kernel().detach() * 0 + eye)  # it moved


def test_the_kernel_learns_and_the_symmetric_part_of_the_weight_gets_no_gradient() -> None:
    layer = OrthogonalDownsampling(2, dim=2, method="cayley").to(DTYPE)
    _random_weight(layer, 3)
    y = layer(torch.randn(2, 2, 4, 4, dtype=DTYPE))
    (y * torch.randn_like(y)).sum().backward()
    grad = layer.weight.grad
    assert grad is not None and torch.count_nonzero(grad) > 0
    torch.testing.assert_close(grad + grad.mT, torch.zeros_like(grad), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_upsampling_with_the_same_kernel_undoes_downsampling(dim: int) -> None:
    down = OrthogonalDownsampling(3, dim=dim, init="random", seed=2).to(DTYPE)
    up = OrthogonalUpsampling(3, dim=dim, init="random", seed=2).to(DTYPE)
    _random_weight(down, 5)
    up.load_state_dict(down.state_dict())
    x = torch.randn(SHAPES[dim], dtype=DTYPE)
    torch.testing.assert_close(up(down(x)), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(up.inverse(x), down(x), rtol=0, atol=0)
    assert up(down(x)).shape == x.shape


def test_a_fresh_upsampling_is_the_inverse_haar_transform() -> None:
    y = torch.randn(2, 12, 2, 3, dtype=DTYPE)
    up = OrthogonalUpsampling(3, dim=2).to(DTYPE)
    torch.testing.assert_close(
        up(y), HaarDownsampling().inverse(_band_major(y, 3)), rtol=0, atol=1e-15
    )


def test_random_init_is_seeded_and_leaves_the_global_rng_alone() -> None:
    before = torch.get_rng_state()
    a, b = (OrthogonalDownsampling(2, init="random", seed=4) for _ in range(2))
    c = OrthogonalDownsampling(2, init="random", seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a.kernel(), b.kernel()) and not torch.equal(a.kernel(), c.kernel())


def test_state_dict_holds_the_weight_and_the_random_base() -> None:
    assert set(OrthogonalDownsampling(2).state_dict()) == {"weight"}
    assert set(OrthogonalDownsampling(2, init="squeeze").state_dict()) == {"weight"}
    trained = OrthogonalDownsampling(2, init="random", seed=0)
    assert set(trained.state_dict()) == {"weight", "base_generator"}
    _random_weight(trained, 1)
    loaded = OrthogonalDownsampling(2, init="random", seed=9)
    loaded.load_state_dict(trained.state_dict())
    assert torch.equal(loaded.kernel(), trained.kernel())


def test_a_lower_precision_input_keeps_its_dtype() -> None:
    layer = OrthogonalDownsampling(2, dim=2)
    x = torch.randn(1, 2, 4, 4)
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and layer.inverse(y).dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), rtol=0.02, atol=0.05)


def test_errors_name_the_argument_and_the_fix() -> None:
    with pytest.raises(ValueError, match="dim must be 1, 2 or 3"):
        OrthogonalDownsampling(2, dim=4)
    with pytest.raises(ValueError, match="factor .* has 2 entries for 3-dimensional data"):
        OrthogonalDownsampling(2, dim=3, factor=(2, 2))
    with pytest.raises(ValueError, match="init='haar' needs factors of 1 or 2"):
        OrthogonalDownsampling(2, factor=3)
    with pytest.raises(ValueError, match="method must be 'exp' or 'cayley'"):
        OrthogonalDownsampling(2, method="householder")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="init must be 'haar', 'squeeze' or 'random'"):
        OrthogonalDownsampling(2, init="zeros")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="channels must be an int >= 1"):
        OrthogonalDownsampling(0)
    layer = OrthogonalDownsampling(2, dim=2)
    with pytest.raises(ValueError, match=r"built for dim=2 .* got shape \(1, 2, 4, 4, 4\)"):
        layer(torch.randn(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="built for 2 channels .* got an input with 3"):
        layer(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="built for 2 channels .* got an input with 3"):
        layer.inverse(torch.randn(1, 12, 2, 2))
    with pytest.raises(ValueError, match="divisible by its factor"):
        layer(torch.randn(1, 2, 4, 5))
    with pytest.raises(ValueError, match="channel count divisible by 4"):
        layer.inverse(torch.randn(1, 6, 2, 2))


def test_the_repr_shows_the_arguments() -> None:
    assert repr(OrthogonalUpsampling(3, dim=3, factor=(2, 2, 1), method="cayley")) == (
        "OrthogonalUpsampling(channels=3, dim=3, factor=(2, 2, 1), method='cayley', init='haar')"
    )
