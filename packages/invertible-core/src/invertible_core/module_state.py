"""Module state the recompute must not move: buffers a block writes in its forward pass.

Every buffer a block changes in its forward pass (BatchNorm's running statistics,
``spectral_norm``'s power-iteration vectors, any ``torch.nn.utils.parametrize`` state, a flag
such as ActNorm's "initialised") is saved before the forward pass, put back for the recompute
and restored to its current value afterwards (:class:`BufferState`), so the recompute sees
exactly what the forward saw and the model's state moves once per step.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["BufferState"]


# NOTE [buffers changed in the forward pass]
# A buffer that a block writes in its forward pass (spectral_norm's u and v, a parametrize
# state, ActNorm's "initialised" flag) would be written again by the recompute, which then
# computes a different function (spectral_norm: one more power iteration, a gradient error
# of about 1e-3) and moves the model's state twice (BatchNorm would count every batch twice).
# For every buffer the forward pass writes we keep its value from before the forward pass,
# show it to the recompute, and put the forward pass's value back afterwards; a norm layer
# thus normalises with the batch's statistics in both passes (the same function, with the
# same saved tensors) and its running statistics move once per step. Copying every buffer of every block at every step
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


def _updates_statistics(m: nn.Module) -> bool:
    """A norm layer that will update its running statistics in this forward pass: its kernel
    writes them without moving their version counters, so they are always watched."""
    return (
        isinstance(m, nn.modules.batchnorm._NormBase) and m.training and bool(m.track_running_stats)
    )


_RUNNING_STATISTICS = frozenset({"running_mean", "running_var", "num_batches_tracked"})


class _BufferWatch:
    __slots__ = ("_copies", "_modules", "state")

    def __init__(self, block: nn.Module) -> None:
        self.state = BufferState()
        self._copies: list[tuple[nn.Module, str, Tensor, int, Tensor | None, bool]] = []
        self._modules = [m for m in block.modules() if m._buffers]
        for m in self._modules:
            known = _WRITTEN_BUFFERS.get(m)
            statistics = _updates_statistics(m)
            for name, b in _own_buffers(m):
                always = statistics and name in _RUNNING_STATISTICS
                watched = always or known is None or name in known
                copy = b.detach().clone() if watched else None
                self._copies.append((m, name, b, b._version, copy, always))

    def finish(self) -> BufferState:
        """End the watch: keep the values of the buffers the forward pass wrote."""
        for m, name, b, version, copy, always in self._copies:
            written = always or m._buffers.get(name) is not b or b._version != version
            known = _WRITTEN_BUFFERS.setdefault(m, set())
            if written:
                if copy is None:
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
