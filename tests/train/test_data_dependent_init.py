"""Data-dependent layers (ActNorm) are initialised alike on every rank before DDP wraps."""

from __future__ import annotations

import copy

import torch
from torch import nn

from invertible_core import ActNorm, InvertibleConv1x1
from invertible_train.model import initialise_data_dependent_layers


def flow() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(ActNorm(3), InvertibleConv1x1(3), ActNorm(3))


def test_every_process_initialises_from_the_same_batch_and_agrees() -> None:
    batch = torch.rand(8, 3, 4, 4) * 5 + 1
    rank0, rank1 = flow(), flow()
    for model in (rank0, rank1):
        assert initialise_data_dependent_layers(model, lambda: batch, model)
    assert all(m.is_initialized() for m in rank0.modules() if isinstance(m, ActNorm))
    for p, q in zip(rank0.state_dict().values(), rank1.state_dict().values()):
        assert torch.equal(p, q)
    first = rank0[0]
    assert isinstance(first, ActNorm)
    torch.testing.assert_close(first(batch).mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)


def test_nothing_runs_without_uninitialised_layers_and_the_rng_is_untouched() -> None:
    calls: list[int] = []
    plain = nn.Linear(2, 2)
    plain.register_forward_hook(lambda *_: calls.append(1))
    assert not initialise_data_dependent_layers(plain, lambda: torch.randn(1, 2), plain)
    assert calls == []
    model = flow()
    initialised = copy.deepcopy(model)
    initialise_data_dependent_layers(initialised, lambda: torch.rand(4, 3, 2, 2), initialised)
    assert not initialise_data_dependent_layers(
        initialised, lambda: torch.rand(4, 3, 2, 2), initialised
    )
    state = torch.get_rng_state()
    initialise_data_dependent_layers(model.eval(), lambda: torch.rand(4, 3, 2, 2), model)
    assert torch.equal(torch.get_rng_state(), state)
    assert not model.training  # its mode is put back
