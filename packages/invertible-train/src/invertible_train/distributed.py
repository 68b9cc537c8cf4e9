"""Distributed training under ``torchrun``: process group, DDP, SyncBatchNorm, rank-0 writes.

``torchrun --nproc_per_node N -m invertible_train MODEL DATASET ...`` starts N copies of the
command line; each finds its place in the job from the variables torchrun sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). This module turns them
into a running job:

- :func:`process_group` initialises ``torch.distributed`` (NCCL on GPUs, gloo on CPUs,
  unless told otherwise), binds each process to ``cuda:LOCAL_RANK``, and destroys the group
  when the run ends, on error too. Outside torchrun it yields ``None``: one process.
- :class:`DistributedTrainer` is the :class:`~invertible_train.engine.Trainer` with its
  seams filled: the model wrapped in ``DistributedDataParallel`` (optionally with
  SyncBatchNorm), rank 0's model evaluated with the test set split across ranks and the
  sums all-reduced, training loss and accuracy logged for the global batch, a non-finite
  loss on any rank stopping every rank, the checkpoint read by rank 0 and broadcast (so
  resuming needs no shared file system), the dataset prepared by one process per machine
  before the others read it. ``data.batch_size`` stays the *global* batch; each rank
  trains on its share.
- ``--sync-bn`` normalises with the statistics of the global batch. On CUDA it uses
  ``torch.nn.SyncBatchNorm`` (fused kernels; ``invertible_core``'s recompute supports
  it). On the CPU it uses :class:`SyncBatchNorm` from this module, put in place of every
  BatchNorm layer by :func:`convert_sync_batchnorm`: the stock layer refuses CPU tensors
  (and DDP refuses it on the CPU), so it cannot run on gloo. This one works on any device
  and backend and computes the same function in the forward pass and in the recompute.

Reversible networks need nothing special: a :class:`~invertible_core.ReversibleSequence`
takes its parameters as inputs of one autograd node, so each gradient reaches DDP once,
through an ordinary autograd edge, and ``find_unused_parameters`` stays ``False``.

Costs: one small collective per SyncBatchNorm layer in each forward (and recompute) and one
in each backward, as with the stock layer; its normalisation runs as ordinary autograd ops,
which keep about two more activation-sized tensors per layer than the fused stock kernel.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from invertible_train.config import ConfigError, ExperimentConfig
from invertible_train.data import ImageData, build_data
from invertible_train.engine import Trainer
from invertible_train.results import Throughput

__all__ = [
    "BACKENDS",
    "DistributedContext",
    "DistributedTrainer",
    "SyncBatchNorm",
    "all_gather_differentiable",
    "convert_sync_batchnorm",
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
    """Where this process stands in a running job."""

    rank: int
    world_size: int
    #: index of this process on its machine (torchrun's ``LOCAL_RANK``): its GPU.
    local_rank: int
    backend: str
    #: the device this process trains on (``cuda:LOCAL_RANK`` on GPUs).
    device: torch.device
    #: the trainers built on this context, closed (DDP released) before the group goes.
    _trainers: weakref.WeakSet[DistributedTrainer] = field(
        default_factory=weakref.WeakSet, repr=False, compare=False
    )

    @property
    def is_main_process(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

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


# -- SyncBatchNorm that works on every device and inside reversible blocks ---------------------


class _AllGather(torch.autograd.Function):
    """Stack every rank's ``tensor`` along a new first dimension, differentiably.

    Backward: each rank's output is used by every rank's loss, so the gradient of a rank's
    input is the sum over ranks of the gradients of its row.
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        rows = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(rows, tensor.contiguous(), group=group)
        return torch.stack(rows)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def all_gather_differentiable(tensor: Tensor, group: Any = None) -> Tensor:
    """``(world_size, *tensor.shape)``: every rank's ``tensor``, with gradients flowing back."""
    return _AllGather.apply(tensor, group)  # type: ignore[no-any-return]


class SyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, on any device.

    Made from a BatchNorm layer by :func:`convert_sync_batchnorm`, with the same
    parameters, buffers and ``state_dict`` keys, so checkpoints move freely between the two.
    In training mode under an initialised process group of more than one rank, each rank
    computes its batch's mean and variance in float32 (two passes, numerically stable), the
    per-rank statistics and counts are all-gathered and combined in rank order (so every
    rank normalises with bit-identical statistics), and gradients flow back through the
    gather. Otherwise (eval mode, one process) it is plain BatchNorm. Running statistics are
    updated with the global batch's values, and left alone while they are detached (the
    reversible recompute detaches them so that a batch is counted once).

    Not a subclass of ``torch.nn.SyncBatchNorm`` on purpose: DistributedDataParallel
    refuses that class on the CPU, and the class itself refuses CPU tensors and detached
    buffers.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device=device,
            dtype=dtype,
        )
        #: the ranks whose batches are normalised together (None: all of them).
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects at least 2D input, got {input.dim()}D")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(input)  # plain BatchNorm
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if dist.get_world_size(group) == 1:
            return super().forward(input)
        return self._synced_forward(input, group)

    def _synced_forward(self, input: Tensor, group: Any) -> Tensor:
        dims = [0, *range(2, input.dim())]
        x = input.float()
        count = input.numel() // input.shape[1]
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        counts = torch.full((1,), float(count), device=x.device)
        stats = all_gather_differentiable(torch.cat([mean, var, counts]), group)
        channels = mean.shape[0]
        means, variances = stats[:, :channels], stats[:, channels : 2 * channels]
        weights = stats[:, -1:].detach()
        total = weights.sum().clamp_min(1.0)  # tensors throughout: no device sync per layer
        global_mean = (weights * means).sum(0) / total
        # total variance = mean of the within-rank variances + variance of the rank means
        global_var = (weights * (variances + (means - global_mean) ** 2)).sum(0) / total
        shape = [1, channels] + [1] * (input.dim() - 2)
        out = (x - global_mean.view(shape)) * torch.rsqrt(global_var.view(shape) + self.eps)
        if self.weight is not None:
            out = out * self.weight.view(shape)
        if self.bias is not None:
            out = out + self.bias.view(shape)
        unbiased = global_var.detach() * (total / (total - 1.0).clamp_min(1.0))
        self._update_running_stats(global_mean.detach(), unbiased)
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, unbiased_var: Tensor) -> None:
        if not self.track_running_stats or self.running_mean is None or self.running_var is None:
            return  # not tracked, or detached for a recompute: counted once already
        factor = 0.0 if self.momentum is None else self.momentum
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """``module`` with every BatchNorm layer replaced by a :class:`SyncBatchNorm`.

    The replacements hold the very parameter and buffer objects of the layers they replace
    (an optimizer built before still updates them) and keep their training mode. The role
    of ``nn.SyncBatchNorm.convert_sync_batchnorm``, for this module's layer (see
    :class:`SyncBatchNorm` for why not the stock one).
    """
    converted = module
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        converted = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
        )
        # the same objects, not copies: state_dict keys and optimizer references carry over
        converted._parameters.update(module._parameters)
        converted._buffers.update(module._buffers)
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, process_group))
    return converted


