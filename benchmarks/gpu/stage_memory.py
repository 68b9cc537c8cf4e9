"""Stage 2 of the GPU suite: MemCNN's memory table, reproduced, with step times.

ResNet-32/110/164 against RevNet-38/110/164 at batch 128, 32x32 images, 10 classes, in
float32 and under bf16 autocast, with memory saving on and off (for the ResNets "on" is
``torch.utils.checkpoint`` per residual block, the zoo's ``memory_saving``; off, their
default, is the conventional ResNet).

Each row is the zoo profiler's measurement of the project's one training step
(:func:`invertible_models.profiler.profile_step`; forward, cross-entropy, backward, SGD step
with momentum), so its figures mean what ``invertible-profile`` prints: the step peak is the
most one step allocates beyond what it holds before it (parameters, gradients, momentum
buffers, the batch), exact on CUDA (``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``, without the caching allocator's reserve or the CUDA context);
the activations are what a training-mode forward pass keeps for backward; the step time is
the median of several steps, each synchronised, each from the same state of the model.
MemCNN's published figures (GPU, batch 128) sit beside the float32 rows they correspond to:
its ResNets without saving, its RevNets with.
"""

from __future__ import annotations

from typing import Any

import torch
from common import StageResult, parameter_count, run_rows, start_stage, training_step
from plan import MEMCNN_ACTIVATION_MB, MEMORY_MODELS, MEMORY_PRECISIONS

from invertible_models.profiler import profile_step

#: sizes of a real run, and of the dry run (toy sizes, for the CPU)
SIZES = {
    "gpu": {"batch_size": 128, "image_size": 32, "num_classes": 10, "steps": 10},
    "dry": {"batch_size": 2, "image_size": 8, "num_classes": 10, "steps": 1},
}

DEFINITION = (
    "step peak = the most one training step (forward, loss, backward, SGD step) allocates "
    "beyond what it holds before it (parameters, gradients, momentum buffers, input batch); "
    "torch.cuda.max_memory_allocated on CUDA"
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
    step = training_step(
        spec["model"],
        spec["saving"],
        batch_size=sizes["batch_size"],
        image_size=sizes["image_size"],
        num_classes=sizes["num_classes"],
        device=device,
        precision=spec["precision"],
    )
    profile = profile_step(step, name=spec["model"], steps=sizes["steps"])
    return {
        "parameters": parameter_count(step),
        "step_peak_mib": profile.step_peak_mib,
        "activation_mib": profile.activation_mib,
        "state_mib": profile.state_mib,
        "step_seconds": profile.step_seconds,
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
