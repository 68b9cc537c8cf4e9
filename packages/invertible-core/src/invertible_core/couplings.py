"""Coupling layers: turn any pair of shape-preserving functions into an invertible block.

A coupling splits its input ``x`` into halves ``(x1, x2)`` along ``split_dim`` and computes::

    y1 = couple(x1, Fm(x2))        x2 = decouple(y2, Gm(y1))
    y2 = couple(x2, Gm(y1))        x1 = decouple(y1, Fm(x2))      (the inverse)

``Fm`` and ``Gm`` need not be invertible; ``couple`` must be invertible in its first
argument. :class:`AdditiveCoupling` uses ``x + h``; :class:`AffineCoupling` uses
``x * s + t`` with ``(s, t) = Fm(x2)``.

Every coupling honours one protocol (the :class:`Coupling` base class), which is what the
memory-saving machinery (:class:`~invertible_core.ReversibleSequence`,
:class:`~invertible_core.InvertibleModuleWrapper`) relies on:

- ``forward_halves(x1, x2, record=None)`` and ``inverse_halves(y1, y2, record=None)``;
- ``backward_halves(y1, y2, dy1, dy2, record, params)``: the fused backward step of the
  RevNet paper. It recomputes ``Gm(y1)`` and ``Fm(x2)`` once each, with grad, and uses each
  result twice: to rebuild the input and to backpropagate. It returns the rebuilt input
  halves, their gradients, and the gradients of ``params``;
- ``inverse_backward_halves(x1, x2, dx1, dx2, record, params)``: the same for a block run
  in the inverse direction.

To define a new coupling law, subclass :class:`Coupling` and implement ``_couple`` and
``_decouple`` (and, for speed, their analytic gradients ``_couple_backward`` and
``_decouple_backward``; the default derives them with autograd).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from invertible_core.recompute import BlockRecord

__all__ = [
    "AdditiveCoupling",
    "AffineAdapterNaive",
    "AffineAdapterSigmoid",
    "AffineCoupling",
    "Coupling",
    "create_coupling",
]

#: What ``Fm``/``Gm`` produce inside a coupling: a tensor (additive) or ``(scale, shift)``.
CouplingTerm = Tensor | tuple[Tensor, ...]
ParamGrads = tuple[Tensor | None, ...]


def _terms(h: CouplingTerm) -> tuple[Tensor, ...]:
    return h if isinstance(h, tuple) else (h,)


def _detach(h: CouplingTerm) -> CouplingTerm:
    return tuple(t.detach() for t in h) if isinstance(h, tuple) else h.detach()


def _warn_deprecated_implementation(implementation_fwd: int, implementation_bwd: int) -> None:
    if implementation_fwd != -1 or implementation_bwd != -1:
        warnings.warn(
            "implementation_fwd/implementation_bwd are deprecated and ignored: invertible-core "
            "has one implementation (the fused one-recompute backward). Remove the arguments.",
            DeprecationWarning,
            stacklevel=3,
        )


def _add_grads(a: ParamGrads, b: ParamGrads) -> ParamGrads:
    return tuple(x if y is None else y if x is None else x + y for x, y in zip(a, b))


class Coupling(nn.Module):
    """Base class of all couplings: the protocol the memory-saving machinery relies on.

    Args:
        Fm: module applied to ``x2``; its output couples into ``x1``.
        Gm: module applied to ``y1``; its output couples into ``x2``. ``None`` means a deep
            copy of ``Fm`` (same initial weights, separate parameters), as in MemCNN.
        split_dim: the dimension split into two equal halves (size must be even).
    """

    def __init__(self, Fm: nn.Module, Gm: nn.Module | None = None, split_dim: int = 1) -> None:
        super().__init__()
        if not isinstance(Fm, nn.Module):
            raise TypeError(f"Fm must be a torch.nn.Module, got {type(Fm).__name__}")
        if Gm is not None and not isinstance(Gm, nn.Module):
            raise TypeError(f"Gm must be a torch.nn.Module or None, got {type(Gm).__name__}")
        if not isinstance(split_dim, int):
            raise TypeError(f"split_dim must be an int, got {type(split_dim).__name__}")
        self.Fm = Fm
        self.Gm = copy.deepcopy(Fm) if Gm is None else Gm
        self.split_dim = split_dim

    # -- the coupling law (override in subclasses) ---------------------------------------
    def _couple(self, x: Tensor, h: CouplingTerm) -> Tensor:
        raise NotImplementedError

    def _decouple(self, y: Tensor, h: CouplingTerm) -> Tensor:
        raise NotImplementedError

    def _couple_backward(
        self, x: Tensor, h: CouplingTerm, y: Tensor, dy: Tensor
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Gradients of ``y = _couple(x, h)`` w.r.t. ``x`` and each term of ``h``."""
        return _autograd_law_backward(self._couple, x, h, dy)

    def _decouple_backward(
        self, y: Tensor, h: CouplingTerm, x: Tensor, dx: Tensor
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Gradients of ``x = _decouple(y, h)`` w.r.t. ``y`` and each term of ``h``."""
        return _autograd_law_backward(self._decouple, y, h, dx)

    def _check_term(self, h: CouplingTerm, half: Tensor, name: str) -> None:
        """Hook for subclasses: raise a clear error when a term does not fit the half."""

    # -- split / merge ---------------------------------------------------------------------
    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Split ``x`` into two equal halves along ``split_dim`` (views, no copy)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__} expects a tensor, got {type(x).__name__}")
        if x.dim() == 0 or not -x.dim() <= self.split_dim < x.dim():
            raise ValueError(
                f"{type(self).__name__}: split_dim={self.split_dim} is out of range for an "
                f"input of shape {tuple(x.shape)}"
            )
        size = x.shape[self.split_dim]
        if size % 2 != 0:
            raise ValueError(
                f"{type(self).__name__} splits dim {self.split_dim} into two equal halves, but "
                f"that dim has odd size {size} (input shape {tuple(x.shape)}); use an even "
                "size or choose another split_dim"
            )
        x1, x2 = torch.chunk(x, 2, dim=self.split_dim)
        return x1, x2

    def merge(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.cat([a, b], dim=self.split_dim)

    # -- the protocol ------------------------------------------------------------------------
    def _term(
        self, module: nn.Module, cond: Tensor, half: Tensor, record: BlockRecord | None, slot: int
    ) -> CouplingTerm:
        if record is not None:
            record.capture(slot)
        h = module(cond)
        self._check_term(h, half, "Fm" if slot == 0 else "Gm")
        return h

    def forward_halves(
        self, x1: Tensor, x2: Tensor, record: BlockRecord | None = None
    ) -> tuple[Tensor, Tensor]:
        y1 = self._couple(x1, self._term(self.Fm, x2, x1, record, 0))
        y2 = self._couple(x2, self._term(self.Gm, y1, x2, record, 1))
        return y1, y2

    def inverse_halves(
        self, y1: Tensor, y2: Tensor, record: BlockRecord | None = None
    ) -> tuple[Tensor, Tensor]:
        x2 = self._decouple(y2, self._term(self.Gm, y1, y2, record, 1))
        x1 = self._decouple(y1, self._term(self.Fm, x2, y1, record, 0))
        return x1, x2

    def forward(self, x: Tensor) -> Tensor:
        return self.merge(*self.forward_halves(*self.split(x)))

    def inverse(self, y: Tensor) -> Tensor:
        return self.merge(*self.inverse_halves(*self.split(y)))

    def _undo(
        self,
        module: nn.Module,
        cond: Tensor,
        known: Tensor,
        d_known: Tensor,
        record: BlockRecord | None,
        slot: int,
        params: Sequence[Tensor],
        forward_law: bool,
    ) -> tuple[Tensor, Tensor, Tensor, ParamGrads]:
        """Undo one half step and backpropagate through it with a single call of ``module``.

        ``forward_law=True`` undoes ``known = couple(other, module(cond))``; ``False`` undoes
        ``known = decouple(other, module(cond))``. Returns ``(other, d_other, d_cond,
        param_grads)``.
        """
        cond = cond.detach().requires_grad_(True)
        with torch.enable_grad(), nullcontext() if record is None else record.replay(slot):
            h = module(cond)
        h_values = _detach(h)
        with torch.no_grad():
            if forward_law:
                other = self._decouple(known, h_values)
                d_other, d_terms = self._couple_backward(other, h_values, known, d_known)
            else:
                other = self._couple(known, h_values)
                d_other, d_terms = self._decouple_backward(other, h_values, known, d_known)
        terms = _terms(h)
        d_terms = tuple(d.to(t.dtype) for d, t in zip(d_terms, terms))
        grads = torch.autograd.grad(terms, (cond, *params), d_terms, allow_unused=True)
        d_cond = grads[0]
        if d_cond is None:
            d_cond = torch.zeros_like(cond)
        return other, d_other, d_cond.to(cond.dtype), tuple(grads[1:])

    def backward_halves(
        self,
        y1: Tensor,
        y2: Tensor,
        dy1: Tensor,
        dy2: Tensor,
        record: BlockRecord | None,
        params: Sequence[Tensor],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, ParamGrads]:
        """Rebuild ``(x1, x2)`` from ``(y1, y2)`` and return their gradients and ``params``'."""
        return self.backward_consuming([y1, y2, dy1, dy2], record, params, inverse=False)

    def inverse_backward_halves(
        self,
        x1: Tensor,
        x2: Tensor,
        dx1: Tensor,
        dx2: Tensor,
        record: BlockRecord | None,
        params: Sequence[Tensor],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, ParamGrads]:
        """Like :meth:`backward_halves` for a block that ran in the inverse direction."""
        return self.backward_consuming([x1, x2, dx1, dx2], record, params, inverse=True)

    def backward_consuming(
        self,
        state: list[Tensor],
        record: BlockRecord | None,
        params: Sequence[Tensor],
        inverse: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, ParamGrads]:
        """The fused backward step, taking ownership of ``[out1, out2, d_out1, d_out2]``.

        ``state`` is emptied on entry, so each half and its gradient is released as soon as
        the step no longer needs it (a caller holding no other reference gets that memory
        back in the middle of the step, which lowers the peak of a reversible backward).
        """
        if not inverse:
            # the block computed y1 = couple(x1, Fm(x2)), then y2 = couple(x2, Gm(y1))
            y1, y2, dy1, dy2 = state
            state.clear()
            x2, dx2, d_y1, grads_g = self._undo(self.Gm, y1, y2, dy2, record, 1, params, True)
            del y2, dy2
            dy1 = dy1 + d_y1
            del d_y1
            x1, dx1, d_x2, grads_f = self._undo(self.Fm, x2, y1, dy1, record, 0, params, True)
            del y1, dy1
            return x1, x2, dx1, dx2 + d_x2, _add_grads(grads_f, grads_g)
        # the block computed x2 = decouple(y2, Gm(y1)), then x1 = decouple(y1, Fm(x2))
        x1, x2, dx1, dx2 = state
        state.clear()
        y1, dy1, d_x2, grads_f = self._undo(self.Fm, x2, x1, dx1, record, 0, params, False)
        del x1, dx1
        dx2 = dx2 + d_x2
        del d_x2
        y2, dy2, d_y1, grads_g = self._undo(self.Gm, y1, x2, dx2, record, 1, params, False)
        del x2, dx2
        return y1, y2, dy1 + d_y1, dy2, _add_grads(grads_f, grads_g)


def _autograd_law_backward(
    law: Callable[[Tensor, CouplingTerm], Tensor], a: Tensor, h: CouplingTerm, d_out: Tensor
) -> tuple[Tensor, tuple[Tensor, ...]]:
    with torch.enable_grad():
        a = a.detach().requires_grad_(True)
        terms = tuple(t.detach().requires_grad_(True) for t in _terms(h))
        out = law(a, terms if isinstance(h, tuple) else terms[0])
        grads = torch.autograd.grad(out, (a, *terms), d_out, allow_unused=True)
    filled = tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, (a, *terms)))
    return filled[0], filled[1:]


