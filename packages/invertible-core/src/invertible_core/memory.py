"""Exact memory accounting for a piece of PyTorch work, on the CPU as well as on CUDA.

Why this exists: the claim of this library is "less memory", and a claim is only as good as
its measurement. CUDA has ``torch.cuda.max_memory_allocated``; the CPU allocator keeps no
such counter, and the process's resident size is too coarse (the allocator caches, the OS
pages lazily). The PyTorch profiler, run with ``profile_memory=True``, records every
allocation and every free of tensor memory with a timestamp; summing them in time order
gives the exact number of bytes held at every instant, hence the peak.

The cost: the profiler slows the measured work down (a few times on small ops), so measure
memory and time in separate runs. :func:`measure_memory` does only memory.

:func:`measure_memory_phases` also splits the call into phases at each :func:`mark_phase`
(a backward hook can call it, so a phase may be "the backward pass of one stage") and gives
the peak of each: the memory planner (:mod:`invertible_core.planner`) learns from it *when*
the peak happens, not only how high it is.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["MemoryStats", "mark_phase", "measure_memory", "measure_memory_phases"]

#: the name of the profiler range that marks a phase boundary on the CPU
_PHASE_MARK = "invertible_core::phase"
#: the phase boundaries of the measurements in progress (innermost last)
_MARKERS: list[Callable[[], None]] = []


@dataclass(frozen=True)
class MemoryStats:
    """Bytes allocated by the measured call, relative to what was allocated before it.

    Attributes:
        peak_bytes: the most bytes held at any instant during the call.
        retained_bytes: bytes still held when the call returned (what the result keeps
            alive, e.g. the activations a forward pass saves for backward).
        device: the device measured (``"cpu"`` or ``"cuda:N"``).
    """

    peak_bytes: int
    retained_bytes: int
    device: str

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20

    @property
    def retained_mib(self) -> float:
        return self.retained_bytes / 2**20


def measure_memory(
    fn: Callable[[], Any], device: str | torch.device = "cpu"
) -> tuple[Any, MemoryStats]:
    """Run ``fn()`` once and return ``(its result, MemoryStats)``.

    On the CPU the allocation and free events of the PyTorch profiler are summed in time
    order (exact to the byte, independent of other processes). On CUDA the allocator's own
    peak counter is used (``torch.cuda.max_memory_allocated``), after a synchronize.
    The result of ``fn`` is returned so that what it keeps alive counts as retained.

    A caveat on the CPU: the profiler sees only allocations made while it runs, so when
    ``fn`` frees memory allocated before the call (the previous step's gradients, an input
    the caller then drops), that free is missing or mis-sized and the figures depend on
    history. Measure work that frees only what it allocated itself: release earlier
    tensors before the call (``zero_grad(set_to_none=...)`` consistently, a fresh input),
    or run a warm-up step first so that the measured step is a steady state.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return _measure_cuda(fn, dev)
    if dev.type != "cpu":
        raise ValueError(f"measure_memory supports 'cpu' and 'cuda' devices, got {str(dev)!r}")
    return _measure_cpu(fn)


def measure_memory_phases(
    fn: Callable[[], Any], device: str | torch.device = "cpu"
) -> tuple[Any, MemoryStats, list[int]]:
    """:func:`measure_memory`, and the peak of each phase of the call.

    Phase 0 runs from the start of ``fn`` to the first :func:`mark_phase` call made while
    ``fn`` runs (from any thread, backward hooks included), phase ``k`` from the ``k``-th
    mark to the next. Each phase's peak counts, like ``peak_bytes``, from what was
    allocated before ``fn``; the list has one entry more than there were marks.
    """
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(
            f"measure_memory_phases supports 'cpu' and 'cuda' devices, got {str(dev)!r}"
        )
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        peaks: list[int] = []

        def mark() -> None:
            peaks.append(torch.cuda.max_memory_allocated(dev) - before)
            torch.cuda.reset_peak_memory_stats(dev)

        _MARKERS.append(mark)
        try:
            result, stats = _measure_cuda(fn, dev)
        finally:
            _MARKERS.remove(mark)
        torch.cuda.synchronize(dev)
        peaks.append(torch.cuda.max_memory_allocated(dev) - before)
        stats = MemoryStats(max(peaks), stats.retained_bytes, stats.device)
        return result, stats, peaks

    def cpu_mark() -> None:
        with torch.profiler.record_function(_PHASE_MARK):
            pass

    _MARKERS.append(cpu_mark)
    try:
        result, stats, deltas = _measure_cpu_events(fn)
    finally:
        _MARKERS.remove(cpu_mark)
    peaks = [0]
    current = 0
    for delta in deltas:
        if delta is None:
            peaks.append(current)
            continue
        current += delta
        peaks[-1] = max(peaks[-1], current)
    return result, stats, peaks


def mark_phase() -> None:
    """Start the next phase of the :func:`measure_memory_phases` in progress (if any)."""
    if _MARKERS:
        _MARKERS[-1]()


def _measure_cuda(fn: Callable[[], Any], dev: torch.device) -> tuple[Any, MemoryStats]:
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    result = fn()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - before
    retained = torch.cuda.memory_allocated(dev) - before
    return result, MemoryStats(peak_bytes=peak, retained_bytes=retained, device=str(dev))


def _measure_cpu(fn: Callable[[], Any]) -> tuple[Any, MemoryStats]:
    result, stats, _ = _measure_cpu_events(fn)
    return result, stats


def _measure_cpu_events(fn: Callable[[], Any]) -> tuple[Any, MemoryStats, list[int | None]]:
    """The call's result, its stats and its signed allocation sizes in time order, with
    ``None`` where a phase mark fell."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # the profiler's C++ start-up chatter, not the caller's output
        prof.__enter__()
    try:
        result = fn()
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    deltas = _cpu_allocation_deltas(prof)
    current = peak = 0
    for delta in deltas:
        if delta is None:
            continue
        current += delta
        peak = max(peak, current)
    return result, MemoryStats(peak_bytes=peak, retained_bytes=current, device="cpu"), deltas


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (C++ logging) for the enclosed block, if it can be."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # pragma: no cover - no file descriptor 2 to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_allocation_deltas(prof: Any) -> list[int | None]:
    """Signed sizes of every CPU allocation (+) and free (-), in time order; ``None`` at
    each phase mark (:func:`mark_phase`)."""
    try:
        from torch._C._profiler import _EventType

        events: list[tuple[int, int | None]] = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation:
                fields = node.extra_fields
                if fields.device.type == "cpu":
                    events.append((node.start_time_ns, int(fields.alloc_size)))
            elif node.name == _PHASE_MARK:
                events.append((node.start_time_ns, None))
            stack.extend(node.children)
        events.sort(key=lambda e: e[0])
        return [size for _, size in events]
    except (ImportError, AttributeError) as exc:  # pragma: no cover - profiler internals moved
        raise RuntimeError(
            "measure_memory could not read allocation events from this torch release's profiler "
            f"({exc}); measure on CUDA, or use a torch release this package supports."
        ) from exc
