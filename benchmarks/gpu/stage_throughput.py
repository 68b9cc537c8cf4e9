"""Stage 3 of the GPU suite: training throughput (images/s) in mixed precision.

RevNet-38/110/164 and the zoo's reversible transformer (``revvit_tiny``, 32x32 images)
under bf16 autocast and under fp16 autocast with a ``torch.amp.GradScaler``, memory saving
on and off, batch 128. Throughput is the batch times the number of timed steps over their
wall time, synchronised only before the first and after the last (the steps queue on the
GPU as in training: their losses are checked after the last, not at every step), after
warm-up steps. A row whose losses are not all finite fails: NaN arithmetic is not what
training costs.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from common import (
    StageResult,
    parameter_count,
    run_rows,
    start_stage,
    synchronize,
    training_step,
)
from plan import AMPS, THROUGHPUT_MODELS, TRANSFORMER

#: the transformer's own input size (its patch embedding is built for it)
TRANSFORMER_IMAGE_SIZE = 32

SIZES = {
    "gpu": {"batch_size": 128, "image_size": 32, "num_classes": 10, "warmup": 3, "steps": 15},
    "dry": {"batch_size": 2, "image_size": 8, "num_classes": 10, "warmup": 1, "steps": 2},
}


def specs_of(model: str) -> list[dict[str, Any]]:
    return [{"model": model, "amp": a, "saving": s} for a in AMPS for s in (True, False)]


def measure(spec: dict[str, Any], sizes: dict[str, int], device: torch.device) -> dict[str, Any]:
    image_size = TRANSFORMER_IMAGE_SIZE if spec["model"] == TRANSFORMER else sizes["image_size"]
    step = training_step(
        spec["model"],
        spec["saving"],
        batch_size=sizes["batch_size"],
        image_size=image_size,
        num_classes=sizes["num_classes"],
        device=device,
        precision=spec["amp"],
        check_finite=False,  # checked after the timed steps: a check is a synchronisation
    )
    for _ in range(sizes["warmup"]):
        step()
    synchronize(device)
    start = time.perf_counter()
    losses = [step() for _ in range(sizes["steps"])]
    synchronize(device)
    elapsed = time.perf_counter() - start
    finite = bool(torch.isfinite(torch.stack(losses)).all())
    return {
        "status": "ok" if finite else "failed",
        **({} if finite else {"note": "a timed step's loss was not finite"}),
        "parameters": parameter_count(step),
        "image_size": image_size,
        "images_per_second": sizes["batch_size"] * sizes["steps"] / elapsed,
        "step_seconds": elapsed / sizes["steps"],
        "loss_scale": float(step.scaler.get_scale()) if step.scaler is not None else None,
    }


def main(argv: list[str] | None = None) -> int:
    args, box, device, kind = start_stage(__doc__, argv)
    sizes = SIZES[kind]
    result = StageResult(
        args.result, conditions={**sizes, "device": str(device)}, transformer=TRANSFORMER
    )
    specs = [s for m in THROUGHPUT_MODELS for s in specs_of(m)]
    run_rows(result, box, specs, lambda spec: measure(spec, sizes, device), device)
    result.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
