"""Stage 0 of the GPU suite: the facts a measurement is worthless without.

torch, CUDA, cuDNN and NCCL versions, the GPU's name, memory and compute capability, the
Python, and where our three packages were imported from (their ``src/`` folders, not some
installed copy). It also initialises CUDA once, so that a broken driver shows here, in
seconds, rather than as a timeout of every later stage.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from common import GIB, StageResult, stage_arguments


def _version_of(module: str) -> str | None:
    try:
        return str(__import__(module).__version__)
    except Exception:  # not installed, or no version: the fact is its absence
        return None


def _fact(get: Callable[[], Any]) -> Any:
    """``get()``, or a string saying why this torch could not tell."""
    try:
        return get()
    except Exception as exc:
        return f"unavailable ({type(exc).__name__}: {exc})"


def _nccl_version() -> str:
    version = torch.cuda.nccl.version()  # a tuple on recent torch, an int on older ones
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def facts(device: torch.device) -> dict[str, Any]:
    import invertible_core
    import invertible_models
    import invertible_train

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu_threads": torch.get_num_threads(),
        "torchvision": _version_of("torchvision"),
        "pytest": _version_of("pytest"),
        "packages": {
            m.__name__: {"version": m.__version__, "path": str(m.__file__)}
            for m in (invertible_core, invertible_models, invertible_train)
        },
    }
    if device.type == "cuda":
        started = time.monotonic()
        torch.zeros(1, device=device)  # creates the context: the one fact that must hold
        info["cuda_init_seconds"] = time.monotonic() - started
        # the rest is description: a fact this torch cannot give is recorded as such
        props = _fact(lambda: torch.cuda.get_device_properties(device))
        info.update(
            gpu=_fact(lambda: props.name),
            gpu_count=_fact(torch.cuda.device_count),
            gpu_memory_gib=_fact(lambda: props.total_memory / GIB),
            compute_capability=_fact(lambda: f"{props.major}.{props.minor}"),
            cudnn=_fact(torch.backends.cudnn.version),
            cudnn_benchmark=_fact(lambda: torch.backends.cudnn.benchmark),
            cudnn_allow_tf32=_fact(lambda: torch.backends.cudnn.allow_tf32),
            matmul_allow_tf32=_fact(lambda: torch.backends.cuda.matmul.allow_tf32),
            bf16_supported=_fact(torch.cuda.is_bf16_supported),
            nccl=_fact(_nccl_version),
        )
    return info


def main(argv: list[str] | None = None) -> int:
    args = stage_arguments(__doc__.split("\n\n")[0], argv)
    result = StageResult(args.result)
    result.data["facts"] = facts(torch.device(args.device))
    result.finish("ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
