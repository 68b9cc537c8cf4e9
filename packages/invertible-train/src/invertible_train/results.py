"""The results folder of an experiment: what is written there, and when it may be reused.

Layout (written by the main process only)::

    .invertible-train      the marker: this folder holds this harness's results (--fresh
                           deletes nothing else)
    config.toml            the resolved experiment (reusable with --config)
    metrics.jsonl          one JSON object per line: "train" steps, "eval"uations,
                           "resumed" and "stopped" events
    summary.json           final test metrics, parameters, activation memory, images/s,
                           versions of our packages and torch
    checkpoints/last.pt    written every train.checkpoint_every iterations, at the end, and
                           when the run is interrupted (SIGINT, SIGTERM)
    checkpoints/previous.pt  the last.pt before it (resumed from when last.pt is unusable)
    checkpoints/best.pt    the evaluated model with the best test metric so far
    samples/               density models: a PNG grid of samples at each evaluation
    tensorboard/           event files: loss, metrics, lr, throughput, memory, samples

:func:`prepare_results` creates the folder and its marker (a folder that cannot be written
is a :class:`~invertible_train.config.ConfigError` naming ``--results-dir``).
:class:`RunLog` writes the logs, the summary and TensorBoard; on resumption it drops what
the interrupted run logged after the checkpoint it resumes from, so the logs read as one
uninterrupted run. :func:`holds_results` says what of value a folder holds (what a restart
would overwrite), and :func:`remove_results` implements ``--fresh``; when a run may resume
is :mod:`invertible_train.resume`'s business.
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

from invertible_train.config import ConfigError, ExperimentConfig, check_run_name, dump_toml

__all__ = [
    "MARKER",
    "ResultsDirError",
    "RunLog",
    "Throughput",
    "holds_results",
    "package_versions",
    "prepare_results",
    "remove_results",
    "results_path",
]

#: the file that marks a folder as this harness's results (written when the folder is made).
MARKER = ".invertible-train"


class ResultsDirError(RuntimeError):
    """The results directory holds something this run must not overwrite or resume."""


def results_path(results_dir: str | Path, cfg: ExperimentConfig) -> Path:
    """``results_dir / run name``, the run name checked to be a single folder name."""
    return Path(results_dir) / check_run_name(cfg.run_name(), "--name (the experiment name)")


def prepare_results(path: Path) -> None:
    """Create the results folder ``path`` and its :data:`MARKER` (main process only).

    A folder that cannot be created or written (a file in the way, no permission) raises
    :class:`ConfigError` naming ``--results-dir``: nothing has been trained yet.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        marker = path / MARKER
        if not marker.exists():
            marker.write_text(
                "This folder holds results of invertible-train; "
                "`invertible-train ... --fresh` may delete it.\n",
                encoding="utf-8",
            )
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        where = exc.filename if exc.filename is not None else path
        raise ConfigError(
            f"--results-dir: cannot write the results folder {path} ({reason}: {where}); "
            "choose a folder you can write to"
        ) from None


def holds_results(path: Path) -> list[str]:
    """What of value ``path`` holds (checkpoints, evaluations, a summary), as relative paths.

    A run with nothing in this list may start over from iteration 0: it lost at most the
    training-loss lines of the iterations before its first checkpoint, which it repeats
    exactly. Anything here would be overwritten by a restart.
    """
    found = [str(f.relative_to(path)) for f in sorted((path / "checkpoints").glob("*.pt*"))]
    if (path / "summary.json").exists():
        found.append("summary.json")
    metrics = path / "metrics.jsonl"
    if metrics.exists():
        lines = metrics.read_text(encoding="utf-8").splitlines()
        if any(line.strip() and json.loads(line).get("kind") == "eval" for line in lines):
            found.append("metrics.jsonl (evaluations)")
    return found


def remove_results(path: Path) -> None:
    """Delete an experiment's results (``--fresh``); anything but results is refused.

    Deleted only when ``path`` is a real folder (not a link), directly inside its results
    folder, holding the harness's :data:`MARKER`.
    """
    if not path.exists() and not path.is_symlink():
        return
    parent = path.parent.resolve()
    inside = path.resolve().parent == parent and path.name not in ("", ".", "..")
    if path.is_symlink() or not path.is_dir() or not inside or not (path / MARKER).is_file():
        raise ResultsDirError(
            f"--fresh would delete {path}, which is not a results folder of invertible-train "
            f"(no {MARKER} file in it, or not a folder inside {path.parent}); delete it "
            "yourself, or choose another --name or --results-dir"
        )
    shutil.rmtree(path)


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
        """Write the resolved config and open the logs; ``resumed_at``: resumed iteration.

        Starting over (``resumed_at`` None) clears ``metrics.jsonl`` and makes TensorBoard
        ignore earlier events; resuming keeps only what was logged up to ``resumed_at``.
        """
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
                str(self.results_dir / "tensorboard"),
                purge_step=resumed_at if resumed_at is not None else 0,
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

    def log_image(self, tag: str, image: torch.Tensor, iteration: int) -> None:
        """A ``(C, H, W)`` image in [0, 1] to TensorBoard (e.g. a grid of samples)."""
        if self._writer is not None:
            self._writer.add_image(tag, image, iteration)

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
