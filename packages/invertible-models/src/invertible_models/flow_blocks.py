"""The building blocks of the normalizing flows: coupling networks, bounded scales, priors,
and the dequantisation of discrete images.

* :class:`ZeroConv2d`: Glow's last convolution of every network, initialised to zero (with
  a learned per-channel log-scale), so that what it feeds starts as the identity.
* :class:`CouplingNetwork`: the network ``NN()`` of a Glow affine coupling: conv3x3 ->
  ActNorm -> ReLU -> conv1x1 -> ActNorm -> ReLU -> :class:`ZeroConv2d` (conv3x3). No
  BatchNorm: a flow must be the same function of each sample in train and eval mode.
* :class:`SigmoidScaleAdapter`: turns that network's output into a coupling's ``(scale,
  shift)``, with the stable scale of Glow's code, ``sigmoid(h + 2)``, divided by
  ``sigmoid(2)`` so that ``h = 0`` (a zero-initialised network) is exactly the identity.
* :class:`SplitPrior`, :class:`LearnedPrior`: the Gaussian priors of the factored-out
  latents (conditioned on the half that flows on) and of the top latent.
* :func:`dequantize`, :func:`quantize`: discrete images to continuous flow inputs in
  ``[-0.5, 0.5)`` and back (see :mod:`invertible_models.glow` for the convention).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from invertible_core import ActNorm

__all__ = [
    "CouplingNetwork",
    "LearnedPrior",
    "SigmoidScaleAdapter",
    "SplitPrior",
    "ZeroConv2d",
    "dequantize",
    "gaussian_log_prob",
    "quantize",
    "to_levels",
]

_LOG_2PI = math.log(2 * math.pi)


class ZeroConv2d(nn.Module):
    """A convolution that starts at zero: ``conv(x) * exp(logscale_factor * logs)``.

    Weights, bias and the per-channel ``logs`` start at zero (Glow's ``Conv2dZeros``), so the
    output is exactly zero until training moves them; the learned log-scale (multiplied by
    ``logscale_factor``, 3 as in Glow) lets the output's size grow quickly when useful.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        logscale_factor: float = 3.0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv.weight)
        assert self.conv.bias is not None
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(out_channels, 1, 1))
        self.logscale_factor = logscale_factor

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) * torch.exp(self.logs * self.logscale_factor)


class CouplingNetwork(nn.Module):
    """Glow's ``NN()``: conv3x3 -> ActNorm -> ReLU -> conv1x1 -> ActNorm -> ReLU -> zero conv3x3.

    Args:
        in_channels: channels of the half it reads.
        out_channels: channels it returns (twice the other half's: shift and scale).
        hidden_channels: width of the two hidden layers (Glow: 512).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 3, padding=1, bias=False),
            ActNorm(hidden_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, hidden_channels, 1, bias=False),
            ActNorm(hidden_channels),
            nn.ReLU(inplace=True),
            ZeroConv2d(hidden_channels, out_channels),
        )
        for m in self.layers:
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.05)  # Glow's initialisation of these convs

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)  # type: ignore[no-any-return]


#: sigmoid(2): the scale of Glow's ``sigmoid(h + 2)`` at ``h = 0``.
_SIGMOID_2 = 1.0 / (1.0 + math.exp(-2.0))


class SigmoidScaleAdapter(nn.Module):
    """``(scale, shift)`` from a module with twice the channels: ``h = module(x)``;
    ``shift = h[:, 0::2]``, ``scale = sigmoid(h[:, 1::2] + 2) / sigmoid(2)``.

    The scale of Glow's code, bounded in ``(0, 1.135)``, which keeps deep stacks stable, and
    divided by its value at zero so that a zero-initialised module gives exactly the
    identity (``scale = 1``, ``shift = 0``), as the Glow paper intends; the core's
    :class:`~invertible_core.AffineAdapterSigmoid` keeps Glow's 0.88 there.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.f = module

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        h = self.f(x, *args, **kwargs)
        shift, raw = h[:, 0::2], h[:, 1::2]
        return torch.sigmoid(raw + 2.0) / _SIGMOID_2, shift


