"""The building blocks of the vision transformers: patch embedding, attention, MLP, head.

A pre-norm transformer block is two residual branches, ``x + F(x)`` then ``x + G(x)``:

* :class:`AttentionBranch` ``F``: LayerNorm -> multi-head self-attention
  (``torch.nn.functional.scaled_dot_product_attention``, which picks a fused kernel where
  the device has one) -> projection -> dropout -> drop-path;
* :class:`MlpBranch` ``G``: LayerNorm -> linear -> GELU -> dropout -> linear -> dropout ->
  drop-path.

They are used in two ways, with the same modules and therefore the same parameters:

* in a :class:`TransformerBlock`, one stream of width ``C``: the plain ViT;
* as the ``Fm`` and ``Gm`` of an additive coupling over two streams of width ``C`` each
  (:func:`reversible_transformer_block`, RevViT): ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``.
  The two streams travel as the two halves of one ``(batch, tokens, 2C)`` tensor
  (``split_dim=-1``), which is what :class:`invertible_core.ReversibleSequence` passes
  between blocks.

A reversible block therefore holds exactly one attention and one MLP of width ``C``, as a
ViT block does: a RevViT and a ViT of the same depth, width and heads have the same number
of parameters (the embedding and head are shared code too), which makes them fair twins.

Randomness (dropout, attention dropout, drop-path) draws from the global generator, so a
memory-saving recompute that restores the random state (the core's
``preserve_rng_state``, ``torch.utils.checkpoint``'s) draws the same masks again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from invertible_core import AdditiveCoupling, CheckpointableModule

__all__ = [
    "Attention",
    "AttentionBranch",
    "DropPath",
    "Mlp",
    "MlpBranch",
    "PatchEmbedding",
    "TokenHead",
    "TransformerBlock",
    "drop_path_rates",
    "init_transformer_weights",
    "reversible_transformer_block",
]


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {value}")


class DropPath(nn.Module):
    """Stochastic depth: zero a branch's output for a random subset of the samples.

    In training, each sample's output is kept with probability ``1 - p`` and then scaled by
    ``1 / (1 - p)``, so the expected output is unchanged; in eval mode it is the identity.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        _check_probability("drop-path rate", p)
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
        return x * mask.bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Attention(nn.Module):
    """Multi-head self-attention over tokens ``(batch, tokens, dim)``.

    Args:
        dim: token width; must be divisible by ``num_heads``.
        num_heads: attention heads, each of width ``dim // num_heads``.
        qkv_bias: biases on the query/key/value projection.
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(
                f"embed_dim {dim} must be divisible by num_heads {num_heads}; pick a width "
                "that is a multiple of the heads"
            )
        _check_probability("attention dropout", attn_drop)
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, tokens, dim)))


class Mlp(nn.Module):
    """The transformer's feed-forward network: linear -> GELU -> dropout -> linear -> dropout."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class AttentionBranch(nn.Module):
    """``F``: LayerNorm -> :class:`Attention` -> drop-path (a residual branch, no residual)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop_path(self.attn(self.norm(x)))


class MlpBranch(nn.Module):
    """``G``: LayerNorm -> :class:`Mlp` (``mlp_ratio`` times wider inside) -> drop-path."""

    def __init__(
        self, dim: int, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        if hidden < 1:
            raise ValueError(f"mlp_ratio {mlp_ratio} leaves no hidden units at width {dim}")
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden, drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop_path(self.mlp(self.norm(x)))


def _branches(
    dim: int,
    num_heads: int,
    mlp_ratio: float,
    qkv_bias: bool,
    drop: float,
    attn_drop: float,
    drop_path: float,
) -> tuple[AttentionBranch, MlpBranch]:
    _check_probability("dropout", drop)
    return (
        AttentionBranch(dim, num_heads, qkv_bias, drop, attn_drop, drop_path),
        MlpBranch(dim, mlp_ratio, drop, drop_path),
    )


class TransformerBlock(CheckpointableModule):
    """A pre-norm ViT block: ``x = x + attn(x)``, then ``x = x + mlp(x)``.

    Checkpointable (``block.checkpointed``, :class:`~invertible_core.CheckpointableModule`):
    a ViT with ``memory_saving`` checkpoints every block.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: hidden width of the MLP relative to ``dim``.
        qkv_bias: biases on the query/key/value projection.
        drop: dropout after the attention projection and inside the MLP.
        attn_drop: dropout on the attention weights.
        drop_path: stochastic-depth rate of both branches.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn, self.mlp = _branches(
            dim, num_heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path
        )

    def compute(self, x: Tensor) -> Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


def reversible_transformer_block(
    dim: int,
    num_heads: int,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    drop: float = 0.0,
    attn_drop: float = 0.0,
    drop_path: float = 0.0,
) -> AdditiveCoupling:
    """A RevViT block: ``y1 = x1 + attn(x2)``, ``y2 = x2 + mlp(y1)`` over two ``dim`` streams.

    The input is ``(batch, tokens, 2 * dim)``: the two streams are its halves along the last
    dimension. Same arguments, and the same parameters, as :class:`TransformerBlock`.
    """
    attn, mlp = _branches(dim, num_heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path)
    return AdditiveCoupling(attn, mlp, split_dim=-1)


class PatchEmbedding(nn.Module):
    """Image to tokens: non-overlapping ``patch_size`` patches, linearly projected, plus a
    learned position embedding. ``(batch, C_in, H, W) -> (batch, (H/p) * (W/p), dim)``.

    Args:
        image_size: height and width of the (square) input images.
        patch_size: side of a patch; must divide ``image_size``.
        in_channels: image channels.
        dim: token width.
    """

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(
                f"patch_size {patch_size} must divide image_size {image_size} (32x32 images: "
                "patch 2, 4 or 8)"
            )
        self.image_size = image_size
        self.num_tokens = (image_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected images of shape (batch, channels, {self.image_size}, "
                f"{self.image_size}), got {tuple(x.shape)}; build the model with "
                "image_size= the size of your images"
            )
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos_embed


class TokenHead(nn.Module):
    """The classifier: LayerNorm over each token, mean over the tokens, linear."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.fc(self.norm(tokens).mean(dim=1))


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic-depth rate of each block: rising linearly from 0 to ``rate`` at the top.

    The schedule of the stochastic-depth paper (Huang et al., 2016), used by DeiT and the
    RevViT paper: shallow blocks, which every later block depends on, are dropped least.
    """
    _check_probability("drop_path_rate", rate)
    if depth == 1:
        return [rate]
    return [rate * i / (depth - 1) for i in range(depth)]


def init_transformer_weights(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) linear weights and position embeddings, zero biases.

    The initialisation of ViT/DeiT: small weights keep every residual branch near zero at
    the start, so a deep stack begins close to the identity.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbedding):
            nn.init.trunc_normal_(m.pos_embed, std=0.02)
