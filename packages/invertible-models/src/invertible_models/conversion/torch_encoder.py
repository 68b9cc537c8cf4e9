"""PyTorch's ``nn.TransformerEncoder`` of ``nn.TransformerEncoderLayer``, pre- and post-norm.

An encoder layer is two residual steps: self-attention, then the feed-forward network.
With ``norm_first=True`` (pre-norm) each is ``x + f(norm(x))``; with ``norm_first=False``
(post-norm, the default) each is ``norm(x + f(x))``, whose branch is
``norm(x + f(x)) - x``. Every layer's two steps become residual units
(:class:`EncoderSelfAttention`, :class:`EncoderFeedForward`) and the whole stack one
reversible run, inside a :class:`ReversibleEncoder` that computes what the encoder computes
(the final ``norm`` included) with the same arguments: ``mask``, ``src_key_padding_mask``
and ``is_causal`` reach every attention. The units call the layer's own modules
(``self_attn``, ``linear1``, ``norm1``, ...) as the layer's forward does; they are not the
layer's fused inference kernel (``torch._transformer_encoder_layer_fwd``) and the encoder
does not turn padded batches into nested tensors, so in eval mode outputs at padded
positions are computed rather than zeroed (they are masked out everywhere else).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from invertible_models.conversion.context import ConversionContext, ConversionError
from invertible_models.conversion.stage import ReversibleStage
from invertible_models.conversion.units import ResidualUnit

__all__ = [
    "EncoderFeedForward",
    "EncoderSelfAttention",
    "ReversibleEncoder",
    "rewire_torch_encoder",
]


class _EncoderStep(ResidualUnit):
    """A residual step of an encoder layer, pre-norm (``x + f(norm(x))``) or post-norm
    (``norm(x + f(x))``)."""

    def __init__(self, norm: nn.Module, norm_first: bool) -> None:
        super().__init__()
        self.norm = norm
        self.norm_first = norm_first

    def branch(self, x: Tensor, **kwargs: Any) -> Tensor:
        raise NotImplementedError

    def residual(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.norm_first:
            return self.branch(self.norm(x), **kwargs)
        return self.norm(x + self.branch(x, **kwargs)) - x  # type: ignore[no-any-return]

    def with_skip(self, x: Tensor, alpha: float, *args: Any, **kwargs: Any) -> Tensor:
        if self.norm_first:
            f = self.branch(self.norm(x), **kwargs)
            return x + f if alpha == 1.0 else alpha * x + f
        out: Tensor = self.norm(x + self.branch(x, **kwargs))
        return out if alpha == 1.0 else out - (1.0 - alpha) * x


class EncoderSelfAttention(_EncoderStep):
    """The self-attention step of an ``nn.TransformerEncoderLayer`` (its ``norm1``,
    ``self_attn``, ``dropout1``); takes ``attn_mask``, ``key_padding_mask``, ``is_causal``."""

    def __init__(self, layer: nn.TransformerEncoderLayer) -> None:
        super().__init__(layer.norm1, layer.norm_first)
        self.self_attn = layer.self_attn
        self.dropout = layer.dropout1

    def branch(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
        **_: Any,
    ) -> Tensor:
        out = self.self_attn(
            x,
            x,
            x,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            need_weights=False,
            is_causal=is_causal,
        )[0]
        return self.dropout(out)  # type: ignore[no-any-return]


class EncoderFeedForward(_EncoderStep):
    """The feed-forward step of an ``nn.TransformerEncoderLayer`` (its ``norm2``,
    ``linear1``, activation, ``dropout``, ``linear2``, ``dropout2``); ignores masks."""

    def __init__(self, layer: nn.TransformerEncoderLayer) -> None:
        super().__init__(layer.norm2, layer.norm_first)
        self.linear1 = layer.linear1
        self.dropout = layer.dropout
        self.linear2 = layer.linear2
        self.dropout2 = layer.dropout2
        # a module activation (nn.GELU()) is a child of the layer, a function (F.relu) is not
        activation = layer.activation
        if isinstance(activation, nn.Module):
            self.activation = activation
        else:
            self._activation_fn: Callable[[Tensor], Tensor] = activation

    def _activate(self, x: Tensor) -> Tensor:
        if "activation" in self._modules:
            return self.activation(x)  # type: ignore[no-any-return]
        return self._activation_fn(x)

    def branch(self, x: Tensor, **_: Any) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(self._activate(self.linear1(x)))))  # type: ignore[no-any-return]


class ReversibleEncoder(nn.Module):
    """What an ``nn.TransformerEncoder`` computes, its layers as one reversible run.

    ``forward(src, mask=None, src_key_padding_mask=None, is_causal=None)`` as the encoder's
    (``is_causal`` is a hint there; the mask given is what the attention applies).
    """

    def __init__(self, layers: ReversibleStage, norm: nn.Module | None) -> None:
        super().__init__()
        self.layers = layers
        self.norm = norm

    def forward(
        self,
        src: Tensor,
        mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool | None = None,
    ) -> Tensor:
        out: Tensor = self.layers(
            src,
            attn_mask=mask,
            key_padding_mask=src_key_padding_mask,
            is_causal=bool(is_causal),
        )
        if self.norm is not None:
            out = self.norm(out)
        return out


def _units(layer: nn.Module, path: str) -> list[ResidualUnit]:
    if not isinstance(layer, nn.TransformerEncoderLayer) or (
        type(layer).forward is not nn.TransformerEncoderLayer.forward
    ):
        raise ConversionError(
            f"the encoder layer at {path!r} is a {type(layer).__name__} with its own forward, "
            "not an nn.TransformerEncoderLayer; make_reversible knows the residual steps of "
            "nn.TransformerEncoderLayer only (for your own layers, describe them with "
            "residual='x + net(x)' on an nn.Sequential)"
        )
    return [EncoderSelfAttention(layer), EncoderFeedForward(layer)]


def rewire_torch_encoder(
    encoder: nn.TransformerEncoder, ctx: ConversionContext, where: str
) -> ReversibleEncoder:
    """The :class:`ReversibleEncoder` of ``encoder`` (its layers' modules, not copies)."""
    path = f"{where}.layers" if where else "layers"
    stage = ctx.stage(encoder.layers.named_children(), _units, path)
    return ReversibleEncoder(stage, encoder.norm)
