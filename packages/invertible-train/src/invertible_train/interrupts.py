"""Ctrl-C and SIGTERM while training: remembered by a handler, acted on between two steps.

The default reaction to SIGINT is a ``KeyboardInterrupt`` wherever Python happens to be,
mid-step or mid-write; to SIGTERM, death. Neither leaves a checkpoint of the iteration
reached. While :meth:`StopSignals.installed` is active, both only set
:attr:`StopSignals.received`; the training loop looks at it after each step (under
torchrun, at the points where the ranks synchronise anyway, so that all stop at the same
iteration), writes a checkpoint and raises :class:`Interrupted`, which the command line
turns into one line and exit status 128 + the signal number (130, 143).

Signals after the first are remembered the same way rather than acted on, so that the
SIGTERM torchrun sends its workers after a Ctrl-C cannot cut that checkpoint short. Python
delivers signals to the main thread only: elsewhere nothing is installed.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["STOP_SIGNALS", "Interrupted", "StopSignals"]

#: the signals that stop a run cleanly (those this platform has).
STOP_SIGNALS = tuple(
    s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s
)


class Interrupted(RuntimeError):
    """Training stopped on SIGINT or SIGTERM after saving a checkpoint to resume from."""

    def __init__(self, signum: int, iteration: int, total: int, checkpoint: Path) -> None:
        self.signum = signum
        self.iteration = iteration
        self.checkpoint = checkpoint
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at iteration {iteration} of {total}; "
            f"saved {checkpoint}; rerun the same command to resume"
        )


class StopSignals:
    """Remembers the first of :data:`STOP_SIGNALS` received while installed."""

    def __init__(self) -> None:
        #: the signal number, or None while none arrived.
        self.received: int | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Catch the stop signals for the block; the previous handlers come back after it."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def remember(signum: int, frame: Any) -> None:
            if self.received is None:
                self.received = signum

        previous = {s: signal.signal(s, remember) for s in STOP_SIGNALS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    @property
    def name(self) -> str:
        """``SIGINT`` or ``SIGTERM`` (SIGTERM when nothing was received here: another rank
        of the job was signalled)."""
        return signal.Signals(self.received or signal.SIGTERM).name

    @property
    def number(self) -> int:
        """The received signal's number (SIGTERM's when another rank was signalled)."""
        return int(self.received or signal.SIGTERM)