# -- the trainer --------------------------------------------------------------------------------


class DistributedTrainer(Trainer):
    """A :class:`~invertible_train.engine.Trainer` for one rank of a torchrun job.

    ``data.batch_size`` is the global batch (it must divide by the world size); each rank
    trains on its share of the data through the sampler's ``num_replicas``/``rank``, and
    only rank 0 writes the results folder. ``sync_bn`` converts BatchNorm layers to
    :class:`SyncBatchNorm` so that they normalise with the statistics of the global batch
    (needed when the per-rank batch is small; costs a collective per layer).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        results_dir: str | Path,
        context: DistributedContext,
        sync_bn: bool = False,
        quiet: bool = False,
        data: ImageData | None = None,
    ) -> None:
        self.context = context
        self.sync_bn = sync_bn
        self.closed = False
        if data is None:
            data = local_main_first(
                lambda: build_data(cfg.data, cfg.train.seed), context.local_rank
            )
        super().__init__(
            cfg,
            results_dir,
            device=context.device,
            quiet=quiet,
            data=data,
            rank=context.rank,
            world_size=context.world_size,
        )
        context._trainers.add(self)

    def close(self) -> None:
        """Drop the ``DistributedDataParallel`` wrapper; the trained module stays.

        Called for every trainer when its :func:`process_group` block ends (see
        :meth:`DistributedContext.release`); call it yourself to free the wrapper earlier.
        ``self.module`` keeps the weights; training a closed trainer raises an error,
        because its gradients would no longer be averaged across ranks.
        """
        self.model = self.module
        self.closed = True

    def train_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, ...]:
        """One optimisation step on this rank's share of the batch (see the base class)."""
        if self.closed:
            raise RuntimeError(
                "this DistributedTrainer was closed when its process group ended; build a "
                "new one inside `with process_group(...)` to train again"
            )
        return super().train_step(images, labels)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """``DistributedDataParallel`` over the model (after SyncBatchNorm when asked)."""
        if self.sync_bn:
            if self.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                model = convert_sync_batchnorm(model)
            self.module = model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)

    def reduce(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over all ranks, in place; returns it."""
        dist.all_reduce(tensor)
        return tensor

    def _nonfinite(self, bad: Tensor, since: int) -> None:
        # a divergence seen by one rank stops all of them at the same iteration
        flag = self.reduce(bad.to(torch.int32))
        super()._nonfinite(flag > 0, since)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Evaluate rank 0's model, each rank on its share of the test set, sums all-reduced.

        Without SyncBatchNorm each rank's running statistics follow its own batches; rank
        0's are broadcast first, so the result is that of the model rank 0 checkpoints.
        """
        for buffer in self.module.buffers():
            dist.broadcast(buffer, src=0)
        return super().evaluate()

    def _log_train(
        self, loss_sum: Tensor, correct: Tensor, window: tuple[int, float]
    ) -> dict[str, Any]:
        # loss and accuracy of the global batch, images/s of the whole job
        images, seconds = window
        count = torch.tensor(float(images), dtype=torch.float64, device=self.device)
        totals = torch.stack([loss_sum.double(), correct.double(), count])
        loss_sum.copy_(self.reduce(totals)[0])
        correct.copy_(totals[1])
        return super()._log_train(loss_sum, correct, (int(totals[2]), seconds))

    def _summarize(self, last_eval: tuple[float, float], clock: Throughput) -> dict[str, Any]:
        # images/s of the whole job: every rank's images over rank 0's training time
        images = torch.tensor(float(clock.total_images), device=self.device)
        clock.total_images = int(self.reduce(images))
        return super()._summarize(last_eval, clock)

    def read_last_checkpoint(self) -> dict[str, Any] | None:
        """Rank 0 reads ``checkpoints/last.pt`` and sends it to every rank.

        Only rank 0 touches the results folder, so resuming works without a file system
        shared between machines; a checkpoint rank 0 cannot use fails on every rank.
        """
        return run_on_main(super().read_last_checkpoint)
