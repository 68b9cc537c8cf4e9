"""The coupling machinery every coupling law shares: :class:`Coupling`.

A coupling splits its input into two parts and couples each with a function of the other
(see :mod:`invertible_core.couplings` for the laws shipped: additive and affine). This
module holds what does not depend on the law: the partition along ``split_dim``, the
routing of side inputs, fixed-point rounding, the fused one-recompute backward step (split
into a recompute half and a backprop half for overlapped schedules), log-determinants and
the whole-tensor ``forward``/``inverse``. A law is the four small methods a subclass
implements (``_couple``, ``_decouple`` and, for speed, their analytic gradients).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from invertible_core.contract import Partition, State
from invertible_core.fixed_point import GridRange, round_term_to_grid, round_to_grid
from invertible_core.recompute import RecomputeContext, direct_context
from invertible_core.side_inputs import SideInputs

__all__ = ["Coupling", "CouplingTerm", "SideRoute"]

#: What ``Fm``/``Gm`` produce inside a coupling: a tensor (additive) or ``(scale, shift)``.
CouplingTerm = Tensor | tuple[Tensor, ...]
SideRoute = Literal["both", "Fm", "Gm", "none"]


def _terms(h: CouplingTerm) -> tuple[Tensor, ...]:
    return h if isinstance(h, tuple) else (h,)


def _detach(h: CouplingTerm) -> CouplingTerm:
    return tuple(t.detach() for t in h) if isinstance(h, tuple) else h.detach()


def _check_implementation(implementation_fwd: int, implementation_bwd: int) -> None:
    for name, value in (
        ("implementation_fwd", implementation_fwd),
        ("implementation_bwd", implementation_bwd),
    ):
        if value not in (-1, 0, 1):
            # MemCNN raises NotImplementedError for an unknown implementation, and so do we
            raise NotImplementedError(
                f"{name}={value!r} is not an implementation: MemCNN knew -1, 0 and 1; "
                "invertible-core has one implementation (the fused one-recompute backward). "
                "Remove the argument."
            )
    if implementation_fwd != -1 or implementation_bwd != -1:
        warnings.warn(
            "implementation_fwd/implementation_bwd are deprecated and ignored: invertible-core "
            "has one implementation (the fused one-recompute backward). Remove the arguments.",
            DeprecationWarning,
            stacklevel=3,
        )


_ROUTES: dict[str, tuple[bool, bool]] = {
    "both": (True, True),
    "Fm": (True, False),
    "Gm": (False, True),
    "none": (False, False),
}


class _Half(NamedTuple):
    """One recomputed half step, waiting for its gradient."""

    sign: int
    cond: Tensor
    h: CouplingTerm
    h_values: CouplingTerm
    other: Tensor
    known: Tensor


class Coupling(nn.Module):
    """Base class of all couplings.

    Args:
        Fm: module applied to ``x2`` (and the side inputs); its output couples into ``x1``.
        Gm: module applied to ``y1``; its output couples into ``x2``. ``None`` means a deep
            copy of ``Fm`` (same initial weights, separate parameters), as in MemCNN.
        split_dim: the dimension the input is split along.
        split_sizes: sizes ``(a, b)`` of the two parts along ``split_dim`` (3 channels as
            ``(1, 2)``); ``None`` splits into two equal halves (the size must be even).
            With uneven parts ``Fm`` maps ``b`` to ``a`` channels and ``Gm`` ``a`` to ``b``.
        side_inputs: which of ``Fm``/``Gm`` receive the side inputs: ``'both'`` (default),
            ``'Fm'``, ``'Gm'`` or ``'none'``.
        fixed_point_bits: compute the coupling on a fixed-point grid of ``2**-bits``
            (see :mod:`invertible_core.fixed_point`): rebuilt inputs are then bit-exact and
            memory saving changes no gradient at all. ``None`` (default): ordinary floats.
    """

    #: The coupling law changes no volume (``log|det J| = 0``): additive couplings.
    volume_preserving = False

    def __init__(
        self,
        Fm: nn.Module,
        Gm: nn.Module | None = None,
        split_dim: int = 1,
        *,
        split_sizes: tuple[int, int] | None = None,
        side_inputs: SideRoute = "both",
        fixed_point_bits: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(Fm, nn.Module):
            raise TypeError(f"Fm must be a torch.nn.Module, got {type(Fm).__name__}")
        if Gm is not None and not isinstance(Gm, nn.Module):
            raise TypeError(f"Gm must be a torch.nn.Module or None, got {type(Gm).__name__}")
        if side_inputs not in _ROUTES:
            raise ValueError(
                f"side_inputs must be one of 'both', 'Fm', 'Gm', 'none', got {side_inputs!r}"
            )
        if fixed_point_bits is not None and (
            not isinstance(fixed_point_bits, int) or not 1 <= fixed_point_bits <= 40
        ):
            raise ValueError(
                f"fixed_point_bits must be an int in 1..40 or None, got {fixed_point_bits!r}; "
                "16 keeps additions exact for |values| < 256 in float32"
            )
        self.Fm = Fm
        self.Gm = copy.deepcopy(Fm) if Gm is None else Gm
        self.partition = Partition(split_dim, split_sizes)
        self.side_inputs: SideRoute = side_inputs
        self.fixed_point_bits = fixed_point_bits
        self._grid_range = GridRange(type(self).__name__)

    @property
    def split_dim(self) -> int:
        return self.partition.dim

    @property
    def split_sizes(self) -> tuple[int, int] | None:
        return self.partition.sizes

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

    def _logdet(self, h: CouplingTerm) -> Tensor:
        """Per-sample ``log|d couple(x, h) / dx|``, shape ``(batch,)``."""
        raise NotImplementedError(
            f"{type(self).__name__} does not report a log-determinant: implement _logdet(h) "
            "(or set volume_preserving = True for a law with |det J| = 1)"
        )

    def _logdet_backward(self, h: CouplingTerm, grad_logdet: Tensor) -> tuple[Tensor, ...]:
        """Gradients of ``_logdet(h)`` w.r.t. each term of ``h`` (default: autograd)."""
        with torch.enable_grad():
            terms = tuple(t.detach().requires_grad_(True) for t in _terms(h))
            logdet = self._logdet(terms if isinstance(h, tuple) else terms[0])
            grads = torch.autograd.grad(logdet, terms, grad_logdet, allow_unused=True)
        return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, terms))

    def _check_term(self, h: CouplingTerm, half: Tensor, name: str) -> None:
        """Hook for subclasses: raise a clear error when a term does not fit the half."""

    # -- one half step -------------------------------------------------------------------------
    def _term(self, ctx: RecomputeContext, slot: int, cond: Tensor, half: Tensor) -> CouplingTerm:
        module = self.Fm if slot == 0 else self.Gm
        bits = self.fixed_point_bits
        if bits is not None:
            # the same memory layout in the forward pass and in the recompute, so that
            # convolutions and norms sum in the same order: exactness needs every bit
            cond = _dense(cond)
        h = ctx.call(slot, module, cond, side=_ROUTES[self.side_inputs][slot])
        self._check_term(h, half, "Fm" if slot == 0 else "Gm")
        if bits is not None:
            dtype = half.dtype
            if isinstance(h, tuple):
                h = tuple(round_term_to_grid(t, bits, dtype, (cond,)) for t in h)
            else:
                h = round_term_to_grid(h, bits, dtype, (cond,))
        return h

    def _coupled(self, ctx: RecomputeContext, x: Tensor, h: CouplingTerm, sign: int) -> Tensor:
        if ctx.wants_logdet and not self.volume_preserving:
            logdet = self._logdet(h)
            ctx.add_logdet(logdet if sign > 0 else -logdet)
        out = self._couple(x, h) if sign > 0 else self._decouple(x, h)
        if self.fixed_point_bits is not None and ctx.recording:
            self._grid_range.observe(out, self.fixed_point_bits)
        return out

    # -- the fused block contract ---------------------------------------------------------------
    def run_state(self, state: State, ctx: RecomputeContext, *, inverse: bool = False) -> State:
        """The coupling on its two parts: ``(x1, x2) -> (y1, y2)`` (or back, ``inverse``)."""
        a, b = state
        if not inverse:
            y1 = self._coupled(ctx, a, self._term(ctx, 0, b, a), +1)
            y2 = self._coupled(ctx, b, self._term(ctx, 1, y1, b), +1)
            return y1, y2
        x2 = self._coupled(ctx, b, self._term(ctx, 1, a, b), -1)
        x1 = self._coupled(ctx, a, self._term(ctx, 0, x2, a), -1)
        return x1, x2

    def backward_state(
        self,
        state: list[Tensor],
        grads: list[Tensor],
        ctx: RecomputeContext,
        *,
        inverse: bool = False,
    ) -> tuple[State, State]:
        """Rebuild the input parts from the output parts and backpropagate, in one step.

        Takes ownership of ``state`` and ``grads`` (both are emptied), so each part and its
        gradient is released as soon as the step no longer needs it: a caller that holds no
        other reference gets that memory back in the middle of the step, which lowers the
        peak of a reversible backward pass.
        """
        (p, q), (dp, dq) = state, grads
        state.clear()
        grads.clear()
        if not inverse:
            # the block computed y1 = couple(x1, Fm(x2)), then y2 = couple(x2, Gm(y1))
            x2, dx2, d_y1 = self._undo(ctx, 1, p, q, dq, +1)
            del q, dq
            dp = dp + d_y1
            del d_y1
            x1, dx1, d_x2 = self._undo(ctx, 0, x2, p, dp, +1)
            del p, dp
            return (x1, x2), (dx1, dx2 + d_x2)
        # the block computed x2 = decouple(y2, Gm(y1)), then x1 = decouple(y1, Fm(x2))
        y1, dy1, d_x2 = self._undo(ctx, 0, q, p, dp, -1)
        del p, dp
        dq = dq + d_x2
        del d_x2
        y2, dy2, d_y1 = self._undo(ctx, 1, y1, q, dq, -1)
        del q, dq
        return (y1, y2), (dy1 + d_y1, dy2)

    def _undo(
        self,
        ctx: RecomputeContext,
        slot: int,
        cond: Tensor,
        known: Tensor,
        d_known: Tensor,
        sign: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Undo one half step and backpropagate through it with a single call of Fm or Gm.

        ``sign=+1`` undoes ``known = couple(other, module(cond))``; ``-1`` undoes ``known =
        decouple(other, module(cond))``. Returns ``(other, d_other, d_cond)``.
        """
        half = self._recompute_half(ctx, slot, cond, known, sign)
        d_other, d_cond = self._backprop_half(ctx, half, d_known)
        return half.other, d_other, d_cond

    def _recompute_half(
        self, ctx: RecomputeContext, slot: int, cond: Tensor, known: Tensor, sign: int
    ) -> _Half:
        cond = cond.detach().requires_grad_(True)
        h = self._term(ctx, slot, cond, known)
        h_values = _detach(h)
        with torch.no_grad():
            other = self._decouple(known, h_values) if sign > 0 else self._couple(known, h_values)
        return _Half(sign, cond, h, h_values, other, known)

    def _backprop_half(
        self, ctx: RecomputeContext, half: _Half, d_known: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Gradients of a recomputed half step: ``(d_other, d_cond)``."""
        h_values, other, known = half.h_values, half.other, half.known
        with torch.no_grad():
            if half.sign > 0:
                d_other, d_terms = self._couple_backward(other, h_values, known, d_known)
            else:
                d_other, d_terms = self._decouple_backward(other, h_values, known, d_known)
            if ctx.grad_logdet is not None and not self.volume_preserving:
                g = ctx.grad_logdet if half.sign > 0 else -ctx.grad_logdet
                d_terms = tuple(a + b for a, b in zip(d_terms, self._logdet_backward(h_values, g)))
        terms = _terms(half.h)
        d_terms = tuple(d.to(t.dtype) for d, t in zip(d_terms, terms))
        (d_cond,) = ctx.backward(terms, d_terms, (half.cond,))
        if d_cond is None:
            d_cond = torch.zeros_like(half.cond)
        return d_other, d_cond.to(half.cond.dtype)

    def recompute_state(
        self, state: list[Tensor], ctx: RecomputeContext, *, inverse: bool = False
    ) -> tuple[State, Any]:
        """The first half of :meth:`backward_state`: rebuild the input parts (recomputing
        ``Gm`` and ``Fm`` with grad) and return them with what :meth:`backprop_state` needs.

        Split in two so that a chain can rebuild the next block while this one's gradients
        are computed (overlapped recompute); both halves' graphs are alive in between.
        """
        p, q = state
        state.clear()
        if not inverse:
            g = self._recompute_half(ctx, 1, p, q, +1)
            f = self._recompute_half(ctx, 0, g.other, p, +1)
            return (f.other, g.other), (g, f)
        f = self._recompute_half(ctx, 0, q, p, -1)
        g = self._recompute_half(ctx, 1, f.other, q, -1)
        return (f.other, g.other), (f, g)

    def backprop_state(
        self,
        pending: Any,
        grads: list[Tensor],
        ctx: RecomputeContext,
        *,
        inverse: bool = False,
        between: Callable[[], None] | None = None,
    ) -> State:
        """The second half of :meth:`backward_state`: the input parts' gradients.

        ``between`` is called once, after the first function's gradients are done and its
        graph released (a chain starts the next block's recompute there, so that only three
        graphs of half a block, not four, are alive at once).
        """
        dp, dq = grads
        grads.clear()
        first, second = pending
        del pending
        if not inverse:
            dx2, d_y1 = self._backprop_half(ctx, first, dq)
            del first
            if between is not None:
                between()
            dx1, d_x2 = self._backprop_half(ctx, second, dp + d_y1)
            return dx1, dx2 + d_x2
        dy1, d_x2 = self._backprop_half(ctx, first, dp)
        del first
        if between is not None:
            between()
        dy2, d_y1 = self._backprop_half(ctx, second, dq + d_x2)
        return dy1 + d_y1, dy2

    # -- whole tensors ------------------------------------------------------------------------
    def _whole(
        self, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any], inverse: bool, logdet: bool
    ) -> tuple[Tensor, Tensor | None]:
        ctx = direct_context(SideInputs(args, kwargs), wants_logdet=logdet)
        if self.fixed_point_bits is not None:
            x = round_to_grid(x, self.fixed_point_bits)
        state = self.partition.split(x, type(self).__name__)
        out = self.partition.merge(self.run_state(state, ctx, inverse=inverse))
        if not logdet:
            return out, None
        ld = ctx._take_logdet()
        return out, ld if ld is not None else x.new_zeros(x.shape[0])

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """``y = merge(couple(x1, Fm(x2)), couple(x2, Gm(y1)))``; side inputs go to Fm/Gm."""
        return self._whole(x, args, kwargs, inverse=False, logdet=False)[0]

    def inverse(self, y: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """The exact inverse of :meth:`forward` for the same side inputs."""
        return self._whole(y, args, kwargs, inverse=True, logdet=False)[0]

    def forward_with_logdet(self, x: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """:meth:`forward` and the per-sample ``log|det dy/dx|`` (shape ``(batch,)``)."""
        y, ld = self._whole(x, args, kwargs, inverse=False, logdet=True)
        assert ld is not None
        return y, ld

    def inverse_with_logdet(self, y: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """:meth:`inverse` and the per-sample ``log|det dx/dy|`` (the forward's, negated)."""
        x, ld = self._whole(y, args, kwargs, inverse=True, logdet=True)
        assert ld is not None
        return x, ld

    def extra_repr(self) -> str:
        parts = [f"split_dim={self.split_dim}"]
        if self.split_sizes is not None:
            parts.append(f"split_sizes={self.split_sizes}")
        if self.side_inputs != "both":
            parts.append(f"side_inputs={self.side_inputs!r}")
        if self.fixed_point_bits is not None:
            parts.append(f"fixed_point_bits={self.fixed_point_bits}")
        return ", ".join(parts)


def _dense(x: Tensor) -> Tensor:
    """``x`` densely laid out, keeping a channels-last layout channels-last."""
    if x.dim() == 4 and x.stride(1) == 1 and x.shape[1] > 1:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


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


def _check_like(h: Tensor, half: Tensor, coupling: str, name: str, what: str) -> None:
    if h.shape != half.shape:
        raise ValueError(
            f"{coupling}: {name} returned {what}shape {tuple(h.shape)} for a part of shape "
            f"{tuple(half.shape)}; {name}'s output must have the shape of the part it couples into"
        )
    # a lower precision (autocast) is cast back by the coupling's sum; a higher one is not
    if torch.promote_types(h.dtype, half.dtype) != half.dtype:
        raise TypeError(
            f"{coupling}: {name} returned {what}dtype {h.dtype} for a part of dtype {half.dtype}; "
            f"the coupling would silently change the output's dtype. Make {name} return "
            f"{half.dtype} (e.g. cast its parameters with .to({half.dtype}))"
        )
