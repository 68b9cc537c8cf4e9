"""Residual units: one residual step ``x -> x + f(x)`` of an existing network, with its
skip connection told apart from its residual branch ``f``.

Both conversions of :func:`~invertible_models.make_reversible` rewire the skip connections
and keep the branches, so they need each step in two forms:

- :meth:`ResidualUnit.residual`: ``f(x)`` alone (the momentum method adds it to a velocity);
- :meth:`ResidualUnit.with_skip`: ``alpha * x + f(x)``, the step with its skip connection
  scaled by ``alpha``; at ``alpha = 1`` it is computed exactly as the original network
  computes the step (the two-stream method starts there).

A unit holds the original modules (the same objects, so the same parameters) and calls
them through ``__call__``, so their hooks fire. How a step splits into skip and branch is
known for the architectures :func:`~invertible_models.make_reversible` recognises; for any
other stack of residual blocks, :func:`residual_units` reads a one-line description:
``"x + net(x)"`` (each block adds its submodule ``net`` to its input) or ``"block(x)"``
(each block computes ``x + f(x)`` as a whole, possibly followed by an elementwise
operation such as torchvision's ReLU after the sum; then ``f(x) = block(x) - x``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "Branch",
    "IdentityUnit",
    "ResidualUnit",
    "WholeBlock",
    "parse_residual",
]


class ResidualUnit(nn.Module):
    """One residual step of a network, ``x -> x + f(x)``; subclasses say where ``f`` is.

    ``forward`` computes the step as the original network does (``with_skip`` at 1).
    Side inputs (masks) are passed on to the branch where the unit uses them.
    """

    def residual(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """``f(x)``: the residual branch alone."""
        raise NotImplementedError

    def with_skip(self, x: Tensor, alpha: float, *args: Any, **kwargs: Any) -> Tensor:
        """``alpha * x + f(x)``; at ``alpha = 1`` the original step, computed as it was."""
        raise NotImplementedError

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.with_skip(x, 1.0, *args, **kwargs)


class Branch(ResidualUnit):
    """A step whose block computes ``x + branch(x)`` and nothing else.

    Args:
        branch: the residual branch module (called as ``branch(x, *side_inputs)``).
        side_inputs: pass the side inputs (masks) on to ``branch``.
    """

    def __init__(self, branch: nn.Module, side_inputs: bool = False) -> None:
        super().__init__()
        self.branch = branch
        self.side_inputs = side_inputs

    def residual(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.side_inputs:
            return self.branch(x, *args, **kwargs)  # type: ignore[no-any-return]
        return self.branch(x)  # type: ignore[no-any-return]

    def with_skip(self, x: Tensor, alpha: float, *args: Any, **kwargs: Any) -> Tensor:
        f = self.residual(x, *args, **kwargs)
        return x + f if alpha == 1.0 else alpha * x + f


class WholeBlock(ResidualUnit):
    """A block that computes its step as a whole, ``block(x) = x + f(x)`` (possibly followed
    by an elementwise operation: torchvision's ReLU after the sum, a post-norm layer's
    normalisation); the branch is ``f(x) = block(x) - x``, as momentumnet treats a block
    given with ``is_residual=False``.

    Args:
        block: the block (called as ``block(x, *side_inputs)``).
        side_inputs: pass the side inputs on to ``block``.
    """

    def __init__(self, block: nn.Module, side_inputs: bool = False) -> None:
        super().__init__()
        self.block = block
        self.side_inputs = side_inputs

    def _call(self, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        if self.side_inputs:
            return self.block(x, *args, **kwargs)  # type: ignore[no-any-return]
        return self.block(x)  # type: ignore[no-any-return]

    def residual(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self._call(x, args, kwargs) - x

    def with_skip(self, x: Tensor, alpha: float, *args: Any, **kwargs: Any) -> Tensor:
        out = self._call(x, args, kwargs)
        return out if alpha == 1.0 else out - (1.0 - alpha) * x


class IdentityUnit(ResidualUnit):
    """The step that does nothing (``f = 0``): the partner of a lone unit in a two-stream
    coupling, which needs units in pairs."""

    def residual(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return torch.zeros_like(x)

    def with_skip(self, x: Tensor, alpha: float, *args: Any, **kwargs: Any) -> Tensor:
        return x if alpha == 1.0 else alpha * x


_BRANCH = re.compile(r"x\s*\+\s*([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\s*\(\s*x\s*\)")
_WHOLE = re.compile(r"block\s*\(\s*x\s*\)")


def parse_residual(description: str) -> Callable[[nn.Module, str], ResidualUnit]:
    """The unit maker for a one-line description of where each block's residual branch is.

    ``"x + net(x)"``: each block ``b`` computes ``x + b.net(x)`` (any dotted submodule path);
    ``"block(x)"``: each block computes ``x + f(x)`` as a whole (``f = block(x) - x``).
    The maker is called with a block and its path (for error messages) and raises
    ``ValueError`` naming the block when it has no such submodule.
    """
    if not isinstance(description, str):
        raise TypeError(
            f"residual must be a string such as 'x + net(x)' or 'block(x)', got "
            f"{type(description).__name__}"
        )
    if _WHOLE.fullmatch(description.strip()):
        return lambda block, path: WholeBlock(block)
    match = _BRANCH.fullmatch(description.strip())
    if match is None:
        raise ValueError(
            f"residual={description!r} does not say where the residual branch is; write "
            "'x + net(x)' when each block computes x plus its submodule net applied to x "
            "(any submodule path, e.g. 'x + layers.mlp(x)'), or 'block(x)' when each block "
            "computes x + f(x) as a whole (then f(x) = block(x) - x)"
        )
    path = match.group(1)

    def make(block: nn.Module, where: str) -> ResidualUnit:
        try:
            branch = block.get_submodule(path)
        except AttributeError:
            raise ValueError(
                f"residual={description!r}: the block at {where!r} ({type(block).__name__}) "
                f"has no submodule {path!r}; its submodules are "
                f"{', '.join(n for n, _ in block.named_children()) or '(none)'}"
            ) from None
        return Branch(branch)

    return make
