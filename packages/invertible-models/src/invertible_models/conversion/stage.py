"""A converted stack of blocks: runs of reversible units, and the blocks kept as they were.

A stage of an existing network (a ResNet's ``layer2``, a ViT's ``blocks``) mixes blocks
that keep their input's shape, which become residual units, with blocks that change it (a
ResNet's downsampling block), which cannot be inverted. :class:`ReversibleStage` holds, in
order, each maximal run of convertible blocks as one
:class:`~invertible_models.conversion.run.ReversibleRun` and each other block as a
:class:`KeptBlock`: the same module, computing what it computed, and recomputed in backward
with ``torch.utils.checkpoint`` while its switch ``checkpointed`` is on (the core's
``CheckpointableModule``, set by the converted network's ``memory_saving`` and
``checkpoint_kept``, or block by block by a memory plan).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from invertible_core import CheckpointableModule
from invertible_models.conversion.run import ReversibleRun

__all__ = ["KeptBlock", "ReversibleStage"]


class KeptBlock(CheckpointableModule):
    """A block the conversion could not make reversible, left as it was.

    ``forward(x)`` is ``module(x)``; while ``checkpointed`` (and training with grad) it keeps
    only ``x`` for backward and recomputes the rest there, BatchNorm statistics updated once.
    """

    def __init__(self, module: nn.Module, checkpointed: bool = False) -> None:
        super().__init__()
        self.module = module
        self.checkpointed = checkpointed

    def compute(self, x: Tensor) -> Tensor:
        return self.module(x)  # type: ignore[no-any-return]


class ReversibleStage(nn.Sequential):
    """Reversible runs and kept blocks, applied in order; iterating yields them.

    ``forward(x, *args, **kwargs)`` passes side inputs (masks) to the runs; kept blocks get
    ``x`` alone.
    """

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:  # type: ignore[override]
        for part in self:
            if isinstance(part, ReversibleRun):
                x = part(x, *args, **kwargs)
            else:
                x = part(x)
        return x
