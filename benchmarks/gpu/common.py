"""What the measuring stages of the GPU suite share: command line, result file, time box, step.

Every stage is a script that the driver (``suite.py``) runs in its own process with a hard
timeout. The stage knows its own time box (``--budget-s``) too, and stops *starting* rows
whose estimated time no longer fits, so a slow stage ends with most of its rows measured
instead of being killed half-way. Its result file is rewritten after every row, so even a
killed stage leaves the rows it finished.

The training step is the project's one (:class:`invertible_core.TrainingStep`), as the zoo's
profiler makes it (:func:`invertible_models.step.training_step`: forward, cross-entropy,
backward, SGD with momentum; gradients zeroed in place so that the model state stays
allocated between steps), in the precision of the row: autocast for bf16 and fp16, and a
``torch.amp.GradScaler`` for fp16, as a user trains.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from record import write_json

from invertible_core import TrainingStep

#: autocast dtype of each precision the suite measures (``None``: float32, no autocast)
AMP_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

MIB = 2**20
GIB = 2**30


def stage_arguments(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The command line every stage takes from the driver."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--result", type=Path, required=True, help="JSON file to write")
    parser.add_argument(
        "--budget-s", type=float, required=True, help="this stage's time box, in seconds"
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes (for the CPU)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available (use --device cpu --dry-run)")
    return args


def start_stage(
    doc: str | None, argv: list[str] | None
) -> tuple[argparse.Namespace, TimeBox, torch.device, str]:
    """A stage's arguments, its time box (started now), its device and its sizes' key
    (``"dry"`` for a dry run, else ``"gpu"``)."""
    args = stage_arguments((doc or "").split("\n\n")[0], argv)
    return args, TimeBox(args.budget_s), torch.device(args.device), "dry" if args.dry_run else "gpu"


class TimeBox:
    """The seconds a stage has, and whether a piece of work of a given length still fits.

    ``reserve_s`` is kept back for writing the result and exiting cleanly.
    """

    def __init__(self, budget_s: float, reserve_s: float = 3.0) -> None:
        self.budget_s = budget_s
        self.reserve_s = reserve_s
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        return self.budget_s - self.reserve_s - self.elapsed()

    def allows(self, estimate_s: float) -> bool:
        return self.remaining() >= estimate_s


class StageResult:
    """A stage's result: a dict written to ``path`` (atomically) after every change."""

    def __init__(self, path: Path, **fields: Any) -> None:
        self.path = path
        self.data: dict[str, Any] = {"status": "running", "note": None, **fields, "rows": []}
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)

    def add_row(self, row: dict[str, Any]) -> None:
        self.data["rows"].append(row)
        self.save()

    def finish(self, status: str | None = None, note: str | None = None) -> None:
        """Set the final status: given, or from the rows (any error: failed; any skipped:
        partial; else ok)."""
        if status is None:
            statuses = {row.get("status") for row in self.data["rows"]}
            if statuses & {"error", "failed"}:
                status = "failed"
            elif "skipped" in statuses:
                status = "partial"
            else:
                status = "ok"
        self.data["status"] = status
        if note is not None:
            self.data["note"] = note
        self.save()


def run_rows(
    result: StageResult,
    box: TimeBox,
    specs: Iterable[dict[str, Any]],
    measure: Callable[[dict[str, Any]], dict[str, Any]],
    device: torch.device,
    first_guess_s: float = 5.0,
) -> None:
    """Measure each spec (a dict naming one row) with ``measure``, within the time box.

    A row whose estimated time (the last time of the same model, else the mean so far,
    else ``first_guess_s``) no longer fits is recorded as skipped; a row that raises is
    recorded as an error with its message, and the next row runs.
    """
    last_of_model: dict[str, float] = {}
    durations: list[float] = []
    for spec in specs:
        model = str(spec.get("model", ""))
        if model in last_of_model:
            estimate = last_of_model[model]
        elif durations:
            estimate = statistics.mean(durations)
        else:
            estimate = first_guess_s
        if not box.allows(estimate):
            result.add_row({**spec, "status": "skipped", "note": "not run: time box spent"})
            print(f"skipped (time box): {spec}", flush=True)
            continue
        started = time.monotonic()
        try:
            row = {**spec, **measure(spec)}
            row.setdefault("status", "ok")
        except Exception as exc:  # one row's failure must not cost the others
            row = {**spec, "status": "error", "error": error_text(exc)}
        release(device)
        seconds = time.monotonic() - started
        row["seconds"] = seconds
        last_of_model[model] = seconds
        durations.append(seconds)
        result.add_row(row)
        print(f"{row['status']}: {spec} ({seconds:.1f} s)", flush=True)


def error_text(exc: BaseException, limit: int = 2000) -> str:
    """The exception's type and message, then the tail of its traceback."""
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    head = f"{type(exc).__name__}: {exc}"
    return (head + "\n" + trace[-limit:])[: limit + len(head) + 1]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Free what a finished row left behind, so the next row starts from the same state."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def training_step(
    name: str,
    saving: bool | None,
    *,
    batch_size: int,
    image_size: int,
    num_classes: int,
    device: torch.device,
    precision: str,
    check_finite: bool = True,
) -> TrainingStep:
    """The zoo's training step of model ``name`` with ``memory_saving=saving`` (``None``: the
    model's default: a RevNet saves, a ResNet trains plainly), on a synthetic batch made on
    the device, in ``precision`` (``fp32``, ``bf16`` or ``fp16`` with a ``GradScaler``). A
    ResNet's saving is checkpointing every residual block."""
    from invertible_models import create_model
    from invertible_models.step import training_step as zoo_step

    if precision not in AMP_DTYPES:
        raise ValueError(f"precision must be one of {sorted(AMP_DTYPES)}, got {precision!r}")
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes, memory_saving=saving)
    return zoo_step(
        model,
        batch_size=batch_size,
        image_size=image_size,
        num_classes=num_classes,
        device=device,
        autocast_dtype=AMP_DTYPES[precision],
        scaler=torch.amp.GradScaler(device.type) if precision == "fp16" else None,
        check_finite=check_finite,
    )


def parameter_count(step: TrainingStep) -> int:
    """Parameters of a step's model."""
    return sum(p.numel() for p in step.module.parameters())
