"""Density models (``log_prob`` and ``sample``) train by likelihood and report bits per dim."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from invertible_train import plot
from invertible_train.checkpoint import load_checkpoint
from invertible_train.config import DataConfig, apply_values, load_experiment
from invertible_train.data import BatchTransform
from invertible_train.tasks import (
    SAMPLE_GRID,
    Classification,
    DensityEstimation,
    bits_per_dim,
    task_for,
)
from invertible_train.trainer import Trainer

from .datasets import trust_written_cifar, write_cifar10
from .tiny_model import TinyFlow, TinyNet

Run = Callable[..., int]


def records(results: Path, kind: str) -> list[dict]:
    lines = (results / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_a_density_uniform_over_the_levels_scores_log2_of_the_levels() -> None:
    dims = 3 * 8 * 8
    for levels in (256, 17, 2):
        uniform = torch.full((5,), -dims * math.log(levels))
        assert bits_per_dim(uniform, dims).tolist() == pytest.approx([math.log2(levels)] * 5)
    # twice as likely as uniform is one bit per image less: 8 - 1/D per dim
    twice = torch.tensor([math.log(2.0) - dims * math.log(256)])
    assert float(bits_per_dim(twice, dims)) == pytest.approx(8 - 1 / dims)


def test_bits_per_dim_of_a_known_gaussian_density() -> None:
    """A flow whose density is N(0.5, 1) per dimension, on dequantised 8-bit values: its
    bits/dim follow by hand from the density of the dequantised image."""
    flow = TinyFlow(in_channels=1, image_size=2)
    x = torch.full((1, 1, 2, 2), 128 / 255)  # level 128: y = (128 + u) / 256, z = u / 256
    torch.manual_seed(0)
    got = float(bits_per_dim(flow.log_prob(x).detach(), 4))
    torch.manual_seed(0)
    z = (torch.rand(1, 1, 2, 2) / 256).double()
    log_density = float((-0.5 * (z * z + math.log(2 * math.pi))).sum())
    assert got == pytest.approx((-log_density + 4 * math.log(256)) / (4 * math.log(2)))


def test_density_models_see_the_levels_of_the_data() -> None:
    """8-bit pixels reach a density model as k / 255; digits' scans (stored as
    round(k * 255 / 16)) as their values k / 16, exactly."""
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    eight_bit = DensityEstimation(BatchTransform([0.5], [0.25], torch.device("cpu")), 256)
    assert torch.equal(eight_bit.test_view(pixels, [0]), pixels.float() / 255)
    scans = torch.arange(17, dtype=torch.float64)
    stored = (scans * 255 / 16).round().to(torch.uint8).view(1, 1, 1, 17)
    transform = BatchTransform([0.5], [0.25], torch.device("cpu"), augment=False, levels=17)
    view = DensityEstimation(transform, 17).train_view(stored, iteration=0, rank=0)
    assert torch.equal(view * 16, scans.float().view(1, 1, 1, 17))


def test_a_uniform_model_scores_log2_of_each_datasets_levels(
    run_cli: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the whole harness: 8 bits on 8-bit CIFAR images, log2(17) on the digits (the
    model refuses any input that is not the levels of the data)."""
    pytest.importorskip("sklearn")
    write_cifar10(tmp_path / "data")
    trust_written_cifar(monkeypatch, tmp_path / "data")
    short = ["--iterations", "2", "--set", "data.crop_padding=0", "--batch-size", "8"]
    cifar = ["--data-dir", str(tmp_path / "data"), "--set", "model.options.image_size=32"]
    assert run_cli("uniform_density", "cifar10", *short, *cifar) == 0
    # digits: grey (the harness passes in_channels=1), 17 levels (the model must say so)
    assert run_cli("uniform_density", "digits", *short, "--set", "model.options.num_bins=17") == 0
    for dataset, expected in (("cifar10", 8.0), ("digits", math.log2(17))):
        summary = json.loads(
            (tmp_path / f"results/uniform_density-{dataset}/summary.json").read_text()
        )
        assert summary["test_bits_per_dim"] == pytest.approx(expected, abs=1e-6)
        trained = records(tmp_path / f"results/uniform_density-{dataset}", "train")
        assert trained[-1]["bits_per_dim"] == pytest.approx(expected, abs=1e-6)


