"""For tests that start a training run in another process and stop it mid-run."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

#: a hang guard, not a speed requirement: alone a test run writes its first checkpoint within
#: seconds, but in a full CI run on a slow 2-core machine one took over 120 s
CHECKPOINT_WAIT_S = 300


def wait_for_checkpoint(
    process: subprocess.Popen, checkpoint: Path, timeout: float = CHECKPOINT_WAIT_S
) -> None:
    """Return once ``checkpoint`` exists; fail if ``process`` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not checkpoint.exists():
        assert process.poll() is None, "the run ended before writing a checkpoint"
        assert time.monotonic() < deadline, f"no checkpoint within {timeout} s"
        time.sleep(0.005)
