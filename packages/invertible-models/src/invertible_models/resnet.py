"""Pre-activation ResNets: the baselines the RevNets are measured against.

:class:`ResNet` builds the CIFAR networks of the RevNet paper (3 stages, conv3x3 stem) and
the 4-stage ImageNet-style variant (conv7x7 stride-2 stem and a max-pool) from data: a block
type, blocks per stage, channels per stage. The registered constructors at the bottom
(``resnet32``, ``resnet110``, ``resnet164``) are those configurations; reach them through
:func:`invertible_models.create_model`.

A ResNet keeps every block's activations for backward, so its training memory grows
linearly with depth: it trains plainly by default, as timm's networks do, and is the
conventional ResNet of the RevNet paper's comparison. ``memory_saving=True`` (the zoo's one
switch, as on every model; ``set_grad_checkpointing()`` is timm's name for it) trades time
for memory the usual way: ``torch.utils.checkpoint`` per residual block, one extra forward
per block, and each block's input is still kept. It sets every residual block's own switch
(``block.checkpointed``), which a memory plan (:func:`invertible_core.fit_memory_budget`)
may then set block by block. ``checkpoint_blocks``, its former name, is a deprecated alias.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from torch import Tensor, nn

from invertible_core import MemorySaving, MemorySwitches, SwitchState
from invertible_models.blocks import (
    BlockType,
    Head,
    ResidualBlock,
    Stem,
    StemType,
    init_weights,
    residual_function,
)
from invertible_models.registry import register_model

__all__ = ["ResNet", "resnet32", "resnet110", "resnet164"]


def default_strides(num_stages: int) -> tuple[int, ...]:
    """Stride 1 for the first stage, 2 for every later one (halving the resolution)."""
    return (1,) + (2,) * (num_stages - 1)


def check_config(
    stage_blocks: Sequence[int], channels: Sequence[int], strides: Sequence[int]
) -> None:
    """Raise ValueError naming the argument when a network configuration is inconsistent."""
    if len(stage_blocks) not in (3, 4):
        raise ValueError(
            f"stage_blocks must give 3 (CIFAR) or 4 (ImageNet-style) stages, got {stage_blocks}"
        )
    if any(n < 1 for n in stage_blocks):
        raise ValueError(f"every stage needs at least one block, got {stage_blocks}")
    if len(channels) != len(stage_blocks) + 1:
        raise ValueError(
            f"channels must give the stem's width and one per stage ({len(stage_blocks) + 1} "
            f"values), got {channels}"
        )
    if len(strides) != len(stage_blocks):
        raise ValueError(f"strides must give one stride per stage, got {strides}")


class ResNet(MemorySaving, nn.Module):
    """A pre-activation ResNet: stem, stages of residual blocks, head.

    Args:
        block: ``"basic"`` (two 3x3 convs) or ``"bottleneck"`` (1x1, 3x3, 1x1, 4x wide).
        stage_blocks: residual blocks per stage; 3 stages for CIFAR, 4 for ImageNet-style.
        channels: the stem's width, then each stage's residual width (a bottleneck stage
            outputs 4x that).
        num_classes: outputs of the classifier.
        strides: stride of each stage's first block; default 1, 2, 2(, 2).
        stem: ``"cifar"`` (conv3x3) or ``"imagenet"`` (conv7x7 stride 2 + max-pool).
        in_channels: image channels.
        memory_saving: while training, recompute every residual block in backward
            (``torch.utils.checkpoint``; BatchNorm statistics still updated once): less
            memory, about one more forward of time. Off by default (plain autograd).
            Settable later through the attribute or ``set_grad_checkpointing()``;
            parameters and ``state_dict`` keys are the same either way.
        checkpoint_blocks: deprecated alias of ``memory_saving``; when given, it wins.
    """

    def __init__(
        self,
        block: BlockType,
        stage_blocks: Sequence[int],
        channels: Sequence[int],
        num_classes: int = 10,
        strides: Sequence[int] | None = None,
        stem: StemType = "cifar",
        in_channels: int = 3,
        memory_saving: bool = False,
        checkpoint_blocks: bool | None = None,
    ) -> None:
        super().__init__()
        strides = tuple(strides) if strides is not None else default_strides(len(stage_blocks))
        check_config(stage_blocks, channels, strides)
        residual_cls = residual_function(block)
        if checkpoint_blocks is not None:
            _warn_checkpoint_blocks()
            memory_saving = checkpoint_blocks
        self.stem = Stem(in_channels, channels[0], stem)
        width = channels[0]
        stages: list[nn.Module] = []
        for index, (count, planes, stride) in enumerate(
            zip(stage_blocks, channels[1:], strides, strict=True)
        ):
            blocks: list[nn.Module] = []
            for i in range(count):
                # The stem ends with BN + ReLU: the network's first block must not repeat them.
                preactivate = not (index == 0 and i == 0)
                res_block = ResidualBlock(
                    residual_cls, width, planes, stride if i == 0 else 1, preactivate
                )
                width = res_block.out_channels
                blocks.append(res_block)
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.num_features = width
        self.head = Head(width, num_classes)
        self.memory_saving = memory_saving
        init_weights(self)

    def memory_saving_state(self, enabled: bool) -> SwitchState:
        """Every residual block checkpointed (or none); never the stem, as MemCNN's
        checkpointed ResNet."""
        state = MemorySwitches(self).uniform(enabled)
        checkpointed = {name: enabled and name != "stem" for name in state.checkpointed}
        return replace(state, checkpointed=checkpointed)

    @property
    def checkpoint_blocks(self) -> bool:
        """Deprecated alias of ``memory_saving``."""
        _warn_checkpoint_blocks()
        return self.memory_saving

    @checkpoint_blocks.setter
    def checkpoint_blocks(self, value: bool) -> None:
        _warn_checkpoint_blocks()
        self.memory_saving = value

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's feature map, before the head's BN + ReLU and pooling."""
        out = self.stem(x)
        for stage in self.stages:
            out = stage(out)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Class logits of shape ``(batch, num_classes)``."""
        return self.head(self.forward_features(x))


def _warn_checkpoint_blocks() -> None:
    warnings.warn(
        "ResNet's checkpoint_blocks is deprecated: use memory_saving, the switch every model "
        "of the zoo has (for a ResNet it checkpoints the residual blocks)",
        DeprecationWarning,
        stacklevel=3,
    )


@register_model
def resnet32(num_classes: int = 10, memory_saving: bool = False, **options: Any) -> ResNet:
    """ResNet-32 for CIFAR: basic blocks 5, 5, 5; widths 16, 16, 32, 64 (0.47 M parameters)."""
    return ResNet(
        "basic", (5, 5, 5), (16, 16, 32, 64), num_classes, memory_saving=memory_saving, **options
    )


@register_model
def resnet110(num_classes: int = 10, memory_saving: bool = False, **options: Any) -> ResNet:
    """ResNet-110 for CIFAR: basic blocks 18, 18, 18; widths 16, 16, 32, 64 (1.73 M)."""
    return ResNet(
        "basic", (18, 18, 18), (16, 16, 32, 64), num_classes, memory_saving=memory_saving, **options
    )


@register_model
def resnet164(num_classes: int = 10, memory_saving: bool = False, **options: Any) -> ResNet:
    """ResNet-164 for CIFAR: bottleneck blocks 18, 18, 18; widths 16, 16, 32, 64 (1.70 M)."""
    return ResNet(
        "bottleneck",
        (18, 18, 18),
        (16, 16, 32, 64),
        num_classes,
        memory_saving=memory_saving,
        **options,
    )
