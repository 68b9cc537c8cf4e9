"""ChannelSplit and ChannelConcat: exact, volume-preserving, usable in a memory-saving call."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from invertible_core import ChannelConcat, ChannelSplit, InvertibleModuleWrapper


def test_a_split_cuts_the_channels_into_views_and_its_inverse_joins_them_bit_for_bit() -> None:
    x = torch.randn(2, 7, 3, 4, 5)
    split = ChannelSplit((2, 4, 1))
    parts = split(x)
    assert [p.shape[1] for p in parts] == [2, 4, 1]
    assert all(p.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for p in parts)
    assert torch.equal(parts[1], x[:, 2:6])
    assert torch.equal(split.inverse(*parts), x)


def test_concat_is_the_inverse_of_split_with_the_same_sizes() -> None:
    a, b = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    join = ChannelConcat((3, 5))
    y = join(a, b)
    assert torch.equal(y, torch.cat((a, b), dim=1))
    back = join.inverse(y)
    assert torch.equal(back[0], a) and torch.equal(back[1], b)
    assert torch.equal(ChannelSplit((3, 5))(y)[1], b)


def test_channels_last() -> None:
    x = torch.randn(2, 6, 5)
    first, second = ChannelSplit((2, 3), dim=-1)(x)
    assert torch.equal(first, x[..., :2]) and torch.equal(second, x[..., 2:])
    assert torch.equal(ChannelConcat((2, 3), dim=-1)(first, second), x)


def test_logdets_are_zeros_per_sample_and_side_inputs_are_ignored() -> None:
    x = torch.randn(3, 4, 2)
    split = ChannelSplit((1, 3))
    parts, logdet = split.forward_with_logdet(x, mask=torch.ones(3))
    assert torch.equal(logdet, torch.zeros(3))
    back, inverse_logdet = split.inverse_with_logdet(*parts, emb=None)
    assert torch.equal(back, x) and torch.equal(inverse_logdet, torch.zeros(3))
    join = ChannelConcat((1, 3))
    y, logdet = join.forward_with_logdet(*parts, step=4)
    assert torch.equal(y, x) and logdet.shape == (3,)
    again, logdet = join.inverse_with_logdet(y)
    assert all(torch.equal(a, p) for a, p in zip(again, parts)) and logdet.shape == (3,)


class _Scale(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.linspace(-0.5, 0.5, channels).view(1, -1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.log_scale.exp()


@pytest.mark.parametrize("layer", [ChannelSplit((2, 3)), ChannelConcat((2, 3))])
def test_in_a_memory_saving_wrapper_gradients_equal_plain_autograd(layer: nn.Module) -> None:
    torch.manual_seed(0)
    wrapper = InvertibleModuleWrapper(layer)
    before, after = _Scale(5).double(), _Scale(5).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    grads = []
    for disable in (False, True):
        wrapper.disable = disable
        inp = x.clone().requires_grad_()
        h = before(inp)
        given = (h,) if isinstance(layer, ChannelSplit) else (h[:, :2], h[:, 2:])
        out = wrapper(*given)
        merged = torch.cat(out, dim=1) if isinstance(out, tuple) else out
        after(merged).square().sum().backward()
        grads.append([inp.grad, before.log_scale.grad.clone(), after.log_scale.grad.clone()])
        before.zero_grad()
        after.zero_grad()
    for saved, plain in zip(*grads):
        torch.testing.assert_close(saved, plain, rtol=1e-12, atol=1e-12)


def test_errors_say_what_was_wrong() -> None:
    with pytest.raises(ValueError, match="sizes must be two or more channel counts"):
        ChannelSplit((4,))
    with pytest.raises(ValueError, match="every size must be an int >= 1"):
        ChannelSplit((2, 0))
    with pytest.raises(ValueError, match="dim=0 is the batch dimension"):
        ChannelConcat((1, 1), dim=0)
    with pytest.raises(ValueError, match=r"cuts 5 channels into \(2, 3\).*with 6 there"):
        ChannelSplit((2, 3))(torch.randn(1, 6, 2))
    with pytest.raises(TypeError, match=r"expects 2 tensors \(parts of \(2, 3\) channels\), got 1"):
        ChannelConcat((2, 3))(torch.randn(1, 5))
    with pytest.raises(ValueError, match=r"joins parts of \(2, 3\) channels"):
        ChannelSplit((2, 3)).inverse(torch.randn(1, 3), torch.randn(1, 2))
    with pytest.raises(TypeError, match="ChannelSplit.forward expects a tensor, got list"):
        ChannelSplit((1, 1))([1.0, 2.0])  # type: ignore[arg-type]
