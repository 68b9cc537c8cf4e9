"""The state a recomputation must replay: random numbers, autocast, normalisation statistics.

Rebuilding activations in the backward pass means running ``Fm`` and ``Gm`` a second time.
That second run must compute *the same function* as the first, or the gradients are wrong
(dropout masks differ) or the model's state drifts (BatchNorm counts every batch twice).
This module holds the three pieces of state involved:

- :class:`BlockRecord` captures the CPU (and CUDA) random state before each recomputed call,
  so that dropout draws the same masks again; the caller's own random stream is restored
  after the backward pass (:func:`forked_rng`).
- :class:`AutocastState` captures the autocast settings of the forward pass, so that the
  recompute runs in the same precision (fp16/bf16) instead of silently in float32.
- :func:`frozen_norm_statistics` lets BatchNorm layers normalise with batch statistics
  during the recompute without updating ``running_mean``, ``running_var`` or
  ``num_batches_tracked`` a second time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "AutocastState",
    "BlockRecord",
    "forked_rng",
    "frozen_norm_statistics",
    "tensor_devices",
]


def tensor_devices(tensors: Iterable[torch.Tensor]) -> tuple[torch.device, ...]:
    """The distinct non-CPU devices of ``tensors`` (the CPU generator is always handled)."""
    seen: dict[torch.device, None] = {}
    for t in tensors:
        if t.device.type != "cpu":
            seen[t.device] = None
    return tuple(seen)


def _get_device_rng(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    raise NotImplementedError(
        f"preserve_rng_state does not know how to capture the random state of device "
        f"{str(device)!r}; pass preserve_rng_state=False"
    )


def _set_device_rng(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)


class BlockRecord:
    """What one block's recompute must replay: random states and autocast settings.

    The forward pass calls :meth:`capture` before each module call of the block (``slot``
    0 for ``Fm``, 1 for ``Gm`` in a coupling); the backward pass runs each recomputed call
    inside :meth:`replay` with the same slot. Capturing a random state costs one copy of
    the generator state (about 5 KB on the CPU) per call, and only when ``preserve_rng``.
    """

    __slots__ = ("_autocast", "_devices", "_last", "_preserve_rng", "_states")

    def __init__(
        self,
        devices: tuple[torch.device, ...],
        preserve_rng: bool,
        autocast: AutocastState | None,
        previous: BlockRecord | None = None,
    ) -> None:
        self._devices = devices
        self._preserve_rng = preserve_rng
        self._autocast = autocast
        self._states: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}
        # The last state captured in this forward pass (shared along a chain): a module
        # that draws no random numbers leaves the state unchanged, and an unchanged state
        # is stored once, not once per call.
        self._last: list[tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None] = (
            previous._last if previous is not None else [None]
        )

    def capture(self, slot: int) -> None:
        if not self._preserve_rng:
            return
        state = (torch.get_rng_state(), tuple(_get_device_rng(d) for d in self._devices))
        last = self._last[0]
        if last is not None and all(
            torch.equal(a, b) for a, b in zip((state[0], *state[1]), (last[0], *last[1]))
        ):
            state = last
        self._last[0] = state
        self._states[slot] = state

    @contextmanager
    def replay(self, slot: int) -> Iterator[None]:
        """Restore the random state captured for ``slot`` and re-enter the autocast state."""
        state = self._states.get(slot)
        if state is not None:
            cpu_state, device_states = state
            torch.set_rng_state(cpu_state)
            for device, device_state in zip(self._devices, device_states):
                _set_device_rng(device, device_state)
        if self._autocast is None:
            yield
        else:
            with self._autocast.replay():
                yield


@contextmanager
def forked_rng(devices: tuple[torch.device, ...], enabled: bool = True) -> Iterator[None]:
    """Leave the caller's random streams (CPU and ``devices``) as they were on exit."""
    if not enabled:
        yield
        return
    cpu_state = torch.get_rng_state()
    device_states = [_get_device_rng(d) for d in devices]
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        for device, state in zip(devices, device_states):
            _set_device_rng(device, state)


@dataclass(frozen=True)
class AutocastState:
    """Autocast settings (per device type) in force when the forward pass ran."""

    settings: tuple[tuple[str, bool, torch.dtype, bool], ...]

    @classmethod
    def capture(cls, devices: tuple[torch.device, ...]) -> AutocastState:
        device_types = ["cpu", *(d.type for d in devices if d.type != "cpu")]
        settings = []
        for device_type in dict.fromkeys(device_types):
            try:
                enabled = torch.is_autocast_enabled(device_type)
            except RuntimeError:  # a device type autocast does not know (e.g. "meta")
                continue
            settings.append(
                (
                    device_type,
                    enabled,
                    torch.get_autocast_dtype(device_type),
                    torch.is_autocast_cache_enabled(),
                )
            )
        return cls(tuple(settings))

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the enclosed recompute under the captured autocast settings."""
        with ExitStack() as stack:
            for device_type, enabled, dtype, cache_enabled in self.settings:
                stack.enter_context(
                    torch.autocast(
                        device_type=device_type,
                        dtype=dtype,
                        enabled=enabled,
                        cache_enabled=cache_enabled,
                    )
                )
            yield


_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


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
    detached: list[tuple[nn.modules.batchnorm._NormBase, dict[str, torch.Tensor | None]]] = []
    for root in modules:
        for m in root.modules():
            if (
                isinstance(m, nn.modules.batchnorm._NormBase)
                and m.training
                and m.track_running_stats
            ):
                saved = {name: m._buffers.get(name) for name in _RUNNING_STATS}
                detached.append((m, saved))
                m.track_running_stats = False
                for name in _RUNNING_STATS:
                    m._buffers[name] = None
    try:
        yield
    finally:
        for m, saved in detached:
            m._buffers.update(saved)
            m.track_running_stats = True
