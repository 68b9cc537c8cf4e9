"""Tiny networks registered in the zoo's public registry for the harness tests.

``tiny`` trains on 8x8 synthetic images in well under a second (``signal_at=N`` makes it
send itself SIGINT during its N-th training forward); ``tiny_nan`` is the same network
producing NaN logits from its sixth training forward on, to test the non-finite stop;
``tiny_flow`` is a density model (``log_prob`` and ``sample``): an elementwise affine flow
onto a standard normal, whose exact log-likelihood is known in closed form;
``uniform_density`` is the density model uniform over the levels of the data;
``tiny_revnet`` is the zoo's RevNet at width 8 (a stem, reversible blocks, transitions:
every kind of FSDP unit the harness makes, in milliseconds).
Registered in-process by ``conftest.py`` and in subprocesses by ``launch.py``.
"""

from __future__ import annotations

import math
import signal
from typing import Any

import torch
from torch import nn

from invertible_models import register_model
from invertible_models.flow_blocks import dequantize
from invertible_models.revnet import RevNet


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
    """``z = (y - shift) * exp(log_scale)`` per dimension, ``z ~ N(0, 1)``, on the
    dequantised images ``y = (k + u) / num_bins``.

    ``log_prob(x)`` takes discrete images (levels ``k / (num_bins - 1)``, as the harness
    gives them), dequantises them with the zoo's ``dequantize`` and returns
    ``sum(log N(z; 0, 1)) + sum(log_scale) - D log(num_bins)``: the log-density of ``y``
    (exact: the log-determinant of an elementwise affine map) on the scale of the levels.
    ``sample(n)`` inverts the map.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 8, num_bins: int = 256) -> None:
        super().__init__()
        shape = (in_channels, image_size, image_size)
        self.shift = nn.Parameter(torch.full(shape, 0.5))
        self.log_scale = nn.Parameter(torch.zeros(shape))
        self.shape = shape
        self.in_channels, self.image_size, self.num_bins = in_channels, image_size, num_bins

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.shift) * self.log_scale.exp()

    def log_density(self, y: torch.Tensor) -> torch.Tensor:
        """Per-sample log-density of continuous ``y`` (no dequantisation)."""
        z = self(y)
        gaussian = -0.5 * (z * z + math.log(2 * math.pi))
        return (gaussian + self.log_scale).flatten(1).sum(1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        y = dequantize(x, self.num_bins) + 0.5  # in [0, 1)
        return self.log_density(y) - math.prod(self.shape) * math.log(self.num_bins)

    def sample(self, n: int) -> torch.Tensor:
        z = torch.randn(n, *self.shape, device=self.shift.device)
        return self.shift + z * (-self.log_scale).exp()


class UniformDensity(nn.Module):
    """The density that is uniform over the levels: ``log_prob = -D log(num_bins)``.

    Dequantised, ``y = (k + u) / num_bins`` is uniform on ``[0, 1)^D`` (density 1), so the
    discrete image has probability ``num_bins^-D``: ``log2(num_bins)`` bits per dimension.
    ``log_prob`` refuses inputs that are not levels ``k / (num_bins - 1)``, so a harness
    that gives it anything else fails. ``weight`` (always multiplied by 0) gives the
    optimizer a parameter.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 8, num_bins: int = 256) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.in_channels, self.image_size, self.num_bins = in_channels, image_size, num_bins

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        k = x.double() * (self.num_bins - 1)
        top = self.num_bins - 1
        if not torch.allclose(k, k.round(), atol=1e-4) or k.min() < 0 or k.max() > top + 1e-4:
            raise ValueError(f"input is not made of the {self.num_bins} levels k / {top}")
        dims = x[0].numel()
        return x.new_full((x.shape[0],), -dims * math.log(self.num_bins)) + 0 * self.weight

    def sample(self, n: int) -> torch.Tensor:
        shape = (n, self.in_channels, self.image_size, self.image_size)
        return torch.randint(0, self.num_bins, shape) / (self.num_bins - 1)


def tiny(num_classes: int = 10, memory_saving: bool = True, **options: Any) -> TinyNet:
    """The tiny test network (``memory_saving`` is accepted and has nothing to save)."""
    return TinyNet(num_classes, **options)


def tiny_nan(num_classes: int = 10, memory_saving: bool = True, **options: Any) -> TinyNet:
    """The tiny network, diverging (NaN logits) from its sixth training step on."""
    return TinyNet(num_classes, nan_after=5, **options)


def tiny_flow(num_classes: int = 10, **options: Any) -> TinyFlow:
    """The tiny density model (``num_classes`` is accepted and ignored)."""
    return TinyFlow(**options)


def uniform_density(num_classes: int = 10, **options: Any) -> UniformDensity:
    """The density uniform over the levels (``num_classes`` is accepted and ignored)."""
    return UniformDensity(**options)


def tiny_revnet(num_classes: int = 10, memory_saving: bool = True, **options: Any) -> RevNet:
    """The zoo's RevNet with basic blocks, 2 blocks per stage (a transition opens the
    second and the third), widths 8, 8, 8, 16."""
    return RevNet(
        "basic", (2, 2, 2), (8, 8, 8, 16), num_classes, memory_saving=memory_saving, **options
    )


def register() -> None:
    """Add the tiny models to ``invertible_models``' registry (idempotent)."""
    register_model(tiny)
    register_model(tiny_nan)
    register_model(tiny_flow)
    register_model(uniform_density)
    register_model(tiny_revnet)