def gaussian_log_prob(z: Tensor, mean: Tensor, logs: Tensor) -> Tensor:
    """``sum log N(z; mean, exp(logs)**2)`` over all but the batch dim, shape ``(batch,)``."""
    density = -0.5 * (_LOG_2PI + 2.0 * logs + (z - mean).square() * torch.exp(-2.0 * logs))
    return density.flatten(1).sum(1)


class SplitPrior(nn.Module):
    """The prior of a factored-out half ``z`` given the half ``h`` that flows on (Glow's
    ``split2d``): ``N(z; mean(h), exp(logs(h))**2)`` with ``(mean, logs)`` from a
    :class:`ZeroConv2d` of ``h``, so it starts as the standard normal.
    """

    def __init__(self, kept_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = ZeroConv2d(kept_channels, 2 * out_channels)

    def params(self, kept: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, logs)`` of the factored-out half, each shaped like it."""
        h = self.conv(kept)
        return h[:, 0::2], h[:, 1::2]

    def log_prob(self, z: Tensor, kept: Tensor) -> Tensor:
        """Per-sample ``log p(z | kept)`` in nats."""
        mean, logs = self.params(kept)
        return gaussian_log_prob(z, mean, logs)

    def sample(self, kept: Tensor, temperature: float) -> Tensor:
        """A draw of the factored-out half given ``kept``, its std scaled by ``temperature``."""
        mean, logs = self.params(kept)
        return mean + torch.exp(logs) * temperature * torch.randn_like(mean)


class LearnedPrior(nn.Module):
    """The top latent's prior: a Gaussian with a learned mean and log-std per channel,
    starting as the standard normal (Glow's ``learntop``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(channels, 1, 1))

    def log_prob(self, z: Tensor) -> Tensor:
        """Per-sample ``log p(z)`` in nats."""
        return gaussian_log_prob(z, self.mean, self.logs)

    def sample(self, shape: tuple[int, ...], temperature: float) -> Tensor:
        """A draw of shape ``shape`` (batch first), its std scaled by ``temperature``."""
        noise = torch.randn(shape, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + torch.exp(self.logs) * temperature * noise


def to_levels(x: Tensor, num_bins: int) -> Tensor:
    """The discrete values ``k`` in ``[0, num_bins)`` of an image batch, as int64.

    Integer tensors hold ``k`` already; floating tensors hold ``k / (num_bins - 1)`` in
    ``[0, 1]`` (what ``torchvision.transforms.ToTensor`` gives for 8-bit images) and are
    rounded to the nearest level. Values out of range raise a ``ValueError``.
    """
    if x.is_floating_point():
        if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
            raise ValueError(
                f"floating images must lie in [0, 1] (k / {num_bins - 1} for k in "
                f"0..{num_bins - 1}), got values in [{float(x.min()):.4g}, {float(x.max()):.4g}]; "
                "scale them, or pass the integer levels"
            )
        return torch.round(x * (num_bins - 1)).long()
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"images must be integer or floating tensors, got {x.dtype}")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= num_bins):
        raise ValueError(
            f"integer images must hold levels in 0..{num_bins - 1} (num_bins={num_bins}), got "
            f"values in [{int(x.min())}, {int(x.max())}]; build the model with num_bins= the "
            "number of levels of your data"
        )
    return x.long()


def dequantize(x: Tensor, num_bins: int, dtype: torch.dtype | None = None) -> Tensor:
    """Continuous flow inputs ``y = (k + u) / num_bins - 0.5`` with ``u ~ U[0, 1)``.

    ``k`` are the levels of :func:`to_levels`; ``y`` lies in ``[-0.5, 0.5)``, uniformly
    spread over the bin of ``k`` (the dequantisation of Glow and RealNVP).
    """
    levels = to_levels(x, num_bins)
    dtype = dtype or torch.get_default_dtype()
    noise = torch.rand(levels.shape, dtype=dtype, device=levels.device)
    return (levels.to(dtype) + noise) / num_bins - 0.5


def quantize(y: Tensor, num_bins: int) -> Tensor:
    """Flow outputs back to images: the bin of each ``y``, as ``k / (num_bins - 1)`` in
    ``[0, 1]`` (values outside ``[-0.5, 0.5)`` land in the nearest end bin)."""
    levels = torch.floor((y + 0.5) * num_bins).clamp_(0, num_bins - 1)
    return levels / (num_bins - 1)
