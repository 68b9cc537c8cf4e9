"""ReversibleUNet: a U of invertible segments, exact, with memory bounded by its state.

Built from the core's parts, as a user would: couplings around small convolutions,
orthogonal resampling between the levels, half of each level's channels as its skip. The
memory is measured exactly (profiler allocation events on the CPU).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from invertible_core import (
    AdditiveCoupling,
    AffineAdapterSigmoid,
    AffineCoupling,
    OrthogonalDownsampling,
    OrthogonalUpsampling,
    ReversibleUNet,
    measure_memory,
)

DTYPE = torch.float64
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _coupling(channels: int, dim: int, affine: bool) -> nn.Module:
    half = channels // 2

    def net(out: int) -> nn.Module:
        return nn.Sequential(
            CONV[dim](half, half, 3, padding=1),
            nn.GroupNorm(1, half),
            nn.Tanh(),
            CONV[dim](half, out, 1),
        )

    if affine:
        return AffineCoupling(net(channels), net(channels), adapter=AffineAdapterSigmoid)
    return AdditiveCoupling(net(half), net(half))


def _unet(
    depth: int,
    dim: int = 2,
    levels: int = 2,
    width: int = 4,
    affine: bool = False,
    **options: object,
) -> ReversibleUNet:
    """``levels`` levels above the bottom; half of each level's channels go down."""
    sigma = 2**dim
    channels = [width]
    for _ in range(levels):
        channels.append(channels[-1] // 2 * sigma)
    rest = [channels[i + 1] // sigma for i in range(levels)]
    return ReversibleUNet(
        down=[[_coupling(channels[i], dim, affine) for _ in range(depth)] for i in range(levels)],
        bottom=[_coupling(channels[-1], dim, affine) for _ in range(depth)],
        up=[[_coupling(channels[i], dim, affine) for _ in range(depth)] for i in range(levels)],
        downsample=[OrthogonalDownsampling(r, dim=dim) for r in rest],
        upsample=[OrthogonalUpsampling(r, dim=dim, method="cayley") for r in rest],
        splits=[(c - r, r) for c, r in zip(channels, rest)],
        **options,  # type: ignore[arg-type]
    )


def _perturb(module: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return module


SHAPES = {1: (2, 4, 16), 2: (2, 4, 8, 8), 3: (2, 4, 4, 4, 4)}


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_inverse_undoes_forward_in_1d_2d_and_3d(dim: int) -> None:
    torch.manual_seed(0)
    unet = _perturb(_unet(2, dim=dim).to(DTYPE))
    x = torch.randn(SHAPES[dim], dtype=DTYPE)
    y = unet(x)
    assert y.shape == x.shape
    torch.testing.assert_close(unet.inverse(y), x, rtol=0, atol=1e-12)
    assert (y - x).abs().max() > 1e-2  # it is not the identity


@pytest.mark.parametrize("dim", [1, 3])
def test_gradients_with_memory_saving_equal_plain_autograd(dim: int) -> None:
    torch.manual_seed(0)
    unet = _perturb(_unet(2, dim=dim).to(DTYPE)).train()
    x = torch.randn(SHAPES[dim], dtype=DTYPE)
    weights = torch.randn(SHAPES[dim], dtype=DTYPE)
    grads = []
    for saving in (True, False):
        unet.memory_saving = saving
        assert unet.memory_saving is saving
        unet.zero_grad()
        inp = x.clone().requires_grad_()
        (unet(inp) * weights).sum().backward()
        grads.append([inp.grad, *(p.grad.clone() for p in unet.parameters())])
    assert all(g is not None for g in grads[0])
    for saved, plain in zip(*grads):
        torch.testing.assert_close(saved, plain, rtol=1e-9, atol=1e-11)


def test_logdet_is_that_of_the_jacobian_and_its_gradient_is_plain_autograds() -> None:
    torch.manual_seed(0)
    unet = _perturb(_unet(1, dim=1, levels=1, affine=True).to(DTYPE)).train()
    x = torch.randn(2, 4, 4, dtype=DTYPE)
    y, logdet = unet.forward_with_logdet(x)
    jac = torch.autograd.functional.jacobian(unet.eval(), x).reshape(2, 16, 2, 16)
    unet.train()  # (GroupNorm: the same function; eval keeps the Jacobian's many passes plain)
    expected = torch.stack([torch.linalg.slogdet(jac[b, :, b, :]).logabsdet for b in range(2)])
    assert expected.abs().min() > 1e-2
    torch.testing.assert_close(logdet, expected, rtol=0, atol=1e-10)
    x_back, inverse_logdet = unet.inverse_with_logdet(y)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(inverse_logdet, -logdet, rtol=0, atol=1e-12)
    grads = []
    for saving in (True, False):
        unet.memory_saving = saving
        unet.zero_grad()
        out, ld = unet.forward_with_logdet(x.clone().requires_grad_())
        (out.square().sum() - ld.sum()).backward()
        grads.append([p.grad.clone() for p in unet.parameters()])
    for saved, plain in zip(*grads):
        torch.testing.assert_close(saved, plain, rtol=1e-9, atol=1e-11)


def test_side_inputs_reach_every_block() -> None:
    seen: list[object] = []

    class Conditioned(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 2, 1)

        def forward(self, x: Tensor, *, scale: float) -> Tensor:
            seen.append(scale)
            return self.conv(x) * scale

    def coupling() -> nn.Module:
        return AdditiveCoupling(Conditioned(), Conditioned())

    unet = ReversibleUNet(
        down=[[coupling()]],
        bottom=[coupling()],
        up=[[coupling()]],
        downsample=[OrthogonalDownsampling(2, dim=1)],
        upsample=[OrthogonalUpsampling(2, dim=1)],
        splits=[(2, 2)],
    ).eval()
    x = torch.randn(1, 4, 4)
    with torch.no_grad():
        y = unet(x, scale=0.5)
        torch.testing.assert_close(unet.inverse(y, scale=0.5), x, rtol=0, atol=1e-6)
    assert seen and set(seen) == {0.5} and len(seen) == 12  # 3 couplings x 2, twice


def _forward_retained(unet: ReversibleUNet, x: Tensor) -> int:
    _, stats = measure_memory(lambda: unet(x))
    return stats.retained_bytes


def test_memory_is_bounded_by_the_state_of_the_u_not_by_its_depth() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    saving = {d: _forward_retained(_unet(d, width=8).train(), x) for d in (1, 6)}
    plain = {
        d: _forward_retained(_unet(d, width=8, memory_saving=False).train(), x) for d in (1, 6)
    }
    assert saving[6] == saving[1]  # flat: the segments keep their outputs only
    assert plain[6] > 4 * plain[1]  # plain autograd stores every block's activations
    # the state: the outputs of the 2K + 1 = 5 segments, each at most the input's size
    assert saving[6] <= 5 * x.numel() * x.element_size()
    assert saving[6] < plain[6] / 10


def test_memory_saving_changes_no_parameter_or_state_dict_key() -> None:
    unet = _unet(1)
    keys = list(unet.state_dict())
    unet.memory_saving = False
    assert all(not s.memory_saving for s in unet.segments()) and not unet.memory_saving
    assert list(unet.state_dict()) == keys
    assert len(unet.segments()) == 5 and unet.levels == 2


def test_errors_name_what_is_missing() -> None:
    down = [OrthogonalDownsampling(2, dim=1)]
    up = [OrthogonalUpsampling(2, dim=1)]
    with pytest.raises(ValueError, match="at least one level above the bottom"):
        ReversibleUNet([], [_coupling(4, 1, False)], [], [], [], [])
    with pytest.raises(ValueError, match="down has 1 levels above the bottom, but up has 2"):
        ReversibleUNet([[_coupling(4, 1, False)]], [], [[], []], down, up, [(2, 2)])
    with pytest.raises(ValueError, match="level 0 needs at least one block"):
        ReversibleUNet([[]], [], [[_coupling(4, 1, False)]], down, up, [(2, 2)])
    with pytest.raises(ValueError, match=r"splits\[0\] must be \(skip, rest\)"):
        ReversibleUNet(
            [[_coupling(4, 1, False)]],
            [],
            [[_coupling(4, 1, False)]],
            down,
            up,
            [(4,)],  # type: ignore[list-item]
        )
