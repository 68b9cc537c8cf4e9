"""A tiny network registered for the harness tests, where the model itself does not matter.

``invertible_models.create_model`` is wrapped so that ``tiny`` (and ``tiny-nan``, which
produces NaN logits from its sixth training forward on, to test the non-finite stop) build
here, and every other name goes to the real registry. Used in-process by ``conftest.py``
and in subprocesses by ``launch.py``.
"""

from __future__ import annotations

from typing import Any

import invertible_models
import torch
from torch import nn

TINY_MODELS = ("tiny", "tiny-nan")


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


def register() -> None:
    """Make ``tiny`` and ``tiny-nan`` available through ``invertible_models.create_model``."""
    real_create = getattr(invertible_models, "create_model", None)
    real_list = getattr(invertible_models, "list_models", None)
    if getattr(real_create, "_tiny_wrapper", False):
        return

    def create_model(name: str, num_classes: int = 10, memory_saving: bool = True, **options: Any):
        if name == "tiny":
            return TinyNet(num_classes, **options)
        if name == "tiny-nan":
            return TinyNet(num_classes, nan_after=5, **options)
        if real_create is None:
            raise KeyError(f"unknown model {name!r} (invertible_models has no registry yet)")
        return real_create(name, num_classes=num_classes, memory_saving=memory_saving, **options)

    def list_models() -> list[str]:
        return sorted([*TINY_MODELS, *(real_list() if real_list is not None else [])])

    create_model._tiny_wrapper = True  # type: ignore[attr-defined]
    invertible_models.create_model = create_model  # type: ignore[attr-defined]
    invertible_models.list_models = list_models  # type: ignore[attr-defined]
