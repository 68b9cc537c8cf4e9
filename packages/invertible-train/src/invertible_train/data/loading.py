"""Loading batches: a sampler whose place in the epoch can be saved, and the DataLoader.

:class:`ResumableSampler` is torch's ``DistributedSampler`` (one process is
``num_replicas=1``) with a position inside the epoch, which a checkpoint stores, so that a
resumed run continues with exactly the images an uninterrupted one would have seen.
:func:`make_loader` batches ``uint8`` images (one gather for in-memory datasets) with a
generator of its own, so that starting an epoch draws nothing from torch's global random
stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from invertible_train.data.datasets import InMemoryImages

__all__ = ["ResumableSampler", "make_loader"]


def _collate_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate for :class:`InMemoryImages`: ``__getitems__`` already built the batch."""
    return batch


class _Sized:
    """Stands in for a dataset where only its length matters (``DistributedSampler``)."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length


class ResumableSampler(DistributedSampler):  # type: ignore[type-arg]
    """``torch.utils.data.DistributedSampler`` whose position can be saved mid-epoch.

    The order is ``DistributedSampler``'s own for the same ``seed``, ``epoch``,
    ``num_replicas`` and ``rank`` (it computes it); this subclass adds ``start_index``: the
    number of this rank's indices of the epoch already consumed. A checkpoint stores
    ``(epoch, start_index)``; restoring both continues the same order, where the stock
    sampler could only restart the epoch. One process is ``num_replicas=1, rank=0``.
    """

    def __init__(
        self,
        length: int,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        super().__init__(
            _Sized(length),  # type: ignore[arg-type]
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
        )
        self.length = length
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Select the epoch's order and how many of its indices to skip."""
        super().set_epoch(epoch)
        self.start_index = start_index

    def indices(self) -> list[int]:
        """This rank's whole index list for the current epoch."""
        return list(super().__iter__())

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start_index :])

    def __len__(self) -> int:
        return int(self.num_samples) - self.start_index


def make_loader(
    dataset: Dataset[Any],
    batch_size: int,
    sampler: Sampler[int] | None = None,
    workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> DataLoader[Any]:
    """A DataLoader that batches ``uint8`` images (one gather for in-memory datasets).

    It has a generator of its own: a stock DataLoader draws a number from torch's global
    generator each time an epoch's iterator starts (the base seed of its workers), which
    would shift every random number the model draws afterwards (dropout, drop path, a
    flow's dequantisation noise) by where epochs begin and where a run was resumed.
    """
    collate: Callable[[Any], Any] | None = (
        _collate_batch if isinstance(dataset, InMemoryImages) else None
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        collate_fn=collate,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(0),
    )
