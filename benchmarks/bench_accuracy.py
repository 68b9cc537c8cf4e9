"""Accuracy parity on real data, CPU-sized: does a reversible network lose accuracy?

The RevNet and RevViT papers claim that a reversible network reaches the accuracy of its
plain twin. This reproduces the claim small: ``resnet32`` against ``revnet38`` and
``vit_tiny`` against ``revvit_tiny``, each trained with 3 seeds on scikit-learn's handwritten
digits (1,437 training scans, 8x8, 17 grey levels) and tested on the 360 held-out ones; and
Glow's test bits per dimension on the same digits after a fixed budget of steps.

Every run goes through the harness itself: a ``Trainer`` given the experiment that
``invertible-train MODEL digits`` would use (the shipped files, the data, the augmentation,
the optimizer and schedule, the evaluation), with only the length, the seed and the sizes
below changed. The seed sets the initialisation, the data order and the augmentation.

Sizes, chosen so that the whole benchmark takes minutes on one CPU thread:

* ``resnet32``, ``revnet38``: the paper's networks unchanged, the RevNet recipe (SGD, lr
  0.1, batch 100, lr x0.1 at 1/2 and 3/4 of the run), the digits augmentation (a 1-pixel
  shift, no flip), 400 iterations (28 epochs).
* ``vit_tiny``, ``revvit_tiny``: the shipped digits experiments (2x2 patches: 16 tokens;
  the RevViT recipe: AdamW, lr 1e-3, warmup then cosine, batch 128) at a CPU width:
  ``embed_dim`` 64, ``depth`` 4, 4 heads (202,058 parameters each, against 5.4 M at the
  zoo's width 192 and depth 12), 600 iterations (54 epochs).
* ``glow``: the shipped ``glow-digits`` experiment (2 levels of 8 steps, 64 channels,
  Adam 1e-3 with warmup), 600 iterations, seed 0. A model uniform over the 17 levels
  scores log2(17) = 4.09 bits per dimension.

Parity holds when the reversible twin's mean accuracy lies within the seeds' spread of
the plain one: ``|mean(reversible) - mean(plain)|`` at most the larger of the two ranges
(max - min over the seeds). Accuracy does not depend on the machine's load; no time is
reported.

    OMP_NUM_THREADS=1 python benchmarks/bench_accuracy.py      # minutes
    python benchmarks/bench_accuracy.py --quick                # seconds: a smoke test

Prints a table and writes JSON (default ``benchmarks/results/accuracy.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from invertible_train.config import DataConfig, apply_values, load_experiment
from invertible_train.data import DIGITS_LEVELS, ImageData, build_data
from invertible_train.results import package_versions
from invertible_train.trainer import Trainer

#: (plain, reversible) twins compared
PAIRS = (("resnet32", "revnet38"), ("vit_tiny", "revvit_tiny"))
#: the CNN recipe's augmentation made for 8x8 scans: a 1-pixel shift, no flip
CNN_DIGITS = {"data.crop_padding": 1, "data.horizontal_flip": False}
#: the transformers at a CPU width (patch 2 and the rest: the shipped digits files)
VIT_CPU = {"model.options.embed_dim": 64, "model.options.depth": 4, "model.options.num_heads": 4}
#: the same, for --quick
VIT_QUICK = {"model.options.embed_dim": 16, "model.options.depth": 1, "model.options.num_heads": 2}
GLOW_QUICK = {"model.options.hidden_channels": 8, "model.options.steps": 1}


def experiment(model: str, seed: int, iterations: int, sizes: dict[str, Any]) -> Any:
    """The experiment of ``invertible-train MODEL digits``, at this length, seed and size;
    evaluated, checkpointed and logged once, at the end."""
    values: dict[str, Any] = {
        "data.dataset": "digits",
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
    return apply_values(load_experiment(model, dataset="digits"), values, source="benchmark")


def train(model: str, seed: int, iterations: int, sizes: dict[str, Any], data: ImageData) -> dict:
    """One run through the harness; its summary (test figures, parameters)."""
    with tempfile.TemporaryDirectory() as folder:
        cfg = experiment(model, seed, iterations, sizes)
        trainer = Trainer(cfg, Path(folder) / "run", device="cpu", quiet=True, data=data)
        return trainer.fit()


def sizes_of(model: str, quick: bool) -> dict[str, Any]:
    if "vit" in model:
        return VIT_QUICK if quick else VIT_CPU
    return CNN_DIGITS


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
    parser.add_argument("--seeds", type=int, default=None, help="seeds per model (default 3)")
    parser.add_argument("--cnn-iterations", type=int, default=None, help="default 400")
    parser.add_argument("--vit-iterations", type=int, default=None, help="default 600")
    parser.add_argument("--glow-iterations", type=int, default=None, help="default 600")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 2 seeds, a few steps, tiny ViTs"
    )
    parser.add_argument(
        "--json", default="benchmarks/results/accuracy.json", help="JSON file to write"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds or (2 if args.quick else 3)))
    iterations = {
        "cnn": args.cnn_iterations or (2 if args.quick else 400),
        "vit": args.vit_iterations or (2 if args.quick else 600),
        "glow": args.glow_iterations or (2 if args.quick else 600),
    }
    data = build_data(DataConfig(dataset="digits"))

    runs: list[dict[str, Any]] = []
    for pair in PAIRS:
        for model in pair:
            length = iterations["vit" if "vit" in model else "cnn"]
            for seed in seeds:
                summary = train(model, seed, length, sizes_of(model, args.quick), data)
                runs.append(
                    {
                        "model": model,
                        "seed": seed,
                        "iterations": summary["iterations"],
                        "test_accuracy": summary["test_accuracy"],
                        "parameters": summary["parameters"],
                    }
                )
                print(f"  {model} seed {seed}: {summary['test_accuracy']:.4f}", file=sys.stderr)

    def accuracies(model: str) -> list[float]:
        return [r["test_accuracy"] for r in runs if r["model"] == model]

    pairs = []
    for plain, reversible in PAIRS:
        a, b = spread(accuracies(plain)), spread(accuracies(reversible))
        difference = b["mean"] - a["mean"]
        allowed = max(a["range"], b["range"])
        pairs.append(
            {
                "plain": plain,
                "reversible": reversible,
                plain: a,
                reversible: b,
                "difference": difference,
                "allowed": allowed,
                "within_spread": abs(difference) <= allowed,
            }
        )

    glow_cfg = GLOW_QUICK if args.quick else {}
    glow = train("glow", 0, iterations["glow"], glow_cfg, data)
    glow_record = {
        "iterations": glow["iterations"],
        "seed": 0,
        "test_bits_per_dim": glow["test_bits_per_dim"],
        "uniform_bits_per_dim": math.log2(DIGITS_LEVELS),
        "parameters": glow["parameters"],
    }

    print(
        f"digits: {len(data.train)} training scans, {len(data.test)} test scans, seeds "
        f"{', '.join(map(str, seeds))}; {torch.get_num_threads()} threads"
        + (" (quick)" if args.quick else "")
    )
    header = f"{'model':<12}{'parameters':>11}{'iterations':>11}  " + "".join(
        f"{'seed ' + str(s):>8}" for s in seeds
    )
    print(header + f"{'mean':>9}{'std':>8}{'range':>8}")
    for entry in pairs:
        for model in (entry["plain"], entry["reversible"]):
            mine = [r for r in runs if r["model"] == model]
            cells = "".join(f"{100 * r['test_accuracy']:>8.2f}" for r in mine)
            stats = entry[model]
            print(
                f"{model:<12}{mine[0]['parameters']:>11,}{mine[0]['iterations']:>11}  {cells}"
                f"{100 * stats['mean']:>9.2f}{100 * stats['std']:>8.2f}{100 * stats['range']:>8.2f}"
            )
    print("test accuracy in %; std over the seeds, range = max - min")
    for entry in pairs:
        verdict = "within" if entry["within_spread"] else "OUTSIDE"
        print(
            f"{entry['reversible']} - {entry['plain']}: {100 * entry['difference']:+.2f} points "
            f"({verdict} the seeds' spread, {100 * entry['allowed']:.2f})"
        )
    print(
        f"glow ({glow_record['parameters']:,} parameters), {glow_record['iterations']} "
        f"iterations: test bits per dim {glow_record['test_bits_per_dim']:.3f} "
        f"(uniform over the 17 levels: {glow_record['uniform_bits_per_dim']:.3f})"
    )

    record = {
        "benchmark": "accuracy_parity",
        "dataset": "digits",
        "train_size": len(data.train),
        "test_size": len(data.test),
        "seeds": seeds,
        "iterations": iterations,
        "quick": args.quick,
        "sizes": {"cnn": CNN_DIGITS, "vit": VIT_QUICK if args.quick else VIT_CPU},
        "runs": runs,
        "pairs": pairs,
        "glow": glow_record,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": package_versions(),
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
