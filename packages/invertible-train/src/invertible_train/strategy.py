"""Where a run executes: its device, and how its trainer shares work with other processes.

A :class:`~invertible_train.trainer.Trainer` is given a :class:`Distribution`: the strategy
for everything that differs between one process and a torchrun job. The trainer calls it
unconditionally; :class:`SingleProcess` does nothing (``reduce`` returns its argument,
``wrap`` returns the model, ``run_on_main`` just calls), and
:class:`~invertible_train.distributed.DistributedContext` is the strategy of one rank of a
job (``DistributedDataParallel``, all-reduce, rank 0 writes). The trainer has no branch on
the number of processes.

========================  =======================================  ==========================
the trainer asks          one process                              a torchrun rank
========================  =======================================  ==========================
``is_main_process``       yes                                      rank 0 only
``wrap(module)``          the module                               ``DistributedDataParallel``
``shard(model)``          refused: nothing to shard across         FSDP2 ``fully_shard``, every
                                                                   block a unit (``--fsdp``)
``sync_batchnorm(model)`` the model                                BatchNorm -> SyncBatchNorm
``reduce(tensor)``        the tensor                               all-reduce (sum), in place
``run_on_main(fn)``       ``fn()``                                 rank 0 calls, all get it
``main_first(fn)``        ``fn()``                                 one process per machine
                                                                   first (a download)
``broadcast_buffers(m)``  nothing                                  rank 0's buffers to all
``track(trainer)``        nothing                                  closed before the group
                                                                   is destroyed
========================  =======================================  ==========================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

from invertible_train.config import ConfigError
from invertible_train.sharding import refuse_fsdp_in_one_process

__all__ = ["Closable", "Distribution", "SingleProcess", "select_device"]

_T = TypeVar("_T")


class Closable(Protocol):
    """What a strategy closes when its process group ends (a trainer: its DDP wrapper)."""

    def close(self) -> None: ...


@runtime_checkable
class Distribution(Protocol):
    """The strategy a trainer is given (see the module docstring for each method)."""

    @property
    def rank(self) -> int:
        """This process's place in the job (0 in one process)."""
        ...

    @property
    def world_size(self) -> int:
        """The number of processes of the job."""
        ...

    @property
    def local_rank(self) -> int:
        """This process's index on its machine."""
        ...

    @property
    def device(self) -> torch.device:
        """The device this process trains on."""
        ...

    @property
    def is_main_process(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        ...

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module the training loop calls: ``module``, or a DDP wrapper around it."""
        ...

    def shard(
        self,
        model: nn.Module,
        param_dtype: torch.dtype | None = None,
        methods: Sequence[str] = (),
    ) -> nn.Module:
        """``model`` sharded in place across the processes (``--fsdp``), with parameters in
        ``param_dtype`` while a unit computes; ``methods`` besides ``forward`` that the
        caller calls on it. See :mod:`invertible_train.sharding`."""
        ...

    def sync_batchnorm(self, model: nn.Module) -> nn.Module:
        """``model`` whose BatchNorm layers normalise over every process's batch."""
        ...

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over processes, in place; returns it."""
        ...

    def run_on_main(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` called by the main process; every process returns its result (or raises
        its exception)."""
        ...

    def main_first(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` on each machine's first process, then on the others (a download)."""
        ...

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Give every process the main process's buffers of ``module`` (BatchNorm statistics)."""
        ...

    def track(self, trainer: Closable) -> None:
        """Close ``trainer`` before the process group is destroyed."""
        ...


class SingleProcess:
    """The :class:`~invertible_train.strategy.Distribution` of a run in one process: every method does nothing."""

    rank = 0
    world_size = 1
    local_rank = 0

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    @property
    def is_main_process(self) -> bool:
        return True

    def wrap(self, module: nn.Module) -> nn.Module:
        return module

    def shard(
        self,
        model: nn.Module,
        param_dtype: torch.dtype | None = None,
        methods: Sequence[str] = (),
    ) -> nn.Module:
        refuse_fsdp_in_one_process()

    def sync_batchnorm(self, model: nn.Module) -> nn.Module:
        return model  # one process: the local batch is the global batch

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def run_on_main(self, fn: Callable[[], _T]) -> _T:
        return fn()

    def main_first(self, fn: Callable[[], _T]) -> _T:
        return fn()

    def broadcast_buffers(self, module: nn.Module) -> None:
        pass

    def track(self, trainer: Closable) -> None:
        pass


def select_device(spec: str = "auto", no_cuda: bool = False) -> torch.device:
    """``auto`` picks CUDA when present; ``no_cuda`` forces the CPU whatever ``spec`` says."""
    if no_cuda or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if spec == "auto":
        return torch.device("cuda")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N; got {spec!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {spec!r} but CUDA is not available; use cpu or auto")
    return device
