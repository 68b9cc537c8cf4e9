"""Segmentation parity: does the fully invertible iUNet segment as well as its plain twin?

``iunet`` (memory saving on) and ``unet`` (its plain twin: the same layout and parameter
count, plain autograd) trained with 3 seeds each on the synthetic shapes (balls against
boxes of the same brightness, 3 classes) through the harness itself: a ``Trainer`` given the
shipped experiments ``iunet-shapes2d`` / ``unet-shapes2d`` (or ``-shapes3d``), with only
the length, the seed and the sizes below changed. The seed sets the initialisation and the
data order; the data are the same for every run.

Parity holds when the iUNet's mean test Dice lies within the seeds' spread of the twin's:
``|mean(iunet) - mean(unet)|`` at most the larger of the two ranges (max - min over the
seeds). Dice does not depend on the machine's load; no time is reported.

    OMP_NUM_THREADS=1 python benchmarks/bench_segmentation.py               # 2D, minutes
    OMP_NUM_THREADS=1 python benchmarks/bench_segmentation.py --dataset shapes3d
    python benchmarks/bench_segmentation.py --quick                         # a smoke test

Prints a table and writes JSON (default ``benchmarks/results/segmentation-DATASET.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from invertible_train.config import DataConfig, apply_values, load_experiment
from invertible_train.data import ImageData, build_data
from invertible_train.results import package_versions
from invertible_train.trainer import Trainer

MODELS = ("unet", "iunet")
#: --quick: tiny inputs and networks, 2 iterations
QUICK = {
    "data.image_size": 16,
    "data.synthetic_train_size": 16,
    "data.synthetic_test_size": 8,
    "model.options.width": 8,
    "model.options.levels": 1,
    "model.options.depth": 1,
}


def experiment(model: str, dataset: str, seed: int, iterations: int, sizes: dict[str, Any]) -> Any:
    """The experiment of ``invertible-train MODEL DATASET`` at this length, seed and size;
    evaluated, checkpointed and logged once, at the end."""
    values: dict[str, Any] = {
        "train.seed": seed,
        "train.iterations": iterations,
        "train.epochs": 0,
        "train.eval_every": iterations,
        "train.checkpoint_every": iterations,
        "train.log_every": iterations,
        "train.tensorboard": False,
        "train.measure_memory": False,
        **sizes,
    }
    return apply_values(load_experiment(model, dataset=dataset), values, source="benchmark")


def train(cfg: Any, data: ImageData) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(cfg, Path(folder) / "run", device="cpu", quiet=True, data=data)
        return trainer.fit()


def spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "range": max(values) - min(values),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("shapes2d", "shapes3d"), default="shapes2d")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per model (default 3)")
    parser.add_argument("--iterations", type=int, default=None, help="default: the experiment's")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 seeds, 2 steps")
    parser.add_argument("--json", default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds or (2 if args.quick else 3)))
    sizes: dict[str, Any] = dict(QUICK) if args.quick else {}
    base = load_experiment("iunet", dataset=args.dataset)
    iterations = args.iterations or (2 if args.quick else base.train.iterations)
    data_cfg = DataConfig(
        **{
            **base.data.__dict__,
            **{k.split(".", 1)[1]: v for k, v in sizes.items() if k.startswith("data.")},
        }
    )
    data = build_data(data_cfg)

    runs: list[dict[str, Any]] = []
    for model in MODELS:
        for seed in seeds:
            summary = train(experiment(model, args.dataset, seed, iterations, sizes), data)
            runs.append(
                {
                    "model": model,
                    "seed": seed,
                    "iterations": summary["iterations"],
                    "test_dice": summary["test_dice"],
                    "test_accuracy": summary["test_accuracy"],
                    "test_accuracy_per_class": [
                        summary[f"test_accuracy_{k}"] for k in range(data.num_classes)
                    ],
                    "parameters": summary["parameters"],
                }
            )
            print(f"  {model} seed {seed}: dice {summary['test_dice']:.4f}", file=sys.stderr)

    stats = {m: spread([r["test_dice"] for r in runs if r["model"] == m]) for m in MODELS}
    difference = stats["iunet"]["mean"] - stats["unet"]["mean"]
    allowed = max(stats["iunet"]["range"], stats["unet"]["range"])
    parity = {
        "difference": difference,
        "allowed": allowed,
        "within_spread": abs(difference) <= allowed,
    }

    print(
        f"{args.dataset}: {len(data.train)} training, {len(data.test)} test samples of "
        f"{tuple(data.train[0][0].shape)}, {data.num_classes} classes; {iterations} "
        f"iterations; seeds {', '.join(map(str, seeds))}; {torch.get_num_threads()} thread(s)"
        + (" (quick)" if args.quick else "")
    )
    header = f"{'model':<8}{'parameters':>11}  " + "".join(f"{'seed ' + str(s):>8}" for s in seeds)
    print(header + f"{'mean':>8}{'std':>8}{'range':>8}   per-class accuracy (mean over seeds)")
    for model in MODELS:
        mine = [r for r in runs if r["model"] == model]
        cells = "".join(f"{r['test_dice']:>8.4f}" for r in mine)
        per_class = [
            statistics.fmean(r["test_accuracy_per_class"][k] for r in mine)
            for k in range(data.num_classes)
        ]
        s = stats[model]
        print(
            f"{model:<8}{mine[0]['parameters']:>11,}  {cells}{s['mean']:>8.4f}{s['std']:>8.4f}"
            f"{s['range']:>8.4f}   " + ", ".join(f"{v:.3f}" for v in per_class)
        )
    print(
        f"test Dice (mean over the foreground classes); iunet - unet = {difference:+.4f}, "
        f"allowed {allowed:.4f}: {'within' if parity['within_spread'] else 'outside'} the spread"
    )
    record = {
        "environment": {
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            **package_versions(),
        },
        "dataset": args.dataset,
        "iterations": iterations,
        "quick": args.quick,
        "runs": runs,
        "dice": stats,
        "parity": parity,
    }
    path = Path(args.json or f"benchmarks/results/segmentation-{args.dataset}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
