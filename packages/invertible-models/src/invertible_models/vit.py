"""Vision transformers (Dosovitskiy et al., 2021): the plain twins of the RevViTs.

:class:`VisionTransformer` is patch embedding, a stack of pre-norm
:class:`~invertible_models.transformer.TransformerBlock`, and a mean-pooling head. The
registered constructors (``vit_tiny``, ``vit_small``) are DeiT's tiny and small widths at
CIFAR size (32x32 images, 4x4 patches: 64 tokens); every size is an argument.

A ViT keeps every block's activations for backward (the attention weights and the MLP's
hidden layer are the largest), so its training memory grows linearly with depth: it trains
plainly by default, as timm's ViTs do. ``memory_saving=True`` (the zoo's one switch, as on
every model; ``set_grad_checkpointing()`` is timm's name for it) recomputes each block in
backward with ``torch.utils.checkpoint``: each block's input is still kept, the rest is
rebuilt at the cost of one more forward per block. It sets every block's own switch
(``block.checkpointed``), which a memory plan (:func:`invertible_core.fit_memory_budget`)
may then set block by block. The RevViT twin (:mod:`invertible_models.revvit`) keeps no
block input at all.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from invertible_core import MemorySaving
from invertible_models.registry import register_model
from invertible_models.transformer import (
    PatchEmbedding,
    TokenHead,
    TransformerBlock,
    drop_path_rates,
    init_transformer_weights,
)

__all__ = ["VisionTransformer", "vit_small", "vit_tiny"]


class VisionTransformer(MemorySaving, nn.Module):
    """A pre-norm vision transformer: patch embedding, transformer blocks, head.

    Args:
        embed_dim: token width.
        depth: transformer blocks.
        num_heads: attention heads per block (``embed_dim`` must be divisible by it).
        num_classes: outputs of the classifier.
        image_size: side of the square input images.
        patch_size: side of a patch (must divide ``image_size``).
        in_channels: image channels.
        mlp_ratio: hidden width of each MLP relative to ``embed_dim``.
        qkv_bias: biases on the query/key/value projections.
        drop_rate: dropout after the attention projection and inside the MLPs.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth of the top block; it rises linearly from 0.
        memory_saving: recompute each block in backward (``torch.utils.checkpoint``, random
            state replayed so dropout repeats); off by default; settable later through the
            attribute or ``set_grad_checkpointing()``; parameters and ``state_dict`` keys are
            the same either way.
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
        memory_saving: bool = False,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.embed = PatchEmbedding(image_size, patch_size, in_channels, embed_dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, rate
            )
            for rate in drop_path_rates(drop_path_rate, depth)
        )
        self.num_features = embed_dim
        self.head = TokenHead(embed_dim, num_classes)
        self.memory_saving = memory_saving
        init_transformer_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last block's tokens ``(batch, tokens, embed_dim)``, before the head."""
        tokens = self.embed(x)
        for block in self.blocks:
            tokens = block(tokens)
        return tokens

    def forward(self, x: Tensor) -> Tensor:
        """Class logits of shape ``(batch, num_classes)``."""
        return self.head(self.forward_features(x))


def _vit(
    size: dict[str, Any], num_classes: int, memory_saving: bool, options: dict[str, Any]
) -> VisionTransformer:
    config = {**size, **options}  # depth, width and heads may be overridden too
    return VisionTransformer(num_classes=num_classes, memory_saving=memory_saving, **config)


#: DeiT-Ti and DeiT-S widths (Touvron et al., 2021), also the RevViT paper's ViT-S.
TINY: dict[str, Any] = {"embed_dim": 192, "depth": 12, "num_heads": 3}
SMALL: dict[str, Any] = {"embed_dim": 384, "depth": 12, "num_heads": 6}


@register_model
def vit_tiny(
    num_classes: int = 10, memory_saving: bool = False, **options: Any
) -> VisionTransformer:
    """ViT-Tiny at CIFAR size: width 192, depth 12, 3 heads, patch 4 on 32x32 (5.36 M parameters)."""
    return _vit(TINY, num_classes, memory_saving, options)


@register_model
def vit_small(
    num_classes: int = 10, memory_saving: bool = False, **options: Any
) -> VisionTransformer:
    """ViT-Small at CIFAR size: width 384, depth 12, 6 heads, patch 4 on 32x32 (21.3 M)."""
    return _vit(SMALL, num_classes, memory_saving, options)
