"""What the measuring stages of the GPU suite share: command line, result file, time box, step.

Every stage is a script that the driver (``suite.py``) runs in its own process with a hard
timeout. The stage knows its own time box (``--budget-s``) too, and stops *starting* rows
whose estimated time no longer fits, so a slow stage ends with most of its rows measured
instead of being killed half-way. Its result file is rewritten after every row, so even a
killed stage leaves the rows it finished.

The training step here is the zoo profiler's (forward, cross-entropy, backward, SGD with
momentum; gradients zeroed in place so that the model state stays allocated between steps)
with mixed precision added: autocast for bf16 and fp16, and a ``torch.amp.GradScaler`` for
fp16, as a user trains.
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
import torch.nn.functional as F
from record import NOT_AVAILABLE, write_json
from torch import nn

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


def not_available_rows(
    result: StageResult, specs: Iterable[dict[str, Any]], why: str = NOT_AVAILABLE
) -> None:
    """Record each spec as a row that this build cannot run."""
    for spec in specs:
        result.add_row({**spec, "status": "not available", "note": why})


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


def is_registered(name: str) -> bool:
    """Whether the zoo of this checkout registers a model called ``name``."""
    from invertible_models import list_models

    return name in list_models()


def build_model(name: str, saving: bool, num_classes: int = 10) -> tuple[nn.Module, str]:
    """The zoo model ``name`` with memory saving on or off, and how saving was switched.

    For reversible networks saving is ``memory_saving``. Plain ResNets have nothing to
    rebuild; their saving is checkpointing every block (``torch.utils.checkpoint``), asked
    for with ``memory_saving`` where the zoo maps it so, else with ``checkpoint_blocks``.
    """
    from invertible_models import create_model

    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes, memory_saving=saving)
    if not saving:
        return model, "off"
    if getattr(model, "memory_saving", False):
        return model, "memory_saving"
    if hasattr(model, "checkpoint_blocks"):
        torch.manual_seed(0)
        return create_model(name, num_classes=num_classes, checkpoint_blocks=True), (
            "checkpoint_blocks"
        )
    return model, "none"


def make_scaler(device_type: str, enabled: bool) -> Any:
    """A ``torch.amp.GradScaler`` (torch >= 2.3), or the older per-device class."""
    amp = getattr(torch, "amp", None)
    if amp is not None and hasattr(amp, "GradScaler"):
        return amp.GradScaler(device_type, enabled=enabled)
    if device_type == "cuda":  # pragma: no cover - torch < 2.3
        return torch.cuda.amp.GradScaler(enabled=enabled)
    return torch.cpu.amp.GradScaler(enabled=enabled)  # type: ignore[attr-defined]  # pragma: no cover


class AmpTrainingStep:
    """One SGD training step on a fixed synthetic batch, in a given precision, repeatable.

    Forward and loss run under autocast (bf16, fp16) or in float32 (fp32); fp16 scales the
    loss with a GradScaler. Gradients are zeroed in place, so after the first call the
    parameters, gradients, momentum buffers and the batch stay allocated between calls
    (:attr:`held_bytes`), and a call's peak beyond them is what the step itself needs.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        batch_size: int,
        image_size: int,
        num_classes: int,
        device: torch.device,
        precision: str,
        channels_last: bool = False,
    ) -> None:
        if precision not in AMP_DTYPES:
            raise ValueError(f"precision must be one of {sorted(AMP_DTYPES)}, got {precision!r}")
        self.device = device
        self.dtype = AMP_DTYPES[precision]
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(device).to(memory_format=memory_format).train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.scaler = make_scaler(device.type, enabled=precision == "fp16")
        self.image_size = image_size
        self.num_classes = num_classes
        self.memory_format = memory_format
        self.images, self.labels = self._batch(batch_size)

    def _batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        # made on the device: a batch of ten thousand images is slow to make on the CPU
        shape = (batch_size, 3, self.image_size, self.image_size)
        images = torch.randn(shape, device=self.device).contiguous(memory_format=self.memory_format)
        labels = torch.randint(0, self.num_classes, (batch_size,), device=self.device)
        return images, labels

    def set_batch_size(self, batch_size: int) -> None:
        """Train on a new synthetic batch of ``batch_size`` images (same image size)."""
        del self.images, self.labels  # free the old batch before allocating the new one
        self.images, self.labels = self._batch(batch_size)

    @property
    def batch_size(self) -> int:
        return self.images.shape[0]

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=False)
        with torch.autocast(
            self.device.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None
        ):
            loss = F.cross_entropy(self.model(self.images), self.labels)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def seconds(self) -> float:
        """Wall time of one step, synchronised before and after on CUDA."""
        synchronize(self.device)
        start = time.perf_counter()
        self()
        synchronize(self.device)
        return time.perf_counter() - start

    @property
    def held_bytes(self) -> int:
        """Bytes of parameters, gradients, optimizer buffers and the batch."""
        tensors: list[torch.Tensor] = [*self.model.parameters(), self.images, self.labels]
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        for state in self.optimizer.state.values():
            tensors += [t for t in state.values() if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
