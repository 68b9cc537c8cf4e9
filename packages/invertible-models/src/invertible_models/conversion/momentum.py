"""The momentum method: momentum residual networks (Sander, Ablin, Blondel and Peyré, ICML
2021) from an existing network's residual branches.

A residual step ``x <- x + f(x)`` becomes

    v <- gamma * v + (1 - gamma) * f(x)
    x <- x + v

with a velocity ``v`` that starts at zero at each run of converted steps. Its inverse is
closed-form, ``x <- x - v``, then ``v <- (v - (1 - gamma) * f(x)) / gamma``, so the
activations need not be stored. As a coupling of the core over the state ``(v, x)`` (two
halves along dim 0) it is an affine coupling whose ``Fm`` returns the constant scale
``gamma`` and the shift ``(1 - gamma) f(x)`` (``v' = gamma v + (1 - gamma) f(x)``), and
whose ``Gm`` returns the scale 1 and the shift ``v'`` itself (``x' = x + v'``):
``invertible_core.AffineCoupling`` runs it with its fused one-recompute backward.

Where it starts: at ``gamma -> 0`` the step is the original ``x + f(x)``, but the inverse
divides by ``gamma``; the paper's and momentumnet's default ``gamma = 0.9`` is
well-conditioned and changes the function (the velocity reaches ``f`` only after a few
steps), so a converted pretrained network starts away from the original and is fine-tuned
from there, as the paper does. The distance at conversion is measured in the package
README. Exact up to float rounding: the core has no fixed-point arithmetic for affine
couplings (momentumnet keeps an exact integer representation of ``v`` instead), so float32
reconstruction error grows by about ``1 / gamma`` per step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from invertible_core import AffineCoupling
from invertible_models.conversion.method import Coefficients, ConversionMethod, constant_like
from invertible_models.conversion.units import ResidualUnit

__all__ = ["Momentum", "MomentumCoefficients", "MomentumStep", "VelocityStep"]


class MomentumCoefficients(Coefficients):
    """``gamma``: the momentum term, in (0, 1) (default 0.9, as the paper and momentumnet)."""

    names = ("gamma",)

    def __init__(self, gamma: float = 0.9) -> None:
        super().__init__(gamma=gamma)

    def check(self, name: str, value: float) -> float:
        if not 0.0 < value < 1.0:
            raise ValueError(
                f"gamma must be in (0, 1), got {value}: at 0 the velocity forgets everything "
                "and the step cannot be inverted; at 1 it ignores the residual branch"
            )
        return value


class MomentumStep(nn.Module):
    """``Fm`` of a momentum coupling: ``(gamma, (1 - gamma) * f(x))`` for the velocity."""

    def __init__(self, unit: ResidualUnit, coefficients: MomentumCoefficients) -> None:
        super().__init__()
        self.unit = unit
        self.coefficients = coefficients

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        gamma = self.coefficients.gamma
        f = self.unit.residual(x, *args, **kwargs)
        return constant_like(gamma, f), (1.0 - gamma) * f


class VelocityStep(nn.Module):
    """``Gm`` of a momentum coupling: scale 1 and the new velocity as the shift
    (``x' = x + v'``). No parameters; side inputs are ignored."""

    def forward(self, v: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        return constant_like(1.0, v), v


class Momentum(ConversionMethod):
    """``method="momentum"``: one affine coupling per residual unit, state ``(v, x)``."""

    name = "momentum"
    coefficients_type = MomentumCoefficients

    def couplings(self, units: list[ResidualUnit], coefficients: Coefficients) -> list[nn.Module]:
        assert isinstance(coefficients, MomentumCoefficients)
        return [
            AffineCoupling(MomentumStep(unit, coefficients), VelocityStep(), split_dim=0)
            for unit in units
        ]

    def lift(self, x: Tensor) -> Tensor:
        return torch.cat([torch.zeros_like(x), x], dim=0)