def test_a_density_model_built_for_other_data_is_refused(
    run_cli: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("sklearn")

    def refusal(dataset: str, *options: str) -> str:
        args = ["--iterations", "2", "--set", "data.crop_padding=0"]
        assert run_cli("uniform_density", dataset, *args, *options) == 2
        return capsys.readouterr().err

    assert (
        "UniformDensity models 256 levels per value, but the dataset's images have 17: set "
        "model.options.num_bins = 17"
    ) in refusal("digits")
    assert (
        "UniformDensity is built for image_size = 4, but the dataset's images are 3x8x8: set "
        "model.options.image_size = 8"
    ) in refusal("synthetic", "--set", "model.options.image_size=4")
    assert "set model.options.in_channels = 3" in refusal(
        "synthetic", "--set", "model.options.in_channels=1"
    )


def test_the_task_is_chosen_from_the_models_interface() -> None:
    transform = BatchTransform([0.5], [0.25], torch.device("cpu"))
    density = task_for(TinyFlow(), transform, (3, 8, 8))
    assert isinstance(density, DensityEstimation) and density.dims == 192
    assert (density.metric, density.higher_is_better) == ("test_bits_per_dim", False)
    assert isinstance(task_for(TinyNet(), transform, (3, 8, 8)), Classification)
    assert density.better(3.0, 4.0) and not density.better(4.0, 3.0) and density.better(9, None)


def test_evaluation_draws_the_same_noise_each_time_and_leaves_training_alone(
    tmp_path: Path,
) -> None:
    """The model dequantises with torch's generator: evaluation forks it and seeds each
    test batch, so two evaluations agree exactly and the training stream is unchanged."""
    cfg = apply_values(
        load_experiment("tiny_flow"),
        {
            "data.dataset": "synthetic", "data.image_size": 8, "data.synthetic_train_size": 32,
            "data.synthetic_test_size": 24, "data.batch_size": 8, "data.eval_batch_size": 10,
            "train.iterations": 2, "train.tensorboard": False, "train.measure_memory": False,
        },
    )  # fmt: skip
    trainer = Trainer(cfg, tmp_path / "run")
    torch.manual_seed(5)
    first = trainer.evaluate()
    after_first = torch.rand(3)
    torch.manual_seed(5)
    torch.rand(1)  # a different training state: evaluation does not depend on it
    assert trainer.evaluate() == first
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after_first)  # evaluation consumed nothing


FLOW = ["--set", "data.crop_padding=0", "--lr", "0.05", "--set", "optimizer.name=adam"]


