"""The zoo's per-block switches (``checkpointed``, ``keep_blocks``) and plans made on them.

One concept on every model: ``memory_saving`` sets every switch (everything recomputed, or
nothing), a memory plan sets them one by one; no switch changes a parameter, a
``state_dict`` key or a gradient, only what is stored.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from invertible_core import (
    CheckpointableModule,
    MemoryProfile,
    MemorySwitches,
    ReversibleSequence,
    fit_memory_budget,
    is_checkpointable,
    measure_memory,
)
from invertible_models import ResNet, RevNet, create_model
from invertible_models.blocks import BasicResidual, ResidualBlock, Stem


def _small_resnet(**options: object) -> ResNet:
    return ResNet("basic", (2, 2, 2), (8, 8, 8, 8), **options)  # type: ignore[arg-type]


def _small_revnet(**options: object) -> RevNet:
    return RevNet("basic", (3, 3, 3), (16, 16, 32, 64), **options)  # type: ignore[arg-type]


def _switches(model: nn.Module) -> dict[str, bool]:
    return dict(MemorySwitches(model).state().checkpointed)


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _batch(
    n: int = 4, size: int = 8, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g, dtype=dtype)
    return x, torch.randint(0, 10, (n,), generator=g)


def test_the_zoos_non_reversible_blocks_are_checkpointable() -> None:
    assert is_checkpointable(Stem(3, 8))
    block = ResidualBlock(BasicResidual, 8, 8)
    assert isinstance(block, CheckpointableModule) and block.checkpointed is False
    vit = create_model("vit_tiny", depth=2)
    assert all(is_checkpointable(b) for b in vit.blocks)  # type: ignore[union-attr]


@pytest.mark.parametrize("saving", [True, False])
def test_memory_saving_sets_every_switch_of_a_resnet(saving: bool) -> None:
    model = _small_resnet(memory_saving=saving)
    switches = _switches(model)
    blocks = {n: v for n, v in switches.items() if n != "stem"}
    assert len(blocks) == 6 and set(blocks.values()) == {saving}
    assert switches["stem"] is False  # a ResNet never checkpointed its stem
    model.memory_saving = not saving
    assert set(_switches(model).values()) - {switches["stem"]} <= {not saving}


def test_memory_saving_sets_every_switch_of_a_revnet_and_clears_kept_blocks() -> None:
    model = _small_revnet()
    assert _switches(model) == {
        "stem": True,
        "stages.1.transition": True,
        "stages.2.transition": True,
    }
    model.stages[0].blocks.keep_blocks = 2  # type: ignore[union-attr]
    model.stem.checkpointed = False
    model.memory_saving = True
    assert model.stages[0].blocks.keep_blocks == ()  # type: ignore[union-attr]
    assert set(_switches(model).values()) == {True}
    model.memory_saving = False
    assert set(_switches(model).values()) == {False}
    assert not any(s.blocks.memory_saving for s in model.stages)  # type: ignore[union-attr]


def test_checkpoint_transitions_applies_at_once_while_saving() -> None:
    model = _small_revnet()
    model.checkpoint_transitions = False
    assert set(_switches(model).values()) == {False}
    assert model.stages[0].blocks.memory_saving  # type: ignore[union-attr]
    model.checkpoint_transitions = True
    assert set(_switches(model).values()) == {True}
    assert model.stages[1].transition.checkpointed is True  # type: ignore[union-attr]
    assert model.stages[0].transition is None  # no transition in stage 1


@pytest.mark.parametrize("name", ["revvit_tiny", "irevnet"])
def test_memory_saving_clears_kept_blocks_of_the_reversible_models(name: str) -> None:
    model = create_model(
        name, **({"depth": 2} if name == "revvit_tiny" else {"stage_blocks": (1, 1)})
    )
    model.blocks.keep_blocks = 1  # type: ignore[union-attr]
    model.memory_saving = True
    assert model.blocks.keep_blocks == ()  # type: ignore[union-attr]


def test_glow_memory_saving_clears_kept_blocks() -> None:
    model = create_model("glow", image_size=8, levels=2, steps=2, hidden_channels=4)
    for level in model.levels:
        level.flow.keep_blocks = 2  # type: ignore[union-attr]
    model.memory_saving = True
    assert all(level.flow.keep_blocks == () for level in model.levels)  # type: ignore[union-attr]


def test_switches_change_no_parameter_and_no_state_dict_key() -> None:
    model = _small_revnet()
    keys = list(model.state_dict())
    model.stem.checkpointed = False
    model.stages[2].blocks.keep_blocks = [0, 1]  # type: ignore[union-attr]
    assert list(model.state_dict()) == keys


def test_one_checkpointed_block_stores_less_and_keeps_gradients() -> None:
    torch.manual_seed(0)
    model = _small_resnet(memory_saving=False).double()
    x, y = _batch(dtype=torch.float64)
    expected = _grads(model, x, y)

    def stored() -> int:
        out, stats = measure_memory(lambda: model(x))  # what the forward keeps for backward
        del out
        return stats.retained_bytes

    plain = stored()
    model.stages[0][1].checkpointed = True
    for g, e in zip(_grads(model, x, y), expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    activation = x.numel() // 3 * 8 * 8  # one 8-channel double feature map of the batch
    assert stored() <= plain - 2 * activation


def test_a_checkpointed_block_updates_batchnorm_statistics_once() -> None:
    block = ResidualBlock(BasicResidual, 8, 8)
    twin = copy.deepcopy(block)
    block.checkpointed = True
    x = torch.randn(4, 8, 6, 6)
    for m in (block, twin):
        m(x).sum().backward()
    for a, b in zip(block.buffers(), twin.buffers()):
        torch.testing.assert_close(a, b)


def test_a_plan_for_a_revnet_stays_within_its_budget_with_plain_gradients() -> None:
    torch.manual_seed(0)
    model = _small_revnet()
    x, y = _batch(n=4, size=8)
    reference = copy.deepcopy(model)
    reference.memory_saving = False
    expected = _grads(reference, x, y)
    loss = lambda out: nn.functional.cross_entropy(out, y)  # noqa: E731
    profile = MemoryProfile.measure(model, x, loss_fn=loss, repeats=1)
    assert {u.name for u in profile.units} >= {
        "stem",
        "stages.0.blocks[0]",
        "stages.1.transition",
        "stages.2.blocks[1]",
    }
    lo, hi = profile.minimum_peak_bytes, profile.plain_peak_bytes
    for budget in (lo, (lo + hi) // 2, hi):
        plan = fit_memory_budget(model, budget=budget, profile=profile, repeats=1)
        assert plan.measured_peak_bytes is not None and plan.measured_peak_bytes <= budget
        # fixed-point couplings: every plan computes plain autograd's gradients, bit for bit
        for g, e in zip(_grads(model, x, y), expected):
            torch.testing.assert_close(g, e, rtol=0, atol=0)
    assert isinstance(model.stages[0].blocks, ReversibleSequence)
