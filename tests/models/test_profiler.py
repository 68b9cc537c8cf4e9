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

from invertible_core import measure_step_memory, median_step_seconds
from invertible_models import ResNet, RevNet, create_model, list_models, register_model, registry
from invertible_models.profiler import (
    ModelProfile,
    build_parser,
    compare,
    format_table,
    main,
    plot_profiles,
    profile_model,
)
from invertible_models.step import training_step


@pytest.fixture
def tiny_models(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Two small registered networks, so that profiling under the CPU profiler is quick."""
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))

    def tinyres8(num_classes: int = 10, memory_saving: bool = False, **options: Any) -> nn.Module:
        return ResNet(
            "basic", (1, 1, 1), (8, 8, 8, 8), num_classes, memory_saving=memory_saving, **options
        )

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
    assert "tinyres8" in printed and "tinyrev8" in printed and "step peak MiB" in printed
    data = json.loads(out.read_text())
    rows = {p["name"]: p for p in data["profiles"]}
    assert set(rows) == set(tiny_models)
    for name, row in rows.items():
        model = create_model(name)
        assert row["parameters"] == sum(p.numel() for p in model.parameters())
        assert row["step_peak_mib"] > 0 and row["activation_mib"] > 0 and row["step_seconds"] > 0
    assert data["failed"] == []


def test_every_row_says_whether_saving_is_on_and_the_defaults_are_the_zoos(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_models: list[str]
) -> None:
    """A plain network plainly, a reversible one saving; and the saving row measured
    against the plain one, memory saved beside the time it costs."""
    out = tmp_path / "profile.json"
    argv = ["tinyrev8", "tinyres8", "--batch-size", "2", "--image-size", "8", "--steps", "1"]
    assert main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1] for line in printed.splitlines()[3:5]}
    assert rows == {"tinyrev8": "on", "tinyres8": "off"}
    assert "tinyrev8 (saving on) against tinyres8 (saving off): step peak" in printed
    assert "the step time" in printed
    data = json.loads(out.read_text())
    saving = {p["name"]: p["memory_saving"] for p in data["profiles"]}
    assert saving == {"tinyrev8": True, "tinyres8": False}
    (comparison,) = data["comparisons"]
    assert (comparison["label"], comparison["reference"]) == ("tinyrev8", "tinyres8")
    by = {p["name"]: p for p in data["profiles"]}
    assert comparison["step_peak_ratio"] == pytest.approx(
        by["tinyrev8"]["step_peak_mib"] / by["tinyres8"]["step_peak_mib"]
    )
    assert comparison["time_ratio"] == pytest.approx(
        by["tinyrev8"]["step_seconds"] / by["tinyres8"]["step_seconds"]
    )


def test_both_profiles_each_model_with_and_without_saving(
    tmp_path: Path, tiny_models: list[str]
) -> None:
    out = tmp_path / "profile.json"
    argv = ["tinyres8", "--memory-saving", "both", "--batch-size", "2", "--image-size", "8"]
    assert main([*argv, "--steps", "1", "--json", str(out)]) == 0
    profiles = json.loads(out.read_text())["profiles"]
    assert [(p["name"], p["memory_saving"]) for p in profiles] == [
        ("tinyres8", True),
        ("tinyres8", False),
    ]
    checkpointed, plain = profiles
    assert checkpointed["activation_mib"] < plain["activation_mib"]


@pytest.fixture
def diverging_model(monkeypatch: pytest.MonkeyPatch) -> str:
    """A classifier whose loss is infinite from its second training step on."""
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))

    class Diverging(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3 * 8 * 8, 10)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                self.calls += 1
            scale = torch.where(self.calls > 1, torch.inf, 1.0)
            return self.linear(x.flatten(1)) * scale

    def diverging8(num_classes: int = 10, **options: Any) -> nn.Module:
        return Diverging()

    register_model(diverging8)
    return "diverging8"


def test_a_step_whose_loss_is_not_finite_is_never_timed_and_nothing_is_recorded(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tiny_models: list[str],
    diverging_model: str,
) -> None:
    import warnings

    out = tmp_path / "profile.json"
    argv = [diverging_model, "tinyres8", "--batch-size", "2", "--image-size", "8", "--steps", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no raw RuntimeWarning of NaN arithmetic either
        assert main([*argv, "--json", str(out)]) == 1
    captured = capsys.readouterr()
    assert "diverging8: the loss of training step 2 is nan" in captured.err
    assert "nothing recorded" in captured.err
    assert "diverging8" not in captured.out and "tinyres8" in captured.out
    data = json.loads(out.read_text())
    assert [p["name"] for p in data["profiles"]] == ["tinyres8"]
    assert [f["model"] for f in data["failed"]] == [diverging_model]


def test_cli_rejects_unknown_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["resnet33"]) == 2
    assert "known models: glow, irevnet, iunet, iunet3d, resnet32" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cli_refuses_cuda_when_it_is_missing(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["resnet32", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def _profile(label: str, peak: float, saving: bool | None = None) -> ModelProfile:
    return ModelProfile(
        name=label,
        label=label,
        memory_saving=saving,
        parameters=1,
        parameter_mib=0.0,
        state_mib=0.0,
        step_peak_mib=peak,
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
    profiles = [
        _profile("resnet32", 10, False),
        _profile("resnet110", 30, False),
        _profile("revnet38", 5, True),
    ]
    plot_profiles([*profiles, _profile("custom", 1)], str(path))
    assert path.stat().st_size > 0


def test_comparisons_are_against_the_first_row_without_saving() -> None:
    rows = [
        _profile("revnet38", 5, True),
        _profile("resnet32", 20, False),
        _profile("resnet110", 40, False),
        _profile("odd", 1, None),
    ]
    (only,) = compare(rows)
    assert (only.label, only.reference) == ("revnet38", "resnet32")
    assert only.step_peak_ratio == 0.25 and only.step_peak_saved_mib == 15
    assert compare([_profile("revnet38", 5, True)]) == []  # nothing to compare against


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
    assert profile.options == {"memory_saving": False} and profile.memory_saving is False
    assert "tinyrev8 nosave" in format_table([profile])
    assert profile.state_mib >= 3 * profile.parameter_mib  # parameters, gradients, momentum
    untimed = profile_model("tinyres8", batch_size=1, image_size=8, steps=0)
    assert untimed.step_seconds != untimed.step_seconds  # NaN: not timed
    with pytest.raises(ValueError, match="steps must be at least 0"):
        profile_model("resnet32", steps=-1)


def test_step_times_are_interleaved_medians_on_either_clock(tiny_models: list[str]) -> None:
    step = training_step(create_model("tinyres8"), batch_size=1, image_size=8, num_classes=10)
    step()
    assert step.state_bytes() > 0
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

    step = training_step(model, images=images, labels=labels, loss=loss)
    memory = measure_step_memory(step)
    assert calls and all(shape == (4, 10) for shape in calls)
    assert memory.activation_bytes > 0 and memory.step_peak_bytes > memory.activation_bytes
    assert memory.state_bytes == step.state_bytes()
    # the default synthetic batch of the same size measures the same: memory depends on shapes
    torch.manual_seed(0)
    default = measure_step_memory(
        training_step(create_model("tinyrev8"), batch_size=4, image_size=8, num_classes=10)
    )
    assert default == memory
    # autocast is applied: a plain network stores half-size activations under bf16 (a
    # reversible one keeps its residual stream in float32, see blocks.float32_stream)
    fp32, bf16 = (
        measure_step_memory(
            training_step(
                create_model("tinyres8"), images=images, labels=labels, autocast_dtype=amp
            )
        )
        for amp in (None, torch.bfloat16)
    )
    assert bf16.activation_bytes < fp32.activation_bytes


def test_a_flow_on_real_digits_is_profiled_by_its_likelihood() -> None:
    """A density model (``log_prob``) is stepped on its negative log-likelihood per value;
    the measured steps start from one state, so whatever its learning rate the figures are
    finite (at the classifiers' 0.01 a K=32 Glow trained on digits reaches NaN in 5 steps)."""
    from sklearn.datasets import load_digits

    from invertible_models.profiler import profile_step

    digits = torch.tensor(load_digits().images[:16], dtype=torch.float32).unsqueeze(1) / 16
    torch.manual_seed(0)
    glow = create_model(
        "glow", in_channels=1, image_size=8, levels=2, num_bins=17, steps=2, hidden_channels=8
    )
    step = training_step(glow, images=digits)
    losses = [float(step()) for _ in range(2)]
    assert losses[0] == pytest.approx(-glow.log_prob(digits).mean().item() / 64, rel=0.05)
    profile = profile_step(step, name="glow", steps=2)
    assert profile.step_peak_mib > 0 and profile.activation_mib > 0 and profile.step_seconds > 0
    assert profile.image_size == 8 and profile.memory_saving is True
