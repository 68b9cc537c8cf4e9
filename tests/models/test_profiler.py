"""The ``invertible-profile`` command and the profiling functions behind it."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from invertible_models import ResNet, RevNet, create_model, list_models, register_model, registry
from invertible_models.profiler import (
    ModelProfile,
    TrainingStep,
    build_parser,
    format_table,
    main,
    measure_step_memory,
    median_step_seconds,
    plot_profiles,
    profile_model,
)


@pytest.fixture
def tiny_models(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Two small registered networks, so that profiling under the CPU profiler is quick."""
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))

    def tinyres8(num_classes: int = 10, **options: Any) -> nn.Module:
        return ResNet("basic", (1, 1, 1), (8, 8, 8, 8), num_classes, **options)

    def tinyrev8(num_classes: int = 10, memory_saving: bool = True, **options: Any) -> nn.Module:
        return RevNet(
            "basic", (2, 2, 2), (8, 8, 8, 8), num_classes, memory_saving=memory_saving, **options
        )

    register_model(tinyres8)
    register_model(tinyrev8)
    return ["tinyres8", "tinyrev8"]


def test_cli_prints_a_row_per_model_writes_valid_json_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_models: list[str]
) -> None:
    pytest.importorskip("matplotlib")
    out, plot = tmp_path / "profile.json", tmp_path / "memory.png"
    argv = [*tiny_models, "--batch-size", "2", "--image-size", "8", "--steps", "1"]
    assert main([*argv, "--json", str(out), "--plot", str(plot)]) == 0
    assert plot.stat().st_size > 0
    printed = capsys.readouterr().out
    assert "tinyres8" in printed and "tinyrev8" in printed and "peak MiB" in printed
    data = json.loads(out.read_text())
    rows = {p["name"]: p for p in data["profiles"]}
    assert set(rows) == set(tiny_models)
    for name, row in rows.items():
        model = create_model(name)
        assert row["parameters"] == sum(p.numel() for p in model.parameters())
        assert row["peak_step_mib"] > 0 and row["activation_mib"] > 0 and row["step_seconds"] > 0


def test_cli_rejects_unknown_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["resnet33"]) == 2
    assert "known models: glow, irevnet, iunet, iunet3d, resnet32" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cli_refuses_cuda_when_it_is_missing(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["resnet32", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def _profile(label: str, peak: float) -> ModelProfile:
    return ModelProfile(
        name=label,
        label=label,
        parameters=1,
        parameter_mib=0.0,
        state_mib=0.0,
        peak_step_mib=peak,
        activation_mib=peak / 2,
        step_seconds=0.1,
        batch_size=2,
        image_size=16,
        device="cpu",
        options={},
    )


def test_plot_draws_memory_against_depth(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "memory.png"
    profiles = [_profile("resnet32", 10), _profile("resnet110", 30), _profile("revnet38", 5)]
    plot_profiles([*profiles, _profile("custom", 1)], str(path))
    assert path.stat().st_size > 0


def test_cli_plot_without_matplotlib_says_how_to_install_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tiny_models: list[str],
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    argv = ["tinyres8", "--batch-size", "1", "--image-size", "8", "--steps", "1"]
    assert main([*argv, "--plot", str(tmp_path / "m.png")]) == 1
    assert "invertible-models[plot]" in capsys.readouterr().err


def test_profile_model_passes_options_and_labels_rows(tiny_models: list[str]) -> None:
    profile = profile_model(
        "tinyrev8",
        batch_size=2,
        image_size=8,
        steps=1,
        label="tinyrev8 nosave",
        memory_saving=False,
    )
    assert profile.label == "tinyrev8 nosave"
    assert profile.options == {"memory_saving": False}
    assert "tinyrev8 nosave" in format_table([profile])
    assert profile.state_mib >= 3 * profile.parameter_mib  # parameters, gradients, momentum
    untimed = profile_model("tinyres8", batch_size=1, image_size=8, steps=0)
    assert untimed.step_seconds != untimed.step_seconds  # NaN: not timed
    with pytest.raises(ValueError, match="steps must be at least 0"):
        profile_model("resnet32", steps=-1)


def test_step_times_are_interleaved_medians_on_either_clock(tiny_models: list[str]) -> None:
    step = TrainingStep(create_model("tinyres8"), batch_size=1, image_size=8, num_classes=10)
    step()
    assert step.state_bytes > 0
    for clock in ("wall", "cpu"):
        times = median_step_seconds([step, step], repeats=2, clock=clock)
        assert len(times) == 2 and all(t >= 0 for t in times)


def test_cli_lists_the_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list"]) == 0
    assert capsys.readouterr().out.split() == list_models()


@pytest.mark.parametrize("option", ["--batch-size", "--steps", "--image-size", "--num-classes"])
def test_cli_refuses_zero_with_a_usage_error(
    capsys: pytest.CaptureFixture[str], option: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["resnet32", option, "0"])
    assert exit_.value.code == 2
    assert f"argument {option}: must be at least 1, got 0" in capsys.readouterr().err


def test_cli_without_a_model_says_how_to_list_them(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2 and "--list" in capsys.readouterr().err


def test_help_names_only_options_that_exist() -> None:
    parser = build_parser()
    named = set(re.findall(r"--[a-z][a-z-]+", parser.format_help()))
    existing = {option for action in parser._actions for option in action.option_strings}
    assert named <= existing and "--list" in existing


def test_a_step_on_the_callers_batch_and_loss_is_measured_like_any_other(
    tiny_models: list[str],
) -> None:
    """The one measurement the harness and the demo use: any batch, any loss."""
    torch.manual_seed(0)
    model = create_model("tinyrev8")
    images = torch.randn(4, 3, 8, 8)
    labels = torch.randint(0, 10, (4,))
    calls = []

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls.append(logits.shape)
        return nn.functional.cross_entropy(logits, target)

    step = TrainingStep(model, images=images, labels=labels, loss=loss)
    memory = measure_step_memory(step)
    assert calls and all(shape == (4, 10) for shape in calls)
    assert memory.activation_bytes > 0 and memory.step_peak_bytes > memory.activation_bytes
    assert memory.state_bytes == step.state_bytes
    # the default synthetic batch of the same size measures the same: memory depends on shapes
    torch.manual_seed(0)
    default = measure_step_memory(
        TrainingStep(create_model("tinyrev8"), batch_size=4, image_size=8, num_classes=10)
    )
    assert default == memory
    # autocast is applied: a plain network stores half-size activations under bf16 (a
    # reversible one keeps its residual stream in float32, see blocks.float32_stream)
    fp32, bf16 = (
        measure_step_memory(
            TrainingStep(create_model("tinyres8"), images=images, labels=labels, amp_dtype=amp)
        )
        for amp in (None, torch.bfloat16)
    )
    assert bf16.activation_bytes < fp32.activation_bytes


def test_profiling_a_flow_on_real_digits_keeps_it_finite() -> None:
    """A flow is profiled at a learning rate it survives: stepped at the classifiers' 0.01 on
    one batch of real digits, Glow reached NaN within these 6 steps, and the profiler timed
    NaN arithmetic (and the chain warned of drift)."""
    import warnings

    from sklearn.datasets import load_digits

    digits = torch.tensor(load_digits().images[:64], dtype=torch.float32).unsqueeze(1) / 16
    torch.manual_seed(0)
    glow = create_model(
        "glow", in_channels=1, image_size=8, levels=2, num_bins=17, steps=32, hidden_channels=64
    )
    step = TrainingStep(glow, images=digits)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the chain's drift warning included
        for _ in range(6):
            step()
            for p in glow.parameters():
                assert torch.isfinite(p).all()
