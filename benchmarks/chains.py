"""The networks bench_core measures: residual functions ``F``/``G`` and the chains they form.

Every method of the benchmark, ours and the peers', is built around the *same* module
objects (the same weights), so a difference between two rows is a difference between two
ways of training one network. A chain is therefore handed around as its list of ``(F, G)``
pairs plus the layout the pairs expect:

- **conv chain**: ``x`` is ``(B, C, H, W)``, split along dim 1 (channels) into two halves of
  ``C/2``; ``F`` and ``G`` are conv3x3 + BatchNorm + ReLU at ``C/2`` channels.
- **transformer chain**: ``x`` is ``(B, T, C)``, split along the last dim into two streams
  of ``C/2``; ``F`` is pre-norm multi-head self-attention
  (:func:`torch.nn.functional.scaled_dot_product_attention`) and ``G`` a pre-norm MLP
  (hidden ``4 * C/2``), both at width ``C/2``. This is the layout of RevViT and Reformer,
  whose blocks see one stream each; ``C`` here is the width of the tensor the chain
  carries, so ``(B, T, C) = (8, 256, 256)`` means attention at width 128.
- **conditioned transformer chain**: the same, with side inputs: a timestep embedding
  ``emb`` made by a learnable MLP (its gradient must reach that MLP) and a boolean
  key-padding mask; every ``F`` and ``G`` is called as ``F(x2, emb, mask)``.
- **flow chain**: Glow-like steps (ActNorm, InvertibleConv1x1, AffineCoupling) with an
  :class:`~invertible_core.InvertibleDownsampling` in the middle, trained with a negative
  log-likelihood through ``forward_with_logdet``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from invertible_core import (
    ActNorm,
    AffineAdapterSigmoid,
    AffineCoupling,
    InvertibleConv1x1,
    InvertibleDownsampling,
    ReversibleSequence,
)

Pairs = list[tuple[nn.Module, nn.Module]]


@dataclass
class Chain:
    """A chain of additive couplings as data: its ``(F, G)`` pairs and its input layout.

    ``split_dim`` is the dimension every coupling splits (normalised to be non-negative, as
    some peers index it literally); ``inputs`` is one input batch (without grad).
    """

    name: str
    pairs: Pairs
    split_dim: int
    inputs: Tensor

    @property
    def parameters(self) -> list[nn.Parameter]:
        return [p for pair in self.pairs for module in pair for p in module.parameters()]

    def in_float64(self) -> Chain:
        """A float64 copy (same weights, separate modules): the gradient check without
        float32 rounding."""
        pairs = [(copy.deepcopy(f).double(), copy.deepcopy(g).double()) for f, g in self.pairs]
        return Chain(self.name, pairs, self.split_dim, self.inputs.double())

    def to(self, device: torch.device) -> Chain:
        for pair in self.pairs:
            for module in pair:
                module.to(device)
        self.inputs = self.inputs.to(device)
        return self


def conv_residual(channels: int) -> nn.Module:
    """conv3x3 + BatchNorm + ReLU, shape-preserving: the RevNet residual function."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
    )


