"""make_reversible on torchvision's ResNets: every stage's identity blocks reversible."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conversion_checks import output_distance, saving_gradient_error
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from invertible_core import measure_memory
from invertible_models import ConvertedModel, make_reversible
from invertible_models.conversion import KeptBlock

METHODS = ("momentum", "two_stream")


def images(size: int = 32, batch: int = 2, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, dtype=dtype)


def test_every_stage_s_identity_blocks_become_one_run_and_the_rest_is_kept():
    converted = make_reversible(torchvision.models.resnet50(), "momentum")
    assert isinstance(converted, ResNet) and isinstance(converted, ConvertedModel)
    assert converted.conversion.runs == [
        ("layer1.1-2", 2),
        ("layer2.1-3", 3),
        ("layer3.1-5", 5),
        ("layer4.1-2", 2),
    ]
    assert [path for path, _ in converted.conversion.kept] == [
        "conv1",
        "layer1.0",
        "layer2.0",
        "layer3.0",
        "layer4.0",
    ]
    assert isinstance(converted.layer1[0], KeptBlock)


@pytest.mark.parametrize("method", METHODS)
def test_resnet_parameters_and_state_dict_are_the_originals(method):
    original = torchvision.models.resnet18(num_classes=10)
    converted = make_reversible(original, method)
    assert [id(p) for p in converted.parameters()] == [id(p) for p in original.parameters()]
    assert list(converted.state_dict()) == list(original.state_dict())
    other = torchvision.models.resnet18(num_classes=10)
    converted.load_state_dict(other.state_dict())
    assert all(
        torch.equal(a, b)
        for a, b in zip(converted.state_dict().values(), other.state_dict().values())
    )
    original.load_state_dict(converted.state_dict())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("depths", [(2, 2, 2, 2), (1, 3, 1, 1)], ids=["basic", "bottleneck"])
def test_resnet_gradients_with_memory_saving_equal_plain_autograd(method, depths):
    block = BasicBlock if depths == (2, 2, 2, 2) else Bottleneck
    converted = make_reversible(ResNet(block, list(depths), num_classes=10).double(), method)
    x = images()
    error = saving_gradient_error(converted, lambda: converted(x))
    assert error <= 1e-10, error


@pytest.mark.parametrize(
    ("method", "near"), [("momentum", {"gamma": 1e-5}), ("two_stream", {"beta": 1e-5})]
)
def test_resnet_starts_at_the_original_for_small_coefficients(method, near):
    original = torchvision.models.resnet18(num_classes=10).double()
    converted = make_reversible(original, method, **near)
    x = images(64)
    assert output_distance(converted, original, lambda m: m(x)) < 1e-3


def _retained(model: nn.Module, x: torch.Tensor) -> int:
    model.train()
    _, stats = measure_memory(lambda: model(x))
    return stats.retained_bytes


def test_resnet_training_memory_is_flat_in_depth_and_kept_blocks_are_checkpointed():
    x = images(32, 2, torch.float32)
    shallow = ResNet(Bottleneck, [1, 2, 2, 1], num_classes=10)
    deep = ResNet(Bottleneck, [1, 2, 6, 1], num_classes=10)
    # what grows is the engine's copy of the BatchNorm statistics the added blocks write
    # (it shows the recompute the statistics the forward saw), never their activations
    added = sum(b.numel() * b.element_size() for block in deep.layer3[2:] for b in block.buffers())
    saving = [_retained(make_reversible(m, "momentum"), x) for m in (shallow, deep)]
    assert 0 <= saving[1] - saving[0] <= added + 1024
    assert _retained(deep, x) > 3 * saving[1]
    flat = [_retained(make_reversible(m, "two_stream", anchor_every=0), x) for m in (shallow, deep)]
    assert 0 <= flat[1] - flat[0] <= added + 1024
    anchored = [_retained(make_reversible(m, "two_stream"), x) for m in (shallow, deep)]
    # an anchor after each coupling of layer3 (1 coupling shallow, 3 deep) is stored
    assert anchored[0] == flat[0] and anchored[1] > flat[1]
    converted = make_reversible(deep, "momentum", checkpoint_kept=False)
    assert not any(block.checkpointed for block in converted.kept_blocks())
    assert _retained(converted, x) > saving[1]
    converted.checkpoint_kept = True
    assert all(block.checkpointed for block in converted.kept_blocks())
    assert _retained(converted, x) == saving[1]
    converted.memory_saving = False
    assert not any(block.checkpointed for block in converted.kept_blocks())


def test_kept_blocks_update_batchnorm_statistics_once_per_step():
    original = torchvision.models.resnet18(num_classes=10)
    converted = make_reversible(original, "momentum")
    converted.train()
    converted(images(32, 2, torch.float32)).sum().backward()
    counts = {
        int(m.num_batches_tracked) for m in original.modules() if isinstance(m, nn.BatchNorm2d)
    }
    assert counts == {1}
