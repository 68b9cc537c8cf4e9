"""The two-stream method: consecutive residual steps of an existing network rewired into
couplings, with the scale factors of Dr2Net (Zhao et al., CVPR 2024) that let the converted
network start where the original was (MEFT, Liao et al., NeurIPS 2023, and RevViT's
two residual streams are the same wiring at other factors).

Two consecutive steps ``h1 = h0 + f(h0)`` and ``h2 = h1 + g(h1)`` become one coupling over
two streams ``(x1, x2)``, both started from the run's input:

    y1 = beta * x1 + (alpha * x2 + f(x2))
    y2 = beta * x2 + (alpha * y1 + g(y1))

``alpha`` scales the original skip connection, ``beta`` the new one that skips two steps.
At ``alpha = 1, beta = 0`` this is the original network exactly (``y1 = h1``, ``y2 = h2``)
but not invertible; the inverse, ``x2 = (y2 - alpha y1 - g(y1)) / beta`` and likewise
``x1``, divides by ``beta``, so a small ``beta`` starts close to the original (the output
moves by about ``beta``, measured in the package README) and amplifies float rounding of
the reconstruction by about ``1 / beta`` per step. Dr2Net's remedy is a schedule: fine-tune
while moving ``alpha`` towards 0 and ``beta`` towards 1, where each coupling is RevNet's
``y1 = x1 + f(x2)`` and the inverse is well-conditioned
(:class:`~invertible_models.conversion.CoefficientSchedule`; ``alpha = 1, beta = 1`` is
invertible too, but its skip connections add up like a Fibonacci sequence and so does the
rounding error). A run with an odd number of steps pairs the last one with the identity
step. The run's output is the second stream.

As a coupling of the core over ``(x1, x2)`` (two halves along dim 0) this is an affine
coupling whose ``Fm`` and ``Gm`` return the constant scale ``beta`` and the shifts
``alpha x + f(x)``, ``alpha y + g(y)``: ``invertible_core.AffineCoupling`` runs it with its
fused one-recompute backward.

Near the original the inverse is ill-conditioned whatever ``beta`` is: with ``alpha = 1``
each coupling's skip connections add the two streams (the rounding error of a rebuilt
activation grows like a Fibonacci sequence, by ``(1 + Lip f) / beta`` per half), so on a
long run it swamps the activations (measured on a 12-block ViT-S: memory-saving gradients
100% off plain autograd's, in float64 too). So the method anchors every coupling by default
(``anchor_every=1``: the exact state after each coupling is kept, as much memory as
checkpointing every block, gradients exact); once a schedule has brought ``alpha`` down
(0.25 at 12 blocks: 1e-3 in float32; 0: 3e-6), ``model.anchor_every = 0`` makes the memory
flat in depth.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from invertible_core import AffineCoupling
from invertible_models.conversion.method import Coefficients, ConversionMethod, constant_like
from invertible_models.conversion.units import IdentityUnit, ResidualUnit

__all__ = ["DEFAULT_BETA", "TwoStream", "TwoStreamCoefficients", "TwoStreamStep"]

#: the new skip connection's scale at conversion (see the package README for what it costs)
DEFAULT_BETA = 0.1


class TwoStreamCoefficients(Coefficients):
    """``alpha`` in [0, 1] scales the original skip connections (default 1), ``beta`` in
    (0, 1] the new two-step ones (default :data:`DEFAULT_BETA`)."""

    names = ("alpha", "beta")

    def __init__(self, alpha: float = 1.0, beta: float = DEFAULT_BETA) -> None:
        super().__init__(alpha=alpha, beta=beta)

    def check(self, name: str, value: float) -> float:
        if name == "alpha" and not 0.0 <= value <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {value}")
        if name == "beta" and not 0.0 < value <= 1.0:
            raise ValueError(
                f"beta must be in (0, 1], got {value}: at 0 the coupling is the original "
                "network but cannot be inverted (the inverse divides by beta)"
            )
        return value


class TwoStreamStep(nn.Module):
    """``Fm`` or ``Gm`` of a two-stream coupling: ``(beta, alpha * x + f(x))``."""

    def __init__(self, unit: ResidualUnit, coefficients: TwoStreamCoefficients) -> None:
        super().__init__()
        self.unit = unit
        self.coefficients = coefficients

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        shift = self.unit.with_skip(x, self.coefficients.alpha, *args, **kwargs)
        return constant_like(self.coefficients.beta, shift), shift


class TwoStream(ConversionMethod):
    """``method="two_stream"``: one affine coupling per two residual units, state
    ``(x1, x2)`` started as ``(x, x)``."""

    name = "two_stream"
    coefficients_type = TwoStreamCoefficients
    # near the original (alpha = 1) the inverse of a long run is ill-conditioned at any beta:
    # measured, the memory-saving gradients of a 12-block ViT-S differ from plain autograd's
    # by 100% even in float64 without anchors, by 1e-7 with one after every coupling
    default_anchor_every = 1

    def couplings(self, units: list[ResidualUnit], coefficients: Coefficients) -> list[nn.Module]:
        assert isinstance(coefficients, TwoStreamCoefficients)
        paired = list(units) + ([IdentityUnit()] if len(units) % 2 else [])
        return [
            AffineCoupling(
                TwoStreamStep(paired[i], coefficients),
                TwoStreamStep(paired[i + 1], coefficients),
                split_dim=0,
            )
            for i in range(0, len(paired), 2)
        ]

    def lift(self, x: Tensor) -> Tensor:
        return torch.cat([x, x], dim=0)
