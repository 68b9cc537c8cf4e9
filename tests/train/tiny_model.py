"""Tiny networks registered in the zoo's public registry for the harness tests.

``tiny`` trains on 8x8 synthetic images in well under a second (``signal_at=N`` makes it
send itself SIGINT during its N-th training forward); ``tiny_nan`` is the same network
producing NaN logits from its sixth training forward on, to test the non-finite stop; ``tiny_flow`` is a density model (``log_prob`` and ``sample``): an elementwise affine
flow onto a standard normal, whose exact log-likelihood is known in closed form.
Registered in-process by ``conftest.py`` and in subprocesses by ``launch.py``.
"""

from __future__ import annotations

import math
import signal
from typing import Any

import torch
from torch import nn

from invertible_models import register_model


class TinyNet(nn.Module):
    """conv-BN-ReLU twice, global pool, linear: learns synthetic data in tens of steps."""

    def __init__(
        self,
        num_classes: int = 10,
        width: int = 8,
        nan_after: int | None = None,
        in_channels: int = 3,
        signal_at: int | None = None,
    ):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(width, num_classes)
        self.nan_after = nan_after
        self.signal_at = signal_at
        self.training_forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.body(x))
        if self.training:
            self.training_forwards += 1
            if self.nan_after is not None and self.training_forwards > self.nan_after:
                logits = logits * float("nan")
            if self.training_forwards == self.signal_at:
                signal.raise_signal(signal.SIGINT)
        return logits


class TinyFlow(nn.Module):
    """``z = (x - shift) * exp(log_scale)`` per dimension, ``z ~ N(0, 1)``.

    ``log_prob(x) = sum(log N(z; 0, 1)) + sum(log_scale)`` exactly (the log-determinant of
    an elementwise affine map), and ``sample(n)`` inverts the map.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 8) -> None:
        super().__init__()
        shape = (in_channels, image_size, image_size)
        self.shift = nn.Parameter(torch.full(shape, 0.5))
        self.log_scale = nn.Parameter(torch.zeros(shape))
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) * self.log_scale.exp()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        z = self(x)
        gaussian = -0.5 * (z * z + math.log(2 * math.pi))
        return (gaussian + self.log_scale).flatten(1).sum(1)

    def sample(self, n: int) -> torch.Tensor:
        z = torch.randn(n, *self.shape, device=self.shift.device)
        return self.shift + z * (-self.log_scale).exp()


def tiny(num_classes: int = 10, memory_saving: bool = True, **options: Any) -> TinyNet:
    """The tiny test network (``memory_saving`` is accepted and has nothing to save)."""
    return TinyNet(num_classes, **options)


def tiny_nan(num_classes: int = 10, memory_saving: bool = True, **options: Any) -> TinyNet:
    """The tiny network, diverging (NaN logits) from its sixth training step on."""
    return TinyNet(num_classes, nan_after=5, **options)


def tiny_flow(num_classes: int = 10, **options: Any) -> TinyFlow:
    """The tiny density model (``num_classes`` is accepted and ignored)."""
    return TinyFlow(**options)


def register() -> None:
    """Add the tiny models to ``invertible_models``' registry (idempotent)."""
    register_model(tiny)
    register_model(tiny_nan)
    register_model(tiny_flow)
