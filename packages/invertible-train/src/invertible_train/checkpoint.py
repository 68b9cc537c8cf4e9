"""Atomic, self-describing checkpoints that load with ``torch.load(weights_only=True)``.

A checkpoint is written to a temporary file in the same directory, flushed and
``fsync``-ed, then moved over the old one with ``os.replace`` (atomic on POSIX and
Windows). A kill at any instant therefore leaves either the old or the new checkpoint,
never a torn one. It holds everything a bit-exact resume needs: model, optimizer,
scheduler and grad-scaler state, the iteration, the sampler position ``(epoch,
start_index)``, and every random state (Python ``random``, torch CPU, each CUDA device,
NumPy's global generator).

Loading uses ``weights_only=True`` only: a checkpoint is data, never code. A file that is
not a readable checkpoint raises :class:`CheckpointError` naming the file and the fix,
instead of a traceback from the unpickler (and never torch's advice to load it with
``weights_only=False``, which would run whatever code the file holds).

:class:`CheckpointStore` keeps a run's ``checkpoints/`` folder: each new ``last.pt`` first
moves the one before it to ``previous.pt`` (rotation), so when ``last.pt`` turns out to be
unusable (a disk that lost its tail, a copy cut short) the run resumes from
``previous.pt`` instead of starting over; ``best.pt`` is the best evaluated model. Reading
(:meth:`CheckpointStore.latest`) changes nothing on disk; an unusable ``last.pt`` is moved
aside (:meth:`CheckpointStore.set_aside`) only once the run that passed over it begins, to
``last.pt.unusable``, ``last.pt.unusable.1``, ... so that every such file is kept.
:class:`CheckpointFolder` is what this layout shares with the sharded checkpoints of
``--fsdp`` (:mod:`invertible_train.sharded_checkpoint`): one folder per checkpoint.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FIX",
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointFolder",
    "CheckpointStore",
    "LatestCheckpoint",
    "capture_rng_state",
    "fsync_folder",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

#: bumped when the layout of the checkpoint dictionary changes incompatibly.
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and what to do."""


