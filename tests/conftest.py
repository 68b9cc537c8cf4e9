"""Settings shared by every test directory.

Fixture :func:`spawn_ranks` starts the processes of a multi-process test and fails the
test (killing them) when they do not finish in time, so a hung collective fails one test
instead of stalling the whole run. For CUDA tests, :func:`nccl_group` gives a process group
of one on NCCL and :func:`fp32_exact` true float32 cuDNN kernels.

Hypothesis profiles: ``ci`` (what tox sets through ``HYPOTHESIS_PROFILE=ci``) has no
per-example deadline, because a 2-core CI machine running torch has timing noise far above
any deadline worth setting, and a modest number of examples so the suite stays within CI's
time. ``dev`` is Hypothesis' default budget, for a local run. Environments that do not
install Hypothesis (``build``) skip all of this.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the `build` env tests packaging only and installs no hypothesis
    settings = None

if settings is not None:
    settings.register_profile(
        "ci",
        deadline=None,
        max_examples=25,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
        print_blob=True,
    )
    settings.register_profile("dev", deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


#: seconds a group of spawned ranks may run; the slowest (revnet38 under DDP with
#: SyncBatchNorm) takes about 15 s on a loaded 2-core machine.
SPAWN_TIMEOUT = 180.0


@pytest.fixture
def spawn_ranks() -> Callable[..., None]:
    """``run(fn, args, nprocs=2, timeout=SPAWN_TIMEOUT)``: ``fn(rank, *args)`` in ``nprocs``
    spawned processes, like ``torch.multiprocessing.spawn``, but with a deadline.

    A rank that raises fails the test with its traceback (as ``spawn`` does); ranks still
    running at the deadline are killed and the test fails saying so. Either way no process
    outlives the test, so pytest can exit.
    """
    import torch.multiprocessing as mp  # the packaging tests run without torch

    def run(
        fn: Callable[..., None],
        args: tuple[Any, ...] = (),
        nprocs: int = 2,
        timeout: float = SPAWN_TIMEOUT,
    ) -> None:
        context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False)
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    pytest.fail(
                        f"{nprocs} ranks of {fn.__name__} still running after {timeout:.0f} s: "
                        "a hung collective or a deadlock at exit"
                    )
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join()

    return run


@pytest.fixture
def nccl_group(tmp_path: Path) -> Iterator[None]:
    """A process group of this one process on NCCL (for CUDA tests), destroyed afterwards.

    Rendezvous through a file store (no port to find); one all-reduce proves that NCCL
    runs before the test relies on it.
    """
    import torch
    import torch.distributed as dist

    assert dist.is_available() and dist.is_nccl_available(), "this torch build has no NCCL"
    dist.init_process_group(
        "nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        probe = torch.ones(1, device="cuda")
        dist.all_reduce(probe)
        assert probe.item() == 1.0
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def fp32_exact() -> Iterator[None]:
    """cuDNN in true float32 (no TF32) with deterministic kernels, for tight comparisons."""
    import torch

    with torch.backends.cudnn.flags(enabled=True, deterministic=True, allow_tf32=False):
        yield
