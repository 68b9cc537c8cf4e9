"""The shipped recipes of the transformers, the i-RevNet and Glow: the values each file
holds, how the command line picks them, and a short run of each on digits and on
CIFAR-format data (Glow's own runs: test_glow_training.py)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from invertible_train.config import apply_values, list_experiments, load_experiment
from invertible_train.optim import WarmupConstant, WarmupCosine, schedule_positions
from invertible_train.trainer import Trainer

from .datasets import trust_written_cifar, write_cifar10

Run = Callable[..., int]

TRANSFORMERS = ("vit_tiny", "vit_small", "revvit_tiny", "revvit_small")
#: transformers small enough to train for a few iterations in a test
SMALL_VIT = ["model.options.depth=2", "model.options.embed_dim=64", "model.options.num_heads=4"]
SMALL_IREVNET = ["model.options.stage_blocks=[1, 1, 1]", "model.options.width=16"]
#: no TensorBoard, no memory measurement, two evaluations and a logged point per step
QUICK = [
    "train.tensorboard=false", "train.measure_memory=false", "train.log_every=1",
    "data.eval_batch_size=200",
]  # fmt: skip


def sets(*keys: str) -> list[str]:
    return [arg for key in keys for arg in ("--set", key)]


def records(results: Path, kind: str) -> list[dict]:
    lines = (results / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_the_new_recipes_are_shipped() -> None:
    names = {"vit-recipe", "irevnet", "glow", "glow-digits", *TRANSFORMERS}
    names |= {f"{model}-digits" for model in TRANSFORMERS}
    assert names <= set(list_experiments())


@pytest.mark.parametrize("model", TRANSFORMERS)
def test_each_transformer_has_the_revvit_recipe(model: str) -> None:
    cfg = load_experiment(model)
    # the reversible twin saves memory (its default); the plain ViT trains plainly, as
    # every plain recipe does (model.memory_saving unset: the model's own default)
    saving = True if model.startswith("revvit") else None
    assert cfg.model.name == model and cfg.model.memory_saving is saving
    assert cfg.model.options == {"drop_path_rate": 0.1}
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.weight_decay) == (
        "adamw", 1e-3, 0.05
    )  # fmt: skip
    assert (cfg.scheduler.name, cfg.scheduler.unit, cfg.scheduler.warmup) == (
        "warmup_cosine", "fraction", 0.2333
    )  # fmt: skip
    assert (cfg.data.batch_size, cfg.train.epochs) == (128, 100)
    assert cfg.data.augment and cfg.data.crop_padding == 4 and cfg.data.horizontal_flip
    # 100 epochs of CIFAR's 390 batches; the warmup is the paper's 70 of 300 epochs
    total = 100 * (50_000 // 128)
    (warmup,) = schedule_positions([cfg.scheduler.warmup], cfg.scheduler.unit, total)
    assert warmup == 9098 and abs(warmup - 70 / 300 * total) < 4


@pytest.mark.parametrize("model", TRANSFORMERS)
def test_each_transformer_has_a_digits_recipe_with_2x2_patches(model: str) -> None:
    cfg = load_experiment(model, dataset="digits")
    assert cfg.model.name == model
    assert cfg.model.options == {"drop_path_rate": 0.1, "image_size": 8, "patch_size": 2}
    assert not cfg.data.augment and cfg.data.crop_padding == 0
    assert cfg.optimizer == load_experiment(model).optimizer
    assert cfg.scheduler == load_experiment(model).scheduler


def test_irevnet_has_the_revnet_recipe() -> None:
    cfg, revnet = load_experiment("irevnet"), load_experiment("revnet38")
    assert cfg.model.name == "irevnet" and cfg.model.memory_saving and not cfg.model.options
    assert (cfg.optimizer, cfg.scheduler, cfg.data, cfg.train) == (
        revnet.optimizer, revnet.scheduler, revnet.data, revnet.train
    )  # fmt: skip
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.train.iterations) == ("sgd", 0.1, 80000)


def test_glow_has_the_glow_recipe_and_a_digits_size() -> None:
    cfg = load_experiment("glow", dataset="cifar10")
    assert cfg.model.name == "glow" and not cfg.model.options  # the zoo's CIFAR Glow
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.weight_decay) == ("adam", 1e-3, 0)
    assert (cfg.scheduler.name, cfg.scheduler.unit, cfg.scheduler.warmup) == (
        "warmup_constant", "fraction", 0.1
    )  # fmt: skip
    assert (cfg.data.batch_size, cfg.train.epochs) == (64, 100)
    assert not cfg.data.augment and cfg.data.crop_padding == 0
    # Glow's 10 warmup epochs, of CIFAR's 781 batches of 64
    assert schedule_positions([0.1], "fraction", 100 * 781) == [7810]
    digits = load_experiment("glow", dataset="digits")
    assert digits.model.options == {
        "image_size": 8, "levels": 2, "steps": 8, "hidden_channels": 64, "num_bins": 17
    }  # fmt: skip
    assert (digits.optimizer, digits.scheduler) == (cfg.optimizer, cfg.scheduler)


def test_the_cli_picks_the_model_dataset_file_then_the_model_file(
    run_cli: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def printed(*args: str) -> str:
        assert run_cli(*args, "--print-config", fast=False) == 0
        return capsys.readouterr().out

    assert "num_bins = 17" in printed("glow", "digits")
    assert "num_bins" not in printed("glow", "cifar10")
    assert "patch_size = 2" in printed("revvit_tiny", "digits")
    assert 'name = "warmup_cosine"' in printed("revvit_tiny", "cifar10")
    assert 'name = "multistep"' in printed("irevnet", "digits")  # no irevnet-digits: irevnet
    # --config wins over both
    (tmp_path / "mine.toml").write_text('extends = "glow"\n[train]\nepochs = 3\n')
    mine = printed("glow", "digits", "--config", str(tmp_path / "mine.toml"))
    assert "num_bins" not in mine and "epochs = 3" in mine


def quick_trainer(model: str, tmp_path: Path, **values: object) -> Trainer:
    cfg = apply_values(
        load_experiment(model, dataset="digits"),
        {"train.iterations": 30, "train.epochs": 0, **values, "data.dataset": "digits"},
    )
    return Trainer(cfg, tmp_path / model, quiet=True)


def test_the_recipes_reach_the_optimizer_and_the_schedule(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    small = dict(item.split("=") for item in SMALL_VIT)
    vit = quick_trainer("revvit_tiny", tmp_path, **{k: int(v) for k, v in small.items()})
    assert isinstance(vit.optimizer, torch.optim.AdamW)
    assert vit.optimizer.defaults["lr"] == 1e-3 and vit.optimizer.defaults["weight_decay"] == 0.05
    (schedule,) = vit.scheduler.lr_lambdas  # type: ignore[attr-defined]
    assert isinstance(schedule, WarmupCosine) and not isinstance(schedule, WarmupConstant)
    assert (schedule.warmup, schedule.total) == (math.floor(0.2333 * 30), 30)
    assert vit.model.memory_saving and vit.model.embed.num_tokens == 16  # type: ignore[union-attr]
    glow = quick_trainer("glow", tmp_path, **{"model.options.hidden_channels": 8})
    assert type(glow.optimizer) is torch.optim.Adam and glow.optimizer.defaults["lr"] == 1e-3
    (schedule,) = glow.scheduler.lr_lambdas  # type: ignore[attr-defined]
    assert isinstance(schedule, WarmupConstant) and (schedule.warmup, schedule.total) == (3, 30)
    assert glow.model.num_bins == 17 and glow.task.name == "density"  # type: ignore[comparison-overlap]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.mark.parametrize(
    ("model", "small"),
    [
        # a transformer leaves its first plateau late: a higher lr for so short a run
        ("vit_tiny", [*SMALL_VIT, "optimizer.lr=2e-3"]),
        ("revvit_tiny", [*SMALL_VIT, "optimizer.lr=2e-3"]),
        ("irevnet", [*SMALL_IREVNET, "data.crop_padding=1", "data.horizontal_flip=false"]),
    ],
)
def test_a_short_run_of_each_classifier_recipe_learns_the_digits(
    run_cli: Run, tmp_path: Path, model: str, small: list[str]
) -> None:
    pytest.importorskip("sklearn")
    length = ["--iterations", "150", "--batch-size", "32", "--quiet"]
    assert run_cli(model, "digits", *length, *sets(*small, *QUICK), fast=False) == 0
    results = tmp_path / "results" / f"{model}-digits"
    summary = json.loads((results / "summary.json").read_text())
    saving = model != "vit_tiny"  # the plain transformer trains plainly by default
    assert summary["task"] == "classification" and summary["memory_saving"] is saving
    assert {"test_accuracy", "test_loss", "best_test_accuracy", "parameters"} <= set(summary)
    assert "test_bits_per_dim" not in summary
    losses = [r["loss"] for r in records(results, "train")]
    assert len(losses) == 150 and mean(losses[-10:]) < mean(losses[:10]) - 0.3
    assert summary["test_accuracy"] > 0.3  # chance: 0.1


@pytest.mark.parametrize(
    ("model", "small"),
    [("revvit_tiny", SMALL_VIT), ("vit_tiny", SMALL_VIT), ("irevnet", SMALL_IREVNET)],
)
def test_a_short_run_of_each_classifier_recipe_on_cifar_format_data(
    run_cli: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str, small: list[str]
) -> None:
    """``invertible-train MODEL cifar10`` with the shipped file, on a CIFAR-10 folder the
    test writes (random training images, so only the loop and its records are checked)."""
    write_cifar10(tmp_path / "data")
    trust_written_cifar(monkeypatch, tmp_path / "data")
    length = ["--iterations", "8", "--batch-size", "20", "--quiet"]
    data = ["--data-dir", str(tmp_path / "data")]
    assert run_cli(model, "cifar10", *length, *data, *sets(*small, *QUICK), fast=False) == 0
    results = tmp_path / "results" / f"{model}-cifar10"
    summary = json.loads((results / "summary.json").read_text())
    assert summary["iterations"] == 8 and 0 <= summary["test_accuracy"] <= 1
    assert all(math.isfinite(r["loss"]) for r in records(results, "train"))
    resolved = (results / "config.toml").read_text()
    expected = "adamw" if "vit" in model else "sgd"
    assert f'name = "{expected}"' in resolved
