"""RevNets (Gomez et al., 2017): residual networks whose activations need not be stored.

A RevNet stage is a shape-changing residual block (a *transition*: stride 2 or more
channels, which cannot be inverted) followed by reversible blocks: additive couplings whose
``Fm`` and ``Gm`` are residual functions at half the channels. A stage whose input already
has the right shape is reversible from its first block. The reversible blocks of a stage run
through ONE :class:`invertible_core.ReversibleSequence`, which keeps only the stage's output
and rebuilds every block's input in backward (one recompute per block), so the stored
activations no longer grow with depth.

What remains stored without further measures is the work of the non-reversible parts: the
stem and each stage's transition block keep all their intermediate activations, which for
RevNet-164 (bottleneck transitions at full width) is most of its memory. With
``checkpoint_transitions=True`` (the default) these are recomputed in backward too
(``torch.utils.checkpoint``), so a training step holds little more than the stages' outputs
plus one block's recompute. Why that default: the transitions are 3 (or 4) blocks out of
dozens, so recomputing them costs a few percent of step time, while they hold most of the
memory that is left; a user who asked for a memory-saving network wants that memory back.
It only applies while ``memory_saving`` is on, so ``memory_saving=False`` is plain autograd
throughout. Each of these blocks has its own switch (``model.stem.checkpointed``,
``stage.transition.checkpointed``) and each reversible block its own keep-or-rebuild choice
(``stage.blocks.keep_blocks``): ``memory_saving`` (on by default; ``set_grad_checkpointing``
is timm's name for it) sets them all (everything recomputed, or nothing), and a memory plan
(:func:`invertible_core.fit_memory_budget`) sets them one by one, to store what fits a
budget.

Float32 drift: rebuilding inputs from outputs repeats additions and subtractions, so each
block adds rounding error that the next reconstruction carries along. ``anchor_every=k``
keeps the exact input of every k-th block (one stored feature map per k blocks) and resets
the drift there; see the package README for the error measured against depth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from torch import Tensor, nn

from invertible_core import MemorySaving, MemorySwitches, ReversibleSequence, SwitchState
from invertible_models.blocks import (
    BasicResidual,
    BlockType,
    BottleneckResidual,
    Head,
    ResidualBlock,
    Stem,
    StemType,
    float32_stream,
    init_weights,
    residual_function,
    reversible_block,
)
from invertible_models.registry import register_model
from invertible_models.resnet import check_config, default_strides

__all__ = ["RevNet", "RevNetStage", "revnet38", "revnet110", "revnet164"]

#: Fractional bits of the fixed-point grid of the reversible stages: additions are exact
#: for activations below 2**(24 - 16) = 256 in magnitude, rounding moves a value by at most
#: 2**-17 (7.6e-6), far below what training notices.
DEFAULT_FIXED_POINT_BITS = 16


class RevNetStage(nn.Module):
    """A transition block (when the stage changes shape), then a reversible sequence.

    Args:
        residual_cls: the residual function class of the stage.
        in_channels: channels entering the stage.
        channels: residual width of the stage; the stage outputs ``channels * expansion``.
        num_blocks: blocks in the stage, the transition included.
        stride: stride of the stage's first block.
        preactivate_first: whether the first block starts with BN + ReLU.
        memory_saving, anchor_every: passed to the :class:`~invertible_core.ReversibleSequence`.
        fixed_point_bits: grid of the reversible blocks' additions (see :class:`RevNet`).
    """

    def __init__(
        self,
        residual_cls: type[BasicResidual] | type[BottleneckResidual],
        in_channels: int,
        channels: int,
        num_blocks: int,
        stride: int,
        preactivate_first: bool = True,
        memory_saving: bool = True,
        anchor_every: int = 0,
        fixed_point_bits: int | None = DEFAULT_FIXED_POINT_BITS,
    ) -> None:
        super().__init__()
        out_channels = channels * residual_cls.expansion
        self.transition: ResidualBlock | None = None
        preactivate = preactivate_first
        if stride != 1 or in_channels != out_channels:
            self.transition = ResidualBlock(
                residual_cls, in_channels, channels, stride, preactivate
            )
            num_blocks -= 1
            preactivate = True
        self.blocks: ReversibleSequence | None = None
        if num_blocks > 0:
            couplings = [
                reversible_block(
                    residual_cls, out_channels, preactivate if i == 0 else True, fixed_point_bits
                )
                for i in range(num_blocks)
            ]
            self.blocks = ReversibleSequence(
                *couplings, memory_saving=memory_saving, anchor_every=anchor_every
            )
        self.out_channels = out_channels
        self.fixed_point_bits = fixed_point_bits

    def forward(self, x: Tensor) -> Tensor:
        if self.transition is not None:
            x = self.transition(x)
        if self.blocks is not None:
            # a float32 residual stream (under autocast too), which the chain puts on the
            # couplings' grid: every sum in it is exact
            x = self.blocks(float32_stream(x))
        return x


class RevNet(MemorySaving, nn.Module):
    """A reversible residual network: stem, RevNet stages, head.

    Args:
        block: ``"basic"`` or ``"bottleneck"`` residual functions.
        stage_blocks: blocks per stage (transition included); 3 stages for CIFAR, 4 for
            the ImageNet-style variant.
        channels: the stem's width, then each stage's residual width.
        num_classes: outputs of the classifier.
        strides: stride of each stage's first block; default 1, 2, 2(, 2).
        stem: ``"cifar"`` (conv3x3) or ``"imagenet"`` (conv7x7 stride 2 + max-pool).
        in_channels: image channels.
        memory_saving: run the reversible stages without storing activations. Can be
            changed later through the ``memory_saving`` attribute; parameters and
            ``state_dict`` keys are the same either way.
        checkpoint_transitions: while saving memory in training, also recompute the stem
            and the transition blocks in backward (default True; see the module docstring).
        anchor_every: keep exact activations every this many reversible blocks to bound
            float32 drift (0: never; costs one feature map per anchor). Not needed with
            ``fixed_point_bits``, which removes the drift.
        fixed_point_bits: compute the reversible blocks' additions on a fixed-point grid of
            ``2**-fixed_point_bits`` (default 16), so that rebuilding inputs from outputs is
            bit-exact in float32 and the gradients equal plain autograd's; ``None`` for
            ordinary float arithmetic (MemCNN's behaviour: rebuilt inputs drift by rounding).
            Both memory modes compute the same function, so this never changes what
            ``memory_saving`` toggles. Ignored under float16/bfloat16.
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
        memory_saving: bool = True,
        checkpoint_transitions: bool = True,
        anchor_every: int = 0,
        fixed_point_bits: int | None = DEFAULT_FIXED_POINT_BITS,
    ) -> None:
        super().__init__()
        strides = tuple(strides) if strides is not None else default_strides(len(stage_blocks))
        check_config(stage_blocks, channels, strides)
        residual_cls = residual_function(block)
        self.stem = Stem(in_channels, channels[0], stem)
        width = channels[0]
        stages: list[RevNetStage] = []
        for index, (count, planes, stride) in enumerate(
            zip(stage_blocks, channels[1:], strides, strict=True)
        ):
            stage = RevNetStage(
                residual_cls,
                width,
                planes,
                count,
                stride,
                # The stem ends with BN + ReLU: the network's first block must not repeat them.
                preactivate_first=index > 0,
                memory_saving=memory_saving,
                anchor_every=anchor_every,
                fixed_point_bits=fixed_point_bits,
            )
            width = stage.out_channels
            stages.append(stage)
        self.stages = nn.ModuleList(stages)
        self.num_features = width
        self.head = Head(width, num_classes)
        self._checkpoint_transitions = bool(checkpoint_transitions)
        self.memory_saving = memory_saving
        init_weights(self)

    def memory_saving_state(self, enabled: bool) -> SwitchState:
        """Every reversible block rebuilt, and (with ``checkpoint_transitions``) the stem and
        the transitions checkpointed; off: plain autograd throughout."""
        state = MemorySwitches(self).uniform(enabled)
        checkpointed = enabled and self._checkpoint_transitions
        return replace(state, checkpointed=dict.fromkeys(state.checkpointed, checkpointed))

    @property
    def checkpoint_transitions(self) -> bool:
        """Whether saving memory also checkpoints the stem and the transitions; setting it
        applies at once while ``memory_saving`` is on."""
        return self._checkpoint_transitions

    @checkpoint_transitions.setter
    def checkpoint_transitions(self, value: bool) -> None:
        saving = self.memory_saving
        self._checkpoint_transitions = bool(value)
        if saving:
            self.memory_saving = True

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's feature map, before the head's BN + ReLU and pooling."""
        # the stem and transitions recompute only while training (eval keeps nothing)
        out = self.stem(x)
        for stage in self.stages:
            out = stage(out)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Class logits of shape ``(batch, num_classes)``."""
        return self.head(self.forward_features(x))


