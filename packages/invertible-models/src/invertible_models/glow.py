"""Glow (Kingma and Dhariwal, NeurIPS 2018): a multi-scale normalizing flow of images.

A flow maps an image ``y`` to latents ``z`` by an invertible function, and its density is
the change of variables ``log p(y) = log p(z) + log|det dz/dy|``. Glow's function, per
level ``l = 1..L``:

* *squeeze*: :class:`~invertible_core.InvertibleDownsampling` by 2 (``C, H, W -> 4C, H/2,
  W/2``);
* ``K`` *steps*, each :class:`~invertible_core.ActNorm` (initialised from the first training
  batch) -> :class:`~invertible_core.InvertibleConv1x1` (LU-parametrised) ->
  :class:`~invertible_core.AffineCoupling` whose networks are Glow's ``NN()``
  (:class:`~invertible_models.flow_blocks.CouplingNetwork`, last convolution zero-initialised)
  with the scale ``sigmoid(h + 2) / sigmoid(2)``
  (:class:`~invertible_models.flow_blocks.SigmoidScaleAdapter`): every coupling starts as
  the identity. The core's affine coupling transforms both halves, one from the other
  (``y1 = x1 * s1 + t1`` from ``x2``, then ``y2`` from ``y1``), as FrEIA's
  ``GLOWCouplingBlock`` does; Glow's code transforms one half per step, so a step here holds
  two coupling networks;
* *factor-out* (all levels but the last): half the channels leave the flow as a latent,
  with a Gaussian prior whose mean and log-std a zero-initialised convolution computes from
  the other half (:class:`~invertible_models.flow_blocks.SplitPrior`); the top latent has a
  learned per-channel Gaussian (:class:`~invertible_models.flow_blocks.LearnedPrior`).

The squeeze and the ``K`` steps of a level are ONE
:class:`~invertible_core.ReversibleSequence`, run with ``forward_with_logdet``: it keeps
only the level's output for backward and rebuilds every step's input there, so training
memory does not grow with ``K`` (``memory_saving``, the zoo's one switch).

Data convention (dequantisation, as in the paper): images are discrete, ``num_bins``
levels per value (256 for 8-bit images; 17 for scikit-learn's digits, whose values are
0..16). :meth:`Glow.log_prob` takes integer tensors of levels ``k`` in ``[0, num_bins)``, or
floating tensors in ``[0, 1]`` holding ``k / (num_bins - 1)`` (``ToTensor``'s scaling of
8-bit images; rounded to the nearest level). It adds uniform noise,
``y = (k + u) / num_bins - 0.5`` with ``u ~ U[0, 1)`` (so ``y`` in ``[-0.5, 0.5)``), and
returns ``log p(y) - D log(num_bins)`` per sample, in nats, ``D`` the values per image: the
log-density of ``y`` on the scale of the levels, a lower bound (in expectation over ``u``)
of the log-probability of the discrete image. :meth:`Glow.bits_per_dim` is
``-log_prob / (D log 2)``, the number Glow reports (3.35 on CIFAR-10).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from invertible_core import (
    ActNorm,
    AffineCoupling,
    InvertibleConv1x1,
    InvertibleDownsampling,
    MemorySaving,
    ReversibleSequence,
)
from invertible_models.flow_blocks import (
    CouplingNetwork,
    LearnedPrior,
    SigmoidScaleAdapter,
    SplitPrior,
    dequantize,
    quantize,
)
from invertible_models.registry import register_model

__all__ = ["Glow", "GlowLevel", "flow_step", "glow"]


def flow_step(channels: int, hidden_channels: int, lu: bool = True) -> list[nn.Module]:
    """One step of flow, as three chain blocks: ActNorm, invertible 1x1 conv, affine coupling."""
    first, second = channels // 2, channels - channels // 2
    coupling = AffineCoupling(
        CouplingNetwork(second, 2 * first, hidden_channels),
        CouplingNetwork(first, 2 * second, hidden_channels),
        adapter=SigmoidScaleAdapter,
        split_sizes=(first, second),
    )
    return [ActNorm(channels), InvertibleConv1x1(channels, lu=lu), coupling]


class GlowLevel(nn.Module):
    """Squeeze and ``steps`` steps of flow (one reversible chain), then a factor-out.

    Args:
        in_channels: channels entering the level (before its squeeze).
        steps: steps of flow ``K``.
        hidden_channels: width of the coupling networks.
        split: factor out half the channels at the end, with a :class:`SplitPrior`.
        memory_saving: passed to the chain.
        lu: LU-parametrised 1x1 convolutions.
    """

    def __init__(
        self,
        in_channels: int,
        steps: int,
        hidden_channels: int,
        split: bool,
        memory_saving: bool = True,
        lu: bool = True,
    ) -> None:
        super().__init__()
        channels = 4 * in_channels
        blocks: list[nn.Module] = [InvertibleDownsampling(2)]
        for _ in range(steps):
            blocks += flow_step(channels, hidden_channels, lu)
        self.flow = ReversibleSequence(*blocks, memory_saving=memory_saving)
        self.channels = channels
        self.out_channels = channels // 2 if split else channels
        self.prior = SplitPrior(self.out_channels, channels - self.out_channels) if split else None

    def forward_with_logdet(self, h: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """``(kept, factored_out_or_None, logdet)``: the level's output halves and log-det."""
        out, logdet = self.flow.forward_with_logdet(h)
        if self.prior is None:
            return out, None, logdet
        return out[:, : self.out_channels], out[:, self.out_channels :], logdet

    def inverse(self, kept: Tensor, factored_out: Tensor | None) -> Tensor:
        """The level's input from its output halves."""
        out = kept if factored_out is None else torch.cat([kept, factored_out], dim=1)
        return self.flow.inverse(out)


