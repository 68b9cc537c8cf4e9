"""Module state the recompute must not move: norm statistics and buffers written in forward.

Normalisation layers (:func:`frozen_norm_statistics`) normalise with batch statistics but
update nothing during a recompute. Every other buffer a block changes in its forward pass
(``spectral_norm``'s power-iteration vectors, any ``torch.nn.utils.parametrize`` state, a flag
such as ActNorm's "initialised") is saved before the forward pass, put back for the recompute
and restored to its current value afterwards (:class:`BufferState`), so the recompute sees
exactly what the forward saw.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["BufferState", "frozen_norm_statistics"]


_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._NormBase)


@contextmanager
def frozen_norm_statistics(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Normalise with batch statistics but leave running statistics untouched.

    A normalisation layer (BatchNorm, SyncBatchNorm, InstanceNorm with
    ``track_running_stats=True``) in training mode normalises with the batch's statistics
    and then updates its running buffers. During a recompute the first half is wanted (the
    same function as the forward pass) and the second is not (the forward pass already
    counted this batch). For the duration, each such layer is told not to track statistics
    (BatchNorm and SyncBatchNorm then pass no running buffers to the kernel and count
    nothing) and its running buffers are detached (InstanceNorm passes them regardless), so
    it computes exactly the forward pass's function and writes nothing. Flag and buffers
    are put back on exit, even on error.
    """
    detached: list[tuple[nn.modules.batchnorm._NormBase, dict[str, Tensor | None]]] = []
    for root in modules:
        for m in root.modules():
            if _is_norm(m) and m.training and m.track_running_stats:  # type: ignore[union-attr]
                norm: Any = m
                saved = {name: norm._buffers.get(name) for name in _RUNNING_STATS}
                detached.append((norm, saved))
                norm.track_running_stats = False
                for name in _RUNNING_STATS:
                    norm._buffers[name] = None
    try:
        yield
    finally:
        for m, saved in detached:
            m._buffers.update(saved)
            m.track_running_stats = True


# NOTE [buffers changed in the forward pass]
# A buffer that a block writes in its forward pass (spectral_norm's u and v, a parametrize
# state, ActNorm's "initialised" flag) would be written again by the recompute, which then
# computes a different function (spectral_norm: one more power iteration, a gradient error
# of about 1e-3) and moves the model's state twice. Norm layers are handled by
# frozen_norm_statistics; for every other buffer we keep its value from before the forward
# pass and show it to the recompute. Copying every buffer of every block at every step
# would be wasteful (most blocks have none; some hold large constant tables), so the first
# forward pass of a module copies all its buffers and learns which ones it writes (their
# version counter moves); later passes copy only those. A buffer that starts being written
# later is caught by its version counter, learned, and reported once.
_WRITTEN_BUFFERS: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


def _own_buffers(m: nn.Module) -> Iterator[tuple[str, Tensor]]:
    for name, b in m._buffers.items():
        if b is not None:
            yield name, b


class BufferState:
    """The buffers one block writes in its forward pass, as they were before it."""

    __slots__ = ("_saved",)

    def __init__(self) -> None:
        self._saved: list[tuple[nn.Module, str, Tensor]] = []

    @staticmethod
    def watch(block: nn.Module) -> _BufferWatch:
        """Start watching ``block``'s buffers for one forward pass (see the NOTE above)."""
        return _BufferWatch(block)

    def __bool__(self) -> bool:
        return bool(self._saved)

    @contextmanager
    def as_before(self) -> Iterator[None]:
        """Show the recompute the buffers' values from before the forward pass."""
        if not self._saved:
            yield
            return
        current = [(m, name, m._buffers[name]) for m, name, _ in self._saved]
        with torch.no_grad():
            for m, name, before in self._saved:
                m._buffers[name] = before.clone()
        try:
            yield
        finally:
            for m, name, now in current:
                m._buffers[name] = now


class _BufferWatch:
    __slots__ = ("_copies", "_modules", "state")

    def __init__(self, block: nn.Module) -> None:
        self.state = BufferState()
        self._copies: list[tuple[nn.Module, str, Tensor, int, Tensor | None]] = []
        self._modules = [m for m in block.modules() if not _is_norm(m) and m._buffers]
        for m in self._modules:
            known = _WRITTEN_BUFFERS.get(m)
            for name, b in _own_buffers(m):
                copy = b.detach().clone() if known is None or name in known else None
                self._copies.append((m, name, b, b._version, copy))

    def finish(self) -> BufferState:
        """End the watch: keep the values of the buffers the forward pass wrote."""
        for m, name, b, version, copy in self._copies:
            written = m._buffers.get(name) is not b or b._version != version
            known = _WRITTEN_BUFFERS.setdefault(m, set())
            if written:
                if copy is None:
                    import warnings

                    warnings.warn(
                        f"a buffer {name!r} of {type(m).__name__} was written in the forward "
                        "pass for the first time after earlier passes left it alone; this once "
                        "the recompute sees its new value (gradients may be off for this "
                        "step). It is watched from now on.",
                        RuntimeWarning,
                        stacklevel=4,
                    )
                else:
                    self.state._saved.append((m, name, copy))
                known.add(name)
        self._copies.clear()
        return self.state