class AdditiveCoupling(Coupling):
    """Additive coupling (NICE, RevNet): ``y1 = x1 + Fm(x2)``, ``y2 = x2 + Gm(y1)``.

    Volume preserving and exactly invertible up to float rounding. ``Fm`` and ``Gm`` must
    map a half to a tensor of the same shape.

    Args:
        Fm: the first residual function, applied to ``x2``.
        Gm: the second, applied to ``y1``; ``None`` deep-copies ``Fm``.
        implementation_fwd, implementation_bwd: deprecated, ignored (MemCNN compatibility).
        split_dim: the dimension split into halves (default 1, channels).
    """

    def __init__(
        self,
        Fm: nn.Module,
        Gm: nn.Module | None = None,
        implementation_fwd: int = -1,
        implementation_bwd: int = -1,
        split_dim: int = 1,
    ) -> None:
        super().__init__(Fm, Gm, split_dim)
        _warn_deprecated_implementation(implementation_fwd, implementation_bwd)

    def _check_term(self, h: CouplingTerm, half: Tensor, name: str) -> None:
        if not isinstance(h, Tensor):
            raise TypeError(
                f"AdditiveCoupling: {name} must return a tensor, got {type(h).__name__}; "
                "for (scale, shift) outputs use AffineCoupling"
            )
        if h.shape != half.shape:
            raise ValueError(
                f"AdditiveCoupling: {name} returned shape {tuple(h.shape)} for a half of shape "
                f"{tuple(half.shape)}; {name} must preserve the shape of its input half"
            )

    def _couple(self, x: Tensor, h: CouplingTerm) -> Tensor:
        assert isinstance(h, Tensor)
        return x + h

    def _decouple(self, y: Tensor, h: CouplingTerm) -> Tensor:
        assert isinstance(h, Tensor)
        return y - h

    def _couple_backward(
        self, x: Tensor, h: CouplingTerm, y: Tensor, dy: Tensor
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        return dy, (dy,)

    def _decouple_backward(
        self, y: Tensor, h: CouplingTerm, x: Tensor, dx: Tensor
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        return dx, (-dx,)


class AffineCoupling(Coupling):
    """Affine coupling (RealNVP): ``y1 = x1 * s1 + t1`` with ``(s1, t1) = Fm(x2)``, and the
    same for ``y2`` with ``Gm(y1)``.

    ``Fm``/``Gm`` must return ``(scale, shift)``, each shaped like the half; an ``adapter``
    (e.g. :class:`AffineAdapterNaive`) turns a module with one output into such a pair.
    The scale must be non-zero (keep it positive, as the adapters do).

    Args:
        Fm: module returning ``(scale, shift)`` for ``x2`` (or wrapped by ``adapter``).
        Gm: the same for ``y1``; ``None`` deep-copies ``Fm``.
        adapter: a class, called as ``adapter(Fm)`` and ``adapter(Gm)``.
        implementation_fwd, implementation_bwd: deprecated, ignored (MemCNN compatibility).
        split_dim: the dimension split into halves (default 1, channels).
    """

    def __init__(
        self,
        Fm: nn.Module,
        Gm: nn.Module | None = None,
        adapter: Callable[[nn.Module], nn.Module] | None = None,
        implementation_fwd: int = -1,
        implementation_bwd: int = -1,
        split_dim: int = 1,
    ) -> None:
        Gm = copy.deepcopy(Fm) if Gm is None else Gm
        if adapter is not None:
            Fm, Gm = adapter(Fm), adapter(Gm)
        super().__init__(Fm, Gm, split_dim)
        _warn_deprecated_implementation(implementation_fwd, implementation_bwd)

    def _check_term(self, h: CouplingTerm, half: Tensor, name: str) -> None:
        if not (isinstance(h, tuple) and len(h) == 2 and all(isinstance(t, Tensor) for t in h)):
            raise TypeError(
                f"AffineCoupling: {name} must return a (scale, shift) pair of tensors, got "
                f"{type(h).__name__}; wrap a single-output module with adapter="
                "AffineAdapterNaive or AffineAdapterSigmoid"
            )
        for what, t in zip(("scale", "shift"), h):
            if t.shape != half.shape:
                raise ValueError(
                    f"AffineCoupling: {name} returned a {what} of shape {tuple(t.shape)} for a "
                    f"half of shape {tuple(half.shape)}; both must match the half's shape"
                )

    def _couple(self, x: Tensor, h: CouplingTerm) -> Tensor:
        s, t = h
        return x * s + t

    def _decouple(self, y: Tensor, h: CouplingTerm) -> Tensor:
        s, t = h
        return (y - t) / s

    def _couple_backward(
        self, x: Tensor, h: CouplingTerm, y: Tensor, dy: Tensor
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        s, _ = h
        return dy * s, (dy * x, dy)

    def _decouple_backward(
        self, y: Tensor, h: CouplingTerm, x: Tensor, dx: Tensor
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        s, _ = h
        dy = dx / s
        return dy, (-dy * x, -dy)


class AffineAdapterNaive(nn.Module):
    """Turn a single-output module into ``(scale, shift) = (exp(h), h)``, ``h = module(x)``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.f = module

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.f(x)
        return torch.exp(h), h


class AffineAdapterSigmoid(nn.Module):
    """Turn a module with twice the half's channels into a bounded ``(scale, shift)``.

    ``h = module(x)``; scale ``= sigmoid(h[:, 1::2] + 2)`` (in (0, 1), near 0.88 at zero,
    which keeps deep stacks stable), shift ``= h[:, 0::2]``.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.f = module

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.f(x)
        if h.dim() < 2 or h.shape[1] % 2 != 0:
            raise ValueError(
                f"AffineAdapterSigmoid: the wrapped module must return twice the channels of "
                f"its input (an even dim 1), got shape {tuple(h.shape)}"
            )
        return torch.sigmoid(h[:, 1::2] + 2.0), h[:, 0::2]


def create_coupling(
    Fm: nn.Module,
    Gm: nn.Module | None = None,
    coupling: str = "additive",
    implementation_fwd: int = -1,
    implementation_bwd: int = -1,
    adapter: Callable[[nn.Module], nn.Module] | None = None,
    split_dim: int = 1,
) -> Coupling:
    """Build a coupling by name: ``'additive'`` or ``'affine'`` (MemCNN's factory)."""
    kwargs: dict[str, Any] = {
        "implementation_fwd": implementation_fwd,
        "implementation_bwd": implementation_bwd,
        "split_dim": split_dim,
    }
    if coupling == "additive":
        if adapter is not None:
            raise ValueError("create_coupling: an adapter applies only to coupling='affine'")
        return AdditiveCoupling(Fm, Gm, **kwargs)
    if coupling == "affine":
        return AffineCoupling(Fm, Gm, adapter=adapter, **kwargs)
    raise ValueError(
        f"create_coupling: unknown coupling {coupling!r}; choose 'additive' or 'affine'"
    )
