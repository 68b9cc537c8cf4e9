"""Coupling layers: turn any pair of functions into an invertible block.

A coupling splits its input ``x`` into parts ``(x1, x2)`` along ``split_dim`` and computes::

    y1 = couple(x1, Fm(x2))        x2 = decouple(y2, Gm(y1))
    y2 = couple(x2, Gm(y1))        x1 = decouple(y1, Fm(x2))      (the inverse)

``Fm`` and ``Gm`` need not be invertible; ``couple`` must be invertible in its first
argument. :class:`AdditiveCoupling` uses ``x + h``; :class:`AffineCoupling` uses
``x * s + t`` with ``(s, t) = Fm(x2)``. Side inputs given to the coupling (or to the
sequence around it) are passed on: ``Fm(x2, *args, **kwargs)`` and ``Gm(y1, *args,
**kwargs)``; ``side_inputs='Fm'`` or ``'Gm'`` sends them to one of the two only.

The inverse calls ``Fm`` and ``Gm`` on the same values as the forward (``x2`` and ``y1``), so
both are shared calls (:func:`~invertible_core.shared_call`): a memory-saving recompute
computes each of them once, with grad, and uses the result twice, to rebuild the input and to
backpropagate (the RevNet paper's algorithm). To define a new coupling law, subclass
:class:`Coupling` and implement ``_couple`` and ``_decouple`` (and ``_logdet`` for a law that
changes volume); autograd differentiates the law.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from invertible_core.adapters import AffineAdapterNaive, AffineAdapterSigmoid
from invertible_core.fixed_point import (
    GridRange,
    grid_of,
    mark_on_grid,
    round_term_to_grid,
    round_to_grid,
)
from invertible_core.recompute import report_logdet, shared_call, wants_logdet, with_logdet

__all__ = [
    "AdditiveCoupling",
    "AffineAdapterNaive",
    "AffineAdapterSigmoid",
    "AffineCoupling",
    "Coupling",
    "CouplingTerm",
    "Partition",
    "UnknownCouplingError",
    "create_coupling",
]

#: What ``Fm``/``Gm`` produce inside a coupling: a tensor (additive) or ``(scale, shift)``.
CouplingTerm = Tensor | tuple[Tensor, ...]
#: What a coupling takes and returns: a tensor, or its two parts along ``split_dim``.
Parts = Tensor | tuple[Tensor, Tensor]
SideRoute = Literal["both", "Fm", "Gm", "none"]


def _terms(h: CouplingTerm) -> tuple[Tensor, ...]:
    return h if isinstance(h, tuple) else (h,)


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


def _dense(x: Tensor) -> Tensor:
    """``x`` densely laid out, keeping a channels-last layout channels-last."""
    if x.dim() == 4 and x.stride(1) == 1 and x.shape[1] > 1:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


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


@dataclass(frozen=True)
class Partition:
    """How a coupling cuts its input: two parts along ``dim``.

    ``sizes=None`` means two equal halves; ``(a, b)`` gives the parts' sizes.
    """

    dim: int = 1
    sizes: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.dim, int) or isinstance(self.dim, bool):
            raise TypeError(f"split_dim must be an int, got {type(self.dim).__name__}")
        if self.sizes is not None:
            sizes = tuple(self.sizes)
            if len(sizes) != 2 or not all(
                isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes
            ):
                raise ValueError(
                    f"split_sizes must be two positive ints (a, b), got {self.sizes!r}"
                )
            object.__setattr__(self, "sizes", sizes)

    def split(self, x: Tensor, who: str = "coupling") -> tuple[Tensor, Tensor]:
        """The two parts of ``x`` (views, no copy); clear errors for unsplittable inputs."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{who} expects a tensor, got {type(x).__name__}")
        if x.dim() == 0 or not -x.dim() <= self.dim < x.dim():
            raise ValueError(
                f"{who}: split_dim={self.dim} is out of range for an input of shape "
                f"{tuple(x.shape)}"
            )
        size = x.shape[self.dim]
        if self.sizes is None:
            if size % 2 != 0:
                raise ValueError(
                    f"{who} splits dim {self.dim} into two equal halves, but that dim has odd "
                    f"size {size} (input shape {tuple(x.shape)}); use an even size, choose "
                    "another split_dim, or give split_sizes=(a, b)"
                )
            a, b = torch.chunk(x, 2, dim=self.dim)
            return a, b
        if sum(self.sizes) != size:
            raise ValueError(
                f"{who}: split_sizes={self.sizes} add up to {sum(self.sizes)}, but dim "
                f"{self.dim} of the input has size {size} (input shape {tuple(x.shape)})"
            )
        a, b = torch.split(x, list(self.sizes), dim=self.dim)
        return a, b

    def merge(self, parts: tuple[Tensor, Tensor]) -> Tensor:
        """The whole tensor from its two parts."""
        return torch.cat(parts, dim=self.dim)


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

    A subclass implements the law: ``_couple(x, h)``, ``_decouple(y, h)`` (its inverse in
    ``x``) and, unless ``volume_preserving``, ``_logdet(h)``.
    """

    #: The coupling law changes no volume (``log|det J| = 0``): additive couplings.
    volume_preserving = False
    #: :meth:`forward` reports the log-determinant to :meth:`forward_with_logdet`
    reports_logdet = True

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

    def _decouple_into(self, y: Tensor, h: CouplingTerm, out: Tensor) -> Tensor:
        """``_decouple(y, h)`` written into ``out`` (no grad); a law may override it to
        compute there directly, without the copy."""
        return out.copy_(self._decouple(y, h))

    def _logdet(self, h: CouplingTerm) -> Tensor:
        """Per-sample ``log|d couple(x, h) / dx|``, shape ``(batch,)``."""
        raise NotImplementedError(
            f"{type(self).__name__} does not report a log-determinant: implement _logdet(h) "
            "(or set volume_preserving = True for a law with |det J| = 1)"
        )

    def _check_term(self, h: CouplingTerm, half: Tensor, name: str) -> None:
        """Hook for subclasses: raise a clear error when a term does not fit the half."""

    # -- the two maps ---------------------------------------------------------------------------
    def forward(self, x: Parts, *args: Any, **kwargs: Any) -> Parts:
        """``y = merge(couple(x1, Fm(x2)), couple(x2, Gm(y1)))``; side inputs go to Fm/Gm.

        ``x`` may also be the two parts ``(x1, x2)`` as a tuple; then the parts ``(y1, y2)``
        come back, unmerged (a chain of couplings passes them on without concatenating).
        """
        x1, x2 = self._parts(x)
        y1 = self._half(0, x1, x2, +1, args, kwargs)
        y2 = self._half(1, x2, y1, +1, args, kwargs)
        if isinstance(x, tuple):
            return self._marked(y1), self._marked(y2)
        return self._marked(self.partition.merge((y1, y2)))

    def inverse(self, y: Parts, *args: Any, **kwargs: Any) -> Parts:
        """The exact inverse of :meth:`forward` for the same side inputs (parts in, parts out,
        as for :meth:`forward`)."""
        y1, y2 = self._parts(y)
        if isinstance(y, tuple):
            x2 = self._half(1, y2, y1, -1, args, kwargs)
            x1 = self._half(0, y1, x2, -1, args, kwargs)
            return self._marked(x1), self._marked(x2)
        if torch.is_grad_enabled():
            x2 = self._half(1, y2, y1, -1, args, kwargs)
            x1 = self._half(0, y1, x2, -1, args, kwargs)
            return self._marked(self.partition.merge((x1, x2)))
        # without grad (a rebuild, an inverse in eval mode): the parts are written straight
        # into the result, so that no concatenation copies them, and x2 is laid out as a
        # part of a whole tensor, as it was when the forward pass gave it to Fm
        out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
        o1, o2 = self.partition.split(out, type(self).__name__)
        x2 = self._half(1, y2, y1, -1, args, kwargs, out=o2)
        self._half(0, y1, x2, -1, args, kwargs, out=o1)
        return self._marked(out)

    def forward_with_logdet(self, x: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """:meth:`forward` and the per-sample ``log|det dy/dx|`` (shape ``(batch,)``); runs
        through ``__call__``, so hooks see it as a forward."""
        return with_logdet(self, self, x, *args, **kwargs)

    def inverse_with_logdet(self, y: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """:meth:`inverse` and the per-sample ``log|det dx/dy|`` (the forward's, negated)."""
        return with_logdet(self, self.inverse, y, *args, **kwargs)

    def _parts(self, x: Parts) -> tuple[Tensor, Tensor]:
        """The two parts of ``x`` (given as parts, or split), on the grid if fixed-point."""
        if isinstance(x, tuple):
            if len(x) != 2 or not all(isinstance(t, Tensor) for t in x):
                raise TypeError(
                    f"{type(self).__name__} takes a tensor or its two parts (a tuple of two "
                    f"tensors), got a tuple of {len(x)}"
                )
            return self._on_grid(x[0]), self._on_grid(x[1])
        a, b = self.partition.split(self._on_grid(x), type(self).__name__)
        return a, b

    def _on_grid(self, x: Tensor) -> Tensor:
        bits = self.fixed_point_bits
        if bits is None or grid_of(x) == bits:
            return x
        return round_to_grid(x, bits)

    def _marked(self, t: Tensor) -> Tensor:
        return mark_on_grid(t, self.fixed_point_bits)

    def _half(
        self,
        slot: int,
        part: Tensor,
        cond: Tensor,
        sign: int,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        out: Tensor | None = None,
    ) -> Tensor:
        """One half step: ``couple(part, module(cond))`` (``sign=+1``) or its inverse (into
        ``out`` when given: no grad)."""
        module = self.Fm if slot == 0 else self.Gm
        name = "Fm" if slot == 0 else "Gm"
        bits = self.fixed_point_bits
        if bits is not None:
            # the same memory layout in the forward pass and in the recompute, so that
            # convolutions and norms sum in the same order: exactness needs every bit
            cond = _dense(cond)
        if _ROUTES[self.side_inputs][slot]:
            h = shared_call(slot, module, cond, *args, **kwargs)
        else:
            h = shared_call(slot, module, cond)
        self._check_term(h, part, name)
        if bits is not None:
            dtype = part.dtype
            if isinstance(h, tuple):
                h = tuple(round_term_to_grid(t, bits, dtype, (cond,)) for t in h)
            else:
                h = round_term_to_grid(h, bits, dtype, (cond,))
        if not self.volume_preserving and wants_logdet(self):
            logdet = self._logdet(h)
            report_logdet(self, logdet if sign > 0 else -logdet)
        if sign > 0:
            result = self._couple(part, h)
        elif out is not None:
            result = self._decouple_into(part, h, out)
        else:
            result = self._decouple(part, h)
        if bits is not None:
            self._grid_range.observe(result, bits)
        return result

    def extra_repr(self) -> str:
        parts = [f"split_dim={self.split_dim}"]
        if self.split_sizes is not None:
            parts.append(f"split_sizes={self.split_sizes}")
        if self.side_inputs != "both":
            parts.append(f"side_inputs={self.side_inputs!r}")
        if self.fixed_point_bits is not None:
            parts.append(f"fixed_point_bits={self.fixed_point_bits}")
        return ", ".join(parts)


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

    def _decouple_into(self, y: Tensor, h: CouplingTerm, out: Tensor) -> Tensor:
        assert isinstance(h, Tensor)
        return torch.sub(y, h, out=out)


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

    def _decouple_into(self, y: Tensor, h: CouplingTerm, out: Tensor) -> Tensor:
        s, t = h
        return torch.sub(y, t, out=out).div_(s)

    def _logdet(self, h: CouplingTerm) -> Tensor:
        s, _ = h
        return _per_sample_sum(torch.log(torch.abs(s)))


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
    raise UnknownCouplingError(
        f"create_coupling: unknown coupling {coupling!r}; choose 'additive' or 'affine'"
    )


class UnknownCouplingError(ValueError, NotImplementedError):
    """A coupling name :func:`create_coupling` does not know.

    Both a ``ValueError`` (a bad argument) and a ``NotImplementedError`` (what MemCNN raised),
    so code written against either catches it.
    """
