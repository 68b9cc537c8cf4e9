"""The iUNet and its plain twin: equal parameters, the same function when fresh, an exact
inverse, memory saving with plain autograd's gradients and memory flat in depth."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from invertible_core import measure_memory
from invertible_models import IUNet, UNet, create_model, list_models
from invertible_models.step import is_segmentation_model, training_step

DTYPE = torch.float64


def _perturb(model: nn.Module, scale: float = 0.1) -> nn.Module:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "options",
    [
        {"dim": 2, "depth": 1},
        {"dim": 2, "depth": 3, "width": 8, "levels": 2, "in_channels": 3, "num_classes": 5},
        {"dim": 3, "depth": 2, "width": 4, "levels": 2},
    ],
)
def test_the_twins_have_equal_parameters_and_compute_the_same_function_when_fresh(
    options: dict[str, int],
) -> None:
    torch.manual_seed(0)
    iunet = create_model("iunet", **options)  # type: ignore[arg-type]
    twin = create_model("unet", memory_saving=False, **options)  # type: ignore[arg-type]
    assert _count(iunet) == _count(twin) > 0
    assert isinstance(iunet, IUNet) and isinstance(twin, UNet)
    twin.head.load_state_dict(iunet.head.state_dict())
    dim = options["dim"]
    x = torch.randn(2, options.get("in_channels", 1), *([8] * dim))
    with torch.no_grad():
        torch.testing.assert_close(iunet(x), twin(x), rtol=0, atol=1e-5)


def test_the_3d_constructors_are_registered_twins() -> None:
    assert {"iunet", "unet", "iunet3d", "unet3d"} <= set(list_models())
    iunet, twin = create_model("iunet3d", depth=1), create_model("unet3d", depth=1)
    assert iunet.spatial_dims == twin.spatial_dims == 3 and _count(iunet) == _count(twin)


@pytest.mark.parametrize("dim", [2, 3])
def test_inverse_undoes_the_features(dim: int) -> None:
    torch.manual_seed(0)
    model = _perturb(IUNet(2, dim=dim, depth=1, width=8, levels=2).to(DTYPE)).eval()
    x = torch.randn(2, 2, *([8] * dim), dtype=DTYPE)
    z = model.features(x)
    assert z.shape == (2, 8, *([8] * dim))
    torch.testing.assert_close(model.inverse(z), x, rtol=0, atol=1e-10)
    assert model(x).shape == (2, 2, *([8] * dim))


def test_gradients_with_memory_saving_equal_plain_autograd() -> None:
    torch.manual_seed(0)
    model = _perturb(IUNet(1, 3, dim=3, depth=1, width=4, levels=2).to(DTYPE)).train()
    x = torch.randn(2, 1, 4, 4, 4, dtype=DTYPE)
    labels = torch.randint(0, 3, (2, 4, 4, 4))
    grads = []
    for saving in (True, False):
        model.memory_saving = saving
        model.zero_grad()
        nn.functional.cross_entropy(model(x), labels).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for saved, plain in zip(*grads):
        torch.testing.assert_close(saved, plain, rtol=1e-8, atol=1e-12)


def _retained(model: nn.Module, x: torch.Tensor) -> int:
    model.train()
    _, stats = measure_memory(lambda: model(x))
    return stats.retained_bytes


def test_forward_memory_is_flat_in_depth_and_the_twins_grows() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16)
    options = {"width": 8, "levels": 2}
    ours = [_retained(IUNet(dim=2, depth=d, **options), x) for d in (1, 4)]
    twin = [_retained(UNet(dim=2, depth=d, memory_saving=False, **options), x) for d in (1, 4)]
    assert ours[0] == ours[1]
    assert twin[1] > 3 * twin[0] and ours[1] < twin[1] / 5


def test_the_profiler_steps_a_segmentation_model_on_volumes() -> None:
    model = create_model("iunet3d", num_classes=3, depth=1, width=4, levels=1)
    assert is_segmentation_model(model) and not is_segmentation_model(nn.Linear(2, 2))
    step = training_step(model, batch_size=2, image_size=4)
    (images,), labels = step.inputs, step.targets
    assert images.shape == (2, 1, 4, 4, 4) and labels.shape == (2, 4, 4, 4)
    assert int(labels.max()) <= 2
    step()  # forward, cross-entropy per voxel, backward, SGD


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dim": 1}, "dim must be 2 .* or 3"),
        ({"dim": 3, "width": 6}, "width must be a multiple of 4 for dim=3"),
        ({"levels": 0}, "levels must be >= 1"),
        ({"depth": 0}, "depth must be >= 1"),
        ({"in_channels": 32, "width": 16}, "in_channels must be 1..width=16"),
    ],
)
def test_bad_configuration_names_the_argument(options: dict[str, int], message: str) -> None:
    for name in ("iunet", "unet"):
        with pytest.raises(ValueError, match=message):
            create_model(name, **options)  # type: ignore[arg-type]


def test_a_wrong_input_says_what_was_expected() -> None:
    model = IUNet(dim=2, levels=2)
    with pytest.raises(ValueError, match=r"expected a batch of shape \(batch, 1, height, width\)"):
        model(torch.randn(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="divisible by 4"):
        UNet(dim=2, levels=2)(torch.randn(1, 1, 8, 6))
