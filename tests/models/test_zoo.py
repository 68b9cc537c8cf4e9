"""The zoo: parameter counts, the registry, network configurations, the ImageNet variant."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from invertible_models import (
    BasicBlock,
    Bottleneck,
    ResNet,
    RevNet,
    create_model,
    list_models,
    register_model,
    registry,
    reversible_block,
)
from invertible_models.blocks import BasicResidual, BottleneckResidual, Stem, residual_function

# figures.md: these must match exactly.
PARAMETER_COUNTS = {
    ("resnet32", 10): 466_906,
    ("resnet32", 100): 472_756,
    ("resnet110", 10): 1_730_714,
    ("resnet110", 100): 1_736_564,
    ("resnet164", 10): 1_704_154,
    ("resnet164", 100): 1_727_284,
    ("revnet38", 10): 573_994,
    ("revnet38", 100): 584_164,
    ("revnet110", 10): 1_854_890,
    ("revnet110", 100): 1_866_500,
    ("revnet164", 10): 1_983_786,
    ("revnet164", 100): 2_029_956,
}


@pytest.mark.parametrize(("name", "num_classes"), sorted(PARAMETER_COUNTS))
def test_parameter_count_matches_the_paper(name: str, num_classes: int) -> None:
    model = create_model(name, num_classes=num_classes)
    assert sum(p.numel() for p in model.parameters()) == PARAMETER_COUNTS[name, num_classes]


ZOO = [
    "glow",
    "irevnet",
    "resnet32",
    "resnet110",
    "resnet164",
    "revnet38",
    "revnet110",
    "revnet164",
    "revvit_small",
    "revvit_tiny",
    "vit_small",
    "vit_tiny",
]


def test_list_models_names_the_zoo_by_family_and_depth() -> None:
    # other test suites may register more models in the same process
    assert [name for name in list_models() if name in ZOO] == ZOO


#: the zoo's plain networks: they train plainly unless asked, as timm's do
PLAIN = {"resnet32", "resnet110", "resnet164", "vit_small", "vit_tiny"}


@pytest.mark.parametrize("name", ZOO)
def test_a_plain_network_trains_plainly_a_reversible_one_saves_and_both_take_the_switch(
    name: str,
) -> None:
    model = create_model(name)
    plain = name in PLAIN
    assert model.memory_saving is (not plain)
    if plain:  # nothing checkpointed: plain autograd, the conventional network
        assert not any(getattr(m, "checkpointed", False) for m in model.modules())
    model.set_grad_checkpointing()  # timm's name for memory_saving = True
    assert model.memory_saving is True
    model.set_grad_checkpointing(False)
    assert model.memory_saving is False
    assert create_model(name, memory_saving=plain).memory_saving is plain  # passed through


def test_unknown_model_name_lists_the_known_ones() -> None:
    with pytest.raises(
        ValueError,
        match="unknown model .revnet56.; known models: glow, irevnet, iunet, iunet3d, resnet32",
    ):
        create_model("revnet56")


def test_registering_another_constructor_under_a_taken_name_is_refused() -> None:
    def resnet32(num_classes: int = 10) -> nn.Module:
        return nn.Linear(1, num_classes)

    with pytest.raises(ValueError, match="already registered"):
        register_model(resnet32)


def test_register_model_returns_the_constructor_and_create_model_finds_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))

    def tiny_test_net(num_classes: int = 10) -> nn.Module:
        return nn.Linear(4, num_classes)

    assert register_model(tiny_test_net) is tiny_test_net
    assert register_model(tiny_test_net) is tiny_test_net  # re-registering itself is fine
    model = create_model("tiny_test_net", num_classes=3, memory_saving=False)
    assert isinstance(model, nn.Linear) and model.out_features == 3


@pytest.mark.parametrize("name", ["resnet32", "revnet38"])
def test_forward_gives_logits_per_image(name: str) -> None:
    model = create_model(name, num_classes=7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_first_block_omits_the_leading_batchnorm() -> None:
    model = create_model("resnet32")
    assert isinstance(model, ResNet)
    first, second = model.stages[0][0], model.stages[0][1]
    assert isinstance(first.residual.bn1, nn.Identity)
    assert isinstance(second.residual.bn1, nn.BatchNorm2d)


def test_convolutions_are_he_normal_initialised() -> None:
    model = ResNet("basic", (1, 1, 1), (64, 64, 64, 64))
    conv = model.stages[1][0].residual.conv2
    fan_out = 3 * 3 * 64
    assert conv.weight.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.05)


@pytest.mark.parametrize("cls", [ResNet, RevNet])
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_imagenet_variant_has_four_stages_and_runs(cls: type[nn.Module], block: str) -> None:
    model = cls(block, (1, 2, 2, 2), (16, 16, 32, 64, 128), num_classes=5, stem="imagenet")
    assert len(model.stages) == 4
    assert any(isinstance(m, nn.MaxPool2d) for m in model.stem)
    assert model.stem[0].kernel_size == (7, 7)
    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 5)


def test_blocks_keep_or_change_shape_as_configured() -> None:
    x = torch.randn(2, 16, 8, 8)
    assert BasicBlock(16, 16)(x).shape == (2, 16, 8, 8)
    assert BasicBlock(16, 32, stride=2)(x).shape == (2, 32, 4, 4)
    assert Bottleneck(16, 8)(x).shape == (2, 32, 8, 8)
    assert isinstance(BasicBlock(16, 16).shortcut, nn.Identity)
    assert isinstance(Bottleneck(16, 8).shortcut, nn.Sequential)


def test_reversible_block_uses_half_width_residual_functions() -> None:
    coupling = reversible_block(BottleneckResidual, 64)
    assert isinstance(coupling.Fm, BottleneckResidual)
    assert coupling.Fm.conv1.in_channels == 32 and coupling.Fm.conv3.out_channels == 32
    assert coupling.Fm is not coupling.Gm
    with pytest.raises(ValueError, match="divisible by 8"):
        reversible_block(BottleneckResidual, 36)
    assert reversible_block(BasicResidual, 6)(torch.randn(1, 6, 4, 4)).shape == (1, 6, 4, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stage_blocks": (1, 1)}, "3 \\(CIFAR\\) or 4"),
        ({"stage_blocks": (1, 0, 1)}, "at least one block"),
        ({"channels": (16, 16, 32)}, "channels must give"),
        ({"strides": (1, 2)}, "strides must give"),
        ({"block": "wide"}, "block must be"),
        ({"stem": "tiny"}, "stem must be"),
    ],
)
@pytest.mark.parametrize("cls", [ResNet, RevNet])
def test_inconsistent_configuration_names_the_argument(
    cls: type[nn.Module], kwargs: dict[str, object], message: str
) -> None:
    config: dict[str, object] = {
        "block": "basic",
        "stage_blocks": (1, 1, 1),
        "channels": (16, 16, 32, 64),
    }
    config.update(kwargs)
    with pytest.raises(ValueError, match=message):
        cls(**config)


def test_residual_function_names() -> None:
    assert residual_function("basic") is BasicResidual
    assert residual_function("bottleneck") is BottleneckResidual
    assert len(Stem(3, 8, "cifar")) == 3
