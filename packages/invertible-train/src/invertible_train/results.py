"""The results folder of an experiment: what is written there, and when it may be reused.

Layout (written by the main process only)::

    config.toml            the resolved experiment (reusable with --config)
    metrics.jsonl          one JSON object per line: "train" steps, "eval"uations,
                           "resumed" and "stopped" events
    summary.json           final test_accuracy (a fraction), test_loss, parameters,
                           activation memory, images/s, versions of our packages and torch
    checkpoints/last.pt    written every train.checkpoint_every iterations and at the end
    checkpoints/best.pt    the evaluated model with the highest test accuracy so far
    tensorboard/           event files: loss, accuracy, lr, throughput, memory

:class:`RunLog` writes the first three and TensorBoard; on resumption it drops what the
interrupted run logged after its last checkpoint, so the logs read as one uninterrupted
run. :func:`config_differences` decides whether a folder's run may be resumed by the
current experiment; :func:`remove_results` implements ``--fresh``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import torch

from invertible_train.config import dump_toml

__all__ = [
    "RESUMABLE_CHANGES",
    "ResultsDirError",
    "RunLog",
    "Throughput",
    "config_differences",
    "package_versions",
    "remove_results",
]

#: config keys that may change between a run and its resumption (they do not change what
#: is computed, or they only extend it); any other difference refuses to resume.
RESUMABLE_CHANGES = frozenset(
    {
        "data.workers",
        "data.data_dir",
        "data.download",
        "data.eval_batch_size",
        "train.iterations",
        "train.epochs",
        "train.device",
        "train.log_every",
        "train.eval_every",
        "train.checkpoint_every",
        "train.tensorboard",
        "train.measure_memory",
    }
)

_RESULT_MARKERS = ("config.toml", "checkpoints", "metrics.jsonl", "summary.json")


class ResultsDirError(RuntimeError):
    """The results directory holds something this run must not overwrite or resume."""


def remove_results(path: Path) -> None:
    """Delete an experiment's results (``--fresh``), refusing folders that are not results."""
    if not path.exists():
        return
    if not path.is_dir() or not any((path / m).exists() for m in _RESULT_MARKERS):
        raise ResultsDirError(
            f"--fresh would delete {path}, which does not look like a results directory "
            f"(none of {', '.join(_RESULT_MARKERS)}); remove it yourself or pick another one"
        )
    shutil.rmtree(path)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "options":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def config_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``"key: old -> new"`` for each difference that forbids resuming (nested config dicts)."""
    old, new = _flatten(saved), _flatten(now)
    keys = sorted(k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def package_versions() -> dict[str, str]:
    """Installed versions of our three packages, torch and torchvision (for summaries)."""
    out = {}
    for dist in (
        "invertible-core",
        "invertible-models",
        "invertible-train",
        "torch",
        "torchvision",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # pragma: no cover - partial installs
            out[dist] = "not installed"
    return out


class RunLog:
    """metrics.jsonl, TensorBoard, config.toml and summary.json of one results folder.

    ``enabled=False`` (every process but the main one) makes every method a no-op.
    """

    def __init__(self, results_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.results_dir = results_dir
        self.enabled = enabled
        self.tensorboard = tensorboard
        self._metrics: IO[str] | None = None
        self._writer: Any = None

    def open(self, config: Mapping[str, Any], resumed_at: int | None) -> None:
        """Write the resolved config and open the logs; ``resumed_at``: resumed iteration."""
        if not self.enabled:
            return
        self.results_dir.mkdir(parents=True, exist_ok=True)
        (self.results_dir / "config.toml").write_text(dump_toml(config), encoding="utf-8")
        metrics = self.results_dir / "metrics.jsonl"
        if resumed_at is not None and metrics.exists():
            # drop what the interrupted run logged after its last checkpoint
            kept = [
                line
                for line in metrics.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("iteration", 0) <= resumed_at
            ]
            metrics.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        elif metrics.exists():
            metrics.unlink()
        self._metrics = metrics.open("a", encoding="utf-8")
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(
                str(self.results_dir / "tensorboard"), purge_step=resumed_at
            )

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one record (needs ``kind`` and ``iteration``); numbers go to TensorBoard."""
        if self._metrics is not None:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()
        if self._writer is not None:
            kind = record["kind"]
            for key, value in record.items():
                if key not in ("kind", "iteration", "epoch", "time") and isinstance(
                    value, (int, float)
                ):
                    self._writer.add_scalar(f"{kind}/{key}", value, record["iteration"])

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write summary.json; its memory figures also go to TensorBoard."""
        if not self.enabled:
            return
        if self._writer is not None and summary.get("activation_bytes") is not None:
            self._writer.add_scalar("memory/activation_bytes", summary["activation_bytes"], 0)
            self._writer.add_scalar("memory/step_peak_bytes", summary["step_peak_bytes"], 0)
        (self.results_dir / "summary.json").write_text(
            json.dumps(summary, indent=2) + "\n", encoding="utf-8"
        )

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class Throughput:
    """Images and seconds of training, excluding the "paused" spans (evaluation, saving).

    Everything else the loop does (data, augmentation, logging, progress) counts as
    training time, so the images/s it reports is what the harness really delivers.
    """

    def __init__(self) -> None:
        self.started = self.window_start = time.perf_counter()
        self.images = 0  # trained in the current window
        self.window_paused = 0.0
        self.total_images = 0
        self.total_seconds = 0.0

    def window(self, device: torch.device) -> tuple[int, float]:
        """Close the current window: ``(images, training seconds)`` since the last one."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the queued steps belong to this window
        now = time.perf_counter()
        seconds = now - self.window_start - self.window_paused
        images = self.images
        self.total_images += images
        self.total_seconds += seconds
        self.window_start, self.window_paused, self.images = now, 0.0, 0
        return images, seconds

    @property
    def images_per_second(self) -> float | None:
        return self.total_images / self.total_seconds if self.total_seconds else None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside does not count as training time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.window_paused += time.perf_counter() - start
