"""Coupling layers: turn any pair of functions into an invertible block.

A coupling splits its input ``x`` into parts ``(x1, x2)`` along ``split_dim`` and computes::

    y1 = couple(x1, Fm(x2))        x2 = decouple(y2, Gm(y1))
    y2 = couple(x2, Gm(y1))        x1 = decouple(y1, Fm(x2))      (the inverse)

``Fm`` and ``Gm`` need not be invertible; ``couple`` must be invertible in its first
argument. :class:`AdditiveCoupling` uses ``x + h``; :class:`AffineCoupling` uses
``x * s + t`` with ``(s, t) = Fm(x2)``. Side inputs given to the coupling (or to the
sequence around it) are passed on: ``Fm(x2, *args, **kwargs)`` and ``Gm(y1, *args,
**kwargs)``; ``side_inputs='Fm'`` or ``'Gm'`` sends them to one of the two only.

Every coupling is a :class:`~invertible_core.FusedInvertibleBlock`: besides ``forward`` and
``inverse`` it has a fused backward step (the RevNet paper's algorithm) that recomputes
``Gm(y1)`` and ``Fm(x2)`` once each, with grad, and uses each result twice: to rebuild the
input and to backpropagate. To define a new coupling law, subclass :class:`Coupling` and
implement ``_couple`` and ``_decouple`` (and, for speed, their analytic gradients
``_couple_backward`` and ``_decouple_backward``; the default derives them with autograd;
``_logdet`` for a law that changes volume).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from invertible_core.adapters import AffineAdapterNaive, AffineAdapterSigmoid
from invertible_core.coupling_base import (
    Coupling,
    CouplingTerm,
    SideRoute,
    _check_implementation,
    _check_like,
)

__all__ = [
    "AdditiveCoupling",
    "AffineAdapterNaive",
    "AffineAdapterSigmoid",
    "AffineCoupling",
    "Coupling",
    "create_coupling",
]


class AdditiveCoupling(Coupling):
    """Additive coupling (NICE, RevNet): ``y1 = x1 + Fm(x2)``, ``y2 = x2 + Gm(y1)``.

    Volume preserving (log-determinant 0) and exactly invertible up to float rounding;
    with ``fixed_point_bits`` bit-exact. ``Fm`` and ``Gm`` must map a part to a tensor of the
    shape of the other part.

    Args:
        Fm: the first residual function, applied to ``x2``.
        Gm: the second, applied to ``y1``; ``None`` deep-copies ``Fm``.
        implementation_fwd, implementation_bwd: deprecated, ignored (MemCNN compatibility).
        split_dim: the dimension split into parts (default 1, channels).
        split_sizes, side_inputs, fixed_point_bits: see :class:`Coupling`.
    """

    volume_preserving = True

    def __init__(
        self,
        Fm: nn.Module,
        Gm: nn.Module | None = None,
        implementation_fwd: int = -1,
        implementation_bwd: int = -1,
        split_dim: int = 1,
        *,
        split_sizes: tuple[int, int] | None = None,
        side_inputs: SideRoute = "both",
        fixed_point_bits: int | None = None,
    ) -> None:
        _check_implementation(implementation_fwd, implementation_bwd)
        super().__init__(
            Fm,
            Gm,
            split_dim,
            split_sizes=split_sizes,
            side_inputs=side_inputs,
            fixed_point_bits=fixed_point_bits,
        )

    def _check_term(self, h: CouplingTerm, half: Tensor, name: str) -> None:
        if not isinstance(h, Tensor):
            raise TypeError(
                f"AdditiveCoupling: {name} must return a tensor, got {type(h).__name__}; "
                "for (scale, shift) outputs use AffineCoupling"
            )
        _check_like(h, half, "AdditiveCoupling", name, "")

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


def _per_sample_sum(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).sum(dim=1)


class AffineCoupling(Coupling):
    """Affine coupling (RealNVP): ``y1 = x1 * s1 + t1`` with ``(s1, t1) = Fm(x2)``, and the
    same for ``y2`` with ``Gm(y1)``.

    ``Fm``/``Gm`` must return ``(scale, shift)``, each shaped like the part they couple
    into; an ``adapter`` (e.g. :class:`AffineAdapterNaive`) turns a module with one output
    into such a pair. The scale must be non-zero (keep it positive, as the adapters do).
    The log-determinant is ``sum(log|s1|) + sum(log|s2|)`` per sample (batch along dim 0).

    Args:
        Fm: module returning ``(scale, shift)`` for ``x2`` (or wrapped by ``adapter``).
        Gm: the same for ``y1``; ``None`` deep-copies ``Fm``.
        adapter: a class, called as ``adapter(Fm)`` and ``adapter(Gm)``; an adapter with a
            ``split_dim`` attribute is given the coupling's.
        implementation_fwd, implementation_bwd: deprecated, ignored (MemCNN compatibility).
        split_dim: the dimension split into parts (default 1, channels).
        split_sizes, side_inputs: see :class:`Coupling`.
    """

    def __init__(
        self,
        Fm: nn.Module,
        Gm: nn.Module | None = None,
        adapter: Callable[[nn.Module], nn.Module] | None = None,
        implementation_fwd: int = -1,
        implementation_bwd: int = -1,
        split_dim: int = 1,
        *,
        split_sizes: tuple[int, int] | None = None,
        side_inputs: SideRoute = "both",
    ) -> None:
        _check_implementation(implementation_fwd, implementation_bwd)
        Gm = copy.deepcopy(Fm) if Gm is None else Gm
        if adapter is not None:
            Fm, Gm = adapter(Fm), adapter(Gm)
            for m in (Fm, Gm):
                if hasattr(m, "split_dim"):
                    setattr(m, "split_dim", split_dim)  # noqa: B010 (any adapter, untyped)
        super().__init__(Fm, Gm, split_dim, split_sizes=split_sizes, side_inputs=side_inputs)

    def _check_term(self, h: CouplingTerm, half: Tensor, name: str) -> None:
        if not (isinstance(h, tuple) and len(h) == 2 and all(isinstance(t, Tensor) for t in h)):
            raise TypeError(
                f"AffineCoupling: {name} must return a (scale, shift) pair of tensors, got "
                f"{type(h).__name__}; wrap a single-output module with adapter="
                "AffineAdapterNaive or AffineAdapterSigmoid"
            )
        for what, t in zip(("scale", "shift"), h):
            _check_like(t, half, "AffineCoupling", name, f"a {what} of ")

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

    def _logdet(self, h: CouplingTerm) -> Tensor:
        s, _ = h
        return _per_sample_sum(torch.log(torch.abs(s)))

    def _logdet_backward(self, h: CouplingTerm, grad_logdet: Tensor) -> tuple[Tensor, ...]:
        s, t = h
        g = grad_logdet.to(s.dtype).reshape(-1, *([1] * (s.dim() - 1)))
        return g / s, torch.zeros_like(t)


def create_coupling(
    Fm: nn.Module,
    Gm: nn.Module | None = None,
    coupling: str = "additive",
    implementation_fwd: int = -1,
    implementation_bwd: int = -1,
    adapter: Callable[[nn.Module], nn.Module] | None = None,
    split_dim: int = 1,
) -> Coupling:
    """Build a coupling by name: ``'additive'`` or ``'affine'`` (MemCNN's factory).

    As in MemCNN, an ``adapter`` given with ``coupling='additive'`` is ignored (with a
    warning, since it is probably a mistake).
    """
    kwargs: dict[str, Any] = {
        "implementation_fwd": implementation_fwd,
        "implementation_bwd": implementation_bwd,
        "split_dim": split_dim,
    }
    if coupling == "additive":
        if adapter is not None:
            warnings.warn(
                "create_coupling: an adapter applies only to coupling='affine'; it is ignored "
                "for an additive coupling (as in MemCNN)",
                UserWarning,
                stacklevel=2,
            )
        return AdditiveCoupling(Fm, Gm, **kwargs)
    if coupling == "affine":
        return AffineCoupling(Fm, Gm, adapter=adapter, **kwargs)
    raise ValueError(
        f"create_coupling: unknown coupling {coupling!r}; choose 'additive' or 'affine'"
    )
