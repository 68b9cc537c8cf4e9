"""Command line: ``invertible-train MODEL DATASET [options]`` and ``invertible-eval RESULTS_DIR``.

``python -m invertible_train`` is the same as ``invertible-train``. Options are applied over
the experiment (the model's shipped recipe, or ``--config FILE``) in this order: the
experiment file, then the named options (``--lr``, ``--batch-size``...), then every
``--set key=value`` in the order given.

Exit status: 0 on success, 2 for an invalid command line or experiment (a results folder
that cannot be written included), 1 when data, a checkpoint or the results directory is
unusable, 3 when training stopped on a non-finite loss (the last good checkpoint is kept),
130 and 143 when SIGINT (Ctrl-C) or SIGTERM stopped it (after saving a checkpoint: rerun
the same command to resume). Every error is one line on stderr, never a traceback; warnings
too (``invertible-train: warning: ...``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from invertible_models.convert import METHODS
from invertible_train import __version__
from invertible_train.checkpoint import CheckpointError, load_checkpoint
from invertible_train.config import (
    AMP_MODES,
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    apply_values,
    check_run_name,
    config_from_dict,
    config_to_dict,
    dump_toml,
    load_experiment,
)
from invertible_train.data import DatasetUnavailableError, check_dataset_name
from invertible_train.distributed import (
    BACKENDS,
    DistributedContext,
    process_group,
    torchrun_ranks,
)
from invertible_train.interrupts import Interrupted
from invertible_train.model import check_model_config, with_data_image_size
from invertible_train.optim import check_optim_config
from invertible_train.results import ResultsDirError, read_summary, results_path
from invertible_train.sharded_checkpoint import ShardedCheckpointStore
from invertible_train.sharding import refuse_fsdp_in_one_process
from invertible_train.strategy import Distribution, SingleProcess, select_device
from invertible_train.trainer import NonFiniteLossError, Trainer

__all__ = ["build_eval_parser", "build_parser", "check_experiment", "evaluate_main", "main"]

EXIT_USAGE, EXIT_UNUSABLE, EXIT_NONFINITE = 2, 1, 3


def build_parser() -> argparse.ArgumentParser:
    """The ``invertible-train`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="invertible-train",
        description=(
            "Train a model of the invertible zoo on CIFAR-10/100, handwritten digits, your own "
            "images or synthetic data. Rerunning the same command resumes from the last "
            "checkpoint; Ctrl-C saves one first."
        ),
        epilog=(
            "Example: invertible-train revnet38 cifar10 --data-dir ~/data. "
            "Results go to RESULTS_DIR/NAME (NAME defaults to MODEL-DATASET)."
        ),
    )
    parser.add_argument(
        "model",
        help="model name from the zoo (resnet32, revnet38, revnet110, revnet164, ...), or "
        "tv:NAME from torchvision (tv:resnet18), or timm:NAME from timm "
        "(timm:vit_tiny_patch16_224, built for the data's image size)",
    )
    parser.add_argument(
        "dataset",
        help="cifar10, cifar100, digits (needs scikit-learn), synthetic, or imagefolder:PATH "
        "(PATH/train, PATH/test)",
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
        "--name",
        help="experiment name = results subfolder, one folder name (default MODEL-DATASET)",
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
        "--threads",
        type=int,
        help="torch's CPU threads per process (train.threads; default: torch's choice)",
    )
    parser.add_argument(
        "--no-memory-saving",
        action="store_true",
        help="train reversible models without memory saving (model.memory_saving = false); "
        "a resumed run may switch it either way",
    )
    parser.add_argument(
        "--reversible",
        choices=sorted(METHODS),
        help="make the network reversible with invertible_models.make_reversible "
        "(model.reversible): momentum or two_stream; coefficients with --set "
        "model.reversible_options.gamma=0.9",
    )
    parser.add_argument(
        "--memory-budget",
        metavar="SIZE",
        help="before training, plan which blocks store their activations and which recompute "
        "them for the fastest step whose peak memory fits SIZE per process, e.g. 6GiB or "
        "512MiB (train.memory_budget; recorded in summary.json; a resumed run reuses the "
        "checkpoint's plan for the same budget, else plans again)",
    )
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
        help="under torchrun: BatchNorm normalises with the statistics of the global batch "
        "(train.sync_bn)",
    )
    parser.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard every block of the model with FSDP2 instead of DDP, "
        "and save sharded checkpoints (train.fsdp; --amp adds a mixed-precision policy)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="delete what this harness wrote in the experiment's results folder (the files "
        "its marker lists; your own files there stay) and start over instead of resuming",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved experiment and exit",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


#: the smallest value of each numeric option (0 would mean "the default" in the config).
_MINIMA = {"epochs": 1, "iterations": 1, "batch_size": 1, "workers": 0, "threads": 1}


def _named_options(args: argparse.Namespace) -> dict[str, Any]:
    for option, minimum in _MINIMA.items():
        value = getattr(args, option)
        if value is not None and value < minimum:
            flag = "--" + option.replace("_", "-")
            raise ConfigError(f"{flag} must be at least {minimum}; got {value}")
    values: dict[str, Any] = {"data.dataset": args.dataset}
    if args.name is not None:
        values["name"] = check_run_name(args.name)
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
        ("threads", "train.threads"),
    ):
        if getattr(args, option) is not None:
            values[key] = getattr(args, option)
    if args.no_memory_saving:
        values["model.memory_saving"] = False
    if args.reversible is not None:
        values["model.reversible"] = args.reversible
    if args.sync_bn:
        values["train.sync_bn"] = True
    if args.fsdp:
        values["train.fsdp"] = True
    if args.memory_budget is not None:
        values["train.memory_budget"] = args.memory_budget
    return values


def _error(prog: str, message: str, status: int, report: bool = True) -> int:
    if report:
        print(f"{prog}: error: {message}", file=sys.stderr)
    return status


@contextlib.contextmanager
def _one_line_warnings(prog: str, report: bool = True) -> Iterator[None]:
    """Warnings as ``prog: warning: message`` lines (none where ``report`` is False)."""

    def show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
        if report:
            print(f"{prog}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():  # the filters stay the caller's; only the display changes
        warnings.showwarning = show
        yield


def check_experiment(cfg: ExperimentConfig) -> None:
    """The names an experiment refers to exist (model, dataset, optimizer, schedule), and its
    name is one folder name; else :class:`ConfigError` naming the key and the choices."""
    check_model_config(cfg.model)
    check_dataset_name(cfg.data.dataset)
    check_optim_config(cfg.optimizer, cfg.scheduler)
    check_run_name(cfg.run_name(), "--name (the experiment name)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``invertible-train``; returns the exit status.

    Under torchrun every process runs this; see :mod:`invertible_train.distributed`.
    """
    args = build_parser().parse_args(argv)
    prog = "invertible-train"
    try:
        cfg = load_experiment(args.model, args.config, dataset=args.dataset)
        cfg = apply_values(cfg, _named_options(args), source="command line")
        cfg = with_data_image_size(apply_overrides(cfg, args.overrides))
        check_experiment(cfg)
        if args.print_config:
            print(dump_toml(config_to_dict(cfg)), end="")
            return 0
        device = select_device(cfg.train.device, no_cuda=args.no_cuda)
        if cfg.train.fsdp and torchrun_ranks() is None:
            refuse_fsdp_in_one_process()
        with process_group(device, args.backend) as job:
            return _train(args, cfg, job if job is not None else SingleProcess(device), job)
    except ConfigError as exc:
        return _error(prog, str(exc), EXIT_USAGE)
    except KeyboardInterrupt:  # before training began: nothing to save
        return _error(prog, "interrupted before training began; nothing was saved", 130)


def _train(
    args: argparse.Namespace,
    cfg: ExperimentConfig,
    distribution: Distribution,
    job: DistributedContext | None,
) -> int:
    """Train one experiment; under torchrun (``job``) only rank 0 reports and writes.

    The distributed paths fail on every rank together (the same error), so rank 0 alone
    prints it.
    """
    prog = "invertible-train"
    main_process = distribution.is_main_process
    results = results_path(args.results_dir, cfg)
    try:
        with _one_line_warnings(prog, main_process):
            trainer = Trainer(cfg, results, quiet=args.quiet, distribution=distribution)
            summary = trainer.fit(fresh=args.fresh)
    except ConfigError as exc:
        return _error(prog, str(exc), EXIT_USAGE, main_process)
    except NonFiniteLossError as exc:
        return _error(prog, str(exc), EXIT_NONFINITE, main_process)
    except (DatasetUnavailableError, CheckpointError, ResultsDirError) as exc:
        return _error(prog, str(exc), EXIT_UNUSABLE, main_process)
    except Interrupted as exc:
        if main_process:
            print(f"{prog}: {exc}", file=sys.stderr)
        return 128 + exc.signum
    if not args.quiet and main_process:
        figures = ", ".join(
            f"{key.replace('_', ' ')} {value:.4f}"
            for key, value in summary.items()
            if key.startswith("test_")
        )
        print(
            f"{cfg.run_name()}: {figures} after {summary['iterations']} iterations; "
            f"results in {results}"
        )
    return 0


def build_eval_parser() -> argparse.ArgumentParser:
    """The ``invertible-eval`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="invertible-eval",
        description="Evaluate a trained model of a results folder on its dataset's test set. "
        "It first says which model it evaluates.",
    )
    parser.add_argument("results", metavar="RESULTS_DIR", help="an experiment's results folder")
    parser.add_argument(
        "--checkpoint",
        default="best",
        help="'best' (the model with the best test figure of the run's evaluations; last.pt "
        "when there is no best.pt), 'final' (the final model, which summary.json "
        "describes), 'last', 'previous', or a checkpoint file path (or the folder of a "
        "sharded checkpoint of an --fsdp run; default: best)",
    )
    parser.add_argument("--data-dir", help="where the dataset lives, if it moved since training")
    parser.add_argument("--batch-size", type=int, help="evaluation batch size")
    parser.add_argument("--no-cuda", action="store_true", help="evaluate on the CPU")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return parser


