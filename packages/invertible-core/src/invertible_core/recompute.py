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

Module state is kept out of the recompute in two ways. Normalisation layers
(:func:`frozen_norm_statistics`) normalise with batch statistics but update nothing.
Every other buffer a block changes in its forward pass (``spectral_norm``'s power-iteration
vectors, any ``torch.nn.utils.parametrize`` state, a flag such as ActNorm's "initialised")
is saved before the forward pass, put back for the recompute and restored to its current
value afterwards (:class:`BufferState`), so the recompute sees exactly what the forward saw.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from invertible_core.contract import recomputing

__all__ = [
    "AutocastState",
    "BufferState",
    "RecomputeContext",
    "SideInputs",
    "forked_rng",
    "frozen_norm_statistics",
    "tensor_devices",
]


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


class SideInputs:
    """A call's side inputs (positional and keyword), and their differentiable tensors.

    Side inputs condition every block and are not inverted. Tensors among them that require
    grad receive their gradient, summed over every block; all other values (bool masks,
    integers, ``None``, tensors that need no gradient) pass through untouched.
    """

    __slots__ = ("_leaves", "args", "kwargs", "positions", "tensors")

    def __init__(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> None:
        self.args = args
        self.kwargs = {} if kwargs is None else kwargs
        self.positions: list[int | str] = []
        self.tensors: list[Tensor] = []
        for i, a in enumerate(args):
            if isinstance(a, Tensor) and a.requires_grad:
                self.positions.append(i)
                self.tensors.append(a)
        for k, v in self.kwargs.items():
            if isinstance(v, Tensor) and v.requires_grad:
                self.positions.append(k)
                self.tensors.append(v)
        self._leaves: list[Tensor] | None = None

    def __bool__(self) -> bool:
        return bool(self.args) or bool(self.kwargs)

    def all_tensors(self) -> list[Tensor]:
        values = [*self.args, *self.kwargs.values()]
        return [v for v in values if isinstance(v, Tensor)]

    def versions(self) -> list[tuple[Tensor, int]]:
        return [(t, t._version) for t in self.all_tensors()]

    def differentiable(self) -> SideInputs:
        """A copy whose grad-requiring tensors are fresh leaves (for the recompute)."""
        if not self.tensors:
            return self
        leaves = [t.detach().requires_grad_(True) for t in self.tensors]
        args = list(self.args)
        kwargs = dict(self.kwargs)
        for pos, leaf in zip(self.positions, leaves):
            if isinstance(pos, int):
                args[pos] = leaf
            else:
                kwargs[pos] = leaf
        out = SideInputs.__new__(SideInputs)
        out.args, out.kwargs = tuple(args), kwargs
        out.positions, out.tensors, out._leaves = self.positions, leaves, leaves
        return out


_EMPTY = SideInputs()


# NOTE [the caller's tensors are never modified]
# A sub-module that changes its input in place (``nn.Sequential(nn.ReLU(inplace=True),
# conv)`` as Fm) would overwrite the caller's tensor, since a coupling hands Fm a view of
# the chain's input, and it breaks the coupling's algebra anyway (y2 = x2 + Gm(y1) needs
# the unchanged x2). The first time a module is called on the chain's input, it gets a
# copy; if it changes the copy, we refuse with an error before anything of the caller's is
# touched. A module that left its inputs alone is trusted afterwards (no copies), and every
# call compares version counters, so a module that starts writing its inputs later, or
# writes a side input (passed as the caller's own object, never copied), is refused too.
_TRUSTED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def _trust_key(fn: Callable[..., Any]) -> tuple[Any, str]:
    owner = getattr(fn, "__self__", None)
    if owner is not None:
        return owner, getattr(fn, "__name__", "__call__")
    return fn, "__call__"


def _describe(fn: Callable[..., Any]) -> str:
    owner = getattr(fn, "__self__", None)
    if owner is not None:
        return f"{type(owner).__name__}.{getattr(fn, '__name__', '?')}"
    return type(fn).__name__ if isinstance(fn, nn.Module) else getattr(fn, "__name__", repr(fn))


def _in_place_error(fn: Callable[..., Any], shielded: bool) -> RuntimeError:
    consequence = (
        "Nothing of yours was modified: it worked on a copy."
        if shielded
        else "The modified tensor was one the chain passed on (a part of an activation or "
        "a side input), so this call's results cannot be trusted."
    )
    return RuntimeError(
        f"{_describe(fn)} modified one of its inputs in place. Invertible blocks need the "
        "inputs of their functions unchanged (a coupling reuses them to compute and to "
        "invert), and the caller's tensors must never be overwritten; make the function out "
        "of place (e.g. nn.ReLU(inplace=False) as its first layer, or clone the input before "
        f"an in-place op). {consequence}"
    )


def _guarded_call(
    fn: Callable[..., Any], inputs: tuple[Any, ...], side: SideInputs, protected: frozenset[int]
) -> Any:
    args = (*inputs, *side.args)
    kwargs = side.kwargs
    owner, name = _trust_key(fn)
    try:
        trusted = name in _TRUSTED.get(owner, ())
    except TypeError:  # not weak-referenceable: check versions only
        trusted = True
    copies: list[tuple[Tensor, int]] = []
    if not trusted and protected:

        def shielded(v: Any) -> Any:
            if isinstance(v, Tensor) and v.untyped_storage().data_ptr() in protected:
                c = v.clone()
                copies.append((c, c._version))
                return c
            return v

        args = tuple(shielded(a) for a in args)
        kwargs = {k: shielded(v) for k, v in kwargs.items()}
    versions = [
        (t, t._version)
        for t in (*args, *kwargs.values())
        if isinstance(t, Tensor) and not any(t is c for c, _ in copies)
    ]
    out = fn(*args, **kwargs)
    for t, version in copies:
        if t._version != version:
            raise _in_place_error(fn, shielded=True)
    for t, version in versions:
        if t._version != version:
            raise _in_place_error(fn, shielded=False)
    if not trusted:
        with suppress(TypeError):  # not weak-referenceable
            _TRUSTED.setdefault(owner, set()).add(name)
    return out


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
