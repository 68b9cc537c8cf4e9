"""What a recompute must replay, and how a block's code cooperates with it.

Rebuilding activations in the backward pass means running a block's functions a second
time. That second run must compute *the same function* as the first, or the gradients are
wrong (dropout masks differ, spectral norm iterates once more) or the model's state drifts
(BatchNorm counts every batch twice). The engine (:mod:`invertible_core.engine`) replays:

- the random state of every call (:class:`RngState`), so dropout and drop-path draw the
  same masks; the caller's own random stream is left as it was (:func:`forked_rng`);
- the forward pass's autocast settings (:class:`AutocastState`), so fp16/bf16 training
  recomputes in the same precision;
- module buffers as they were before the forward pass (:mod:`invertible_core.module_state`),
  so norm statistics are counted once.

A block's own code sees the machinery through three functions:

- :func:`shared_call` calls a sub-function (a coupling's ``Fm``/``Gm``). A block's inverse
  calls the same functions as its forward, on the same values; the recompute computes each
  of them once, with grad, and uses the one result both to rebuild the block's input and as
  the saved activations of the forward pass (the RevNet paper's one-recompute backward).
- :func:`wants_logdet` and :func:`report_logdet` let a block report its log-determinant to
  ``forward_with_logdet`` (see :func:`with_logdet`), which runs the block through
  ``__call__`` so that hooks, FSDP and ``torch.compile`` see the call as they see a forward.
- :func:`is_recomputing` tells a block (or a hook) that the code now running is the
  recompute, so that a one-off side effect (ActNorm's initialisation, a counter) happens
  once, in the forward pass.

Nothing here modifies a caller's tensor: :func:`guarded_call` refuses a function that
writes its inputs in place, before anything of the caller's is touched.
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor, nn

_F = TypeVar("_F", bound=Callable[..., Any])

__all__ = [
    "AutocastState",
    "RngState",
    "call_with_logdet",
    "forked_rng",
    "fsdp_forward_method",
    "guarded_call",
    "is_recomputing",
    "register_with_fsdp",
    "report_logdet",
    "shared_call",
    "tensor_devices",
    "wants_logdet",
    "with_logdet",
]


class CallSite(Protocol):
    """What :func:`shared_call` hands a call to: the engine's record of one block call."""

    def call(
        self, slot: int, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any: ...


class _Local(threading.local):
    """Per-thread state (autograd may run backward passes on other threads)."""

    def __init__(self) -> None:
        self.site: CallSite | None = None  # the block call now running under the engine
        self.recomputing = 0
        self.logdet: list[tuple[nn.Module, list[Tensor]]] = []
        self.protected: frozenset[int] = frozenset()


_local = _Local()


# -- torch.compile -------------------------------------------------------------------------------
# NOTE [torch.compile and the recompute]
# Under torch.compile(model), dynamo compiles the code of the blocks (their forward, Fm, Gm)
# and not the engine's bookkeeping: a memory-saving call's public entry runs eagerly with
# dynamo still watching (``entry_frame``), notes dynamo's frame callback
# (:func:`compile_context`), and runs the engine with dynamo off (``engine_only``); the engine
# puts the callback back around every call into a block's code (:func:`compiled_as`). The
# recompute does the same, so it runs the *same* compiled code as the forward pass and saves
# what the compiled forward saved (a recompute is a forward with grad, guarded alike).
_ENTRY_REASON = (
    "memory saving rebuilds activations inside autograd's backward pass, which one graph "
    "cannot express: compile without fullgraph=True (the memory-saving call is then a graph "
    "break and the blocks' code still compiles), or set memory_saving=False (the sequence is "
    "then plain autograd, traced into the graph)"
)


def _lazily_disabled(fn: _F, recursive: bool, reason: str | None = None) -> _F:
    """``torch.compiler.disable(fn, recursive)``, made on first use while dynamo is loaded.

    ``torch.compiler.disable`` imports dynamo (seconds of CPU), which ``import
    invertible_core`` should not cost: nothing can be compiling before dynamo is loaded, so
    until then ``fn`` runs as it is. The wrapper carries the attribute by which dynamo,
    tracing a caller, declines to inline a disabled function (a graph break, as for
    ``torch.compiler.disable``)."""
    disabled: Callable[..., Any] | None = None

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal disabled
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if disabled is None:
            if reason is not None:
                try:
                    disabled = torch.compiler.disable(fn, recursive=recursive, reason=reason)  # type: ignore[call-arg]
                except TypeError:  # torch before the reason argument
                    disabled = torch.compiler.disable(fn, recursive=recursive)
            else:
                disabled = torch.compiler.disable(fn, recursive=recursive)
        return disabled(*args, **kwargs)

    call._torchdynamo_disable = True  # type: ignore[attr-defined]
    call._torchdynamo_disable_msg = reason  # type: ignore[attr-defined]
    return call  # type: ignore[return-value]


def entry_frame(fn: _F) -> _F:
    """Run ``fn``'s own frame eagerly under torch.compile, with dynamo still watching: the
    public entry of a memory-saving call, which takes note of dynamo's callback
    (:func:`compile_context`) before the engine runs."""
    return _lazily_disabled(fn, recursive=False, reason=_ENTRY_REASON)


def engine_only(fn: _F) -> _F:
    """Keep dynamo out of ``fn`` and everything it calls (engine bookkeeping); the engine
    re-enters dynamo itself around the code of the blocks (:func:`compiled_as`)."""
    return _lazily_disabled(fn, recursive=True)


def run_compiled(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """``fn(*args, **kwargs)``: a frame of this package, which dynamo traces when a callback
    is set, inlining ``fn`` (an ``nn.Sequential`` as Fm, whose own frames, being torch's
    code, dynamo would skip)."""
    return fn(*args, **kwargs)


def _eval_frame_module() -> Any:
    """torch's C module of dynamo's frame hook (``torch._C._dynamo.eval_frame``), reached by
    attribute: before torch 2.5 it is not importable by name."""
    return torch._C._dynamo.eval_frame  # type: ignore[attr-defined]


def compile_context() -> Any:
    """Dynamo's frame callback now (``None`` outside torch.compile)."""
    if "torch._dynamo" not in sys.modules:
        return None
    eval_frame = _eval_frame_module()
    getter = getattr(eval_frame, "get_eval_frame_callback", None)
    if getter is not None:
        callback = getter()
    else:  # torch before 2.5 has no getter: setting a callback returns the one it replaces
        callback = eval_frame.set_eval_frame(None)
        eval_frame.set_eval_frame(callback)
    return callback if callback not in (None, False) else None


@contextmanager
def compiled_as(callback: Any) -> Iterator[None]:
    """Run the enclosed code under dynamo's frame ``callback`` (``None``: as it is)."""
    if callback is None:
        yield
        return
    eval_frame = _eval_frame_module()
    before = eval_frame.set_eval_frame(callback)
    try:
        yield
    finally:
        eval_frame.set_eval_frame(before)


def current_site() -> CallSite | None:
    """The engine's record of the block call now running (``None``: a plain call)."""
    return _local.site


#: memory-saving calls in progress, in any thread: a module global, so that dynamo, tracing
#: a block's code, guards on it and knows whether shared calls are the engine's (a graph
#: break) or plain code (traced inline)
_ENGINE_CALLS = 0


def _traced_plainly() -> bool:
    """Whether dynamo is tracing plain code (no memory-saving call in progress)."""
    return torch.compiler.is_compiling() and _ENGINE_CALLS == 0


@contextmanager
def active_site(site: CallSite | None) -> Iterator[None]:
    """Make ``site`` receive the :func:`shared_call` calls of the enclosed code; nests."""
    global _ENGINE_CALLS
    before, _local.site = _local.site, site
    _ENGINE_CALLS += 1
    try:
        yield
    finally:
        _ENGINE_CALLS -= 1
        _local.site = before


def is_recomputing() -> bool:
    """Whether the code now running is a memory-saving recompute in the backward pass.

    True while :class:`~invertible_core.ReversibleSequence` or
    :class:`~invertible_core.InvertibleModuleWrapper` runs a block again in backward (its
    inverse, to rebuild its input, and its forward, to rebuild what autograd saved). A
    block or a forward hook with a one-off side effect guards it with
    ``if not is_recomputing():``. Thread-local: autograd may run backward passes on other
    threads, each answers for itself.
    """
    if torch.compiler.is_compiling():  # dynamo tracing a block's code
        return False if _ENGINE_CALLS == 0 else _recomputing_untraced()
    return _local.recomputing > 0


@engine_only
def _recomputing_untraced() -> bool:
    return _local.recomputing > 0


@contextmanager
def recomputing() -> Iterator[None]:
    """Mark the enclosed code as a recompute (for :func:`is_recomputing`); nests."""
    _local.recomputing += 1
    try:
        yield
    finally:
        _local.recomputing -= 1


def shared_call(slot: int, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, as a function that a block's forward and inverse share.

    A coupling calls ``Fm(x2)`` and ``Gm(y1)`` in its forward and the same functions on the
    same values in its inverse. Called through ``shared_call``, such a function is computed
    once in a memory-saving recompute: the inverse computes it with grad, uses its value to
    rebuild the input, and hands the saved activations to the forward pass's graph. ``slot``
    names the call within the block (the forward and the inverse give the same function the
    same slot). Outside the engine (a plain call) this is ``fn(*args, **kwargs)``, with the
    check that ``fn`` did not modify its inputs in place.
    """
    if torch.compiler.is_compiling():  # dynamo tracing a block's code
        if _ENGINE_CALLS == 0:  # plain code (fullgraph=True): the call itself
            return fn(*args, **kwargs)
        return _shared_call_untraced(slot, fn, args, kwargs)  # the engine's: a graph break
    return _shared_call(slot, fn, args, kwargs)


def _shared_call(
    slot: int, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    site = _local.site
    if site is None:
        return guarded_call(fn, args, kwargs)
    return site.call(slot, fn, args, kwargs)


_shared_call_untraced = engine_only(_shared_call)


# -- log-determinants ---------------------------------------------------------------------------
def wants_logdet(module: nn.Module) -> bool:
    """Whether a caller of ``module`` collects its log-determinant (see :func:`with_logdet`)."""
    if torch.compiler.is_compiling():
        return False if _ENGINE_CALLS == 0 else _wants_logdet_untraced(module)
    return _wants_logdet(module)


def _wants_logdet(module: nn.Module) -> bool:
    stack = _local.logdet
    return bool(stack) and stack[-1][0] is module


_wants_logdet_untraced = engine_only(_wants_logdet)


def report_logdet(module: nn.Module, logdet: Tensor) -> None:
    """Add ``logdet`` (per sample, shape ``(batch,)``) to what ``module``'s caller collects.

    A no-op unless :func:`wants_logdet`; only the module whose ``forward_with_logdet`` runs
    reports, never a sub-module of it.
    """
    if torch.compiler.is_compiling():
        _report_logdet_untraced(module, logdet)
        return
    _report_logdet(module, logdet)


def _report_logdet(module: nn.Module, logdet: Tensor) -> None:
    stack = _local.logdet
    if stack and stack[-1][0] is module:
        stack[-1][1].append(logdet)


_report_logdet_untraced = engine_only(_report_logdet)


def with_logdet(
    module: nn.Module, fn: Callable[..., Any], x: Any, *args: Any, **kwargs: Any
) -> tuple[Any, Tensor]:
    """``(fn(x, ...), log|det J|)``: runs ``fn`` while collecting what ``module`` reports.

    ``forward_with_logdet`` is ``with_logdet(self, self, x, ...)``: the block runs through
    ``nn.Module.__call__``, so forward hooks (FSDP's unshard among them) fire as for a
    plain forward. The log-determinant is zeros of shape ``(batch,)`` if nothing reported.
    """
    if torch.compiler.is_compiling():
        return _with_logdet_untraced(module, fn, x, *args, **kwargs)
    return _with_logdet(module, fn, x, *args, **kwargs)


def _with_logdet(
    module: nn.Module, fn: Callable[..., Any], x: Any, *args: Any, **kwargs: Any
) -> tuple[Any, Tensor]:
    parts: list[Tensor] = []
    _local.logdet.append((module, parts))
    try:
        y = fn(x, *args, **kwargs)
    finally:
        _local.logdet.pop()
    if not parts:
        first = x[0] if isinstance(x, tuple) else x  # a coupling's two parts
        return y, first.new_zeros(first.shape[0]) if first.dim() else first.new_zeros(())
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return y, total


_with_logdet_untraced = engine_only(_with_logdet)


def call_with_logdet(
    block: nn.Module, x: Tensor, *args: Any, **kwargs: Any
) -> tuple[Tensor, Tensor]:
    """``block.forward_with_logdet(x, ...)``, also when ``block`` is a wrapper that hooks only
    ``forward`` (FSDP1's ``FullyShardedDataParallel``, whose other methods reach the wrapped
    module without unsharding it): then the wrapper's forward runs, and the log-determinant
    is what the wrapped block reports (see :func:`report_logdet`)."""
    if getattr(type(block), "forward_with_logdet", None) is not None:
        method: Callable[..., tuple[Tensor, Tensor]] = block.forward_with_logdet  # type: ignore[assignment]
        return method(x, *args, **kwargs)
    inner: Any = block
    while getattr(type(inner), "forward_with_logdet", None) is None and isinstance(
        getattr(inner, "module", None), nn.Module
    ):
        inner = inner.module
    if not getattr(inner, "reports_logdet", False):
        raise TypeError(
            f"{type(block).__name__} wraps {type(inner).__name__}, whose forward_with_logdet the "
            "wrapper does not hook (FSDP1 hooks only forward), and whose forward does not "
            "report its log-determinant. Shard it with FSDP2's fully_shard instead, or report "
            "the log-determinant from forward with invertible_core.report_logdet."
        )
    return with_logdet(inner, block, x, *args, **kwargs)


def fsdp_forward_method(module: nn.Module, name: str) -> Callable[..., Any]:
    """``getattr(module, name)``, registered with FSDP2 first when ``module`` is a
    ``fully_shard`` unit, so that calling it unshards the parameters as a forward does (an
    inverse run in the forward role, such as sampling from a flow)."""
    register_with_fsdp(module, name)
    return getattr(module, name)  # type: ignore[no-any-return]


def register_with_fsdp(module: nn.Module, name: str) -> bool:
    """Register method ``name`` of a ``fully_shard`` (FSDP2) unit with FSDP, once; returns
    whether it was registered now (False: done before, or not an FSDP2 unit)."""
    if name in module.__dict__ or not _is_fsdp2(module):
        return False
    from torch.distributed.fsdp import register_fsdp_forward_method

    register_fsdp_forward_method(module, name)
    return True


def _is_fsdp2(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


@contextmanager
def without_logdet() -> Iterator[None]:
    """Hide any collection in progress (the engine's own calls inside a block)."""
    saved, _local.logdet = _local.logdet, []
    try:
        yield
    finally:
        _local.logdet = saved


# -- random state ------------------------------------------------------------------------------
def tensor_devices(tensors: Iterable[Any]) -> tuple[torch.device, ...]:
    """The distinct non-CPU devices of the tensors among ``tensors`` (CPU is always handled)."""
    seen: dict[torch.device, None] = {}
    for t in tensors:
        if isinstance(t, Tensor) and t.device.type != "cpu":
            seen[t.device] = None
    return tuple(seen)


def _device_rng(device: torch.device) -> Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    raise NotImplementedError(
        f"preserve_rng_state does not know how to capture the random state of device "
        f"{str(device)!r}; pass preserve_rng_state=False"
    )


@dataclass(frozen=True)
class RngState:
    """The CPU random state and that of each device, at one moment."""

    cpu: Tensor
    devices: tuple[tuple[torch.device, Tensor], ...]

    @classmethod
    def capture(cls, devices: tuple[torch.device, ...], last: RngState | None = None) -> RngState:
        """The current state; ``last`` itself when nothing drew a random number since."""
        state = cls(torch.get_rng_state(), tuple((d, _device_rng(d)) for d in devices))
        if last is not None and last.equals(state):
            return last
        return state

    def equals(self, other: RngState) -> bool:
        return (
            torch.equal(self.cpu, other.cpu)
            and [d for d, _ in self.devices] == [d for d, _ in other.devices]
            and all(torch.equal(a[1], b[1]) for a, b in zip(self.devices, other.devices))
        )

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.devices:
            if device.type == "cuda":
                torch.cuda.set_rng_state(state, device)


@contextmanager
def forked_rng(devices: tuple[torch.device, ...], enabled: bool = True) -> Iterator[None]:
    """Leave the caller's random streams (CPU and ``devices``) as they were on exit."""
    if not enabled:
        yield
        return
    state = RngState.capture(devices)
    try:
        yield
    finally:
        state.restore()


# -- autocast ----------------------------------------------------------------------------------
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

    def replay(self) -> AbstractContextManager[None]:
        """Run the enclosed recompute under the captured autocast settings (nothing to do
        when autocast was off then and is off now)."""
        if not self.enabled and not any(
            _autocast_on(device_type) for device_type, _, _, _ in self.settings
        ):
            return nullcontext()
        return self._replay()

    @contextmanager
    def _replay(self) -> Iterator[None]:
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


def _autocast_on(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except RuntimeError:
        return False


# -- the caller's tensors are never modified -------------------------------------------------
# NOTE [the caller's tensors are never modified]
# A function that changes its input in place (``nn.Sequential(nn.ReLU(inplace=True), conv)``
# as Fm) would overwrite the caller's tensor, since a coupling hands Fm a view of the chain's
# input, and it breaks the coupling's algebra anyway (y2 = x2 + Gm(y1) needs the unchanged
# x2). The first time a function is called on a protected tensor (the input of a
# memory-saving call), it gets a copy; if it changes the copy, we refuse with an error
# before anything of the caller's is touched. A function that left its inputs alone is
# trusted afterwards (no copies), and every call compares version counters, so a function
# that starts writing its inputs later, or writes a side input, is refused too.
_TRUSTED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


@contextmanager
def protecting(tensors: Iterable[Tensor]) -> Iterator[None]:
    """Shield the storage of ``tensors`` from functions not yet known to leave inputs alone."""
    before = _local.protected
    _local.protected = before | {t.untyped_storage().data_ptr() for t in tensors}
    try:
        yield
    finally:
        _local.protected = before


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


def _copy_with_strides(t: Tensor) -> Tensor:
    """A copy of ``t`` with ``t``'s strides (some ops save other tensors for other layouts)."""
    if t.dim() and 0 not in t.stride():
        copy = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
        return copy.copy_(t)  # differentiable, like clone()
    return t.clone()


def guarded_call(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    key: tuple[Any, str] | None = None,
    compiled: Any = None,
) -> Any:
    """``fn(*args, **kwargs)``, refusing a function that modifies its tensor inputs in place
    (see the NOTE above). ``key`` names what is trusted once it behaved (default: ``fn``'s
    module and method); ``fn`` itself runs under dynamo's callback ``compiled``."""
    owner, name = _trust_key(fn) if key is None else key
    try:
        trusted = name in _TRUSTED.get(owner, ())
    except TypeError:  # not weak-referenceable: check versions only
        trusted = True
    protected = _local.protected
    copies: list[tuple[Tensor, int]] = []
    if not trusted and protected:

        def shielded(v: Any) -> Any:
            if isinstance(v, Tensor) and v.untyped_storage().data_ptr() in protected:
                c = _copy_with_strides(v)
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
    if copies or compiled is not None:
        with protecting([c for c, _ in copies]), compiled_as(compiled):
            out = run_compiled(fn, args, kwargs)  # calls inside see the copies as protected
    else:
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
