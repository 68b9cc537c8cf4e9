"""Distributed training under ``torchrun``: launch, process group, and the DDP strategy.

``torchrun --nproc_per_node N -m invertible_train MODEL DATASET ...`` starts N copies of the
command line; each finds its place in the job from the variables torchrun sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). This module turns them
into a running job:

- :func:`process_group` initialises ``torch.distributed`` (NCCL on GPUs, gloo on CPUs,
  unless told otherwise), binds each process to ``cuda:LOCAL_RANK``, and destroys the group
  when the run ends, on error too. Outside torchrun it yields ``None``: one process.
- The :class:`DistributedContext` it yields is the
  :class:`~invertible_train.strategy.Distribution` a trainer is given for one rank: the
  model wrapped in ``DistributedDataParallel`` (optionally with SyncBatchNorm, see
  :mod:`invertible_train.sync_batchnorm`), sums all-reduced (evaluation, logged training
  figures, the non-finite and interrupt flags), rank 0's checkpoint read once and broadcast
  (so resuming needs no shared file system), the dataset prepared by one process per machine
  before the others read it. ``data.batch_size`` stays the *global* batch; each rank trains
  on its share. With ``--fsdp`` the model is sharded instead of wrapped
  (:meth:`DistributedContext.shard`, :mod:`invertible_train.sharding`).

Reversible networks need nothing special: a :class:`~invertible_core.ReversibleSequence`
takes its parameters as inputs of one autograd node, so each gradient reaches DDP once,
through an ordinary autograd edge, and ``find_unused_parameters`` stays ``False``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from invertible_train.config import ConfigError
from invertible_train.sharding import check_fsdp_available, shard_model
from invertible_train.strategy import Closable
from invertible_train.sync_batchnorm import convert_sync_batchnorm

__all__ = [
    "BACKENDS",
    "DistributedContext",
    "default_backend",
    "local_main_first",
    "process_group",
    "run_on_main",
    "torchrun_ranks",
]

#: values of ``--backend``; ``auto`` is NCCL for CUDA devices and gloo for the CPU.
BACKENDS = ("auto", "nccl", "gloo")

_T = TypeVar("_T")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a running job, and the strategy its trainer is given.

    Implements :class:`~invertible_train.strategy.Distribution` for one rank (see
    :mod:`invertible_train.strategy` for the one-process counterpart).
    """

    rank: int
    world_size: int
    #: index of this process on its machine (torchrun's ``LOCAL_RANK``): its GPU.
    local_rank: int
    backend: str
    #: the device this process trains on (``cuda:LOCAL_RANK`` on GPUs).
    device: torch.device
    #: the trainers of this job, closed (DDP released) before the group goes.
    _trainers: weakref.WeakSet[Any] = field(
        default_factory=weakref.WeakSet, repr=False, compare=False
    )

    @property
    def is_main_process(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    def wrap(self, module: nn.Module) -> nn.Module:
        """``DistributedDataParallel`` over ``module``, on this process's GPU when there is one."""
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=False)

    def shard(
        self,
        model: nn.Module,
        param_dtype: torch.dtype | None = None,
        methods: Sequence[str] = (),
    ) -> nn.Module:
        """``model`` sharded in place over every rank of the job with FSDP2 (``--fsdp``):
        every block a unit, then the root; see :func:`~invertible_train.sharding.shard_model`
        for ``param_dtype`` (the mixed-precision policy) and ``methods``."""
        check_fsdp_available()
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        return shard_model(model, mesh, param_dtype, methods)

    def sync_batchnorm(self, model: nn.Module) -> nn.Module:
        """``torch.nn.SyncBatchNorm`` on CUDA; on the CPU, where the stock layer cannot run,
        :class:`~invertible_train.sync_batchnorm.SyncBatchNorm`."""
        if self.device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return convert_sync_batchnorm(model)

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks, in place; returns it."""
        dist.all_reduce(tensor)
        return tensor

    def run_on_main(self, fn: Callable[[], _T]) -> _T:
        """See :func:`run_on_main`."""
        return run_on_main(fn)

    def main_first(self, fn: Callable[[], _T]) -> _T:
        """See :func:`local_main_first`."""
        return local_main_first(fn, self.local_rank)

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) to every rank.

        Without SyncBatchNorm each rank's statistics follow its own batches; evaluation
        broadcasts rank 0's first, so it measures the model rank 0 checkpoints.
        """
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)

    def track(self, trainer: Closable) -> None:
        """Close ``trainer`` (releasing its DDP wrapper) before the group is destroyed."""
        self._trainers.add(trainer)

    def release(self) -> None:
        """Close every trainer of this job and collect the freed DDP models.

        :func:`process_group` calls this just before it destroys the group. The order
        matters: a ``DistributedDataParallel`` model holds the process group from C++, and
        when it is the last holder, freeing it joins gloo's worker threads while holding
        the GIL, which deadlocks if a worker still needs the GIL to finish its last
        collective (seen with torch 2.13; pytorch/pytorch#56297 describes the class of
        bug). Released here, the models go while the group is still registered, and the
        group itself is freed by ``destroy_process_group``, which lets the GIL go first.
        """
        for trainer in list(self._trainers):
            trainer.close()
        gc.collect()


