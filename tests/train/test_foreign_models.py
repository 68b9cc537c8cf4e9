"""invertible-train takes torchvision and timm models by name, and makes them reversible."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torchvision

from invertible_models import ConvertedModel
from invertible_train.checkpoint import load_checkpoint
from invertible_train.config import ModelConfig, apply_values, load_experiment
from invertible_train.model import build_model, with_data_image_size


def test_a_torchvision_resnet_trains_reversibly_and_its_checkpoint_is_the_originals(
    run_cli: Callable[..., int], tmp_path: Path
) -> None:
    assert run_cli("tv:resnet18", "synthetic", "--reversible", "momentum", "--iterations", "2") == 0
    state = load_checkpoint(
        tmp_path / "results" / "tv:resnet18-synthetic" / "checkpoints" / "last.pt"
    )
    plain = torchvision.models.resnet18(num_classes=10)
    plain.load_state_dict(state["model"])  # strict: the converted network saved the original's keys
    assert state["config"]["model"]["reversible"] == "momentum"


def test_a_timm_vit_is_built_for_the_data_s_image_size_and_trains_reversibly(
    run_cli: Callable[..., int],
) -> None:
    for dataset, values, size in (
        ("digits", {}, 8),
        ("cifar10", {}, 32),
        ("synthetic", {"data.image_size": 12}, 12),
    ):
        cfg = apply_values(load_experiment("timm:vit_tiny_patch16_224", dataset=dataset), values)
        cfg = apply_values(cfg, {"data.dataset": dataset})
        assert with_data_image_size(cfg).model.options["img_size"] == size
    mine = apply_values(
        load_experiment("timm:vit_tiny_patch16_224"), {"model.options.img_size": 64}
    )
    assert with_data_image_size(mine).model.options["img_size"] == 64  # the experiment's wins
    args = ("--reversible", "two_stream", "--set", "model.options.patch_size=4")
    assert run_cli("timm:vit_tiny_patch16_224", "synthetic", *args, "--iterations", "2") == 0


def test_the_conversion_takes_its_coefficients_and_the_memory_switch() -> None:
    cfg = ModelConfig(
        name="tv:resnet18",
        memory_saving=False,
        reversible="two_stream",
        reversible_options={"beta": 0.25},
    )
    model = build_model(cfg, num_classes=4)
    assert isinstance(model, ConvertedModel)
    assert model.coefficients.as_dict() == {"alpha": 1.0, "beta": 0.25}
    assert model.memory_saving is False
    # model.memory_saving unset: the converted network's own default, saving
    default = build_model(ModelConfig(name="tv:resnet18", reversible="momentum"), num_classes=4)
    assert isinstance(default, ConvertedModel) and default.memory_saving is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("tv:resnet7", "synthetic"), "torchvision has no classification model 'resnet7'"),
        (("timm:not_a_vit", "synthetic"), "timm has no model 'not_a_vit'"),
        (("resnet32", "synthetic", "--reversible", "momentum"), "cannot convert ResNet"),
        (("tv:resnet18", "digits"), "takes 3-channel images, but the dataset has 1"),
        (
            ("tv:resnet18", "synthetic", "--set", "model.reversible_options.gamma=0.5"),
            "model.reversible, which is not set",
        ),
        (
            (
                "tv:resnet18",
                "synthetic",
                "--reversible",
                "momentum",
                "--set",
                "model.reversible_options.gamma=2.0",
            ),
            r"gamma must be in \(0, 1\)",
        ),
    ],
)
def test_bad_names_methods_and_coefficients_are_one_line_usage_errors(
    run_cli: Callable[..., int],
    capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...],
    message: str,
) -> None:
    assert run_cli(*args, "--iterations", "1") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
