"""Command line: ``invertible-train MODEL DATASET [options]`` and ``invertible-eval RESULTS_DIR``.

``python -m invertible_train`` is the same as ``invertible-train``. Options are applied over
the experiment (the model's shipped recipe, or ``--config FILE``) in this order: the
experiment file, then the named options (``--lr``, ``--batch-size``...), then every
``--set key=value`` in the order given.

Exit status: 0 on success, 2 for an invalid command line or experiment, 1 when data, a
checkpoint or the results directory is unusable, 3 when training stopped on a non-finite
loss (the last good checkpoint is kept).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from invertible_train import __version__
from invertible_train.checkpoint import CheckpointError, load_checkpoint
from invertible_train.config import (
    AMP_MODES,
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    apply_values,
    config_from_dict,
    config_to_dict,
    dump_toml,
    load_experiment,
)
from invertible_train.data import DatasetUnavailableError
from invertible_train.distributed import (
    BACKENDS,
    DistributedContext,
    DistributedTrainer,
    process_group,
    run_on_main,
)
from invertible_train.engine import NonFiniteLossError, Trainer, select_device
from invertible_train.results import ResultsDirError, remove_results

__all__ = ["build_eval_parser", "build_parser", "evaluate_main", "main"]

EXIT_USAGE, EXIT_UNUSABLE, EXIT_NONFINITE = 2, 1, 3


def build_parser() -> argparse.ArgumentParser:
    """The ``invertible-train`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="invertible-train",
        description=(
            "Train a model of the invertible zoo on CIFAR-10/100, your own images or synthetic "
            "data. Rerunning the same command resumes from the last checkpoint."
        ),
        epilog=(
            "Example: invertible-train revnet38 cifar10 --data-dir ~/data. "
            "Results go to RESULTS_DIR/NAME (NAME defaults to MODEL-DATASET)."
        ),
    )
    parser.add_argument(
        "model",
        help="model name from the zoo, e.g. resnet32, revnet38, revnet110, revnet164",
    )
    parser.add_argument(
        "dataset",
        help="cifar10, cifar100, synthetic, or imagefolder:PATH (PATH/train, PATH/test)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="experiment TOML file (may 'extends' a shipped one); default: the model's recipe",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set optimizer.lr=0.05 (repeatable, applied last)",
    )
    parser.add_argument(
        "--data-dir", help="where datasets live or are downloaded to (data.data_dir)"
    )
    parser.add_argument(
        "--results-dir",
        default="results",
        help="parent folder of the experiment's results folder (default: ./results)",
    )
    parser.add_argument(
        "--name", help="experiment name = results subfolder (default MODEL-DATASET)"
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="train this many epochs (train.epochs)")
    length.add_argument(
        "--iterations", type=int, help="train this many iterations (train.iterations)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help="global batch size (data.batch_size; recipe: 100)",
    )
    parser.add_argument(
        "--lr", type=float, help="initial learning rate (optimizer.lr; recipe: 0.1)"
    )
    parser.add_argument(
        "--seed", type=int, help="seed for initialisation, data order, augmentation"
    )
    parser.add_argument("--workers", type=int, help="DataLoader worker processes (data.workers)")
    parser.add_argument(
        "--amp",
        choices=AMP_MODES,
        help="mixed precision: off, bf16 (GPU or CPU), fp16 (with a gradient scaler)",
    )
    parser.add_argument(
        "--no-cuda", action="store_true", help="train on the CPU even if CUDA exists"
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="under torchrun: the process-group backend (auto: nccl on GPUs, gloo on the CPU)",
    )
    parser.add_argument(
        "--sync-bn",
        action="store_true",
        help="under torchrun: BatchNorm normalises with the statistics of the global batch",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="delete this experiment's earlier results and start over instead of resuming",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved experiment and exit",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _named_options(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {"data.dataset": args.dataset}
    if args.name is not None:
        values["name"] = args.name
    if args.data_dir is not None:
        values["data.data_dir"] = args.data_dir
    if args.epochs is not None:
        values["train.epochs"] = args.epochs
    if args.iterations is not None:
        values["train.iterations"] = args.iterations
        values["train.epochs"] = 0
    for option, key in (
        ("batch_size", "data.batch_size"),
        ("lr", "optimizer.lr"),
        ("seed", "train.seed"),
        ("workers", "data.workers"),
        ("amp", "train.amp"),
    ):
        if getattr(args, option) is not None:
            values[key] = getattr(args, option)
    return values


def _error(prog: str, message: str, status: int, report: bool = True) -> int:
    if report:
        print(f"{prog}: error: {message}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``invertible-train``; returns the exit status.

    Under torchrun every process runs this; see :mod:`invertible_train.distributed`.
    """
    args = build_parser().parse_args(argv)
    prog = "invertible-train"
    try:
        cfg = load_experiment(args.model, args.config)
        cfg = apply_values(cfg, _named_options(args), source="command line")
        cfg = apply_overrides(cfg, args.overrides)
        if args.print_config:
            print(dump_toml(config_to_dict(cfg)), end="")
            return 0
        device = select_device(cfg.train.device, no_cuda=args.no_cuda)
        with process_group(device, args.backend) as job:
            return _train(args, cfg, device, job)
    except ConfigError as exc:
        return _error(prog, str(exc), EXIT_USAGE)


def _train(
    args: argparse.Namespace,
    cfg: ExperimentConfig,
    device: torch.device,
    job: DistributedContext | None,
) -> int:
    """Train one experiment; under torchrun (``job``) only rank 0 reports and writes.

    The distributed paths fail on every rank together (the same error), so rank 0 alone
    prints it.
    """
    prog = "invertible-train"
    main_process = job is None or job.is_main_process
    results = Path(args.results_dir) / cfg.run_name()
    try:
        if args.fresh:
            # one process deletes, every process waits for it
            run_on_main(lambda: remove_results(results))
        trainer = (
            Trainer(cfg, results, device=device, quiet=args.quiet)
            if job is None
            else DistributedTrainer(cfg, results, job, sync_bn=args.sync_bn, quiet=args.quiet)
        )
        summary = trainer.fit()
    except ConfigError as exc:
        return _error(prog, str(exc), EXIT_USAGE, main_process)
    except NonFiniteLossError as exc:
        return _error(prog, str(exc), EXIT_NONFINITE, main_process)
    except (DatasetUnavailableError, CheckpointError, ResultsDirError) as exc:
        return _error(prog, str(exc), EXIT_UNUSABLE, main_process)
    if not args.quiet and main_process:
        print(
            f"{cfg.run_name()}: test accuracy {summary['test_accuracy']:.4f}, "
            f"test loss {summary['test_loss']:.4f} after {summary['iterations']} iterations; "
            f"results in {results}"
        )
    return 0


def build_eval_parser() -> argparse.ArgumentParser:
    """The ``invertible-eval`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="invertible-eval",
        description="Evaluate a trained model of a results folder on its dataset's test set.",
    )
    parser.add_argument("results", metavar="RESULTS_DIR", help="an experiment's results folder")
    parser.add_argument(
        "--checkpoint",
        default="best",
        help="'best', 'last', or a checkpoint file path (default: best, else last)",
    )
    parser.add_argument("--data-dir", help="where the dataset lives, if it moved since training")
    parser.add_argument("--batch-size", type=int, help="evaluation batch size")
    parser.add_argument("--no-cuda", action="store_true", help="evaluate on the CPU")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return parser


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``invertible-eval``: prints test accuracy and loss of a checkpoint."""
    args = build_eval_parser().parse_args(argv)
    prog = "invertible-eval"
    results = Path(args.results)
    if args.checkpoint in ("best", "last"):
        path = results / "checkpoints" / f"{args.checkpoint}.pt"
        if args.checkpoint == "best" and not path.exists():
            path = results / "checkpoints" / "last.pt"
    else:
        path = Path(args.checkpoint)
    try:
        state = load_checkpoint(path)
        cfg = config_from_dict(state["config"], source=str(path))
        values: dict[str, Any] = {}
        if args.data_dir is not None:
            values["data.data_dir"] = args.data_dir
        if args.batch_size is not None:
            values["data.eval_batch_size"] = args.batch_size
        cfg = apply_values(cfg, values, source="command line")
        device = select_device(cfg.train.device, no_cuda=args.no_cuda)
        trainer = Trainer(cfg, results, device=device, quiet=True)
        trainer.load_state_dict(state, path)
        test_loss, test_accuracy = trainer.evaluate()
    except ConfigError as exc:
        return _error(prog, str(exc), EXIT_USAGE)
    except (DatasetUnavailableError, CheckpointError, ResultsDirError) as exc:
        return _error(prog, str(exc), EXIT_UNUSABLE)
    result = {
        "checkpoint": str(path),
        "iteration": int(state["iteration"]),
        "test_accuracy": test_accuracy,
        "test_loss": test_loss,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{path} (iteration {result['iteration']}): test accuracy {test_accuracy:.4f}, "
            f"test loss {test_loss:.4f}"
        )
    return 0
