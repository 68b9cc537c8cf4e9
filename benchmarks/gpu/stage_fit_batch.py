"""Stage 4 of the GPU suite: the largest batch of RevNet-164 and ResNet-164 that fits 40 GiB.

"Fits" means: the step's peak (the project's one definition, ``held_bytes +
step_peak_bytes``: parameters, gradients, momentum and the batch included, and the most the
step allocates beyond them, as ``torch.cuda.max_memory_allocated`` counts it: tensor memory,
neither the caching allocator's reserve nor the CUDA context) stays within the budget. The
H200 has more than 40 GiB, so a step above the budget runs and is measured rather than
failing (an out-of-memory error counts as "does not fit" all the same).

Two answers per model:

- ``invertible-profile MODEL --budget 40GiB --fit-batch``: the largest batch whose leanest
  plan (everything rebuilt or checkpointed) fits, found by the profiler itself;
- the stage's own search over the model's default float32 step (RevNet-164 saving memory,
  ResNet-164 the conventional one: the comparison of the RevNet paper), with the profiler's
  search (:func:`invertible_models.memory_budget.largest_fitting_batch`: doubling, then the
  line through the nearest measurements and a check of its neighbour) and this stage's time
  box: each try is timed beforehand from the last ones, and the search stops before a try
  that would end past its share of the box, reporting the largest batch it verified.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    GIB,
    MIB,
    StageResult,
    TimeBox,
    error_text,
    release,
    start_stage,
    training_step,
)
from plan import FIT_BATCH_MODELS

from invertible_core import TrainingStep, measure_memory
from invertible_models.memory_budget import largest_fitting_batch
from invertible_models.step import training_step as zoo_step

CONFIG: dict[str, dict[str, Any]] = {
    "gpu": {
        "budget_bytes": 40 * GIB,
        "budget_text": "40GiB",
        "image_size": 32,
        "num_classes": 10,
        "start": 128,
        "max_tries": 12,
    },
    "dry": {
        "budget_bytes": 40 * MIB,
        "budget_text": "40MiB",
        "image_size": 8,
        "num_classes": 10,
        "start": 2,
        "max_tries": 8,
    },
}

#: share of the stage's time box the profiler's own --fit-batch may use, per model. The
#: profiler (the product's answer, which the issue asks for) starts CUDA itself and plans
#: the batch it finds (a few more steps), so it gets most of the box on the GPU; the
#: suite's own search is the cross-check. On the CPU of a dry run both are quick.
PROFILER_SHARE = {"gpu": 0.6, "dry": 0.35}


class BatchProbe:
    """The peak of one training step of a model at any batch size: one model and one
    optimizer, warmed up (gradients and momentum allocated), a new batch per size."""

    def __init__(self, name: str, device: torch.device, image_size: int, num_classes: int):
        self.first = training_step(
            name,
            None,
            batch_size=2,
            image_size=image_size,
            num_classes=num_classes,
            device=device,
            precision="fp32",
        )
        self.memory_saving = bool(getattr(self.first.module, "memory_saving", False))
        self.device = device
        self.image_size = image_size
        self.num_classes = num_classes
        self.first()
        self.first()  # gradients and momentum allocated: the state every batch size pays

    def at(self, batch_size: int) -> TrainingStep:
        """The step at ``batch_size``: the same model and optimizer, a batch of that size."""
        optimizer = self.first.optimizer
        assert optimizer is not None
        return zoo_step(
            self.first.module,
            batch_size=batch_size,
            image_size=self.image_size,
            num_classes=self.num_classes,
            device=self.device,
            optimizer=lambda _: optimizer,
        )

    def peak_bytes(self, batch_size: int) -> int:
        """``peak_bytes`` of a step at ``batch_size``: what it holds before it plus the most
        it allocates beyond. Raises ``torch.cuda.OutOfMemoryError`` when it cannot run."""
        step = self.at(batch_size)
        held = step.held_bytes()
        _, stats = measure_memory(step, device=self.device)
        return held + stats.peak_bytes


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
    probe: Any,
    *,
    budget: int,
    start: int,
    max_tries: int,
    box: TimeBox,
    deadline_s: float,
    tries: list[dict[str, Any]] | None = None,
    on_try: Any = None,
) -> dict[str, Any]:
    """The largest batch whose step peak (``probe(batch)``) is within ``budget``: the
    profiler's search, stopped before a try that (by :func:`estimate_seconds`) would end
    past ``deadline_s`` seconds into the time box.

    A batch that raises an out-of-memory error does not fit; any other error at the very
    first try is raised (the step is broken, not too large), later ones count as "does not
    run at this batch". Each try is appended to ``tries`` (a fresh list by default) with its
    time, and ``on_try`` is called after it, so a caller can save progress.
    """
    tries = [] if tries is None else tries

    def peak_of(batch: int) -> int | None:
        started = time.monotonic()
        attempt: dict[str, Any] = {"batch": batch}
        try:
            attempt["peak_bytes"] = probe(batch)
        except torch.cuda.OutOfMemoryError:
            attempt.update(peak_bytes=None, error="out of memory")
        except RuntimeError as exc:  # e.g. a kernel's size limit: this batch does not run
            if not tries:
                raise
            attempt.update(peak_bytes=None, error=error_text(exc, 600))
        attempt["fits"] = attempt["peak_bytes"] is not None and attempt["peak_bytes"] <= budget
        attempt["seconds"] = time.monotonic() - started
        tries.append(attempt)
        print(f"  try {attempt}", flush=True)
        if on_try is not None:
            on_try()
        return attempt["peak_bytes"]  # type: ignore[no-any-return]

    def out_of_time(batch: int, _: list[dict[str, Any]]) -> bool:
        return box.elapsed() + estimate_seconds(tries, batch) > deadline_s

    found = largest_fitting_batch(peak_of, budget, start, max_tries, stop=out_of_time)
    peak_at = {t["batch"]: t.get("peak_bytes") for t in tries}
    if found.stopped:
        stopped = "time box"
    else:  # the search ends by itself with fewer tries than it may take
        stopped = "bracketed" if len(tries) < max_tries else "max_tries"
    return {
        "largest_batch": found.fit_batch,
        "peak_bytes_at_largest": peak_at.get(found.fit_batch) if found.fit_batch else None,
        "exact": found.exact,
        "stopped": stopped,
        "tries": tries,
    }


def fitted_batch(profile: Any) -> int | None:
    """The batch ``invertible-profile --fit-batch --json`` found (its first model's)."""
    results = profile.get("results") if isinstance(profile, dict) else None
    if not results or not isinstance(results[0], dict):
        return None
    batch = results[0].get("fit_batch")
    return batch if isinstance(batch, int) and not isinstance(batch, bool) else None


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
        record["largest_batch"] = fitted_batch(data)
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
    for index, name in enumerate(FIT_BATCH_MODELS):
        # each model's search may run until its share of what is left is spent
        left = len(FIT_BATCH_MODELS) - index
        profiler_s = PROFILER_SHARE[kind] * box.remaining() / left
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
            row["memory_saving"] = probe.memory_saving
            row.update(
                search(
                    probe.peak_bytes,
                    budget=config["budget_bytes"],
                    start=config["start"],
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
        row["profiler"] = profiler_fit_batch(name, device, config, profiler_s)
        row["seconds"] = time.monotonic() - started
        result.save()
        print(f"{row['status']}: {name}: largest batch {row.get('largest_batch')}", flush=True)
    result.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
