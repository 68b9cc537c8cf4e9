"""``memory_saving``: one switch with one meaning on every model of the zoo."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from invertible_core.memory import measure_memory
from invertible_models import (
    IRevNet,
    ResNet,
    ReversibleVisionTransformer,
    RevNet,
    VisionTransformer,
    create_model,
)

SMALL_MODELS: dict[str, Callable[[], nn.Module]] = {
    "irevnet": lambda: IRevNet((2, 2, 2), width=16),
    "resnet": lambda: ResNet("basic", (2, 2, 2), (8, 8, 16, 32)),
    "revnet": lambda: RevNet("basic", (3, 3, 3), (16, 16, 32, 64)),
    "vit": lambda: VisionTransformer(16, 3, 2, image_size=16, drop_rate=0.1),
    "revvit": lambda: ReversibleVisionTransformer(16, 3, 2, image_size=16, drop_rate=0.1),
}


@pytest.mark.parametrize("family", sorted(SMALL_MODELS))
def test_switching_after_construction_changes_no_parameter_or_state_dict_key(
    family: str,
) -> None:
    model = SMALL_MODELS[family]()
    names = [name for name, _ in model.named_parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.memory_saving = False
    assert model.memory_saving is False
    assert [name for name, _ in model.named_parameters()] == names
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    model.memory_saving = True
    assert model.memory_saving is True


def _images(family: str) -> torch.Tensor:
    return torch.randn(4, 3, 16 if "vit" in family else 32, 16 if "vit" in family else 32)


@pytest.mark.parametrize("family", sorted(SMALL_MODELS))
def test_saving_keeps_fewer_activations_and_the_same_gradients(family: str) -> None:
    model = SMALL_MODELS[family]()
    x, y = _images(family), torch.randint(0, 10, (4,))
    results = []
    for saving in (False, True):
        model.memory_saving = saving
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)  # the same dropout masks in both modes
        logits, stats = measure_memory(lambda: model(x))
        nn.functional.cross_entropy(logits, y).backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        results.append((stats.retained_bytes, grads))
    (plain_bytes, plain_grads), (saving_bytes, saving_grads) = results
    assert saving_bytes < 0.7 * plain_bytes
    torch.testing.assert_close(saving_grads, plain_grads, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", sorted(SMALL_MODELS))
def test_saving_changes_nothing_in_eval_mode(family: str) -> None:
    model = SMALL_MODELS[family]().eval()
    x = _images(family)
    model(x)  # warm-up: the core shields the caller's tensors with copies on a module's first call
    model.memory_saving = False
    _, plain = measure_memory(lambda: model(x).sum())
    model.memory_saving = True
    _, saving = measure_memory(lambda: model(x).sum())
    assert saving.retained_bytes == plain.retained_bytes


def test_checkpoint_blocks_is_a_deprecated_alias_of_memory_saving() -> None:
    with pytest.warns(DeprecationWarning, match="use memory_saving"):
        model = ResNet("basic", (1, 1, 1), (8, 8, 8, 8), checkpoint_blocks=False)
    assert model.memory_saving is False  # the alias wins over the default
    with pytest.warns(DeprecationWarning, match="use memory_saving"):
        named = create_model("resnet32", checkpoint_blocks=True, memory_saving=False)
    assert named.memory_saving is True
    with pytest.warns(DeprecationWarning, match="checkpoint_blocks is deprecated"):
        model.checkpoint_blocks = True
    assert model.memory_saving is True
    with pytest.warns(DeprecationWarning):
        assert model.checkpoint_blocks is True