def conv_chain(depth: int, channels: int, batch: int, size: int, seed: int = 0) -> Chain:
    torch.manual_seed(seed)
    pairs = [(conv_residual(channels // 2), conv_residual(channels // 2)) for _ in range(depth)]
    x = torch.randn(batch, channels, size, size)
    return Chain("conv", pairs, split_dim=1, inputs=x)


class Conditioning(nn.Module):
    """Adds a per-sample projection of a side input ``emb`` (shape ``(B, E)``) to every
    token: a light form of the timestep conditioning of diffusion transformers."""

    def __init__(self, emb_dim: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(emb_dim, width)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return h + self.proj(emb).unsqueeze(1)


class Attention(nn.Module):
    """Pre-norm multi-head self-attention on ``(B, T, width)`` through
    :func:`~torch.nn.functional.scaled_dot_product_attention`.

    ``forward(x, emb=None, mask=None)``: ``emb`` conditions the normalised input (only when
    built with ``emb_dim``), ``mask`` is a boolean attention mask broadcastable to
    ``(B, heads, T, T)``, True where a token may attend.
    """

    def __init__(self, width: int, heads: int, emb_dim: int | None = None) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"Attention: width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.cond = Conditioning(emb_dim, width) if emb_dim is not None else None
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, emb: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        b, t, w = x.shape
        h = self.norm(x)
        if self.cond is not None:
            if emb is None:
                raise ValueError("Attention built with emb_dim needs an emb side input")
            h = self.cond(h, emb)
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, t, w))


class MLP(nn.Module):
    """Pre-norm MLP (hidden ``4 * width``, GELU) on ``(B, T, width)``; ``forward(x,
    emb=None, mask=None)`` uses ``emb`` as :class:`Attention` does and ignores ``mask``."""

    def __init__(self, width: int, emb_dim: int | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.cond = Conditioning(emb_dim, width) if emb_dim is not None else None
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: Tensor, emb: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        h = self.norm(x)
        if self.cond is not None:
            if emb is None:
                raise ValueError("MLP built with emb_dim needs an emb side input")
            h = self.cond(h, emb)
        return self.fc2(F.gelu(self.fc1(h)))


def transformer_chain(
    depth: int, width: int, heads: int, batch: int, tokens: int, seed: int = 0
) -> Chain:
    """``depth`` blocks of (attention, MLP) at ``width // 2`` on a ``(batch, tokens, width)``
    input split along its last dim."""
    if width % 2:
        raise ValueError(f"transformer chain: width {width} must be even (two streams)")
    torch.manual_seed(seed)
    half = width // 2
    pairs: Pairs = [(Attention(half, heads), MLP(half)) for _ in range(depth)]
    x = torch.randn(batch, tokens, width)
    return Chain("transformer", pairs, split_dim=2, inputs=x)


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of an integer timestep through a learnable two-layer MLP, as in
    diffusion models: ``(B,)`` ints to ``(B, emb_dim)``."""

    def __init__(self, emb_dim: int, features: int = 64) -> None:
        super().__init__()
        self.features = features
        self.mlp = nn.Sequential(
            nn.Linear(features, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

    def forward(self, t: Tensor) -> Tensor:
        half = self.features // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device) / half)
        angles = t.float().unsqueeze(1) * freqs
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=1))


@dataclass
class ConditionedChain:
    """A transformer chain whose blocks take ``(emb, mask)`` side inputs."""

    chain: Chain
    embedding: TimestepEmbedding
    timesteps: Tensor
    mask: Tensor

    def to(self, device: torch.device) -> ConditionedChain:
        self.chain.to(device)
        self.embedding.to(device)
        self.timesteps = self.timesteps.to(device)
        self.mask = self.mask.to(device)
        return self


def conditioned_transformer_chain(
    depth: int, width: int, heads: int, batch: int, tokens: int, seed: int = 0
) -> ConditionedChain:
    """The transformer chain with a timestep embedding (width ``width // 2``) and a boolean
    key-padding mask (each sample keeps a random prefix of at least half its tokens)."""
    torch.manual_seed(seed)
    half = width // 2
    pairs: Pairs = [
        (Attention(half, heads, emb_dim=half), MLP(half, emb_dim=half)) for _ in range(depth)
    ]
    x = torch.randn(batch, tokens, width)
    lengths = torch.randint(tokens // 2, tokens + 1, (batch,))
    mask = (torch.arange(tokens) < lengths.unsqueeze(1)).view(batch, 1, 1, tokens)
    return ConditionedChain(
        chain=Chain("conditioned transformer", pairs, split_dim=2, inputs=x),
        embedding=TimestepEmbedding(half),
        timesteps=torch.randint(0, 1000, (batch,)),
        mask=mask,
    )


def flow_coupling_net(channels: int, hidden: int) -> nn.Module:
    """conv3x3 -> ReLU -> conv3x3 to twice the channels, for AffineAdapterSigmoid's
    (scale, shift); the last conv starts small so the flow starts near the identity."""
    last = nn.Conv2d(hidden, 2 * channels, 3, padding=1)
    with torch.no_grad():
        last.weight.mul_(0.1)
    return nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(), last)


def flow_chain(depth: int, channels: int, hidden: int, seed: int = 0) -> ReversibleSequence:
    """``depth`` flow steps (ActNorm, InvertibleConv1x1, AffineCoupling), the first half at
    ``channels``, then an :class:`InvertibleDownsampling` (factor 2), the rest at
    ``4 * channels``: a fully invertible chain whose shape changes in the middle."""
    torch.manual_seed(seed)
    blocks: list[nn.Module] = []
    for i in range(depth):
        if i == depth // 2:
            blocks.append(InvertibleDownsampling(2))
        c = channels if i < depth // 2 else 4 * channels
        blocks += [
            ActNorm(c),
            InvertibleConv1x1(c),
            AffineCoupling(
                flow_coupling_net(c // 2, hidden),
                flow_coupling_net(c // 2, hidden),
                adapter=AffineAdapterSigmoid,
            ),
        ]
    return ReversibleSequence(blocks)


def flow_nll(z: Tensor, logdet: Tensor) -> Tensor:
    """Mean negative log-likelihood per dimension under a standard normal prior on ``z``."""
    dims = z[0].numel()
    log_prior = -0.5 * z.square().flatten(1).sum(1) - 0.5 * dims * math.log(2 * math.pi)
    return -(log_prior + logdet).mean() / dims