def _revnet(
    block: BlockType,
    stage_blocks: tuple[int, ...],
    channels: tuple[int, ...],
    num_classes: int,
    memory_saving: bool,
    options: dict[str, Any],
) -> RevNet:
    return RevNet(
        block, stage_blocks, channels, num_classes, memory_saving=memory_saving, **options
    )


@register_model
def revnet38(num_classes: int = 10, memory_saving: bool = True, **options: Any) -> RevNet:
    """RevNet-38 for CIFAR: basic blocks 3, 3, 3; widths 32, 32, 64, 112 (0.57 M parameters)."""
    return _revnet("basic", (3, 3, 3), (32, 32, 64, 112), num_classes, memory_saving, options)


@register_model
def revnet110(num_classes: int = 10, memory_saving: bool = True, **options: Any) -> RevNet:
    """RevNet-110 for CIFAR: basic blocks 9, 9, 9; widths 32, 32, 64, 128 (1.85 M)."""
    return _revnet("basic", (9, 9, 9), (32, 32, 64, 128), num_classes, memory_saving, options)


@register_model
def revnet164(num_classes: int = 10, memory_saving: bool = True, **options: Any) -> RevNet:
    """RevNet-164 for CIFAR: bottleneck blocks 9, 9, 9; widths 32, 32, 64, 128 (1.98 M)."""
    return _revnet("bottleneck", (9, 9, 9), (32, 32, 64, 128), num_classes, memory_saving, options)
