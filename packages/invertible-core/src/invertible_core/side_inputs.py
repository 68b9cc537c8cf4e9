"""Side inputs of a call, and the guard that keeps the caller's tensors unmodified."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from torch import Tensor, nn

__all__ = ["SideInputs"]


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
