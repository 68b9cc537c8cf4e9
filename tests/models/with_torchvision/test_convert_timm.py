"""make_reversible on timm's VisionTransformer (the optional extra invertible-models[timm])."""

from __future__ import annotations

import pytest
import timm
import torch
from conversion_checks import output_distance, relative_l2, saving_gradient_error
from timm.models.vision_transformer import ResPostBlock, VisionTransformer

from invertible_models import make_reversible

METHODS = ("momentum", "two_stream")


def vit(**options: object) -> VisionTransformer:
    config: dict[str, object] = {
        "img_size": 16,
        "patch_size": 4,
        "embed_dim": 32,
        "depth": 3,
        "num_heads": 4,
        "num_classes": 5,
    }
    config.update(options)
    return VisionTransformer(**config).double()  # type: ignore[arg-type]


def images() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, dtype=torch.float64)


@pytest.mark.parametrize("method", METHODS)
def test_vit_parameters_and_state_dict_are_the_originals(method):
    original = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10)
    original.set_grad_checkpointing(True)
    converted = make_reversible(original, method)
    assert [id(p) for p in converted.parameters()] == [id(p) for p in original.parameters()]
    assert list(converted.state_dict()) == list(original.state_dict())
    assert converted.conversion.runs == [("blocks.0-11", 24)]
    assert not converted.grad_checkpointing and original.grad_checkpointing
    original.load_state_dict(converted.state_dict())


@pytest.mark.parametrize("method", METHODS)
def test_vit_gradients_with_memory_saving_equal_plain_autograd(method):
    converted = make_reversible(vit(drop_path_rate=0.2, proj_drop_rate=0.1), method)
    x = images()
    error = saving_gradient_error(converted, lambda: converted(x))
    assert error <= 1e-10, error


@pytest.mark.parametrize(
    ("method", "near"), [("momentum", {"gamma": 1e-5}), ("two_stream", {"beta": 1e-5})]
)
def test_vit_starts_at_the_original_for_small_coefficients(method, near):
    original = vit()
    converted = make_reversible(original, method, **near)
    x = images()
    assert output_distance(converted, original, lambda m: m(x)) < 1e-3
    # the attention mask reaches every block
    mask = torch.zeros(17, 17, dtype=torch.bool)
    mask[:, -3:] = True
    mask = ~mask
    with torch.no_grad():
        masked = converted(x, attn_mask=mask)
        assert relative_l2(masked, original(x, attn_mask=mask)) < 1e-3
        assert relative_l2(masked, converted(x)) > 1e-3


def test_other_timm_blocks_become_one_unit_each():
    original = vit(block_fn=ResPostBlock)
    converted = make_reversible(original, "two_stream", beta=1e-6)
    assert converted.conversion.runs == [("blocks.0-2", 3)]
    x = images()
    assert output_distance(converted, original, lambda m: m(x)) < 1e-3
