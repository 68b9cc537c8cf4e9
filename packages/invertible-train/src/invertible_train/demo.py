"""``invertible-demo``: a RevNet learns synthetic images on the CPU, and what it saves.

Trains a small reversible network (``revnet38`` by default, on 16x16 CIFAR-like synthetic
images) for a few hundred steps with the full harness, prints its test accuracy, then
measures one training step of the same network with and without memory saving: the memory
with the measurement ``invertible-profile`` uses
(:func:`invertible_core.measure_step_memory`, exact on the CPU), and the time
(median of interleaved steps). Its closing lines say what the two memory figures mean and
what the saving costs in time. It needs no download and no GPU: with one thread it took
41 to 88 s on a shared 2-core machine (``docs/results/harness.md``).

Threads: torch's default of one thread per core turns into a crawl when other work holds
some of the cores (the threads wait on each other; on a shared 2-core machine the demo took
3.7x to 18x as long with 2 threads as with 1). Unless ``--threads`` says otherwise (or
``OMP_NUM_THREADS`` is set), the demo uses the whole cores the 1-minute load average leaves
idle, at least one (:func:`choose_threads`), and says how many it chose and why.

Progress: a progress bar on a terminal; when stdout is not a terminal (a log file, a
pipe, CI), one line per logged step instead, so a slow machine is never silent.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from invertible_core import measure_step_memory, median_step_seconds
from invertible_models.step import training_step
from invertible_train.checkpoint import CheckpointError
from invertible_train.cli import check_experiment
from invertible_train.config import ConfigError, apply_values, load_experiment
from invertible_train.interrupts import Interrupted
from invertible_train.model import build_model
from invertible_train.progress import ProgressMode
from invertible_train.results import ResultsDirError
from invertible_train.trainer import NonFiniteLossError, Trainer

__all__ = ["choose_threads", "main"]

MIB = 2**20

#: what the closing table's figures mean, printed under it.
_MEANING = (
    "activations: what the forward pass keeps for the backward pass; memory saving stores "
    "only a little of it and recomputes the rest during backward",
    "step peak: the most memory one whole step (forward, loss, backward, optimizer update) "
    "holds at once, beyond the weights, their gradients and momentum",
    "memory: exact (the PyTorch profiler's allocations); time: median of 5 interleaved steps each",
)


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


def choose_threads(cpus: int, load: float | None) -> int:
    """torch threads that cannot oversubscribe a machine of ``cpus`` cores whose 1-minute
    load average is ``load``: the whole cores left idle, at least 1 (1 when the load is not
    known)."""
    if load is None:
        return 1
    return max(1, min(cpus, math.floor(cpus - load)))


def _machine() -> tuple[int, float | None]:
    """The cores this process may run on, and the 1-minute load average (None if unknown)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    try:
        load: float | None = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - Windows
        load = None
    return cpus, load


def _threads(requested: int | None) -> tuple[int, str]:
    """The thread count for this run, and why."""
    if requested is not None:
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    cpus, load = _machine()
    threads = choose_threads(cpus, load)
    if load is None:
        return threads, f"{cpus} cores, load unknown; --threads N to choose"
    return threads, f"{cpus} cores, load average {load:.2f}; --threads N to choose"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``invertible-demo``."""
    parser = argparse.ArgumentParser(
        prog="invertible-demo",
        description="Train a small RevNet on synthetic data on the CPU and compare its "
        "training step with and without memory saving: memory and time.",
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
        "--threads",
        type=_positive(int),
        help="torch CPU threads (default: the whole cores the load average leaves idle, at "
        "least 1; OMP_NUM_THREADS when set)",
    )
    parser.add_argument(
        "--results-dir",
        help="keep the run's results here (default: a temporary folder); run again with the "
        "same options, it reports the finished run",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar or lines")
    args = parser.parse_args(argv)
    prog = "invertible-demo"
    try:
        return _demo(args)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except (ResultsDirError, CheckpointError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except NonFiniteLossError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 3
    except Interrupted as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 128 + exc.signum


def _demo(args: argparse.Namespace) -> int:
    steps = int(args.steps)
    threads, why = _threads(None if args.threads is None else int(args.threads))
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
            "train.threads": threads,
            "train.log_every": max(1, steps // 10),
            "train.eval_every": steps,
            "train.checkpoint_every": steps,
            "train.tensorboard": False,
            "train.measure_memory": False,
        },
        source="invertible-demo",
    )
    check_experiment(cfg)  # an unknown --model is one line before anything starts
    progress: ProgressMode
    if args.quiet:
        progress = "none"
    elif sys.stdout.isatty() and sys.stderr.isatty():
        progress = "bar"
    else:
        progress = "lines"  # a log or a pipe: a bar would not show, lines do
    size = f"{args.image_size}x{args.image_size}"
    print(
        f"training {cfg.model.name} (memory saving on) for {steps} steps on {size} synthetic "
        f"images, batch {args.batch_size}, CPU, {threads} thread{'s' * (threads > 1)} ({why})",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="invertible-demo-") as scratch:
        results = Path(args.results_dir or scratch) / cfg.run_name()
        trainer = Trainer(cfg, results, device="cpu", progress=progress)
        summary = trainer.fit()
        speed = summary.get("images_per_second")
        print(
            f"test accuracy {summary['test_accuracy']:.3f} "
            f"(chance {1 / trainer.data.num_classes:.3f}), "
            + (f"{speed:.0f} images/s" if speed is not None else "images/s not measured")
        )
        images, labels = next(iter(trainer.evaluator.loader))
        x = trainer.transform.test(images[: args.batch_size])
        y = labels[: args.batch_size]

    steps_of = {}
    memory = {}
    for saving in (True, False):
        torch.manual_seed(args.seed)
        variant = apply_values(cfg, {"model.memory_saving": saving})
        model = build_model(variant.model, trainer.data.num_classes)
        steps_of[saving] = training_step(model, images=x, labels=y, loss=F.cross_entropy)
        memory[saving] = measure_step_memory(steps_of[saving])
    seconds = dict(
        zip((True, False), median_step_seconds([steps_of[True], steps_of[False]], repeats=5))
    )
    print(f"\none training step of {cfg.model.name}, batch {x.shape[0]}, {size} images, CPU:")
    print(f"{'memory saving':<15}{'activations MiB':>17}{'step peak MiB':>15}{'step time ms':>14}")
    for saving in (True, False):
        print(
            f"{'on' if saving else 'off':<15}{memory[saving].activation_bytes / MIB:>17.2f}"
            f"{memory[saving].step_peak_bytes / MIB:>15.2f}{seconds[saving] * 1e3:>14.0f}"
        )
    print()
    for line in _MEANING:
        print(textwrap.fill(line, width=88, subsequent_indent="  "))
    on, off = memory[True], memory[False]
    if on.activation_bytes > 0 and on.step_peak_bytes > 0:
        print(
            f"memory saving keeps {off.activation_bytes / on.activation_bytes:.1f}x fewer "
            f"activation bytes and a {off.step_peak_bytes / on.step_peak_bytes:.1f}x lower "
            f"step peak, for {seconds[True] / seconds[False]:.2f}x the step time"
        )
    return 0
