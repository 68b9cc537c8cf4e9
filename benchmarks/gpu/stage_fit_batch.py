"""Stage 4 of the GPU suite: the largest batch of RevNet-164 and ResNet-164 that fits 40 GiB.

"Fits" means: the peak of one float32 training step (forward, loss, backward, SGD step),
parameters, gradients, momentum and the batch included, stays within the budget, as
``torch.cuda.max_memory_allocated`` counts it (tensor memory; neither the caching
allocator's reserve nor the CUDA context). RevNet-164 runs with memory saving on, ResNet-164
as it is: the comparison of the RevNet paper. The H200 has more than 40 GiB, so a step
above the budget runs and is measured rather than failing (an out-of-memory error counts as
"does not fit" all the same).

Two answers per model:

- ``invertible-profile MODEL --budget 40GiB --fit-batch`` (the memory-budget issue adds
  the flag; until this checkout's profiler offers it the row says "not available in this
  build");
- the stage's own search: it measures the step at a small batch and its double, fits a
  line to peak against batch (activation memory is linear in the batch), and tries the
  batch the line predicts, then brackets the answer (doubling while there is no upper
  bound, then bisection steered by the line) to within ``granularity`` images. Tries are
  capped in number and each is timed beforehand from the last one, so the search stops
  within its time box and reports the largest batch it verified.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import (
    GIB,
    MIB,
    AmpTrainingStep,
    StageResult,
    TimeBox,
    build_model,
    error_text,
    release,
    start_stage,
)
from plan import FIT_BATCH_MODELS
from record import NOT_AVAILABLE

CONFIG: dict[str, dict[str, Any]] = {
    "gpu": {
        "budget_bytes": 40 * GIB,
        "budget_text": "40GiB",
        "image_size": 32,
        "num_classes": 10,
        "start": 128,
        "granularity": 64,
        "max_tries": 12,
    },
    "dry": {
        "budget_bytes": 40 * MIB,
        "budget_text": "40MiB",
        "image_size": 8,
        "num_classes": 10,
        "start": 2,
        "granularity": 2,
        "max_tries": 8,
    },
}

#: share of the stage's time box the profiler's own --fit-batch may use, per model. The
#: profiler (the product's answer, which the issue asks for) starts CUDA itself and plans
#: the batch it finds (a few more steps), so it gets most of the box on the GPU; the
#: suite's own search is the cross-check. On the CPU of a dry run both are quick.
PROFILER_SHARE = {"gpu": 0.6, "dry": 0.35}


class BatchProbe:
    """Peak bytes of one training step of a model at any batch size (its state included)."""

    def __init__(self, name: str, device: torch.device, image_size: int, num_classes: int):
        model, self.saving_mode = build_model(name, saving=name.startswith("revnet"))
        self.device = device
        self.step = AmpTrainingStep(
            model,
            batch_size=2,
            image_size=image_size,
            num_classes=num_classes,
            device=device,
            precision="fp32",
        )
        self.step()
        self.step()  # gradients and momentum allocated: the state every batch size pays

    def peak_bytes(self, batch_size: int) -> int:
        """Total bytes allocated at the peak of a step at ``batch_size``.

        Raises ``torch.cuda.OutOfMemoryError`` when the device cannot hold the step.
        """
        from invertible_core import measure_memory

        self.step.set_batch_size(batch_size)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            held = torch.cuda.memory_allocated(self.device)
        else:
            held = self.step.held_bytes
        _, stats = measure_memory(self.step, device=self.device)
        return held + stats.peak_bytes


def _round_down(value: float, granularity: int) -> int:
    return max(granularity, int(value) // granularity * granularity)


def predicted_batch(tries: list[dict[str, Any]], budget: int) -> int | None:
    """The batch at which the line through the two largest measured tries meets the budget."""
    points = sorted({t["batch"]: t["peak_bytes"] for t in tries if t.get("peak_bytes")}.items())
    if len(points) < 2:
        return None
    (b0, p0), (b1, p1) = points[-2], points[-1]
    per_image = (p1 - p0) / (b1 - b0)
    if per_image <= 0:
        return None
    return int((budget - (p1 - per_image * b1)) / per_image)


#: the furthest the line's prediction may jump past the largest batch known to fit
MAX_JUMP = 64


def next_batch(
    lo: int | None,
    hi: int | None,
    prediction: int | None,
    granularity: int,
    bisect: bool,
) -> int | None:
    """The next batch to try, or ``None`` when the answer is bracketed to ``granularity``.

    ``lo`` is the largest batch known to fit, ``hi`` the smallest known not to (either may
    be unknown yet). Without an upper bound: the line's prediction when it lies beyond
    ``lo`` (at most ``MAX_JUMP`` times ``lo``), else double ``lo``. Within a bracket: the
    prediction when it falls inside, else (or when ``bisect``) the midpoint; the caller
    alternates ``bisect``, so the bracket at least halves every second try.
    """
    if lo is None:  # nothing fits yet: go down
        assert hi is not None
        if hi <= 1:
            return None
        candidate = hi // 2
        if not bisect and prediction is not None and 1 <= prediction < candidate:
            candidate = prediction
        return max(1, candidate)
    if hi is None:  # no upper bound yet: go up
        if prediction is None:
            return 2 * lo
        if prediction >= lo + granularity:
            return min(_round_down(prediction, granularity), MAX_JUMP * lo)
        return lo + granularity
    if hi - lo <= granularity:
        return None
    if bisect or prediction is None or not lo < prediction < hi:
        candidate = _round_down((lo + hi) // 2, granularity)  # a line that missed: bisect
    else:
        candidate = _round_down(prediction, granularity)
    candidate = min(max(candidate, lo + granularity), hi - granularity)
    return candidate if lo < candidate < hi else None


def estimate_seconds(tries: list[dict[str, Any]], batch: int) -> float:
    """The time a try at ``batch`` will take, from the tries so far (with a margin).

    Step time is an overhead plus a cost per image: the cost is the slope between the two
    largest tries, but at least a quarter of the last try's time per image (a noisy pair
    of small tries must not promise a free large one).
    """
    timed = sorted({t["batch"]: t["seconds"] for t in tries}.items())
    b_last, t_last = timed[-1]
    per_image = 0.25 * t_last / b_last
    if len(timed) >= 2:
        (b0, t0), (b1, t1) = timed[-2], timed[-1]
        per_image = max(per_image, (t1 - t0) / (b1 - b0))
    return 1.3 * (t_last + per_image * max(0, batch - b_last)) + 0.5


def search(
    peak_of: Callable[[int], int],
    *,
    budget: int,
    start: int,
    granularity: int,
    max_tries: int,
    box: TimeBox,
    deadline_s: float,
    tries: list[dict[str, Any]] | None = None,
    on_try: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """The largest batch whose step peak (``peak_of(batch)``) is within ``budget``.

    Stops when the answer is bracketed to ``granularity``, after ``max_tries`` tries, or
    when the next try (:func:`estimate_seconds`) would end past ``deadline_s`` seconds into
    the time box. A batch that raises an out-of-memory error does not fit; any other error
    at the very first try is raised (the step is broken, not too large), and later ones
    count as "does not run at this batch". Each try is appended to ``tries`` (a fresh
    list by default) and ``on_try`` is called after it, so a caller can save progress.
    """
    tries = [] if tries is None else tries
    lo: int | None = None
    hi: int | None = None
    batch: int | None = start
    stopped = "bracketed"
    bisect = False
    while batch is not None:
        if len(tries) >= max_tries:
            stopped = "max_tries"
            break
        if tries and box.elapsed() + estimate_seconds(tries, batch) > deadline_s:
            stopped = "time box"
            break
        started = time.monotonic()
        attempt: dict[str, Any] = {"batch": batch}
        try:
            attempt["peak_bytes"] = peak_of(batch)
            attempt["fits"] = attempt["peak_bytes"] <= budget
        except torch.cuda.OutOfMemoryError:
            attempt.update(peak_bytes=None, fits=False, error="out of memory")
        except RuntimeError as exc:  # e.g. a kernel's size limit: this batch does not run
            if not tries:
                raise
            attempt.update(peak_bytes=None, fits=False, error=error_text(exc, 600))
        attempt["seconds"] = time.monotonic() - started
        tries.append(attempt)
        print(f"  try {attempt}", flush=True)
        if on_try is not None:
            on_try()
        was_bracketed = lo is not None and hi is not None
        if attempt["fits"]:
            lo = batch
        else:
            hi = batch
        # within a bracket, alternate the line's guess and the midpoint (line first)
        bisect = was_bracketed and not bisect
        batch = next_batch(lo, hi, predicted_batch(tries, budget), granularity, bisect)
    peak_at = {t["batch"]: t.get("peak_bytes") for t in tries}
    return {
        "largest_batch": lo,
        "peak_bytes_at_largest": peak_at.get(lo) if lo is not None else None,
        "smallest_not_fitting": hi,
        "exact": lo is not None and hi is not None and hi - lo <= granularity,
        "predicted_batch": predicted_batch(tries, budget),
        "stopped": stopped,
        "tries": tries,
    }


def profiler_fit_batch_supported() -> bool:
    """Whether this checkout's ``invertible-profile`` offers ``--fit-batch``."""
    done = subprocess.run(
        [sys.executable, "-m", "invertible_models.profiler", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode == 0 and "--fit-batch" in done.stdout


def _find_batch(data: Any) -> int | None:
    """The first integer under a key naming the fitted batch, anywhere in ``data``."""
    keys = ("fit_batch", "largest_batch", "max_batch_size", "fitted_batch", "batch_size")
    if isinstance(data, dict):
        for key in keys:
            value = data.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        children = list(data.values())
    elif isinstance(data, list):
        children = data
    else:
        return None
    for child in children:
        found = _find_batch(child)
        if found is not None:
            return found
    return None


def profiler_fit_batch(
    name: str, device: torch.device, config: dict[str, Any], timeout_s: float
) -> dict[str, Any]:
    """``invertible-profile NAME --budget B --fit-batch`` in a subprocess, within ``timeout_s``."""
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "profile.json"
        command = [
            sys.executable, "-m", "invertible_models.profiler", name,
            "--device", device.type,
            "--image-size", str(config["image_size"]),
            "--budget", config["budget_text"],
            "--fit-batch",
            "--max-tries", str(config["max_tries"] + 2),
            "--json", str(output),
        ]  # fmt: skip
        started = time.monotonic()
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=max(1.0, timeout_s)
            )
        except subprocess.TimeoutExpired as exc:
            tail = (exc.stdout or b"")[-1500:]
            return {
                "status": "timeout",
                "seconds": time.monotonic() - started,
                "output_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail,
            }
        record: dict[str, Any] = {
            "command": " ".join(command[1:]),
            "seconds": time.monotonic() - started,
            "output_tail": (done.stdout + done.stderr)[-1500:],
        }
        data = None
        if output.exists():
            try:
                data = json.loads(output.read_text(encoding="utf-8"))
            except ValueError:
                data = None
        record["largest_batch"] = _find_batch(data)
        record["status"] = "ok" if done.returncode == 0 else "error"
        if done.returncode == 0 and record["largest_batch"] is None:
            record["status"] = "error"
            record["note"] = "the profiler ran but its JSON names no fitted batch"
        return record


def main(argv: list[str] | None = None) -> int:
    args, box, device, kind = start_stage(__doc__, argv)
    config = CONFIG[kind]
    result = StageResult(
        args.result, conditions={**config, "device": str(device), "precision": "fp32"}
    )
    try:
        with_profiler = profiler_fit_batch_supported()
    except (OSError, subprocess.SubprocessError) as exc:
        with_profiler = False
        print(f"could not ask the profiler for --fit-batch: {exc}", flush=True)
    result.data["profiler_fit_batch"] = with_profiler
    for index, name in enumerate(FIT_BATCH_MODELS):
        # each model's search may run until its share of what is left is spent
        left = len(FIT_BATCH_MODELS) - index
        profiler_s = PROFILER_SHARE[kind] * box.remaining() / left if with_profiler else 0.0
        deadline = box.elapsed() + (box.remaining() - profiler_s) / left
        # the row is in the result from the start, its tries saved as they happen, so a
        # search the driver has to kill still shows the batches it verified
        row: dict[str, Any] = {
            "model": name,
            "status": "running",
            "budget_bytes": config["budget_bytes"],
            "tries": [],
        }
        result.add_row(row)
        started = time.monotonic()
        try:
            probe = BatchProbe(name, device, config["image_size"], config["num_classes"])
            row["saving_mode"] = probe.saving_mode
            row.update(
                search(
                    probe.peak_bytes,
                    budget=config["budget_bytes"],
                    start=config["start"],
                    granularity=config["granularity"],
                    max_tries=config["max_tries"],
                    box=box,
                    deadline_s=deadline,
                    tries=row["tries"],
                    on_try=result.save,
                )
            )
            row["status"] = "ok" if row["largest_batch"] is not None else "failed"
            if row["largest_batch"] is None:
                row["note"] = "no batch size tried fits the budget"
            del probe
        except Exception as exc:
            row.update(status="error", error=error_text(exc))
        release(device)
        if with_profiler:
            row["profiler"] = profiler_fit_batch(name, device, config, profiler_s)
        else:
            row["profiler"] = {"status": "not available", "note": NOT_AVAILABLE}
        row["seconds"] = time.monotonic() - started
        result.save()
        print(f"{row['status']}: {name}: largest batch {row.get('largest_batch')}", flush=True)
    result.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
