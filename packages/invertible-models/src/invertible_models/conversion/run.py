"""A run: consecutive residual units of an existing network as one reversible chain.

:class:`ReversibleRun` lifts its input into the method's two-part state (velocity and
activation, or two streams), runs the units' couplings through ONE
``invertible_core.ReversibleSequence``, and lowers the result back to an activation of the
input's shape (in float32 when the input is half precision, as under autocast: the
units compute in half precision, the sums stay float32). While training with
``memory_saving`` on, the sequence keeps only its final
state (twice the activation) and rebuilds every unit's input in backward, so the run's
memory does not grow with the number of units; off, it is plain autograd with the same
parameters. Side inputs (attention masks) reach every unit.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from invertible_core import ReversibleSequence
from invertible_models.blocks import float32_stream
from invertible_models.conversion.method import Coefficients, ConversionMethod
from invertible_models.conversion.units import ResidualUnit

__all__ = ["ReversibleRun"]


class ReversibleRun(nn.Module):
    """Residual units computed by a conversion method's couplings, memory flat in their number.

    Args:
        units: the residual units, in the network's order.
        method: the conversion method (momentum or two-stream).
        coefficients: the method's coefficients, shared with the network's other runs.
        memory_saving: rebuild activations in backward instead of storing them.
        anchor_every: keep the exact state after every k-th coupling (0: none), bounding
            how far float rounding of the rebuilt activations can grow (the core's option).

    Attributes:
        blocks: the ``ReversibleSequence`` of couplings (its ``keep_blocks``,
            ``anchor_every``, ``drift_check`` work as documented in the core).
    """

    def __init__(
        self,
        units: list[ResidualUnit],
        method: ConversionMethod,
        coefficients: Coefficients,
        memory_saving: bool = True,
        anchor_every: int = 0,
    ) -> None:
        super().__init__()
        if not units:
            raise ValueError("a ReversibleRun needs at least one residual unit")
        self.method = method
        self.num_units = len(units)
        self.blocks = ReversibleSequence(
            method.couplings(units, coefficients),
            memory_saving=memory_saving,
            anchor_every=anchor_every,
        )

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        # under autocast the units compute in half precision, but the stream they add into
        # stays float32 (the zoo's reversible chains do the same): rebuilding inputs by
        # subtraction in 8 bits of mantissa would drift
        out = self.blocks(self.method.lift(float32_stream(x)), *args, **kwargs)
        return self.method.lower(out, x.shape[0])

    def extra_repr(self) -> str:
        return f"method={self.method.name!r}, units={self.num_units}"
