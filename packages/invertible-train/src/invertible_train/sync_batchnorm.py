"""SyncBatchNorm for every device and backend, and inside reversible blocks.

``--sync-bn`` (``train.sync_bn``) makes BatchNorm normalise with the statistics of the
global batch of a torchrun job. On CUDA the harness uses ``torch.nn.SyncBatchNorm`` (fused
kernels; ``invertible_core``'s recompute supports it). On the CPU it uses
:class:`SyncBatchNorm` from this module, put in place of every BatchNorm layer by
:func:`convert_sync_batchnorm`: the stock layer refuses CPU tensors (and DDP refuses it on
the CPU), so it cannot run on gloo. This one works on any device and backend and computes
the same function in the forward pass and in the recompute.

Costs: one small collective per layer in each forward (and recompute) and one in each
backward, as with the stock layer; its normalisation runs as ordinary autograd ops, which
keep about two more activation-sized tensors per layer than the fused stock kernel.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["SyncBatchNorm", "all_gather_differentiable", "convert_sync_batchnorm"]


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
            return  # not tracked
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
