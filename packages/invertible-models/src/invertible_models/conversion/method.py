"""What a conversion method is: residual units in, couplings out, and the state they carry.

A method (:mod:`~invertible_models.conversion.momentum`,
:mod:`~invertible_models.conversion.two_stream`) turns consecutive residual units of a
network into invertible couplings of the core (``invertible_core.AffineCoupling``) over a
state twice the size of the network's activation: the two halves along dim 0 (a velocity
and the activation, or two streams). Dim 0 is split whatever the layout (``(batch, ...)``
or a sequence-first ``(tokens, batch, width)``), so every unit sees a tensor of the shape
the original block saw. :meth:`ConversionMethod.lift` builds that state from the run's
input, :meth:`ConversionMethod.lower` takes the run's output from it.

The method's scalars (momentum's ``gamma``, the two-stream ``alpha`` and ``beta``) live in
one :class:`Coefficients` object shared by all couplings of a converted network and read
at every call, so a schedule (:class:`~invertible_models.conversion.CoefficientSchedule`)
or the user can change them between steps (never between a forward pass and its backward:
the memory-saving backward recomputes with the values it finds). They are configuration,
not weights: no parameter and no ``state_dict`` key.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from invertible_models.conversion.units import ResidualUnit

__all__ = ["Coefficients", "ConversionMethod", "constant_like"]


class Coefficients:
    """The named scalars of a conversion method, validated on every change.

    Read them as attributes (``coefficients.beta``), change them with :meth:`set`. A
    subclass lists its :attr:`names` and checks each value in :meth:`check`.
    """

    names: tuple[str, ...] = ()

    def __init__(self, **values: float) -> None:
        self._values: dict[str, float] = {}
        self.set(**values)

    def set(self, **values: float) -> None:
        """Change some coefficients (all checked before any changes)."""
        unknown = sorted(set(values) - set(self.names))
        if unknown:
            raise ValueError(
                f"{type(self).__name__}: unknown coefficient(s) {', '.join(unknown)}; this "
                f"method has {', '.join(self.names)}"
            )
        checked = {}
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"coefficient {name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"coefficient {name} must be finite, got {value!r}")
            checked[name] = self.check(name, float(value))
        self._values.update(checked)

    def check(self, name: str, value: float) -> float:
        """``value`` if it is allowed for ``name``, else ``ValueError`` saying why."""
        return value

    def as_dict(self) -> dict[str, float]:
        """The current values, by name."""
        return dict(self._values)

    def __getattr__(self, name: str) -> float:
        values = self.__dict__.get("_values", {})
        if name in values:
            return float(values[name])
        raise AttributeError(f"{type(self).__name__} has no coefficient {name!r}")

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v:g}" for k, v in self._values.items())
        return f"{type(self).__name__}({inner})"


class ConversionMethod:
    """How residual units become couplings: one object per method, no state of its own."""

    #: the name ``make_reversible(method=...)`` takes
    name: str = ""
    #: the class of the method's coefficients
    coefficients_type: type[Coefficients] = Coefficients
    #: anchors (``anchor_every``) where ``make_reversible`` is given none: what the method's
    #: default coefficients need for memory-saving gradients to equal plain autograd's
    default_anchor_every: int = 0

    def coefficients(self, options: dict[str, Any]) -> Coefficients:
        """The coefficients from ``make_reversible``'s options (defaults for the rest);
        ``ValueError`` naming any option the method does not take."""
        unknown = sorted(set(options) - set(self.coefficients_type.names))
        if unknown:
            raise ValueError(
                f"make_reversible(method={self.name!r}) takes no option "
                f"{', '.join(unknown)}; its options are "
                f"{', '.join(self.coefficients_type.names)}"
            )
        return self.coefficients_type(**options)

    def couplings(self, units: list[ResidualUnit], coefficients: Coefficients) -> list[nn.Module]:
        """The invertible blocks that compute ``units`` in turn on the lifted state."""
        raise NotImplementedError

    def lift(self, x: Tensor) -> Tensor:
        """The state a run of couplings starts from, given the run's input ``x``."""
        raise NotImplementedError

    def lower(self, state: Tensor, size: int) -> Tensor:
        """The run's output from its final state (``size``: dim 0 of the run's input)."""
        return state[size:]


def constant_like(value: float, like: Tensor) -> Tensor:
    """A tensor of ``like``'s shape, dtype and device holding ``value`` everywhere: a
    coupling's constant scale, as a broadcast view of one number (nothing allocated)."""
    return torch.full((), value, dtype=like.dtype, device=like.device).expand_as(like)
