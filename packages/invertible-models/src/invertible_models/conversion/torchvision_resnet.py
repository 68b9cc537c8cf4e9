"""torchvision's ResNets (``resnet18`` to ``resnet152``, ``wide_resnet``, ``resnext``).

A torchvision ``ResNet`` is a stem (``conv1``, ``bn1``, ``relu``, ``maxpool``), four stages
``layer1`` to ``layer4`` of ``BasicBlock`` or ``Bottleneck`` blocks, and a head
(``avgpool``, ``fc``). A block computes ``relu(shortcut(x) + f(x))``; the first block of a
stage changes the shape (stride 2 or more channels: a ``downsample`` shortcut) and cannot
be inverted, every other block keeps the shape. Those identity blocks, every stage's, become
one reversible run per stage, each block a residual unit ``f(x) = block(x) - x`` (the ReLU
after the sum belongs to the step; momentumnet's conversion does the same). The
downsampling blocks and the head stay as they were, and so does the stem, whose four
modules run as one kept block at ``conv1`` (``bn1``, ``relu`` and ``maxpool`` become
``nn.Identity``), so that, as a RevNet's stem and transitions, the stem and the
downsampling blocks are checkpointed while saving memory (``checkpoint_kept``).
torchvision is never imported here: a model is recognised when torchvision, which built it,
is already loaded.
"""

from __future__ import annotations

import sys

from torch import nn

from invertible_models.conversion.context import ConversionContext
from invertible_models.conversion.converted import shallow_copy
from invertible_models.conversion.stage import KeptBlock
from invertible_models.conversion.units import ResidualUnit, WholeBlock

__all__ = ["is_torchvision_resnet", "rewire_torchvision_resnet"]

_STAGES = ("layer1", "layer2", "layer3", "layer4")


def is_torchvision_resnet(module: nn.Module) -> bool:
    """Whether ``module`` is a ``torchvision.models.ResNet`` (without importing torchvision)."""
    resnet = sys.modules.get("torchvision.models.resnet")
    return resnet is not None and isinstance(module, resnet.ResNet)


def _units(block: nn.Module, path: str) -> list[ResidualUnit] | str:
    resnet = sys.modules["torchvision.models.resnet"]
    if not isinstance(block, (resnet.BasicBlock, resnet.Bottleneck)):
        return f"a {type(block).__name__}, not torchvision's BasicBlock or Bottleneck"
    if block.downsample is not None:
        return "changes the shape (a downsampling block: stride or channels)"
    return [WholeBlock(block)]


def rewire_torchvision_resnet(model: nn.Module, ctx: ConversionContext, where: str) -> nn.Module:
    """A shallow copy of the ResNet ``model`` whose four stages are reversible stages and
    whose stem is one kept block."""
    new = shallow_copy(model)
    stem = nn.Sequential(*(model.get_submodule(n) for n in ("conv1", "bn1", "relu", "maxpool")))
    new.conv1 = KeptBlock(stem, ctx.memory_saving and ctx.checkpoint_kept)
    new.bn1, new.relu, new.maxpool = nn.Identity(), nn.Identity(), nn.Identity()
    ctx.record.kept.append(
        (f"{where}.conv1" if where else "conv1", "the stem (conv1, bn1, relu, maxpool)")
    )
    for name in _STAGES:
        stage = model.get_submodule(name)
        path = f"{where}.{name}" if where else name
        setattr(new, name, ctx.stage(stage.named_children(), _units, path))
    return new
