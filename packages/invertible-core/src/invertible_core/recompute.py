"""The state a recomputation must replay, and the one object that carries it.

Rebuilding activations in the backward pass means running a block's functions a second
time. That second run must compute *the same function* as the first, or the gradients are
wrong (dropout masks differ, spectral norm iterates once more) or the model's state drifts
(BatchNorm counts every batch twice). Blocks never handle that state themselves: every call
of a sub-module goes through a :class:`RecomputeContext`, which

- captures the CPU (and CUDA) random state before each call in the forward pass and
  restores it before the same call in the recompute, so dropout and drop-path draw the same
  masks; the caller's own random stream is left as it was (:func:`forked_rng`);
- replays the forward pass's autocast settings (:class:`AutocastState`), so fp16/bf16
  training recomputes in the same precision;
- passes the side inputs (masks, embeddings) to the call, as the originals in the forward
  pass and as differentiable leaves in the recompute, whose gradients it collects;
- computes the gradients of a recomputed call (:meth:`RecomputeContext.backward`) with
  respect to its inputs, the block's parameters and the side inputs.

Module state is kept out of the recompute by :mod:`invertible_core.module_state` (norm
statistics frozen, buffers written in the forward pass shown as before), and side inputs
are handled by :mod:`invertible_core.side_inputs`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from invertible_core.contract import recomputing
from invertible_core.module_state import BufferState
from invertible_core.side_inputs import _EMPTY, SideInputs, _guarded_call

__all__ = ["AutocastState", "RecomputeContext", "direct_context", "forked_rng", "tensor_devices"]


def tensor_devices(tensors: Iterable[Tensor]) -> tuple[torch.device, ...]:
    """The distinct non-CPU devices of ``tensors`` (the CPU generator is always handled)."""
    seen: dict[torch.device, None] = {}
    for t in tensors:
        if t.device.type != "cpu":
            seen[t.device] = None
    return tuple(seen)


def _get_device_rng(device: torch.device) -> Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    raise NotImplementedError(
        f"preserve_rng_state does not know how to capture the random state of device "
        f"{str(device)!r}; pass preserve_rng_state=False"
    )


def _set_device_rng(device: torch.device, state: Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)


RngState = tuple[Tensor, tuple[Tensor, ...]]


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

    @property
    def enabled(self) -> bool:
        return any(enabled for _, enabled, _, _ in self.settings)

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


class _Mode:
    DIRECT = 0  # plain call (autograd or no grad): nothing captured
    RECORD = 1  # the forward pass of a memory-saving call: capture what the recompute needs
    REPLAY = 2  # the recompute in the backward pass


class RecomputeContext:
    """What one block's recompute replays; the block's only door to its sub-modules.

    Blocks receive a context from the machinery and never build one. A block calls its
    sub-modules through :meth:`call` and, in a fused backward step, backpropagates through
    the recomputed calls with :meth:`backward`. In a plain call :meth:`call` just calls; in
    the forward pass of a memory-saving call it also captures the random state; in the
    recompute it replays random state and autocast and runs with grad. A block that reports a
    log-determinant adds it with :meth:`add_logdet` when :attr:`wants_logdet` is set and, in
    its backward step, reads the incoming gradient of the chain's log-determinant from
    :attr:`grad_logdet`.

    Capturing a random state costs one copy of the generator state (about 5 KB on the CPU)
    per call, and only with ``preserve_rng_state``; an unchanged state is stored once per
    chain, not once per call.
    """

    __slots__ = (
        "_autocast",
        "_devices",
        "_grads",
        "_last",
        "_logdet",
        "_mode",
        "_params",
        "_preserve_rng",
        "_protected",
        "_side",
        "_states",
        "buffers",
        "grad_logdet",
        "wants_logdet",
    )

    def __init__(
        self,
        *,
        mode: int = _Mode.DIRECT,
        side: SideInputs = _EMPTY,
        devices: tuple[torch.device, ...] = (),
        preserve_rng: bool = False,
        autocast: AutocastState | None = None,
        wants_logdet: bool = False,
        previous: RecomputeContext | None = None,
        protected: frozenset[int] = frozenset(),
    ) -> None:
        self._mode = mode
        self._protected = protected
        self._side = side
        self._devices = devices
        self._preserve_rng = preserve_rng
        self._autocast = autocast
        self._states: dict[int, RngState] = {}
        # the last random state captured along this chain (see capture below)
        self._last: list[RngState | None] = previous._last if previous is not None else [None]
        self._params: Sequence[Tensor] = ()
        self._grads: list[Tensor | None] = []
        self._logdet: Tensor | None = None
        self.wants_logdet = wants_logdet
        self.grad_logdet: Tensor | None = None
        self.buffers = BufferState()

    # -- what blocks use ---------------------------------------------------------------------
    def call(self, slot: int, module: Callable[..., Any], *inputs: Any, side: bool = True) -> Any:
        """``module(*inputs, *side_args, **side_kwargs)``, replayed exactly in the recompute.

        ``slot`` names the call within the block (0 for ``Fm``, 1 for ``Gm`` in a coupling):
        the recompute of slot k replays the random state captured for slot k. ``side=False``
        leaves the side inputs out of this call.
        """
        s = self._side if side else _EMPTY
        if self._mode == _Mode.REPLAY:
            state = self._states.get(slot)
            if state is not None:
                torch.set_rng_state(state[0])
                for device, device_state in zip(self._devices, state[1]):
                    _set_device_rng(device, device_state)
            if self._autocast is None:
                return module(*inputs, *s.args, **s.kwargs)
            with self._autocast.replay():
                return module(*inputs, *s.args, **s.kwargs)
        if self._mode == _Mode.RECORD and self._preserve_rng:
            self._capture(slot)
        return _guarded_call(module, inputs, s, self._protected)

    def backward(
        self, outputs: Sequence[Tensor], grad_outputs: Sequence[Tensor], inputs: Sequence[Tensor]
    ) -> tuple[Tensor | None, ...]:
        """Backpropagate a recomputed call: gradients of ``inputs``; those of the block's
        parameters and of the side inputs are collected by the context."""
        n = len(inputs)
        side = self._side.tensors
        wrt = (*inputs, *self._params, *side)
        if not any(o.requires_grad for o in outputs):
            return (None,) * n
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
        grads = torch.autograd.grad(
            [o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True
        )
        acc = self._grads
        for i, g in enumerate(grads[n:]):
            if g is not None:
                before = acc[i]
                acc[i] = g if before is None else before + g
        return tuple(grads[:n])

    def rebuild(self, fn: Callable[..., Any], *inputs: Any) -> Any:
        """``fn(*inputs, *side_args, **side_kwargs)`` without grad, under the forward pass's
        autocast settings: for rebuilding an input with an inverse."""
        s = self._side
        with torch.no_grad():
            if self._autocast is None:
                return fn(*inputs, *s.args, **s.kwargs)
            with self._autocast.replay():
                return fn(*inputs, *s.args, **s.kwargs)

    def add_logdet(self, logdet: Tensor) -> None:
        """Add a per-sample log-determinant (shape ``(batch,)``) of this block's map."""
        self._logdet = logdet if self._logdet is None else self._logdet + logdet

    @property
    def recording(self) -> bool:
        """Whether this is the forward pass of a memory-saving call (it will be recomputed)."""
        return self._mode == _Mode.RECORD

    # -- what the machinery uses -------------------------------------------------------------
    def _capture(self, slot: int) -> None:
        state = (torch.get_rng_state(), tuple(_get_device_rng(d) for d in self._devices))
        last = self._last[0]
        if last is not None and all(
            torch.equal(a, b) for a, b in zip((state[0], *state[1]), (last[0], *last[1]))
        ):
            state = last  # a module that draws no random numbers leaves the state unchanged
        self._last[0] = state
        self._states[slot] = state

    def _take_logdet(self) -> Tensor | None:
        logdet, self._logdet = self._logdet, None
        return logdet

    @contextmanager
    def _replaying(
        self,
        side: SideInputs,
        params: Sequence[Tensor],
        grads: list[Tensor | None],
        grad_logdet: Tensor | None,
    ) -> Iterator[None]:
        """Replay mode for a whole backward step: recompute, then backpropagate (gradients
        go into ``grads``)."""
        with self._recomputing(side), self._backpropagating(side, params, grads, grad_logdet):
            yield

    @contextmanager
    def _recomputing(self, side: SideInputs) -> Iterator[None]:
        """The recompute of a backward step: calls replay, with grad, buffers as before."""
        mode, saved_side = self._mode, self._side
        self._mode, self._side = _Mode.REPLAY, side
        try:
            with torch.enable_grad(), recomputing(), self.buffers.as_before():
                yield
        finally:
            self._mode, self._side = mode, saved_side

    @contextmanager
    def _backpropagating(
        self,
        side: SideInputs,
        params: Sequence[Tensor],
        grads: list[Tensor | None],
        grad_logdet: Tensor | None,
    ) -> Iterator[None]:
        """The gradient half of a backward step (:meth:`backward` collects into ``grads``)."""
        mode, saved_side = self._mode, self._side
        self._mode, self._side = _Mode.REPLAY, side
        self._params, self._grads, self.grad_logdet = params, grads, grad_logdet
        try:
            yield
        finally:
            self._mode, self._side = mode, saved_side
            self._params, self._grads, self.grad_logdet = (), [], None


def direct_context(side: SideInputs = _EMPTY, wants_logdet: bool = False) -> RecomputeContext:
    """A context for a plain call: sub-modules are called directly, nothing is captured."""
    return RecomputeContext(side=side, wants_logdet=wants_logdet)
