"""The engine as PyTorch's hooks see it: blocks run through ``nn.Module.__call__`` in the
forward pass and in the recompute, and gradients reach the parameters a module holds when
it runs (what FSDP, DDP, PEFT-style wrappers and users' own hooks rely on).

Each test here fails on the engine before core 3, which drove blocks through private
methods and took gradients for the parameters it had collected before any block ran.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from conftest import assert_grads_close, leaf_copy, plain_copy
from invertible_core import (
    ActNorm,
    AdditiveCoupling,
    AffineAdapterSigmoid,
    AffineCoupling,
    InvertibleConv1x1,
    InvertibleModuleWrapper,
    ReversibleBlock,
    ReversibleSequence,
    UnknownCouplingError,
    create_coupling,
    is_recomputing,
)


def mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())


def chain(depth: int = 3) -> ReversibleSequence:
    torch.manual_seed(0)
    return ReversibleSequence(
        [AdditiveCoupling(mlp(4), mlp(4), split_dim=-1) for _ in range(depth)]
    ).double()


def _x() -> Tensor:
    return torch.randn(2, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["sequence", "wrapper"])
def test_a_forward_hook_on_every_block_fires_once_per_forward_and_once_per_recompute(
    kind: str,
) -> None:
    seq = chain()
    blocks = list(seq)
    model: nn.Module = (
        seq if kind == "sequence" else nn.Sequential(*map(InvertibleModuleWrapper, blocks))
    )
    calls: Counter[tuple[int, bool]] = Counter()
    pre_calls: Counter[tuple[int, bool]] = Counter()
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda m, a, out, i=i: calls.update([(i, is_recomputing())]))
        block.register_forward_pre_hook(lambda m, a, i=i: pre_calls.update([(i, is_recomputing())]))
    y = model(leaf_copy(_x()))
    assert calls == Counter({(i, False): 1 for i in range(3)})
    y.sum().backward()
    expected = Counter({(i, r): 1 for i in range(3) for r in (False, True)})
    assert calls == expected
    assert pre_calls == expected


def test_hooks_on_fm_and_gm_fire_once_per_forward_and_once_per_recompute() -> None:
    # the recompute computes Fm and Gm once each, for the rebuild and the backprop
    seq = chain()
    calls: Counter[str] = Counter()
    for i, block in enumerate(seq):
        for name in ("Fm", "Gm"):
            getattr(block, name).register_forward_hook(
                lambda *a, key=f"{i}{name}": calls.update([key])
            )
    seq(leaf_copy(_x())).sum().backward()
    assert calls == Counter({f"{i}{name}": 2 for i in range(3) for name in ("Fm", "Gm")})


class SwapsItsWeights(nn.Module):
    """What FSDP does, in one process: a forward pre-hook puts other parameter objects in
    place (the unsharded ones) and the gradients must reach *those*."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inner = nn.Linear(width, width)
        self.stored = copy.deepcopy(self.inner)  # the "sharded" objects, registered
        self.stored.requires_grad_(False)
        self.running: nn.Linear | None = None
        self.register_forward_pre_hook(self._swap_in)

    def _swap_in(self, module: nn.Module, args: Any) -> None:
        # a fresh "unsharded" copy per forward pass, reused by the recompute
        if not is_recomputing() or self.running is None:
            self.running = copy.deepcopy(self.inner)

    def forward(self, x: Tensor) -> Tensor:
        assert self.running is not None
        return torch.tanh(self.running(x))


def test_gradients_reach_the_parameters_a_module_holds_when_it_runs() -> None:
    torch.manual_seed(0)
    coupling = AdditiveCoupling(SwapsItsWeights(4), SwapsItsWeights(4), split_dim=-1).double()
    seq = ReversibleSequence(coupling)
    x = leaf_copy(_x())
    seq(x).sum().backward()
    for f in (coupling.Fm, coupling.Gm):
        assert isinstance(f, SwapsItsWeights) and f.running is not None
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in f.running.parameters())
    plain = plain_copy(seq)
    xr = leaf_copy(_x())
    plain(xr).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)


def test_torch_autograd_grad_gives_parameter_gradients_without_touching_grad() -> None:
    seq = chain()
    ref = plain_copy(seq)
    x, xr = leaf_copy(_x()), leaf_copy(_x())
    params = list(seq.parameters())
    grads = torch.autograd.grad(seq(x).square().sum(), [x, *params])
    ref(xr).square().sum().backward()
    assert all(p.grad is None for p in params)
    torch.testing.assert_close(grads[0], xr.grad)
    for g, p in zip(grads[1:], ref.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_a_positional_side_input_to_the_wrapper_is_refused_in_both_modes() -> None:
    # positional tensors are the wrapped module's invertible inputs (MemCNN's meaning); a
    # coupling inverts one tensor, so a second one is a side input given the wrong way
    torch.manual_seed(0)
    for disable in (False, True):
        wrapped = InvertibleModuleWrapper(AdditiveCoupling(mlp(4), split_dim=-1), disable=disable)
        with pytest.raises(TypeError, match="by keyword.*wrapper\\(x, emb=emb\\)"):
            wrapped(leaf_copy(_x()), torch.randn(2, 3, 4))


class WithEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return torch.tanh(self.lin(x) + emb)


def test_a_keyword_side_input_to_the_wrapper_gets_plain_autograds_gradients() -> None:
    torch.manual_seed(0)
    wrapped = InvertibleModuleWrapper(AdditiveCoupling(WithEmbedding(), split_dim=-1)).double()
    embed = nn.Linear(2, 4).double()
    plain, plain_embed = plain_copy(wrapped), copy.deepcopy(embed)
    t = torch.randn(2, 1, 2, dtype=torch.float64)
    x, xr = leaf_copy(_x()), leaf_copy(_x())
    wrapped(x, emb=embed(t)).square().sum().backward()
    plain(xr, emb=plain_embed(t)).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    assert_grads_close(wrapped, plain)
    assert_grads_close(embed, plain_embed)
    assert embed.weight.grad is not None and embed.weight.grad.abs().sum() > 0


def test_an_unknown_coupling_name_is_both_a_value_error_and_memcnns_not_implemented_error() -> None:
    for expected in (NotImplementedError, ValueError, UnknownCouplingError):
        with pytest.raises(expected, match="unknown coupling 'unknown'"):
            create_coupling(nn.Identity(), coupling="unknown")
    with pytest.warns(DeprecationWarning), pytest.raises(NotImplementedError):
        ReversibleBlock(nn.Identity(), coupling="unknown")


def test_a_flows_forward_with_logdet_runs_every_block_through_call() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1))
    flow = ReversibleSequence(
        ActNorm(4), InvertibleConv1x1(4), AffineCoupling(net, adapter=AffineAdapterSigmoid)
    ).double()
    seen: Counter[str] = Counter()
    for block in [flow, *flow]:
        block.register_forward_pre_hook(lambda m, a: seen.update([type(m).__name__]))
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    z, logdet = flow.forward_with_logdet(x)
    assert z.shape == x.shape and logdet.shape == (2,)
    assert seen == Counter(
        {"ReversibleSequence": 1, "ActNorm": 1, "InvertibleConv1x1": 1, "AffineCoupling": 1}
    )
