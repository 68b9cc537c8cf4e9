"""Reversible vision transformers (Mangalam et al., CVPR 2022): ViTs whose activation
memory does not grow with depth.

A RevViT carries two residual streams of width ``C``. The patch embedding's tokens start
both (``X1 = X2 = tokens``); each block is an additive coupling whose ``F`` is pre-norm
multi-head attention and ``G`` a pre-norm MLP::

    Y1 = X1 + F(X2)        X2 = Y2 - G(Y1)
    Y2 = X2 + G(Y1)        X1 = Y1 - F(X2)        (the inverse)

The two streams travel as the halves of one ``(batch, tokens, 2C)`` tensor through ONE
:class:`invertible_core.ReversibleSequence`, which keeps only the stack's output and
rebuilds every block's input in backward (one recompute of ``F`` and ``G`` per block).
Dropout, attention dropout and drop-path repeat exactly in that recompute: the sequence
restores the random state captured before each ``F``/``G`` call (``preserve_rng_state``).

The head averages the two streams and then classifies as the ViT does (LayerNorm, mean over
tokens, linear). The paper's reference code (minREV) concatenates the streams and
normalises over ``2C`` instead; averaging (one of the fusions the SlowFast code offers)
keeps the head at width ``C``, so that a RevViT has exactly the parameters of the
:class:`~invertible_models.vit.VisionTransformer` of the same depth, width and heads: each
reversible block holds one attention and one MLP of width ``C``, as a ViT block does.

``memory_saving`` toggles the sequence's saving (``False``: plain autograd through the same
couplings); it changes no parameter and no ``state_dict`` key.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from invertible_core import MemorySaving, ReversibleSequence
from invertible_models.blocks import float32_stream
from invertible_models.registry import register_model
from invertible_models.transformer import (
    PatchEmbedding,
    TokenHead,
    drop_path_rates,
    init_transformer_weights,
    reversible_transformer_block,
)
from invertible_models.vit import SMALL, TINY

__all__ = ["ReversibleVisionTransformer", "revvit_small", "revvit_tiny"]


class ReversibleVisionTransformer(MemorySaving, nn.Module):
    """A reversible vision transformer: patch embedding, reversible blocks, head.

    Takes the arguments of :class:`~invertible_models.vit.VisionTransformer` (same meaning,
    same parameters), and:

    Args:
        memory_saving: run the reversible blocks without storing their activations
            (rebuilt in backward; on by default); settable later through the attribute or
            ``set_grad_checkpointing()``.
        anchor_every: keep the exact activations every this many blocks, bounding float32
            reconstruction drift (0: never; costs one ``(batch, tokens, 2C)`` tensor each).
    """

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        num_classes: int = 10,
        *,
        image_size: int = 32,
        patch_size: int = 4,
        in_channels: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        memory_saving: bool = True,
        anchor_every: int = 0,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.embed = PatchEmbedding(image_size, patch_size, in_channels, embed_dim)
        self.blocks = ReversibleSequence(
            *(
                reversible_transformer_block(
                    embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, rate
                )
                for rate in drop_path_rates(drop_path_rate, depth)
            ),
            preserve_rng_state=True,
            anchor_every=anchor_every,
        )
        self.num_features = embed_dim
        self.head = TokenHead(embed_dim, num_classes)
        self.memory_saving = memory_saving
        init_transformer_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """The two streams averaged: tokens ``(batch, tokens, embed_dim)``, before the head."""
        tokens = float32_stream(self.embed(x))  # residual sums in float32 under autocast too
        y1, y2 = self.blocks(torch.cat([tokens, tokens], dim=-1)).chunk(2, dim=-1)
        return (y1 + y2) / 2

    def forward(self, x: Tensor) -> Tensor:
        """Class logits of shape ``(batch, num_classes)``."""
        return self.head(self.forward_features(x))


def _revvit(
    size: dict[str, Any], num_classes: int, memory_saving: bool, options: dict[str, Any]
) -> ReversibleVisionTransformer:
    config = {**size, **options}  # depth, width and heads may be overridden too
    return ReversibleVisionTransformer(
        num_classes=num_classes, memory_saving=memory_saving, **config
    )


@register_model
def revvit_tiny(
    num_classes: int = 10, memory_saving: bool = True, **options: Any
) -> ReversibleVisionTransformer:
    """RevViT-Tiny at CIFAR size: the twin of ``vit_tiny`` (width 192, depth 12, 3 heads)."""
    return _revvit(TINY, num_classes, memory_saving, options)


@register_model
def revvit_small(
    num_classes: int = 10, memory_saving: bool = True, **options: Any
) -> ReversibleVisionTransformer:
    """RevViT-Small at CIFAR size: the twin of ``vit_small`` (width 384, depth 12, 6 heads)."""
    return _revvit(SMALL, num_classes, memory_saving, options)
