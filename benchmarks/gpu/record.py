"""The GPU suite's result record: stage statuses, and JSON written so that it is never torn.

Torch-free on purpose: the driver (``suite.py``) and the report import
it without paying for torch, and a driver that never touches CUDA cannot hang in it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

#: What a stage (or one row of a stage) can end as.
#: ``ok``: ran and passed; ``partial``: ran, but the stage's time box ended it before every
#: row; ``failed``: ran, and a test or a check failed; ``timeout``: killed at its time box;
#: ``error``: crashed; ``skipped``: not run (deselected, or the suite's deadline had passed).
STATUSES = ("ok", "partial", "failed", "timeout", "error", "skipped")

#: Version of the JSON layout (bump when a field changes meaning). 2: the memory stage's
#: rows are the profiler's (``step_peak_mib``, ``activation_mib``), no overlap stage.
SCHEMA = 2


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically: a reader sees the old file or the new.

    The stages rewrite their result after every row, and the driver may kill them at any
    instant; a temporary file renamed over the old one means a kill never leaves half a
    file. NaN and infinities become ``null``, so the file is strict JSON.
    """
    write_text(path, json.dumps(_strict(data), indent=2, allow_nan=False, default=str) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, _mode_for(path))  # mkstemp makes it private; keep what the file had
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _mode_for(path: Path) -> int:
    """The permission bits ``path`` has, or those a new file gets under the umask."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _strict(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or ``None`` when the file is missing or not valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
