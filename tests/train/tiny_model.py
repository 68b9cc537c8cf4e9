"""Tiny networks registered in the zoo's public registry for the harness tests.

``tiny`` trains on 8x8 synthetic images in well under a second; ``tiny_nan`` is the same
network producing NaN logits from its sixth training forward on, to test the non-finite
stop. Registered in-process by ``conftest.py`` and in subprocesses by ``launch.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from invertible_models import register_model


class TinyNet(nn.Module):
    """conv-BN-ReLU twice, global pool, linear: learns synthetic data in tens of steps."""

    def __init__(self, num_classes: int = 10, width: int = 8, nan_after: int | None = None):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
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
        self.training_forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.body(x))
        if self.training:
            self.training_forwards += 1
            if self.nan_after is not None and self.training_forwards > self.nan_after:
                logits = logits * float("nan")
        return logits


def tiny(num_classes: int = 10, memory_saving: bool = True, **options: Any) -> TinyNet:
    """The tiny test network (``memory_saving`` is accepted and has nothing to save)."""
    return TinyNet(num_classes, **options)


def tiny_nan(num_classes: int = 10, memory_saving: bool = True, **options: Any) -> TinyNet:
    """The tiny network, diverging (NaN logits) from its sixth training step on."""
    return TinyNet(num_classes, nan_after=5, **options)


def register() -> None:
    """Add ``tiny`` and ``tiny_nan`` to ``invertible_models``' registry (idempotent)."""
    register_model(tiny)
    register_model(tiny_nan)
