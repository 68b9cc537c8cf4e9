"""Any ``nn.Sequential`` of residual blocks, given where each block's residual branch is.

``make_reversible(stack, residual="x + net(x)")`` reads the one-line description
(:func:`~invertible_models.conversion.units.parse_residual`): every block of the
``nn.Sequential`` adds its submodule ``net`` to its input (or, with ``"block(x)"``, computes
``x + f(x)`` as a whole). The whole stack becomes one reversible run. ``at="path"`` points
at such a stack inside a larger model; the rest of the model stays as it was.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from invertible_models.conversion.context import ConversionContext, ConversionError
from invertible_models.conversion.stage import ReversibleStage
from invertible_models.conversion.units import ResidualUnit

__all__ = ["rewire_sequential"]


def rewire_sequential(
    stack: nn.Module,
    ctx: ConversionContext,
    where: str,
    unit_of: Callable[[nn.Module, str], ResidualUnit],
) -> ReversibleStage:
    """The reversible stage of ``stack``, each block one residual unit by ``unit_of``."""
    label = f"at={where!r}" if where else "the model"
    if not isinstance(stack, nn.Sequential):
        raise ConversionError(
            f"make_reversible(residual=...): {label} is a {type(stack).__name__}, not an "
            "nn.Sequential of residual blocks; pass at='path.to.the.sequential' to point at "
            "one inside the model"
        )
    if type(stack).forward is not nn.Sequential.forward:
        raise ConversionError(
            f"make_reversible(residual=...): {label} is a {type(stack).__name__} with its own "
            "forward, so what it computes from its blocks is unknown; residual= describes a "
            "plain nn.Sequential of residual blocks"
        )
    if len(stack) == 0:
        raise ConversionError(f"make_reversible(residual=...): {label} holds no blocks")
    return ctx.stage(stack.named_children(), lambda b, p: [unit_of(b, p)], where)
