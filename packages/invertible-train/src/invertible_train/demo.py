"""``invertible-demo``: a RevNet learns synthetic images on the CPU, and what it saves.

Trains a small reversible network (``revnet38`` by default, on 16x16 CIFAR-like synthetic
images) for a few hundred steps with the full harness, prints its test accuracy, then
measures one training step of the same network with and without memory saving, with the
measurement ``invertible-profile`` uses
(:func:`invertible_core.measure_step_memory`, exact on the CPU), and prints
both. It needs no download and no GPU, and takes about a minute or two on two cores with
the defaults.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from invertible_core import measure_step_memory
from invertible_models.step import training_step
from invertible_train.config import ConfigError, apply_values, load_experiment
from invertible_train.model import build_model
from invertible_train.trainer import Trainer

__all__ = ["main"]


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type: a number > 0 (else a usage error, exit 2)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``invertible-demo``."""
    parser = argparse.ArgumentParser(
        prog="invertible-demo",
        description="Train a small RevNet on synthetic data on the CPU and compare its "
        "training-step memory with and without memory saving.",
    )
    parser.add_argument("--model", default="revnet38", help="zoo model (default revnet38)")
    parser.add_argument(
        "--steps", type=_positive(int), default=300, help="training steps (default 300)"
    )
    parser.add_argument(
        "--batch-size", type=_positive(int), default=32, help="batch size (default 32)"
    )
    parser.add_argument(
        "--image-size", type=_positive(int), default=16, help="image side (default 16)"
    )
    parser.add_argument(
        "--lr", type=_positive(float), default=0.05, help="learning rate (default 0.05)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--results-dir", help="keep the run's results here (default: a temporary folder)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        return _demo(args)
    except ConfigError as exc:
        print(f"invertible-demo: error: {exc}", file=sys.stderr)
        return 2


def _demo(args: argparse.Namespace) -> int:
    steps = int(args.steps)
    cfg = load_experiment(args.model)
    cfg = apply_values(
        cfg,
        {
            "data.dataset": "synthetic",
            "data.image_size": args.image_size,
            "data.synthetic_train_size": 2000,
            "data.synthetic_test_size": 500,
            "data.batch_size": args.batch_size,
            "optimizer.lr": args.lr,
            "train.iterations": steps,
            "train.seed": args.seed,
            "train.log_every": max(1, steps // 10),
            "train.eval_every": steps,
            "train.checkpoint_every": steps,
            "train.tensorboard": False,
            "train.measure_memory": False,
        },
        source="invertible-demo",
    )
    with tempfile.TemporaryDirectory(prefix="invertible-demo-") as scratch:
        results = Path(args.results_dir or scratch) / cfg.run_name()
        trainer = Trainer(cfg, results, device="cpu", quiet=args.quiet)
        print(
            f"training {cfg.model.name} (memory saving on) for {steps} steps on "
            f"{args.image_size}x{args.image_size} synthetic images, batch {args.batch_size}, CPU"
        )
        summary = trainer.fit()
        print(
            f"test accuracy {summary['test_accuracy']:.3f} "
            f"(chance {1 / trainer.data.num_classes:.3f}), "
            f"{summary['images_per_second']:.0f} images/s"
        )
        images, labels = next(iter(trainer.evaluator.loader))
        x = trainer.transform.test(images[: args.batch_size])
        y = labels[: args.batch_size]

    rows = []
    for saving in (True, False):
        torch.manual_seed(args.seed)
        variant = apply_values(cfg, {"model.memory_saving": saving})
        model = build_model(variant.model, trainer.data.num_classes)
        step = training_step(model, images=x, labels=y, loss=F.cross_entropy)
        rows.append((saving, measure_step_memory(step)))
    print(f"\none training step of {cfg.model.name}, batch {x.shape[0]}, measured exactly:")
    print(f"{'memory saving':<15}{'activations MiB':>17}{'step peak MiB':>15}")
    for saving, mem in rows:
        print(
            f"{'on' if saving else 'off':<15}{mem.activation_bytes / 2**20:>17.2f}"
            f"{mem.step_peak_bytes / 2**20:>15.2f}"
        )
    on, off = rows[0][1].activation_bytes, rows[1][1].activation_bytes
    if on > 0:
        print(f"memory saving keeps {off / on:.1f}x fewer activation bytes")
    return 0
