"""For tests that start a training run (or a torchrun job) in another process and stop it
mid-run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping
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


def worker_pids(agent: int) -> list[int]:
    """The processes torchrun started (each in a session of its own), from /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # the name field may hold spaces; the parent pid is the second field after it
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == agent:
                children.append(int(stat.parent.name))
    return children


def kill_job(agent: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers at once: a machine that lost power, as they see it."""
    workers = worker_pids(agent.pid)
    for pid in [agent.pid, *workers]:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    agent.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        assert time.monotonic() < deadline, "torchrun's workers outlived SIGKILL"
        time.sleep(0.05)


def start_and_wait_for_checkpoint(
    command: list[str], checkpoint: Path, env: Mapping[str, str], timeout: float
) -> tuple[subprocess.Popen, list[int]]:
    """Start the torchrun job ``command`` (in a session of its own) and return it with its
    workers once ``checkpoint`` exists, a little later (possibly mid-write of the next)."""
    agent = subprocess.Popen(
        command, env=dict(env), start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for_checkpoint(agent, checkpoint, timeout)
        time.sleep(0.05)  # somewhere after the first checkpoint, possibly mid-write
        workers = worker_pids(agent.pid)
    except BaseException:
        kill_job(agent)
        raise
    return agent, workers