class Glow(MemorySaving, nn.Module):
    """A multi-scale Glow flow over ``in_channels x image_size x image_size`` images.

    Args:
        in_channels: image channels.
        image_size: side of the square images; divisible by ``2 ** levels``.
        levels: levels ``L`` (squeezes); factor-outs between them.
        steps: steps of flow per level ``K`` (an int, or one per level).
        hidden_channels: width of the coupling networks.
        num_bins: levels per value of the discrete images (256 for 8 bits).
        memory_saving: the zoo's switch: each level's chain rebuilds its activations in
            backward instead of storing them; settable later, no ``state_dict`` change.
        lu: LU-parametrised 1x1 convolutions (``False``: a full matrix, ``slogdet``).

    ``forward(x)`` is :meth:`log_prob` (so that ``DistributedDataParallel`` wraps it); see
    the module docstring for the data convention. ActNorm layers initialise from the first
    batch seen in training mode: run one before :meth:`sample` or evaluation.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        levels: int = 3,
        steps: int | Sequence[int] = 16,
        hidden_channels: int = 512,
        *,
        num_bins: int = 256,
        memory_saving: bool = True,
        lu: bool = True,
    ) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f"levels must be at least 1, got {levels}")
        if image_size < 1 or image_size % 2**levels:
            raise ValueError(
                f"image_size {image_size} must be divisible by 2 ** levels = {2**levels} (each "
                "level squeezes by 2); use fewer levels or pad the images"
            )
        per_level = [steps] * levels if isinstance(steps, int) else list(steps)
        if len(per_level) != levels or any(k < 1 for k in per_level):
            raise ValueError(
                f"steps must be an int >= 1 or {levels} of them (one per level), got {steps!r}"
            )
        if num_bins < 2:
            raise ValueError(f"num_bins must be at least 2 (levels per value), got {num_bins}")
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_bins = num_bins
        self.num_dims = in_channels * image_size * image_size
        modules = []
        channels = in_channels
        for index, k in enumerate(per_level):
            level = GlowLevel(channels, k, hidden_channels, index < levels - 1, memory_saving, lu)
            modules.append(level)
            channels = level.out_channels
        self.levels = nn.ModuleList(modules)
        self.top_shape = (channels, image_size // 2**levels, image_size // 2**levels)
        self.top_prior = LearnedPrior(channels)
        self.memory_saving = memory_saving

    def _levels(self) -> list[GlowLevel]:
        return [level for level in self.levels if isinstance(level, GlowLevel)]

    def _check(self, y: Tensor) -> None:
        shape = (self.in_channels, self.image_size, self.image_size)
        if y.dim() != 4 or tuple(y.shape[1:]) != shape:
            raise ValueError(
                f"expected images of shape (batch, {', '.join(map(str, shape))}), got "
                f"{tuple(y.shape)}; build the model with in_channels= and image_size= of your "
                "images"
            )

    def encode(self, y: Tensor) -> tuple[list[Tensor], Tensor]:
        """The latents of continuous inputs ``y`` (one per factor-out, then the top one) and
        the per-sample ``log|det dz/dy|`` of the whole flow."""
        self._check(y)
        latents = []
        logdet = y.new_zeros(y.shape[0])
        h = y
        for level in self._levels():
            h, z, ld = level.forward_with_logdet(h)
            logdet = logdet + ld
            if z is not None:
                latents.append(z)
        latents.append(h)
        return latents, logdet

    def decode(self, latents: Sequence[Tensor]) -> Tensor:
        """The continuous input whose latents are ``latents`` (as :meth:`encode` gives them)."""
        levels = self._levels()
        if len(latents) != len(levels):
            raise ValueError(f"expected {len(levels)} latents (one per level), got {len(latents)}")
        h = latents[-1]
        for level, z in zip(reversed(levels), [None, *reversed(latents[:-1])]):
            h = level.inverse(h, z)
        return h

    def log_density(self, y: Tensor) -> Tensor:
        """Per-sample ``log p(y)`` in nats of continuous inputs ``y`` (the flow's own input
        space, ``[-0.5, 0.5)`` for dequantised images): prior of every latent plus log-det."""
        self._check(y)
        logp = y.new_zeros(y.shape[0])
        h = y
        for level in self._levels():
            h, z, ld = level.forward_with_logdet(h)
            logp = logp + ld
            if z is not None:
                assert level.prior is not None
                logp = logp + level.prior.log_prob(z, h)
        return logp + self.top_prior.log_prob(h)

    def dequantize(self, x: Tensor) -> Tensor:
        """Discrete images to continuous inputs ``(k + u) / num_bins - 0.5``, ``u ~ U[0, 1)``."""
        self._check(x)
        return dequantize(x, self.num_bins, self.top_prior.mean.dtype)

    def log_prob(self, x: Tensor) -> Tensor:
        """Per-sample log-likelihood in nats of discrete images ``x`` (dequantised):
        ``log p(y) - D log(num_bins)``; see the module docstring for the convention."""
        return self.log_density(self.dequantize(x)) - self.num_dims * math.log(self.num_bins)

    def bits_per_dim(self, x: Tensor) -> Tensor:
        """Per-sample negative log-likelihood in bits per value: ``-log_prob / (D log 2)``."""
        return -self.log_prob(x) / (self.num_dims * math.log(2.0))

    def forward(self, x: Tensor) -> Tensor:
        """:meth:`log_prob`: per-sample log-likelihood in nats, shape ``(batch,)``."""
        return self.log_prob(x)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        """``n`` images drawn from the model, as floats ``k / (num_bins - 1)`` in ``[0, 1]``.

        ``temperature`` scales every prior's standard deviation (Glow samples at 0.7 for
        cleaner images). The model must have seen a training batch (ActNorm's initialisation).
        """
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        h = self.top_prior.sample((n, *self.top_shape), temperature)
        for level in reversed(self._levels()):
            z = None if level.prior is None else level.prior.sample(h, temperature)
            h = level.inverse(h, z)
        return quantize(h, self.num_bins)


@register_model
def glow(num_classes: int = 10, memory_saving: bool = True, **options: Any) -> Glow:
    """Glow for CIFAR-10 (the paper's L = 3 levels, K = 32 steps, 512 hidden channels), on
    3 x 32 x 32 8-bit images. ``num_classes`` is accepted for :func:`create_model`'s uniform
    call and unused (an unconditional flow). Digits: ``glow(in_channels=1, image_size=8,
    levels=2, steps=8, hidden_channels=64, num_bins=17)``."""
    del num_classes
    return Glow(memory_saving=memory_saving, **options)