def save_checkpoint(
    state: Mapping[str, Any], path: str | Path, keep_previous: str | Path | None = None
) -> Path:
    """Write ``state`` to ``path`` atomically (temp file, flush, fsync, rename).

    With ``keep_previous``, an existing ``path`` is moved there once the new file is
    complete, just before the new one takes its place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format_version": FORMAT_VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    return path


def fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse
        pass
    finally:
        os.close(fd)


#: the way out of an unusable checkpoint, for every message about one.
FIX = "rerun with --fresh to start the experiment over, or use another --results-dir"


def _reason(exc: Exception) -> str:
    """Why torch could not load a file, in one line, without torch's advice on unsafe loading."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    if "weights only load failed" in text.lower():
        found = re.search(r"Unsupported global: GLOBAL [\w.]+", text)
        what = f" ({found.group(0)})" if found else ""
        return f"it holds Python objects, not only tensors and plain data{what}"
    first = text.splitlines()[0] if text else type(exc).__name__
    return f"{type(exc).__name__}: {first.split('. ')[0][:200]}"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` onto the CPU.

    Raises :class:`CheckpointError` (with the file name and the way out) when the file is
    missing, truncated, not a torch file, holds code rather than data, or was written by an
    incompatible version of this package.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler raises many types; all mean "unusable"
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a checkpoint of this package "
            f"({_reason(exc)}); {FIX}"
        ) from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path} is not an invertible-train checkpoint; {FIX}")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {state['format_version']}, this version of "
            f"invertible-train reads version {FORMAT_VERSION}; {FIX}"
        )
    return state


@dataclass(frozen=True)
class LatestCheckpoint:
    """The newest usable checkpoint of a run, as :meth:`CheckpointStore.latest` found it."""

    state: dict[str, Any]
    #: the file it was read from (``last.pt``, or ``previous.pt`` when ``last.pt`` is unusable).
    path: Path
    #: why ``last.pt`` was passed over (``None`` when it was read): it is unusable and is to
    #: be moved aside (:meth:`CheckpointStore.set_aside`) when the run begins.
    skipped: str | None = None


class CheckpointFolder:
    """What both layouts of a run's ``checkpoints/`` folder share: ``last``, ``previous``
    and ``best`` (named ``NAME`` + :attr:`suffix`), reading the newest usable one
    (:meth:`latest`) and setting an unusable one aside (:meth:`set_aside`).

    :class:`CheckpointStore` keeps one file per checkpoint (``.pt``), written by the main
    process; :class:`~invertible_train.sharded_checkpoint.ShardedCheckpointStore` one
    folder per checkpoint (``.dcp``), written by every process of a sharded run.
    """

    #: how a checkpoint of this layout is named: ``last`` + suffix.
    suffix = ".pt"
    #: the suffix of the other layout (whose checkpoints this run must not pass over).
    other_suffix = ".dcp"

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.last = self.folder / f"last{self.suffix}"
        self.previous = self.folder / f"previous{self.suffix}"
        self.best = self.folder / f"best{self.suffix}"

    def read(self, path: Path) -> dict[str, Any]:
        """The checkpoint ``path`` (the state :meth:`latest` returns); raises
        :class:`CheckpointError` naming it and the way out when it is unusable."""
        raise NotImplementedError

    def remove_stale(self) -> None:
        """Clean up after a kill mid-write (never a finished checkpoint); main process."""
        raise NotImplementedError

    def exists(self) -> bool:
        """Whether a checkpoint to resume from (``last`` or ``previous``) exists."""
        return self.last.exists() or self.previous.exists()

    def foreign(self) -> list[str]:
        """The checkpoints of the other layout in the folder (``last.dcp`` beside a run that
        writes ``.pt`` files, or the reverse), by name: a run must not start over past them."""
        return sorted(
            f"{name}{self.other_suffix}"
            for name in ("last", "previous", "best")
            if (self.folder / f"{name}{self.other_suffix}").exists()
        )

    def latest(self) -> LatestCheckpoint | None:
        """The newest usable checkpoint, or None when none exists; reads, changes nothing.

        ``last`` first; when it is unusable, ``previous``, with the reason ``last`` was
        passed over in :attr:`LatestCheckpoint.skipped`. When neither is usable the
        :class:`CheckpointError` names both.
        """
        errors: list[str] = []
        for path in (self.last, self.previous):
            if not path.exists():
                continue
            try:
                state = self.read(path)
            except CheckpointError as exc:
                errors.append(str(exc).split(f"; {FIX}")[0])
                continue
            return LatestCheckpoint(state, path, errors[0] if errors else None)
        if errors:
            raise CheckpointError("; and ".join(errors) + f"; {FIX}")
        return None

    def set_aside(self, path: Path) -> Path:
        """Move the unusable checkpoint ``path`` to ``NAME.unusable`` (``NAME.unusable.1``,
        ``.2``, ... when that is taken: an earlier set-aside one is never replaced), out of
        the rotation's way and kept for inspection; returns where it went."""
        aside = path.with_name(f"{path.name}.unusable")
        number = 0
        while aside.exists() or aside.is_symlink():
            number += 1
            aside = path.with_name(f"{path.name}.unusable.{number}")
        os.replace(path, aside)
        return aside

    def load_latest(self) -> tuple[dict[str, Any], Path, str | None] | None:
        """:meth:`latest`, after :meth:`remove_stale`, with an unusable ``last`` set aside:
        ``(state, path, skipped)``, ``skipped`` saying why ``last`` was passed over and
        where it went, or None when no checkpoint exists."""
        self.remove_stale()
        found = self.latest()
        if found is None:
            return None
        skipped = None
        if found.skipped is not None:
            skipped = f"{found.skipped}; moved it to {self.set_aside(self.last).name}"
        return found.state, found.path, skipped


class CheckpointStore(CheckpointFolder):
    """The ``checkpoints/`` folder of a run: ``last.pt``, ``previous.pt`` and ``best.pt``.

    :meth:`save_last` rotates (the old ``last.pt`` becomes ``previous.pt`` once the new one
    is complete); :meth:`latest` reads the newest usable one of the two without changing
    anything; :meth:`set_aside` moves an unusable one out of the rotation's way. Only the
    main process of a job uses it.
    """

    def read(self, path: Path) -> dict[str, Any]:
        return load_checkpoint(path)

    def save_last(self, state: Mapping[str, Any]) -> Path:
        """Write ``last.pt`` atomically, keeping the one it replaces as ``previous.pt``."""
        return save_checkpoint(state, self.last, keep_previous=self.previous)

    def save_best(self, state: Mapping[str, Any]) -> Path:
        """Write ``best.pt`` atomically."""
        return save_checkpoint(state, self.best)

    def remove_stale(self) -> None:
        """Delete temporary files a kill left behind mid-write (never a finished checkpoint)."""
        for stale in self.folder.glob(".*.tmp"):
            if stale.is_file():
                stale.unlink(missing_ok=True)


def capture_rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Every random state a training step can consume, as weights-only-loadable data.

    On CUDA only ``device``'s generator is read: under DDP each process owns one GPU, and
    reading the others' would create a context on every GPU from every process.
    """
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is optional
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state["numpy"] = [
        kind,
        torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        pos,
        has_gauss,
        cached,
    ]
    return state


def restore_rng_state(state: Mapping[str, Any], device: torch.device | None = None) -> None:
    """Restore what :func:`capture_rng_state` captured; the CUDA state goes to ``device``."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    cuda_state = state.get("cuda")
    if isinstance(cuda_state, torch.Tensor) and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_state, device)
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
