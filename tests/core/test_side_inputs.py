"""Side inputs (masks, timestep embeddings, cross-attention context) through the chain.

``seq(x, *args, **kwargs)`` passes ``args``/``kwargs`` to every block; a coupling passes
them to ``Fm`` and ``Gm``. Tensors among them that require grad receive their gradient,
summed over all blocks, equal to plain autograd's; everything else passes through untouched.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from conftest import assert_grads_close, leaf_copy, peak_memory, plain_copy
from invertible_core import (
    AdditiveCoupling,
    AffineAdapterNaive,
    AffineCoupling,
    InvertibleModuleWrapper,
    ReversibleSequence,
)


class Conditioned(nn.Module):
    """A tiny attention-free transformer-ish function of ``(B, T, C)`` tokens, conditioned
    on a timestep embedding, a bool mask, a context (cross attention) and a Python float."""

    def __init__(self, width: int, emb: int = 6) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.emb = nn.Linear(emb, width)
        self.ctx = nn.Linear(width, width)

    def forward(
        self,
        x: Tensor,
        emb: Tensor,
        mask: Tensor | None = None,
        context: Tensor | None = None,
        scale: float = 1.0,
    ) -> Tensor:
        h = self.lin(x) + self.emb(emb)[:, None, :]
        if context is not None:
            attn = torch.softmax(x @ context.transpose(1, 2), dim=-1)
            h = h + self.ctx(attn @ context)
        if mask is not None:
            h = h * mask[..., None]
        return torch.tanh(h) * scale


def conditioned_chain(depth: int = 4, width: int = 4, **options: object) -> ReversibleSequence:
    torch.manual_seed(0)
    blocks = [AdditiveCoupling(Conditioned(width), split_dim=-1) for _ in range(depth)]
    return ReversibleSequence(blocks, **options).double()  # type: ignore[arg-type]


def embedding_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 6), nn.SiLU(), nn.Linear(6, 6)).double()


def _inputs() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 5, generator=g) > 0.3
    context = torch.randn(2, 7, 4, generator=g, dtype=torch.float64)
    return x, t, mask, context


def _loss(y: Tensor) -> Tensor:
    return (y.square() * torch.linspace(0.5, 1.5, y.numel(), dtype=y.dtype).view_as(y)).sum()


def test_timestep_embedding_and_context_get_the_gradients_of_plain_autograd() -> None:
    seq, emb_net = conditioned_chain(), embedding_net()
    ref, emb_ref = plain_copy(seq), copy.deepcopy(emb_net)
    x, t, mask, context = _inputs()
    xs, cs = leaf_copy(x), leaf_copy(context)
    xr, cr = leaf_copy(x), leaf_copy(context)
    y = seq(xs, emb_net(t), mask=mask, context=cs, scale=0.7)
    y_ref = ref(xr, emb_ref(t), mask=mask, context=cr, scale=0.7)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    _loss(y).backward()
    _loss(y_ref).backward()
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cs.grad, cr.grad, rtol=1e-10, atol=1e-12)
    assert_grads_close(seq, ref)
    # the embedding network gets the gradient summed over all four blocks
    assert_grads_close(emb_net, emb_ref)
    assert emb_net[0].weight.grad is not None and emb_net[0].weight.grad.abs().sum() > 0


def test_non_tensor_and_non_differentiable_side_inputs_pass_through_untouched() -> None:
    seen: list[tuple[object, ...]] = []

    class Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x: Tensor, mask: Tensor, n: int, nothing: None, tag: str) -> Tensor:
            seen.append((mask, n, nothing, tag))
            return self.lin(x) * mask[..., None]

    seq = ReversibleSequence(AdditiveCoupling(Recorder(), split_dim=-1))
    mask = torch.tensor([[True, False, True]])
    x = torch.randn(1, 3, 4, requires_grad=True)
    seq(x, mask, 3, None, tag="t").sum().backward()
    assert len(seen) == 4  # Fm, Gm forward; Gm, Fm recompute
    for m, n, nothing, tag in seen:
        assert m is mask and n == 3 and nothing is None and tag == "t"
    assert mask.dtype == torch.bool and not mask.requires_grad


@pytest.mark.parametrize("route", ["Fm", "Gm", "none"])
def test_side_inputs_can_go_to_one_function_only(route: str) -> None:
    calls: dict[str, int] = {"Fm": 0, "Gm": 0}

    class Takes(nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name
            self.lin = nn.Linear(2, 2)

        def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
            if emb is not None:
                calls[self.name] += 1
                return self.lin(x) + emb
            return self.lin(x)

    coupling = AdditiveCoupling(Takes("Fm"), Takes("Gm"), split_dim=-1, side_inputs=route)
    seq = ReversibleSequence(coupling).double()
    emb = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    seq(x, emb).sum().backward()
    assert calls["Fm"] == (2 if route == "Fm" else 0)
    assert calls["Gm"] == (2 if route == "Gm" else 0)
    assert (emb.grad is None) == (route == "none")
    ref = plain_copy(seq)
    emb_ref, x_ref = leaf_copy(emb), leaf_copy(x)
    ref(x_ref, emb_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    if route != "none":
        torch.testing.assert_close(emb.grad, emb_ref.grad)


def test_unknown_side_input_route_is_an_error() -> None:
    with pytest.raises(ValueError, match="side_inputs must be one of"):
        AdditiveCoupling(nn.Identity(), side_inputs="F")  # type: ignore[arg-type]


def test_autograd_grad_with_side_inputs_matches_backward() -> None:
    seq, emb_net = conditioned_chain(), embedding_net()
    x, t, mask, context = _inputs()
    xs, cs = leaf_copy(x), leaf_copy(context)
    emb = emb_net(t)
    gx, gc, gw = torch.autograd.grad(
        _loss(seq(xs, emb, mask=mask, context=cs)), [xs, cs, emb_net[0].weight]
    )
    assert xs.grad is None and cs.grad is None  # autograd.grad fills no .grad
    xr, cr = leaf_copy(x), leaf_copy(context)
    ref, emb_ref = plain_copy(seq), copy.deepcopy(emb_net)
    _loss(ref(xr, emb_ref(t), mask=mask, context=cr)).backward()
    torch.testing.assert_close(gx, xr.grad)
    torch.testing.assert_close(gc, cr.grad)
    torch.testing.assert_close(gw, emb_ref[0].weight.grad)


def test_inverse_with_side_inputs_undoes_forward() -> None:
    seq = conditioned_chain()
    x, t, mask, context = _inputs()
    emb = embedding_net()(t)
    with torch.no_grad():
        y = seq(x, emb, mask=mask, context=context)
        torch.testing.assert_close(seq.inverse(y, emb, mask=mask, context=context), x)
    # and the inverse direction trains with memory saving too
    seq_ref = plain_copy(seq)
    ys, yr = leaf_copy(y), leaf_copy(y)
    es, er = leaf_copy(emb), leaf_copy(emb)
    _loss(seq.inverse(ys, es, mask=mask)).backward()
    _loss(seq_ref.inverse(yr, er, mask=mask)).backward()
    torch.testing.assert_close(ys.grad, yr.grad)
    torch.testing.assert_close(es.grad, er.grad)
    assert_grads_close(seq, seq_ref)


def test_affine_coupling_passes_side_inputs_through_its_adapter() -> None:
    torch.manual_seed(0)

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x: Tensor, emb: Tensor) -> Tensor:
            return 0.1 * torch.tanh(self.lin(x) + emb)

    seq = ReversibleSequence(
        AffineCoupling(Scaled(), adapter=AffineAdapterNaive, split_dim=-1) for _ in range(3)
    ).double()
    emb = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    ref = plain_copy(seq)
    er, xr = leaf_copy(emb), leaf_copy(x)
    _loss(seq(x, emb)).backward()
    _loss(ref(xr, er)).backward()
    torch.testing.assert_close(emb.grad, er.grad)
    assert_grads_close(seq, ref)


def test_wrapper_takes_side_inputs_by_keyword() -> None:
    torch.manual_seed(0)
    wrapped = InvertibleModuleWrapper(AdditiveCoupling(Conditioned(4), split_dim=-1)).double()
    ref = plain_copy(wrapped)
    x, t, mask, _ = _inputs()
    emb, emb_ref = leaf_copy(embedding_net()(t)), None
    emb_ref = leaf_copy(emb)
    xs, xr = leaf_copy(x), leaf_copy(x)
    _loss(wrapped(xs, emb=emb, mask=mask)).backward()
    _loss(ref(xr, emb=emb_ref, mask=mask)).backward()
    torch.testing.assert_close(xs.grad, xr.grad)
    torch.testing.assert_close(emb.grad, emb_ref.grad)
    assert_grads_close(wrapped, ref)


def test_memory_stays_flat_in_depth_with_side_inputs() -> None:
    emb_net = embedding_net().float()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 64, 32, generator=g)
    t = torch.randn(8, 3, generator=g)
    mask = torch.rand(8, 64, generator=g) > 0.2

    def peak(depth: int) -> int:
        torch.manual_seed(0)
        seq = ReversibleSequence(
            AdditiveCoupling(Conditioned(16), split_dim=-1) for _ in range(depth)
        )

        def step() -> None:
            seq(x, emb_net(t), mask=mask).square().mean().backward()

        step()
        seq.zero_grad(set_to_none=False)
        emb_net.zero_grad(set_to_none=False)
        return peak_memory(step)

    assert peak(16) <= 1.1 * peak(2)


def test_autocast_with_side_inputs_runs_in_bfloat16_and_trains() -> None:
    torch.manual_seed(0)
    seq = ReversibleSequence(AdditiveCoupling(Conditioned(4), split_dim=-1) for _ in range(3))
    emb_net = embedding_net().float()
    x, t, mask, _ = _inputs()
    x, t = x.float().requires_grad_(), t.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = seq(x, emb_net(t), mask=mask)
    y.float().square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert emb_net[0].weight.grad is not None and torch.isfinite(emb_net[0].weight.grad).all()
