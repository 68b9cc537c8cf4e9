"""``invertible-plot RESULTS_DIR``: the training curves of a run as a PNG.

Reads ``metrics.jsonl`` and draws loss, the task's metric (accuracy, or bits per dimension
for a density model; train and test) and the learning rate against the iteration. Needs matplotlib, the optional ``plot`` extra
(``pip install 'invertible-train[plot]'``); it is imported only here, and drawn with the
Agg canvas directly so that plotting never changes the caller's matplotlib backend.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PlotUnavailableError", "main", "plot_curves", "read_metrics"]


class PlotUnavailableError(RuntimeError):
    """Plotting cannot run: matplotlib is missing or the results have no metrics."""


def read_metrics(results_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``RESULTS_DIR/metrics.jsonl``, in order."""
    path = Path(results_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotUnavailableError(f"{path} does not exist: is {results_dir} a results folder?")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def plot_curves(results_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw the curves of a run; returns the PNG path (default ``RESULTS_DIR/curves.png``)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailableError(
            "plotting needs matplotlib: pip install 'invertible-train[plot]'"
        ) from None
    records = read_metrics(results_dir)
    train = [r for r in records if r.get("kind") == "train"]
    test = [r for r in records if r.get("kind") == "eval"]
    if not train and not test:
        raise PlotUnavailableError(f"{results_dir} has no logged steps to plot yet")

    density = any("bits_per_dim" in r or "test_bits_per_dim" in r for r in records)
    metric = "bits_per_dim" if density else "accuracy"

    fig = Figure(figsize=(12, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_metric, ax_lr = fig.subplots(1, 3)
    for ax, train_key, test_key, title in (
        (ax_loss, "loss", "test_loss", "loss"),
        (ax_metric, metric, f"test_{metric}", metric.replace("_", " ")),
    ):
        ax.plot([r["iteration"] for r in train], [r.get(train_key) for r in train], label="train")
        ax.plot(
            [r["iteration"] for r in test],
            [r.get(test_key) for r in test],
            marker="o",
            label="test",
        )
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.legend()
    ax_lr.plot([r["iteration"] for r in train], [r["lr"] for r in train])
    ax_lr.set_yscale("log")
    ax_lr.set_title("learning rate")
    ax_lr.set_xlabel("iteration")
    fig.suptitle(Path(results_dir).resolve().name)
    out = Path(output) if output is not None else Path(results_dir) / "curves.png"
    fig.savefig(out, dpi=100)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``invertible-plot``."""
    parser = argparse.ArgumentParser(
        prog="invertible-plot", description="Plot the training curves of a results folder."
    )
    parser.add_argument("results", metavar="RESULTS_DIR", help="an experiment's results folder")
    parser.add_argument("--output", "-o", help="PNG file to write (default RESULTS_DIR/curves.png)")
    args = parser.parse_args(argv)
    try:
        out = plot_curves(args.results, args.output)
    except PlotUnavailableError as exc:
        print(f"invertible-plot: error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0