def _chosen_checkpoint(results: Path, choice: str) -> tuple[Path, str]:
    """The checkpoint ``--checkpoint choice`` names (a file, or the folder of a sharded
    checkpoint of an ``--fsdp`` run), and which model that is: ``best``, ``final``,
    ``last``, ``previous`` or ``file``."""
    folder = results / "checkpoints"

    def named(name: str) -> Path:
        plain, sharded = folder / f"{name}.pt", folder / f"{name}.dcp"
        return sharded if sharded.exists() and not plain.exists() else plain

    if choice == "best":
        best = named("best")
        return (best, "best") if best.exists() else (named("last"), "last")
    if choice == "final":
        return named("last"), "final"
    if choice in ("last", "previous"):
        return named(choice), choice
    return Path(choice), "file"


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """The state of the checkpoint ``path``: a file, or a sharded checkpoint's folder."""
    if path.is_dir():
        return ShardedCheckpointStore(path.parent).read(path)
    return load_checkpoint(path)


def _describe(which: str, metric: str, iteration: int, total: int, results: Path) -> str:
    """What the evaluated model is, in words, for the line before its figures."""
    at = f"iteration {iteration} of {total}"
    return {
        "best": f"the model with the best {metric} of the run's evaluations ({at}); the final "
        "model, which summary.json describes, is --checkpoint final",
        "final": f"the final model of the run ({at}), which {results / 'summary.json'} describes",
        "last": f"the newest checkpoint ({at})",
        "previous": f"the checkpoint before last.pt ({at})",
        "file": f"the checkpoint file given ({at})",
    }[which]


