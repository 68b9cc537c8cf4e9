"""ReversibleUNet: a U of invertible blocks whose training memory does not grow with depth.

A U-Net runs down through levels of decreasing resolution, then back up, and joins each
level's way down to its way up by a *skip*. Made of invertible parts (couplings, an
invertible downsampling, a channel split for the skip; iUNets, Etmann et al. 2020), the
whole U is one invertible map, so its activations can be rebuilt in backward instead of
stored, as a :class:`~invertible_core.ReversibleSequence` rebuilds a straight chain.

The structure: each level's way down ends in a :class:`~invertible_core.ChannelSplit` into
``(skip, rest)``; the rest is downsampled to the next level; the lowest level (the bottom)
turns round; on the way up each level upsamples what comes from below, joins it to its
skip (:class:`~invertible_core.ChannelConcat`) and runs its blocks. The blocks between two
such joints form one *segment*, run as one :class:`~invertible_core.ReversibleSequence`:

    down[0]                                       up[0]
    [downsample[0], *down[1]]                     [*up[1], upsample[0]]
    ...                                           ...
                  [downsample[-1], *bottom, upsample[-1]]

The trade-off. A segment keeps only its output (and what the split and the join need is a
view of it, or nothing): memory for the activations is the U's *state*, the outputs of its
``2 K + 1`` segments for ``K`` levels above the bottom, plus one block's recompute while
backward runs, whatever the number of blocks per level. Plain autograd keeps every block's
activations: memory grows with the blocks per level. The cost is the sequences' one
recompute per block (about one extra forward pass). Options are the sequences':
``memory_saving=False`` is plain autograd (an attribute, settable at any time, no change
to parameters or ``state_dict`` keys); saving is off in eval mode and without grad.

Side inputs (``forward(x, *args, **kwargs)``) reach every block, as in a sequence; the
split, the join and the resampling layers ignore them. :meth:`ReversibleUNet.inverse` undoes
the U (the skips are cut off the way up and joined on the way down), and
:meth:`ReversibleUNet.forward_with_logdet` sums the blocks' log-determinants.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from invertible_core.channel_split import ChannelConcat, ChannelSplit
from invertible_core.recompute import report_logdet, wants_logdet, with_logdet
from invertible_core.sequence import ReversibleSequence

__all__ = ["ReversibleUNet"]

Blocks = nn.Module | Sequence[nn.Module]


def _blocks(value: Blocks, where: str) -> list[nn.Module]:
    if isinstance(value, nn.Module):
        return [value]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(
            f"ReversibleUNet: {where} must be an invertible block or a list of them, got "
            f"{type(value).__name__}"
        )
    return list(value)


def _pair(value: object, where: str) -> tuple[int, int]:
    if (
        not isinstance(value, Sequence)
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
    ):
        raise ValueError(
            f"ReversibleUNet: {where} must be (skip, rest), two channel counts >= 1, got {value!r}"
        )
    return int(value[0]), int(value[1])


class ReversibleUNet(nn.Module):
    """A U-shaped invertible network trained with memory bounded by its state, not its depth.

    Args:
        down: for each of the ``K`` levels above the bottom, top first, the blocks on the
            way down (a block or a list of blocks; level 0 needs at least one).
        bottom: the blocks of the lowest level.
        up: for each level above the bottom, top first, the blocks on the way up (level 0
            needs at least one).
        downsample: ``K`` invertible layers, the ``i``-th from level ``i``'s ``rest`` to
            level ``i + 1`` (such as :class:`~invertible_core.OrthogonalDownsampling`).
        upsample: ``K`` invertible layers, the ``i``-th from level ``i + 1`` back to level
            ``i``'s ``rest`` (such as :class:`~invertible_core.OrthogonalUpsampling`).
        splits: ``K`` pairs ``(skip, rest)``: level ``i``'s channels after its blocks on the
            way down, cut into the skip (first) and the part that goes down.
        split_dim: the channel dimension (1).
        memory_saving: rebuild activations in backward (default); ``False`` for plain
            autograd. An attribute of the U, settable at any time.
        preserve_rng_state, num_bwd_passes, drift_check: as
            :class:`~invertible_core.ReversibleSequence`'s, for every segment.

    The output has the input's shape when every level's way up gives back the channels its
    way down took. Every spatial size must be divisible by the product of the
    downsampling factors.
    """

    def __init__(
        self,
        down: Sequence[Blocks],
        bottom: Blocks,
        up: Sequence[Blocks],
        downsample: Sequence[nn.Module],
        upsample: Sequence[nn.Module],
        splits: Sequence[tuple[int, int]],
        *,
        split_dim: int = 1,
        memory_saving: bool = True,
        preserve_rng_state: bool = True,
        num_bwd_passes: int = 1,
        drift_check: bool = True,
    ) -> None:
        super().__init__()
        levels = len(down)
        if levels < 1:
            raise ValueError(
                "ReversibleUNet needs at least one level above the bottom (down, up, "
                "downsample, upsample and splits one entry each); with none, use a "
                "ReversibleSequence"
            )
        lengths = {
            "up": len(up),
            "downsample": len(downsample),
            "upsample": len(upsample),
            "splits": len(splits),
        }
        wrong = {name: n for name, n in lengths.items() if n != levels}
        if wrong:
            raise ValueError(
                f"ReversibleUNet: down has {levels} levels above the bottom, but "
                + ", ".join(f"{name} has {n}" for name, n in wrong.items())
                + "; give each one entry per level"
            )
        down_blocks = [_blocks(d, f"down[{i}]") for i, d in enumerate(down)]
        up_blocks = [_blocks(u, f"up[{i}]") for i, u in enumerate(up)]
        if not down_blocks[0] or not up_blocks[0]:
            raise ValueError(
                "ReversibleUNet: level 0 needs at least one block on the way down and one on "
                "the way up (the top level's segments hold no resampling layer)"
            )
        options: dict[str, Any] = {
            "memory_saving": memory_saving,
            "preserve_rng_state": preserve_rng_state,
            "num_bwd_passes": num_bwd_passes,
            "drift_check": drift_check,
        }
        self.down_segments = nn.ModuleList(
            ReversibleSequence(([downsample[i - 1]] if i else []) + down_blocks[i], **options)
            for i in range(levels)
        )
        self.bottom_segment = ReversibleSequence(
            [downsample[-1], *_blocks(bottom, "bottom"), upsample[-1]], **options
        )
        self.up_segments = nn.ModuleList(
            ReversibleSequence(up_blocks[i] + ([upsample[i - 1]] if i else []), **options)
            for i in range(levels)
        )
        sizes = [_pair(s, f"splits[{i}]") for i, s in enumerate(splits)]
        self.splits = nn.ModuleList(ChannelSplit(s, dim=split_dim) for s in sizes)
        self.joins = nn.ModuleList(ChannelConcat(s, dim=split_dim) for s in sizes)

    @property
    def levels(self) -> int:
        """Levels above the bottom (``K``)."""
        return len(self.down_segments)

    def segments(self) -> list[ReversibleSequence]:
        """The ``2 K + 1`` segments in the order the forward pass runs them."""
        return [*self.down_segments, self.bottom_segment, *reversed(self.up_segments)]  # type: ignore[list-item]

    @property
    def memory_saving(self) -> bool:
        """Whether the segments rebuild their activations in backward."""
        return all(bool(s.memory_saving) for s in self.segments())

    @memory_saving.setter
    def memory_saving(self, value: bool) -> None:
        for segment in self.segments():
            segment.memory_saving = bool(value)

    #: :meth:`forward` reports the U's log-determinant to :meth:`forward_with_logdet`
    reports_logdet = True

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """The U applied to ``x`` (side inputs reach every block); saves memory while
        training with grad enabled."""
        if not torch.compiler.is_compiling() and wants_logdet(self):
            y, logdet = self._down_and_up(x, args, kwargs, logdet=True)
            report_logdet(self, cast(Tensor, logdet))
            return y
        return self._down_and_up(x, args, kwargs, logdet=False)[0]

    def inverse(self, y: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Undo the U: ``inverse(forward(x)) == x`` up to float rounding."""
        return self._up_and_down(y, args, kwargs, logdet=False)[0]

    def forward_with_logdet(self, x: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """:meth:`forward` and the per-sample ``log|det dy/dx|`` summed over the blocks
        (shape ``(batch,)``); runs through ``__call__``, so hooks see a forward."""
        return with_logdet(self, self, x, *args, **kwargs)

    def inverse_with_logdet(self, y: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """:meth:`inverse` and the per-sample ``log|det dx/dy|`` (the forward's, negated)."""
        x, logdet = self._up_and_down(y, args, kwargs, logdet=True)
        return x, cast(Tensor, logdet)

    def _down_and_up(
        self, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any], logdet: bool
    ) -> tuple[Tensor, Tensor | None]:
        total = _Total(logdet)
        skips: list[Tensor] = []
        h = x
        for segment, split in zip(self.down_segments, self.splits):
            h = total.add(_run(segment, h, args, kwargs, logdet, inverse=False))
            skip, h = split(h)
            skips.append(skip)
        h = total.add(_run(self.bottom_segment, h, args, kwargs, logdet, inverse=False))
        for i in reversed(range(self.levels)):
            h = self.joins[i](skips.pop(), h)
            h = total.add(_run(self.up_segments[i], h, args, kwargs, logdet, inverse=False))
        return h, total.value

    def _up_and_down(
        self, y: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any], logdet: bool
    ) -> tuple[Tensor, Tensor | None]:
        total = _Total(logdet)
        skips: list[Tensor] = []
        h = y
        for segment, join in zip(self.up_segments, self.joins):
            h = total.add(_run(segment, h, args, kwargs, logdet, inverse=True))
            skip, h = cast(ChannelConcat, join).inverse(h)
            skips.append(skip)
        h = total.add(_run(self.bottom_segment, h, args, kwargs, logdet, inverse=True))
        for i in reversed(range(self.levels)):
            h = cast(ChannelSplit, self.splits[i]).inverse(skips.pop(), h)
            h = total.add(_run(self.down_segments[i], h, args, kwargs, logdet, inverse=True))
        return h, total.value

    def extra_repr(self) -> str:
        return f"levels={self.levels}, memory_saving={self.memory_saving}"


def _run(
    segment: nn.Module,
    h: Tensor,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    logdet: bool,
    inverse: bool,
) -> tuple[Tensor, Tensor | None]:
    sequence = cast(ReversibleSequence, segment)
    if logdet:
        fn = sequence.inverse_with_logdet if inverse else sequence.forward_with_logdet
        return fn(h, *args, **kwargs)
    return (sequence.inverse(h, *args, **kwargs) if inverse else sequence(h, *args, **kwargs)), None


class _Total:
    """The sum of the segments' log-determinants, when one is asked for."""

    def __init__(self, wanted: bool) -> None:
        self.wanted = wanted
        self.value: Tensor | None = None

    def add(self, out: tuple[Tensor, Tensor | None]) -> Tensor:
        y, logdet = out
        if self.wanted and logdet is not None:
            self.value = logdet if self.value is None else self.value + logdet
        return y
