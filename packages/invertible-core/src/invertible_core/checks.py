"""Invertibility checks that leave the module and the program exactly as they were."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["is_invertible_module"]

Shape = Sequence[int] | torch.Size


def _is_shape(obj: object) -> bool:
    return isinstance(obj, (tuple, list, torch.Size)) and all(isinstance(d, int) for d in obj)


@contextmanager
def _untouched(module: nn.Module) -> Iterator[None]:
    """Restore buffers (BatchNorm statistics), train/eval flags and every RNG on exit."""
    modes = [(m, m.training) for m in module.modules()]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    devices = [d for d in {b.device for b in module.parameters()} if d.type == "cuda"]
    try:
        with torch.random.fork_rng(devices=devices, enabled=True):
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
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

    Random inputs of ``test_input_shape`` (one shape, or a tuple of shapes for a module with
    several inputs) are drawn from a private generator seeded with ``random_seed``; both
    round trips run under ``torch.no_grad()`` in the module's current mode and must agree
    within ``atol``. Returns ``False`` for a module without ``inverse``. Warns when inputs
    or outputs are all zeros or when an output shares memory with an input (an in-place
    module cannot be checked this way).

    Unlike MemCNN's version, this has no side effects: the global random state, BatchNorm
    running statistics and train/eval flags are as they were before the call.
    """
    if not callable(getattr(module_in, "inverse", None)):
        return False
    shapes: list[Any] = (
        [test_input_shape] if _is_shape(test_input_shape) else list(test_input_shape)
    )  # type: ignore[arg-type]
    if not shapes or not all(_is_shape(s) for s in shapes):
        raise ValueError(
            "is_invertible_module: test_input_shape must be a tuple of ints, or a tuple of such "
            f"tuples for a module with several inputs; got {test_input_shape!r}"
        )
    device = next((p.device for p in module_in.parameters()), torch.device("cpu"))
    generator = torch.Generator(device="cpu").manual_seed(random_seed)

    def draw() -> tuple[Tensor, ...]:
        return tuple(
            torch.rand(tuple(s), generator=generator, dtype=test_input_dtype).to(device)
            for s in shapes
        )

    def as_tuple(out: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return out if isinstance(out, tuple) else (out,)

    def close(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> bool:
        return len(a) == len(b) and all(
            x.shape == y.shape and torch.allclose(x, y, atol=atol) for x, y in zip(a, b)
        )

    def warn_suspicious(inputs: tuple[Tensor, ...], outputs: tuple[Tensor, ...]) -> None:
        for t in (*inputs, *outputs):
            if not torch.any(t != 0):
                warnings.warn(
                    "is_invertible_module: an input or output is all zeros; the "
                    "check proves little",
                    UserWarning,
                    stacklevel=3,
                )
                break
        for x in inputs:
            for y in outputs:
                if x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr():
                    warnings.warn(
                        "is_invertible_module: an output shares memory with an input "
                        "(an in-place module?); the round trip may be meaningless",
                        UserWarning,
                        stacklevel=3,
                    )

    def round_trip(there: Callable[..., Any], back: Callable[..., Any]) -> bool:
        # the module gets copies, so an in-place module cannot fake a round trip
        start = draw()
        given = tuple(t.clone() for t in start)
        out = as_tuple(there(*given))
        warn_suspicious(given, out)
        return close(as_tuple(back(*(t.clone() for t in out))), start)

    with _untouched(module_in), torch.no_grad():
        inverse: Callable[..., Any] = module_in.inverse  # type: ignore[assignment]
        return round_trip(module_in, inverse) and round_trip(inverse, module_in)
