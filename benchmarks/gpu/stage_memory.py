"""Stage 2 of the GPU suite: MemCNN's memory table, reproduced, with step times.

ResNet-32/110/164 against RevNet-38/110/164 at batch 128, 32x32 images, 10 classes, in
float32 and under bf16 autocast, with memory saving on and off (for the ResNets "on" is
``torch.utils.checkpoint`` per block; see ``common.build_model``).

Activation memory, precisely: the peak bytes allocated during one training step (forward,
cross-entropy, backward, SGD step with momentum) minus the bytes allocated just before it
(parameters, gradients, momentum buffers, the input batch), after two warm-up steps have
allocated that state. On CUDA it comes from ``torch.cuda.max_memory_allocated`` after
``torch.cuda.reset_peak_memory_stats`` (``invertible_core.measure_memory``), so it is exact
and does not include the caching allocator's reserve or the CUDA context. Step time is the
median of several steps, each synchronised. MemCNN's published figures (GPU, batch 128) sit
beside the float32 rows they correspond to: its ResNets without saving, its RevNets with.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
from common import (
    MIB,
    AmpTrainingStep,
    StageResult,
    build_model,
    parameter_count,
    run_rows,
    start_stage,
)
from plan import MEMCNN_ACTIVATION_MB, MEMORY_MODELS, MEMORY_PRECISIONS

#: sizes of a real run, and of the dry run (toy sizes, for the CPU)
SIZES = {
    "gpu": {"batch_size": 128, "image_size": 32, "num_classes": 10, "steps": 10},
    "dry": {"batch_size": 2, "image_size": 8, "num_classes": 10, "steps": 1},
}

DEFINITION = (
    "activation memory = peak bytes allocated during one training step (forward, loss, "
    "backward, SGD step) minus the bytes allocated just before it (parameters, gradients, "
    "momentum buffers, input batch); torch.cuda.max_memory_allocated on CUDA"
)


def memcnn_reference(model: str, precision: str, saving: bool) -> float | None:
    """MemCNN's published activation MB for the row that matches its measurement."""
    if precision != "fp32" or saving != model.startswith("revnet"):
        return None
    return MEMCNN_ACTIVATION_MB.get(model)


def row_specs() -> list[dict[str, Any]]:
    """Every row, MemCNN's comparison first (so a short time box still yields it)."""
    specs: list[dict[str, Any]] = [
        {"model": m, "precision": p, "saving": s}
        for m in MEMORY_MODELS
        for p in MEMORY_PRECISIONS
        for s in (False, True)
    ]
    specs.sort(key=lambda s: memcnn_reference(s["model"], s["precision"], s["saving"]) is None)
    return specs


def measure(spec: dict[str, Any], sizes: dict[str, int], device: torch.device) -> dict[str, Any]:
    from invertible_core import measure_memory

    model, saving_mode = build_model(spec["model"], spec["saving"], sizes["num_classes"])
    step = AmpTrainingStep(
        model,
        batch_size=sizes["batch_size"],
        image_size=sizes["image_size"],
        num_classes=sizes["num_classes"],
        device=device,
        precision=spec["precision"],
    )
    step()
    step()  # warm-up: gradients and momentum allocated, kernels chosen
    _, stats = measure_memory(step, device=device)
    times = [step.seconds() for _ in range(sizes["steps"])]
    return {
        "saving_mode": saving_mode,
        "parameters": parameter_count(step.model),
        "activation_bytes": stats.peak_bytes,
        "activation_mib": stats.peak_bytes / MIB,
        "held_bytes": step.held_bytes,
        "step_seconds": statistics.median(times),
        "memcnn_mb": memcnn_reference(spec["model"], spec["precision"], spec["saving"]),
    }


def main(argv: list[str] | None = None) -> int:
    args, box, device, kind = start_stage(__doc__, argv)
    sizes = SIZES[kind]
    result = StageResult(
        args.result, conditions={**sizes, "device": str(device)}, definition=DEFINITION
    )
    run_rows(result, box, row_specs(), lambda spec: measure(spec, sizes, device), device)
    result.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
