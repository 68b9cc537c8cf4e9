"""timm's ``VisionTransformer`` (``vit_tiny_patch16_224``, ``deit_small_patch16_224``, ...).

A timm ViT is patch embedding, position embedding, ``blocks`` (an ``nn.Sequential``), a
final norm and a head. Its pre-norm ``Block`` is two residual steps,
``x + drop_path1(ls1(attn(norm1(x))))`` and ``x + drop_path2(ls2(mlp(norm2(x))))``, which
become residual units (:class:`TimmAttention`, :class:`TimmMlp`); the other block types
timm builds ViTs from (``ResPostBlock``, ``ParallelScalingBlock``, ...) keep their shape
and are residual as a whole, so each becomes one unit ``f(x) = block(x) - x``. The whole
``blocks`` stack becomes one reversible run; the embeddings, the final norm and the head
stay as they were. The converted ViT's ``forward`` is timm's own (its ``blocks`` is the
reversible stage, called with the attention mask when one is given);
``set_grad_checkpointing`` would only checkpoint the run as a whole and is switched off.
``forward_intermediates`` sees the stack as one block. timm is never imported here: a model
is recognised when timm, which built it, is already loaded.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor, nn

from invertible_models.conversion.context import ConversionContext
from invertible_models.conversion.converted import shallow_copy
from invertible_models.conversion.units import ResidualUnit, WholeBlock

__all__ = ["TimmAttention", "TimmMlp", "is_timm_vit", "rewire_timm_vit"]


def is_timm_vit(module: nn.Module) -> bool:
    """Whether ``module`` is a ``timm.models.vision_transformer.VisionTransformer``."""
    vit = sys.modules.get("timm.models.vision_transformer")
    return vit is not None and isinstance(module, vit.VisionTransformer)


class TimmAttention(ResidualUnit):
    """The attention step of a timm ``Block``: ``x + drop_path1(ls1(attn(norm1(x))))``;
    ``attn_mask`` and ``is_causal`` go to the attention when given."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.norm1 = block.get_submodule("norm1")
        self.attn = block.get_submodule("attn")
        self.ls1 = block.get_submodule("ls1")
        self.drop_path1 = block.get_submodule("drop_path1")

    def residual(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.drop_path1(self.ls1(self.attn(self.norm1(x), **kwargs)))

    def with_skip(self, x: Tensor, alpha: float, *args: Any, **kwargs: Any) -> Tensor:
        f = self.residual(x, **kwargs)
        return x + f if alpha == 1.0 else alpha * x + f


class TimmMlp(ResidualUnit):
    """The MLP step of a timm ``Block``: ``x + drop_path2(ls2(mlp(norm2(x))))``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.norm2 = block.get_submodule("norm2")
        self.mlp = block.get_submodule("mlp")
        self.ls2 = block.get_submodule("ls2")
        self.drop_path2 = block.get_submodule("drop_path2")

    def residual(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def with_skip(self, x: Tensor, alpha: float, *args: Any, **kwargs: Any) -> Tensor:
        f = self.residual(x)
        return x + f if alpha == 1.0 else alpha * x + f


def _units(block: nn.Module, path: str) -> list[ResidualUnit]:
    vit = sys.modules["timm.models.vision_transformer"]
    if isinstance(block, vit.Block) and type(block).forward is vit.Block.forward:
        return [TimmAttention(block), TimmMlp(block)]
    # timm's other ViT blocks keep the shape and add to their input as a whole
    return [WholeBlock(block, side_inputs=True)]


def rewire_timm_vit(model: nn.Module, ctx: ConversionContext, where: str) -> nn.Module:
    """A shallow copy of the timm ViT ``model`` whose ``blocks`` are one reversible run."""
    new = shallow_copy(model)
    path = f"{where}.blocks" if where else "blocks"
    new.blocks = ctx.stage(model.get_submodule("blocks").named_children(), _units, path)
    vars(new)["grad_checkpointing"] = False
    return new
