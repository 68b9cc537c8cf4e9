"""Measurements the conversion tests share (here and in ``with_torchvision/``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def relative_l2(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm())


def flat_grads(params: list[nn.Parameter]) -> Tensor:
    """The gradients of ``params``, concatenated (zeros where one got none)."""
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    )


def gradients(model: nn.Module, run: Callable[[], Tensor], memory_saving: bool) -> Tensor:
    """Every parameter's gradient of ``run()``'s output summed with fixed random weights,
    with the model's ``memory_saving`` switch set as given (the random state reset so that
    dropout draws the same masks in both modes)."""
    model.memory_saving = memory_saving
    params = list(model.parameters())
    for p in params:
        p.grad = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        out = run()
        weights = torch.randn(
            out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(2)
        )
        (out * weights).sum().backward()
    return flat_grads(params)


def saving_gradient_error(model: nn.Module, run: Callable[[], Tensor]) -> float:
    """Relative L2 distance of the gradients with memory saving from plain autograd's."""
    model.train()
    saved = gradients(model, run, memory_saving=True)
    plain = gradients(model, run, memory_saving=False)
    assert plain.norm() > 0
    return relative_l2(saved, plain)


def output_distance(
    converted: nn.Module, original: nn.Module, run: Callable[[nn.Module], Tensor]
) -> float:
    """Relative L2 distance of the converted network's output from the original's, in eval
    mode without grad."""
    converted.eval()
    original.eval()
    with torch.no_grad():
        return relative_l2(run(converted), run(original))
