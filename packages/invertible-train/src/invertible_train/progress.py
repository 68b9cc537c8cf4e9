"""What a run shows while it trains: a progress bar on a terminal, or plain lines.

``bar``: a tqdm bar on stderr with the last logged loss, metric and images/s, shown only
when stderr is a terminal (a bar redrawn into a log file is noise). ``lines``: one line on
stdout per logged iteration, for output that goes to a file or a pipe, where a bar cannot
show and a run would otherwise be silent for minutes. ``none``: nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, Literal

__all__ = ["PROGRESS_MODES", "Progress", "ProgressMode"]

ProgressMode = Literal["bar", "lines", "none"]
#: the values of ``Trainer(progress=...)``.
PROGRESS_MODES: tuple[ProgressMode, ...] = ("bar", "lines", "none")


class Progress:
    """Progress of one training session: ``total`` iterations, from ``initial``.

    ``metric`` and ``abbreviation`` name the task's training figure (``accuracy``, ``acc``).
    """

    def __init__(
        self,
        mode: ProgressMode,
        total: int,
        initial: int,
        description: str,
        metric: str,
        abbreviation: str,
    ) -> None:
        if mode not in PROGRESS_MODES:
            raise ValueError(f"progress must be one of {', '.join(PROGRESS_MODES)}, got {mode!r}")
        self.mode = mode
        self.total = total
        self.description = description
        self.metric = metric
        self.abbreviation = abbreviation
        self._bar: Any = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total,
                initial=initial,
                disable=not sys.stderr.isatty(),
                desc=description,
                unit="it",
                dynamic_ncols=True,
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, iterations: int = 1) -> None:
        """``iterations`` more were trained."""
        if self._bar is not None:
            self._bar.update(iterations)

    def show(self, record: Mapping[str, Any]) -> None:
        """A logged ``train`` record: on the bar, or as one line."""
        loss, metric = record["loss"], record[self.metric]
        speed = record["images_per_second"]
        if self._bar is not None:
            self._bar.set_postfix(
                loss=f"{loss:.3f}",
                **{self.abbreviation: f"{metric:.3f}"},
                img_s=f"{speed:.0f}",
                refresh=False,
            )
        elif self.mode == "lines":
            width = len(str(self.total))
            print(
                f"{self.description}: iteration {record['iteration']:>{width}}/{self.total}, "
                f"loss {loss:.3f}, {self.metric.replace('_', ' ')} {metric:.3f}, "
                f"{speed:.0f} images/s",
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
