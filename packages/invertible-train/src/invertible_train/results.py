"""The results folder of an experiment: what is written there, and when it may be reused.

Layout (written by the main process only)::

    .invertible-train      the marker: this folder holds this harness's results, and the
                           entries it wrote (the only ones --fresh deletes)
    config.toml            the resolved experiment (reusable with --config)
    metrics.jsonl          one JSON object per line: "train" steps, "eval"uations,
                           "resumed" and "stopped" events
    summary.json           final test metrics, parameters, activation memory, images/s,
                           versions of our packages and torch
    checkpoints/last.pt    written every train.checkpoint_every iterations, at the end, and
                           when the run is interrupted (SIGINT, SIGTERM)
    checkpoints/previous.pt  the last.pt before it (resumed from when last.pt is unusable)
    checkpoints/best.pt    the evaluated model with the best test metric so far
    checkpoints/*.dcp/     the same three under --fsdp, each a folder of sharded files
    samples/               density models: a PNG grid of samples at each evaluation
    tensorboard/           event files: loss, metrics, lr, throughput, memory, samples

The folder is the user's as much as ours: a note or a plot the user puts beside the results
is never touched. So the marker (JSON) lists the entries of the folder the harness wrote;
:func:`check_results` refuses, before anything is written, a folder that is not empty but
has no marker (the harness did not make it), and :func:`remove_results` (``--fresh``)
deletes the listed entries and nothing else. :func:`prepare_results` creates the folder and
records in the marker what a run is about to write. :class:`RunLog` writes the logs, the
summary and TensorBoard; on resumption it drops what the interrupted run logged after the
checkpoint it resumes from, so the logs read as one uninterrupted run.
:func:`holds_results` says what of value a folder holds (what a restart would overwrite);
when a run may resume is :mod:`invertible_train.resume`'s business.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import torch

from invertible_train.config import ConfigError, ExperimentConfig, check_run_name, dump_toml

__all__ = [
    "HARNESS_ENTRIES",
    "MARKER",
    "ResultsDirError",
    "RunLog",
    "Throughput",
    "check_results",
    "holds_results",
    "package_versions",
    "prepare_results",
    "read_summary",
    "remove_results",
    "results_path",
    "written_entries",
]

#: the file that marks a folder as this harness's results (written when the folder is made).
MARKER = ".invertible-train"

#: every entry a run may write into its results folder; a marker that lists none (written by
#: a version of the harness before the list) stands for these.
HARNESS_ENTRIES = (
    "checkpoints",
    "config.toml",
    "metrics.jsonl",
    "samples",
    "summary.json",
    "tensorboard",
)

_MARKER_NOTE = (
    "This folder holds results of invertible-train. `invertible-train ... --fresh` deletes "
    "the entries listed under 'written' (and this file), nothing else."
)


class ResultsDirError(RuntimeError):
    """The results directory holds something this run must not overwrite or resume."""


def results_path(results_dir: str | Path, cfg: ExperimentConfig) -> Path:
    """``results_dir / run name``, the run name checked to be a single folder name."""
    return Path(results_dir) / check_run_name(cfg.run_name(), "--name (the experiment name)")


def written_entries(path: Path) -> list[str]:
    """The entries of ``path`` its :data:`MARKER` says the harness wrote (sorted).

    A marker that is not the JSON this version writes (an earlier version's line of text)
    stands for :data:`HARNESS_ENTRIES`. Names that are not one plain entry of the folder
    are ignored: nothing outside the folder is ever listed.
    """
    try:
        listed = json.loads((path / MARKER).read_text(encoding="utf-8"))["written"]
    except (ValueError, KeyError, TypeError):
        return list(HARNESS_ENTRIES)
    if not isinstance(listed, list):
        return list(HARNESS_ENTRIES)
    names = {name for name in listed if isinstance(name, str)}
    return sorted(
        name
        for name in names
        if name not in ("", ".", "..", MARKER) and os.sep not in name and "/" not in name
    )


def _write_marker(path: Path, entries: Iterable[str]) -> None:
    """Write the marker listing ``entries``, atomically (a kill leaves the old one or the new)."""
    marker = path / MARKER
    text = json.dumps({"note": _MARKER_NOTE, "written": sorted(set(entries))}, indent=2) + "\n"
    partial = path / f"{MARKER}.tmp"
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, marker)


def _unwritable(path: Path) -> str | None:
    """Why the folder ``path`` could not be created or written, without trying: None if it can."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"Not a directory: {probe}"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"Permission denied: {probe}"
    return None


def check_results(path: Path, fresh: bool = False) -> None:
    """Refuse, before anything is written, a results folder this run must not use.

    Raises :class:`ConfigError` naming ``--results-dir`` when the folder cannot be created
    or written (a file in the way, no permission), and :class:`ResultsDirError` when it is
    not empty but has no :data:`MARKER` (the harness did not make it: a user's folder) or,
    with ``fresh``, is not a folder ``--fresh`` may empty (a link, say). A missing or empty
    folder is fine. Reads only.
    """
    why = _unwritable(path)
    if why is not None:
        raise ConfigError(
            f"--results-dir: cannot write the results folder {path} ({why}); "
            "choose a folder you can write to"
        )
    if fresh and (path / MARKER).is_file():
        _check_removable(path)
    if not path.exists() or (path / MARKER).is_file():
        return
    held = sorted(entry.name for entry in path.iterdir())
    if held:
        shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
        raise ResultsDirError(
            f"{path} is not a results folder of invertible-train (it has no {MARKER} file) "
            f"and is not empty ({shown}); nothing was written or deleted. Choose another "
            "--name or --results-dir, or move its contents elsewhere"
        )


def prepare_results(path: Path, writes: Iterable[str] = ()) -> None:
    """Create the results folder ``path`` with its :data:`MARKER`, recording the entries
    ``writes`` a run is about to write there (beside those recorded before); main process.

    A folder that cannot be created or written raises :class:`ConfigError` naming
    ``--results-dir`` (:func:`check_results` catches this before anything is trained).
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        before = written_entries(path) if (path / MARKER).is_file() else []
        _write_marker(path, [*before, *writes])
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
    folder = path / "checkpoints"
    found = [
        str(f.relative_to(path)) for f in sorted([*folder.glob("*.pt*"), *folder.glob("*.dcp*")])
    ]
    if (path / "summary.json").exists():
        found.append("summary.json")
    metrics = path / "metrics.jsonl"
    if metrics.exists():
        lines = metrics.read_text(encoding="utf-8").splitlines()
        if any(line.strip() and json.loads(line).get("kind") == "eval" for line in lines):
            found.append("metrics.jsonl (evaluations)")
    return found


def read_summary(path: Path) -> dict[str, Any] | None:
    """The ``summary.json`` of the results folder ``path``, or None when it has none."""
    try:
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _check_removable(path: Path) -> None:
    """Refuse ``--fresh`` on anything but a real folder, directly inside its results folder,
    holding the :data:`MARKER`."""
    parent = path.parent.resolve()
    inside = path.resolve().parent == parent and path.name not in ("", ".", "..")
    if path.is_symlink() or not path.is_dir() or not inside or not (path / MARKER).is_file():
        raise ResultsDirError(
            f"--fresh would delete {path}, which is not a results folder of invertible-train "
            f"(no {MARKER} file in it, or not a folder inside {path.parent}); delete it "
            "yourself, or choose another --name or --results-dir"
        )


def remove_results(path: Path) -> list[str]:
    """Delete what the harness wrote in ``path`` (``--fresh``); returns the entries deleted.

    Only the entries its :data:`MARKER` lists, then the marker; anything else (a user's
    notes) stays, and so does the folder when something is left in it. A folder without the
    marker, a link, or a folder that is not directly inside its results folder is refused
    (:class:`ResultsDirError`) with nothing deleted.
    """
    if not path.exists() and not path.is_symlink():
        return []
    _check_removable(path)
    deleted = []
    for name in written_entries(path):
        entry = path / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()
        else:
            continue
        deleted.append(name)
    (path / MARKER).unlink()
    with contextlib.suppress(OSError):  # not empty: the user's files stay, in their folder
        path.rmdir()
    return deleted


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
    """Seconds of training, excluding the "paused" spans (evaluation, saving).

    Everything else the loop does (data, augmentation, logging, progress) counts as
    training time, so the images/s it reports is what the harness really delivers.
    ``seconds``: the training seconds of the run before this session (a resumed run's, from
    its checkpoint), so that :meth:`so_far` and :attr:`total_seconds` are the whole run's.
    """

    def __init__(self, seconds: float = 0.0) -> None:
        self.started = self.window_start = time.perf_counter()
        self.window_paused = 0.0
        self.total_seconds = seconds
        self._paused_since: float | None = None

    def _open_window(self, now: float) -> float:
        inside = now - self._paused_since if self._paused_since is not None else 0.0
        return now - self.window_start - self.window_paused - inside

    def window(self, device: torch.device) -> float:
        """Close the current window: the training seconds since the last one."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the queued steps belong to this window
        now = time.perf_counter()
        seconds = self._open_window(now)
        self.total_seconds += seconds
        self.window_start, self.window_paused = now, 0.0
        return seconds

    def so_far(self) -> float:
        """The run's training seconds up to now (the open window included, pauses not)."""
        return self.total_seconds + self._open_window(time.perf_counter())

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside does not count as training time."""
        start = self._paused_since = time.perf_counter()
        try:
            yield
        finally:
            self._paused_since = None
            self.window_paused += time.perf_counter() - start
