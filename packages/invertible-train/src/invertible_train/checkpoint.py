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
instead of a traceback from the unpickler.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "capture_rng_state",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

#: bumped when the layout of the checkpoint dictionary changes incompatibly.
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and what to do."""


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (temp file, flush, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format_version": FORMAT_VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
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


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` onto the CPU.

    Raises :class:`CheckpointError` (with the file name and the way out) when the file is
    missing, truncated, not a torch file, holds code rather than data, or was written by an
    incompatible version of this package.
    """
    path = Path(path)
    fix = (
        "delete it (the run restarts from the previous checkpoint if there is one), "
        "rerun with --fresh to start the experiment over, or use another --results-dir"
    )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler raises many types; all mean "unusable"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a checkpoint of this package "
            f"({type(exc).__name__}: {reason[:200]}); {fix}"
        ) from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path} is not an invertible-train checkpoint; {fix}")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {state['format_version']}, this version of "
            f"invertible-train reads version {FORMAT_VERSION}; {fix}"
        )
    return state


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
