"""Invertibility checks that leave the module and the program exactly as they were."""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["is_invertible_module"]

Shape = Sequence[int] | torch.Size


def _dims(obj: object) -> tuple[int, ...] | None:
    """``obj`` as a shape (sizes >= 0, no bools), or None if it is not one."""
    if not isinstance(obj, (tuple, list, torch.Size)):
        return None
    dims = []
    for d in obj:
        if isinstance(d, bool):
            return None
        try:
            size = operator.index(d)  # ints, and integer scalars such as numpy's
        except TypeError:
            return None
        if size < 0:
            return None
        dims.append(size)
    return tuple(dims)


def _shapes(test_input_shape: object) -> list[tuple[int, ...]]:
    """One shape per input: ``test_input_shape`` is one shape or a non-empty tuple of them."""
    single = _dims(test_input_shape)
    if single is not None:
        return [single]
    if isinstance(test_input_shape, (tuple, list)) and test_input_shape:
        shapes = [s for s in map(_dims, test_input_shape) if s is not None]
        if len(shapes) == len(test_input_shape):
            return shapes
    raise ValueError(
        "is_invertible_module: test_input_shape must be a tuple of ints (sizes >= 0), or a "
        "tuple of such tuples for a module with several inputs, for example (2, 3, 8, 8) or "
        f"((2, 4), (2, 4)); got {test_input_shape!r} ({type(test_input_shape).__name__})"
    )


def _as_tuple(out: object, what: str) -> tuple[Tensor, ...]:
    outputs = out if isinstance(out, tuple) else (out,)
    if not outputs or not all(isinstance(t, Tensor) for t in outputs):
        raise TypeError(
            f"is_invertible_module: {what} must return a tensor or a tuple of tensors, got "
            f"{type(out).__name__}"
        )
    return outputs


def _same_memory(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` occupy the same bytes (one tensor, or a view of all of it).

    Disjoint views of one storage, such as the two halves of a ``torch.chunk``, do not.
    """
    return (
        a.numel() > 0
        and a.device == b.device
        and a.data_ptr() == b.data_ptr()
        and a.numel() * a.element_size() == b.numel() * b.element_size()
    )


def _warn_shared(inputs: tuple[Tensor, ...], outputs: tuple[Tensor, ...], direction: str) -> None:
    # stacklevel 4: _warn_shared <- run <- is_invertible_module <- its caller
    if any(_same_memory(x, y) for x in inputs for y in outputs):
        warnings.warn(
            f"is_invertible_module: an output of {direction} shares memory with an input (an "
            "in-place or identity module?); such a module overwrites or aliases its caller's "
            "tensor, and the memory-saving wrappers cannot release its input",
            UserWarning,
            stacklevel=4,
        )
    if any(_same_memory(a, b) for i, a in enumerate(outputs) for b in outputs[i + 1 :]):
        warnings.warn(
            f"is_invertible_module: outputs of {direction} share memory with each other (the "
            "same tensor returned twice?); is that what you want?",
            UserWarning,
            stacklevel=4,
        )


def _warn_zeros(tensors: tuple[Tensor, ...]) -> None:
    if any(not torch.any(t != 0) for t in tensors):
        warnings.warn(
            "is_invertible_module: an input or output is all zeros; the check proves little",
            UserWarning,
            stacklevel=3,  # _warn_zeros <- is_invertible_module <- its caller
        )


@contextmanager
def _untouched(module: nn.Module) -> Iterator[None]:
    """Restore parameters, buffers, train/eval flags and every RNG on exit.

    Parameters are restored too because some layers set them from the data they first see
    (``ActNorm``'s initialisation). Only values that changed are written back, so that no
    version counter moves and an autograd graph built before the check stays usable.
    """
    modes = [(m, m.training) for m in module.modules()]
    state = [(t, t.detach().clone()) for t in (*module.parameters(), *module.buffers())]
    devices = [d for d in {t.device for t, _ in state} if d.type == "cuda"]
    try:
        with torch.random.fork_rng(devices=devices, enabled=True):
            yield
    finally:
        with torch.no_grad():
            for t, saved in state:
                if not torch.equal(t, saved):
                    t.copy_(saved)
        for m, training in modes:
            m.training = training


def is_invertible_module(
    module_in: nn.Module,
    test_input_shape: Shape | Sequence[Shape],
    test_input_dtype: torch.dtype = torch.float32,
    atol: float = 1e-6,
    random_seed: int = 42,
) -> bool:
    """Whether ``module_in.inverse(module_in(x)) ~ x`` and ``module_in(module_in.inverse(y)) ~ y``.

    Random inputs ``x`` of ``test_input_shape`` (one shape, or a tuple of shapes for a module
    with several inputs) are drawn from a private generator seeded with ``random_seed``;
    ``y = module_in(x)`` are the forward's outputs, so a module may return more, fewer or
    differently shaped tensors than it takes (a split, a downsampling). Both round trips run
    under ``torch.no_grad()`` in the module's current mode and must agree within ``atol``.
    Returns ``False`` for a module without ``inverse``; raises ``ValueError`` for a
    ``test_input_shape`` that is not a shape.

    Warns when an input or output is all zeros (the check proves little), when an output
    occupies the same memory as an input (an in-place or identity module), and when two
    outputs are the same memory; in both directions.

    Unlike MemCNN's version, this has no side effects: the global random state, BatchNorm
    running statistics, every other buffer and parameter (ActNorm's data-dependent
    initialisation included) and train/eval flags are as they were before the call. That
    costs a copy of the module's parameters and buffers while the check runs.
    """
    if not callable(getattr(module_in, "inverse", None)):
        return False
    shapes = _shapes(test_input_shape)
    device = next(
        (t.device for t in (*module_in.parameters(), *module_in.buffers())), torch.device("cpu")
    )
    generator = torch.Generator(device="cpu").manual_seed(random_seed)
    x = tuple(torch.rand(s, generator=generator, dtype=test_input_dtype).to(device) for s in shapes)

    def close(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> bool:
        return len(a) == len(b) and all(
            u.shape == v.shape and torch.allclose(u, v, atol=atol) for u, v in zip(a, b)
        )

    def run(
        fn: Callable[..., Any], inputs: tuple[Tensor, ...], direction: str
    ) -> tuple[Tensor, ...]:
        # the module gets copies, so an in-place module cannot fake a round trip
        given = tuple(t.clone() for t in inputs)
        outputs = _as_tuple(fn(*given), direction)
        _warn_shared(given, outputs, direction)
        return outputs

    with _untouched(module_in), torch.no_grad():
        inverse: Callable[..., Any] = module_in.inverse  # type: ignore[assignment]
        y = run(module_in, x, "forward")
        _warn_zeros((*x, *y))
        x_back = run(inverse, y, "inverse")
        return close(x_back, x) and close(run(module_in, x_back, "forward"), y)