def torchrun_ranks(env: Mapping[str, str] | None = None) -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` when started by torchrun, else ``None``.

    A job is recognised by ``WORLD_SIZE``; when it is set, ``RANK`` and ``LOCAL_RANK`` must
    be too (a launcher that sets only some of them gets an error naming the missing ones).
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return None
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    missing = [name for name in names if name not in env]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not: start distributed runs with "
            "torchrun (torchrun --nproc_per_node N -m invertible_train ...), which sets all three"
        )
    try:
        rank, world_size, local_rank = (int(env[name]) for name in names)
    except ValueError:
        raise ConfigError(
            "RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
            + ", ".join(f"{name}={env[name]!r}" for name in names)
        ) from None
    if not 0 <= rank < world_size or local_rank < 0:
        raise ConfigError(
            f"RANK={rank}, LOCAL_RANK={local_rank} do not fit WORLD_SIZE={world_size}"
        )
    return rank, world_size, local_rank


def default_backend(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def _process_device(device: torch.device, local_rank: int) -> torch.device:
    """``cuda:LOCAL_RANK`` for a CUDA run (each process owns one GPU), else ``device``."""
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise ConfigError(
            f"train.device is {str(device)!r}, but under torchrun each process trains on "
            "cuda:LOCAL_RANK; set train.device to auto or cuda"
        )
    visible = torch.cuda.device_count()
    if local_rank >= visible:
        raise ConfigError(
            f"LOCAL_RANK {local_rank} needs GPU {local_rank}, but this machine shows {visible} "
            f"GPU(s); start at most {visible} processes per machine (--nproc_per_node {visible})"
        )
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def process_group(
    device: torch.device,
    backend: str = "auto",
    init_method: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[DistributedContext | None]:
    """Join the torchrun job this process belongs to, for the duration of the block.

    Yields ``None`` when the process was not started by torchrun (nothing to join). Otherwise
    it initialises the default process group (``backend``: ``auto``, ``nccl`` or ``gloo``;
    ``init_method`` defaults to torchrun's ``env://`` rendezvous), sets the CUDA device to
    ``LOCAL_RANK`` and yields the :class:`DistributedContext`; the group is destroyed on
    exit, also when the block raises, so no process is left waiting on a dead peer's group.
    """
    ranks = torchrun_ranks(env)
    if ranks is None:
        yield None
        return
    rank, world_size, local_rank = ranks
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    device = _process_device(device, local_rank)
    chosen = default_backend(device) if backend == "auto" else backend
    if chosen == "nccl" and device.type != "cuda":
        raise ConfigError(
            "backend nccl needs CUDA devices, but this run trains on the CPU; use --backend "
            "gloo (or auto), or drop --no-cuda"
        )
    if not dist.is_available() or not dist.is_backend_available(chosen):
        raise ConfigError(f"this build of torch has no {chosen} backend; try --backend gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        chosen,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        device_id=device if device.type == "cuda" else None,
    )
    context = DistributedContext(rank, world_size, local_rank, chosen, device)
    try:
        yield context
    finally:
        try:
            context.release()
        finally:
            dist.destroy_process_group()


# -- doing something once for everyone ------------------------------------------------------


@dataclass
class _Outcome:
    """What a call returned or raised, in a form that can travel between processes."""

    value: Any = None
    error: BaseException | None = None

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


def _attempt(fn: Callable[[], Any]) -> _Outcome:
    try:
        return _Outcome(value=fn())
    except Exception as exc:  # every rank must learn of the failure, whatever it is
        try:
            pickle.dumps(exc)
        except Exception:
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        return _Outcome(error=exc)


def run_on_main(fn: Callable[[], _T]) -> _T:
    """Call ``fn`` on rank 0 only; every rank returns its result or raises its exception.

    For what must happen once per job (reading the checkpoint, deleting old results): the
    result is pickled and broadcast, and an exception on rank 0 is raised on every rank, so
    no rank is left waiting in a collective for a rank that already gave up. Without a
    process group (one process) it simply calls ``fn``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return fn()
    outcome = [_attempt(fn) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(outcome, src=0)
    assert isinstance(outcome[0], _Outcome)
    return outcome[0].result()  # type: ignore[no-any-return]


def local_main_first(fn: Callable[[], _T], local_rank: int) -> _T:
    """Call ``fn`` on each machine's first process, then on the others; every rank gets a result.

    For what other processes may only read once one process per machine has written it
    (a dataset download): if ``fn`` fails on any first process, every rank raises that
    failure instead of repeating it.
    """
    first = local_rank == 0
    outcome = _attempt(fn) if first else None
    outcomes: list[Any] = [None] * dist.get_world_size()
    # the exception, not the value (a whole dataset), travels to the other ranks
    dist.all_gather_object(outcomes, None if outcome is None else _Outcome(error=outcome.error))
    for other in outcomes:
        if other is not None and other.error is not None:
            raise other.error
    return outcome.result() if outcome is not None else fn()  # type: ignore[no-any-return]