def _check_final(results: Path, iteration: object, path: Path) -> None:
    """Refuse ``--checkpoint final`` when ``path`` is not the model ``summary.json``
    describes (:class:`CheckpointError`, naming what to do)."""
    summary = read_summary(results)
    if summary is None:
        raise CheckpointError(
            f"{results} has no summary.json: the run has not finished (rerun its "
            "invertible-train command to finish it), so there is no final model; evaluate "
            "--checkpoint last instead"
        )
    if summary.get("iterations") != iteration:
        raise CheckpointError(
            f"{results / 'summary.json'} describes the model of iteration "
            f"{summary.get('iterations')}, but {path} holds iteration {iteration} (the run "
            "went on after that summary); finish the run, or evaluate --checkpoint last"
        )


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``invertible-eval``: says which model it evaluates, then prints its
    test figures."""
    args = build_eval_parser().parse_args(argv)
    prog = "invertible-eval"
    results = Path(args.results)
    path, which = _chosen_checkpoint(results, args.checkpoint)
    try:
        with _one_line_warnings(prog):
            state = _read_checkpoint(path)
            if which == "final":
                _check_final(results, state.get("iteration"), path)
            cfg = config_from_dict(state["config"], source=str(path))
            # one process evaluates the whole model, sharded checkpoint or not
            values: dict[str, Any] = {"train.fsdp": False}
            if args.data_dir is not None:
                values["data.data_dir"] = args.data_dir
            if args.batch_size is not None:
                values["data.eval_batch_size"] = args.batch_size
            cfg = apply_values(cfg, values, source="command line")
            device = select_device(cfg.train.device, no_cuda=args.no_cuda)
            trainer = Trainer(cfg, results, device=device, quiet=True)
            trainer.load_state_dict(state, path)
            iteration = trainer.iteration
            metric = trainer.task.metric.removeprefix("test_").replace("_", " ")
            said = _describe(which, f"test {metric}", iteration, trainer.total_iterations, results)
            if not args.json:
                print(f"evaluating {path}: {said}", flush=True)
            figures = trainer.evaluate()
    except ConfigError as exc:
        return _error(prog, str(exc), EXIT_USAGE)
    except (DatasetUnavailableError, CheckpointError, ResultsDirError) as exc:
        return _error(prog, str(exc), EXIT_UNUSABLE)
    result = {"checkpoint": str(path), "which": which, "iteration": iteration, **figures}
    if args.json:
        print(json.dumps(result))
    else:
        shown = ", ".join(f"{key.replace('_', ' ')} {value:.4f}" for key, value in figures.items())
        print(f"{path} (iteration {iteration}): {shown}")
    return 0