def test_a_density_model_trains_by_likelihood_and_reports_bits_per_dim(
    run_cli: Run, tmp_path: Path
) -> None:
    status = run_cli(
        "tiny_flow", "synthetic", "--iterations", "60", *FLOW,
        "--set", "train.eval_every=20", "--set", "train.log_every=10",
        "--set", "train.tensorboard=true", "--set", "train.measure_memory=true",
    )  # fmt: skip
    assert status == 0
    results = tmp_path / "results" / "tiny_flow-synthetic"
    summary = json.loads((results / "summary.json").read_text())
    evals = records(results, "eval")
    assert summary["task"] == "density" and "test_accuracy" not in summary
    assert [r["iteration"] for r in evals] == [20, 40, 60]
    assert summary["test_bits_per_dim"] == evals[-1]["test_bits_per_dim"]
    assert summary["best_test_bits_per_dim"] == min(r["test_bits_per_dim"] for r in evals)
    # it learned: from about 8 bits (a density near uniform on [0, 1)) to well below
    first_train = records(results, "train")[0]
    assert first_train["bits_per_dim"] == first_train["loss"]
    assert summary["test_bits_per_dim"] < first_train["bits_per_dim"] - 0.5
    assert summary["test_bits_per_dim"] < 8.0
    assert summary["activation_bytes"] > 0 and "memory_saving" not in summary
    # best.pt holds the model that scored the best test bits/dim
    best = load_checkpoint(results / "checkpoints" / "best.pt")
    assert best["best_test_metric"] == summary["best_test_bits_per_dim"]
    # a PNG grid of samples at each evaluation
    grids = sorted(p.name for p in (results / "samples").iterdir())
    assert grids == ["iteration-0000020.png", "iteration-0000040.png", "iteration-0000060.png"]
    from PIL import Image

    with Image.open(results / "samples" / grids[0]) as image:
        side = 2 + 8 * (8 + 2)  # make_grid: 8 x 8 samples of 8 x 8 pixels, 2-pixel padding
        assert image.size == (side, side) and SAMPLE_GRID == 64
    # bits/dim in TensorBoard (scalars and the sample grids) and in the plot
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(results / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Scalars("eval/test_bits_per_dim")] == [20, 40, 60]
    assert [e.step for e in events.Images("samples")] == [20, 40, 60]
    assert plot.plot_curves(results).read_bytes()[:4] == b"\x89PNG"


def test_a_density_run_resumes_to_the_same_weights(run_cli: Run, tmp_path: Path) -> None:
    common = [*FLOW, "--set", "scheduler.name=constant", "--set", "train.checkpoint_every=5"]
    assert run_cli("tiny_flow", "synthetic", "--iterations", "20", "--name", "whole", *common) == 0
    assert run_cli("tiny_flow", "synthetic", "--iterations", "11", "--name", "split", *common) == 0
    assert run_cli("tiny_flow", "synthetic", "--iterations", "20", "--name", "split", *common) == 0
    whole = load_checkpoint(tmp_path / "results/whole/checkpoints/last.pt")["model"]
    split = load_checkpoint(tmp_path / "results/split/checkpoints/last.pt")["model"]
    assert all(torch.equal(whole[k], split[k]) for k in whole)


def test_drawing_samples_leaves_the_training_random_state_alone(tmp_path: Path) -> None:
    cfg = apply_values(
        load_experiment("tiny_flow"),
        {
            "data.dataset": "synthetic", "data.image_size": 8, "data.synthetic_train_size": 32,
            "data.synthetic_test_size": 8, "data.batch_size": 8, "train.iterations": 2,
            "train.tensorboard": False, "train.measure_memory": False,
        },
    )  # fmt: skip
    trainer = Trainer(cfg, tmp_path / "run")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    grid = trainer.task.after_evaluation(trainer.model, tmp_path / "run", 7)
    assert torch.equal(torch.rand(3), expected)
    assert grid.shape == (3, 82, 82) and (tmp_path / "run/samples/iteration-0000007.png").exists()


def test_digits_train_a_grey_density_model_and_a_grey_classifier(
    run_cli: Run, tmp_path: Path
) -> None:
    pytest.importorskip("sklearn")
    # 1-channel images: the harness passes in_channels=1 to the model
    levels = ["--set", "model.options.num_bins=17"]
    assert run_cli("tiny_flow", "digits", "--iterations", "150", *FLOW, *levels) == 0
    flow = json.loads((tmp_path / "results/tiny_flow-digits/summary.json").read_text())
    assert flow["dataset"] == "digits" and flow["test_bits_per_dim"] < 8.0
    digits = ["--set", "data.crop_padding=1", "--set", "data.horizontal_flip=false"]
    assert run_cli("tiny", "digits", "--iterations", "200", "--batch-size", "32", *digits) == 0
    net = json.loads((tmp_path / "results/tiny-digits/summary.json").read_text())
    assert net["task"] == "classification" and net["test_accuracy"] > 0.5  # chance: 0.1
    assert DataConfig(dataset="digits").dataset == "digits"
