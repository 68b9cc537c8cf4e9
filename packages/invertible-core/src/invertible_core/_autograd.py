"""A variant of ``torch.autograd.function.once_differentiable`` with our own words."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["once_differentiable"]

_Backward = TypeVar("_Backward", bound=Callable[..., Any])


def once_differentiable(message: str) -> Callable[[_Backward], _Backward]:
    """``torch.autograd.function.once_differentiable`` with our own error message.

    The backward runs without grad; when a caller asked for a differentiable gradient
    (``create_graph=True``), the gradients it returns raise ``message`` if anyone tries to
    differentiate them, instead of torch's generic "differentiate twice" text. A first-order
    ``autograd.grad(..., create_graph=True)`` that is never differentiated again still works.
    """

    def decorate(backward: _Backward) -> _Backward:
        @functools.wraps(backward)
        def wrapper(ctx: Any, *args: Any) -> Any:
            with torch.no_grad():
                outputs = backward(ctx, *args)
            if not torch.is_grad_enabled():
                return outputs
            if not any(isinstance(a, Tensor) and a.requires_grad for a in args):
                return outputs
            single = not isinstance(outputs, tuple)
            outs = (outputs,) if single else outputs
            err = torch._C._functions.DelayedError(message.encode(), len(outs))

            def fake_requires_grad(v: Tensor | None) -> Tensor | None:
                if v is not None:
                    v = v.detach()
                    v.requires_grad = True
                return v

            return err(*[fake_requires_grad(v) for v in outs])  # type: ignore[arg-type]

        return wrapper  # type: ignore[return-value]

    return decorate
