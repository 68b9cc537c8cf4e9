"""ActNorm (Glow): a per-channel affine map, initialised from the data, then learned.

Batch normalisation does not suit an invertible network: its output depends on the other
samples of the batch, and train and eval modes compute different functions. Glow's
activation normalisation keeps what BatchNorm gives at the start of training (zero mean,
unit variance per channel) by *initialising* a plain per-channel scale and bias from the
first batch, then learns them like any other parameter: the layer is the same invertible
function of each sample in train and eval mode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from invertible_core._layer import (
    InvertibleLayer,
    channel_dim,
    check_channel_dim,
    check_positive_int,
    per_sample,
    positions,
)
from invertible_core.contract import is_recomputing

__all__ = ["ActNorm"]


class ActNorm(InvertibleLayer):
    """``y = (x + bias) * exp(logscale)`` per channel along ``dim``, with data-dependent init.

    The first forward pass in training mode (``module.train()``) sets ``bias`` and
    ``logscale`` from its batch so that this batch comes out with zero mean and unit variance
    per channel (statistics over the batch and every dim but ``dim``; ``eps`` guards a
    channel of constant values), then sets the persistent buffer ``initialized`` to 1. A
    loaded ``state_dict`` carries that flag, so a trained model is never re-initialised. The
    initialisation is skipped while a memory-saving chain recomputes the layer in backward
    (:func:`~invertible_core.is_recomputing`): the forward pass already did it.

    Before initialisation, a forward pass in eval mode and ``inverse`` in any mode raise a
    ``RuntimeError``: there is no sensible scale yet, and initialising from ``inverse``'s
    input would normalise the wrong side of the map (run one training batch forward, or
    load a trained ``state_dict``, first).

    ``log|det J| = positions * sum(logscale)`` per sample, ``positions`` being the number of
    positions per sample (``H * W`` for ``(B, C, H, W)``). Inputs of a lower precision than
    the parameters keep their dtype. Side inputs (``*args``, ``**kwargs``) are ignored.

    Distributed training: the initialisation uses the local batch, so under
    ``DistributedDataParallel`` each rank would initialise differently and the replicas
    would diverge (DDP synchronises gradients, not parameters). Initialise *before*
    wrapping the model in DDP: one forward pass in training mode on a batch (on rank 0, or
    on every rank), then wrap; DDP broadcasts rank 0's parameters and buffers, the flag
    included, when it is constructed.
    """

    initialized: Tensor

    def __init__(self, channels: int, dim: int = 1, eps: float = 1e-6) -> None:
        super().__init__()
        self.channels = check_positive_int(channels, "channels", "ActNorm")
        self.dim = check_channel_dim(dim, "ActNorm")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"ActNorm: eps must be a number > 0, got {eps!r}")
        self.eps = float(eps)
        self.bias = nn.Parameter(torch.zeros(channels))
        self.logscale = nn.Parameter(torch.zeros(channels))
        # uint8 rather than bool: every torch.distributed backend can broadcast it
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self._seen_initialized: Tensor | None = None
        self._seen_version = -1

    def _forward(self, x: Tensor) -> Tensor:
        d = channel_dim(x, self.dim, self.channels, type(self).__name__)
        # A memory-saving chain shows its recompute the buffers as they were before the
        # forward pass, so the flag may read 0 there although the forward pass initialised
        # the layer: in a recompute, never initialise, use the parameters as they are.
        if not is_recomputing() and not self.is_initialized():
            if not self.training:
                raise RuntimeError(
                    "ActNorm has not been initialised: its first forward pass in training "
                    "mode sets scale and bias from that batch. Run one batch through the "
                    "model in train() mode, or load a trained state_dict, before eval()"
                )
            self._initialize(x, d)
        bias, logscale = self._shaped(x, d)
        return (x + bias) * logscale.exp()

    def _inverse(self, y: Tensor) -> Tensor:
        d = channel_dim(y, self.dim, self.channels, type(self).__name__)
        if not is_recomputing() and not self.is_initialized():
            raise RuntimeError(
                "ActNorm.inverse before initialisation: scale and bias are set by the first "
                "forward pass in training mode; run one, or load a trained state_dict, first"
            )
        bias, logscale = self._shaped(y, d)
        return y * (-logscale).exp() - bias

    def _logdet(self, x: Tensor) -> Tensor:
        d = channel_dim(x, self.dim, self.channels, type(self).__name__)
        return per_sample(positions(x, d) * self.logscale.sum(), x)

    def is_initialized(self) -> bool:
        """Whether ``bias`` and ``logscale`` have been set (from data, or by a loaded state)."""
        # NOTE [ reading the flag without a device sync ]
        # The flag lives in a buffer (so that state_dicts and DDP's broadcast carry it), and
        # reading a CUDA buffer waits for the GPU. Once it has been seen set, the answer is
        # remembered for as long as the buffer is the same tensor at the same version: any
        # write to it (load_state_dict, a DDP broadcast, a restore by is_invertible_module)
        # bumps its version counter and forces one more read.
        flag = self.initialized
        if self._seen_initialized is flag and self._seen_version == flag._version:
            return True
        if not bool(flag):
            return False
        self._seen_initialized, self._seen_version = flag, flag._version
        return True

    @torch.no_grad()
    def _initialize(self, x: Tensor, d: int) -> None:
        dims = [i for i in range(x.dim()) if i != d]
        data = x.detach().to(self.bias.dtype)
        mean = data.mean(dim=dims)
        std = data.std(dim=dims, correction=0)
        self.bias.copy_(-mean)
        self.logscale.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(1)

    def _shaped(self, x: Tensor, d: int) -> tuple[Tensor, Tensor]:
        """``bias`` and ``logscale`` in ``x``'s dtype, shaped to broadcast along dim ``d``."""
        shape = [1] * x.dim()
        shape[d] = self.channels
        return self.bias.to(x.dtype).view(shape), self.logscale.to(x.dtype).view(shape)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, dim={self.dim}, eps={self.eps}"
