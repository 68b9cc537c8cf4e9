"""Sharded training (``--fsdp``): which modules are FSDP2 units, and how they are made.

Under ``--fsdp`` each rank of a torchrun job holds only its shard of every parameter, of
its gradient and of its optimizer state (FSDP2, ``torch.distributed.fsdp.fully_shard``);
a unit's parameters are gathered (all-gather) just before the unit runs and freed after
it, and its gradients are averaged and sharded again (reduce-scatter) in backward. So the
memory a rank needs for the model is about one unit's full parameters plus its shards.

:func:`shard_units` names the units, innermost first:

- each block of every :class:`~invertible_core.ReversibleSequence` (a RevNet's, an
  i-RevNet's, a RevViT's couplings; a Glow's ActNorm, 1x1 convolution and coupling of each
  step) that holds parameters;
- each checkpointable module outside a sequence (:func:`invertible_core.is_checkpointable`):
  in the zoo, the residual blocks of a ResNet and a RevNet's shape-changing transitions,
  the transformer blocks of a ViT, and the stems;
- with a mixed-precision policy (``--amp``), every normalisation layer (BatchNorm,
  LayerNorm, GroupNorm, and :class:`~invertible_train.sync_batchnorm.SyncBatchNorm`) as a
  unit of its own that keeps float32 parameters, as FSDP1's mixed precision keeps
  BatchNorm: BatchNorm's running statistics are float32, and CPU kernels refuse a
  normalisation with low-precision parameters and a float32 input;
- then the root, the whole model: what no unit above holds (a head, an embedding).

The memory-saving engine of ``invertible_core`` enters each block through
``nn.Module.__call__``, in the forward pass and in the recompute, so each block unit is
gathered once per forward and once in backward, where the rebuild, the replay and the
backprop share the gathered parameters.

Mixed precision (:func:`mixed_precision_policy`): a unit computes with parameters in the
``--amp`` dtype (gathered in it: half the traffic) and reduces gradients in float32, into
float32 shards. Inputs are not cast (``cast_forward_inputs=False``): the residual stream of
a reversible chain stays float32, which keeps its blocks exactly invertible, and
``torch.autocast`` (which ``--amp`` turns on as without ``--fsdp``) chooses each op's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

import torch
from torch import nn

from invertible_core import ReversibleSequence, is_checkpointable
from invertible_train.config import ConfigError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

__all__ = [
    "NORMALIZATION_LAYERS",
    "check_fsdp_available",
    "mixed_precision_policy",
    "refuse_fsdp_in_one_process",
    "reshard",
    "shard_model",
    "shard_units",
]

#: layers that keep float32 parameters under a mixed-precision policy (a unit each).
NORMALIZATION_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
)


def check_fsdp_available() -> None:
    """Raise :class:`ConfigError` when this torch has no FSDP2 (``fully_shard``: 2.6+)."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"--fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard), which torch "
            f"{torch.__version__} does not have; install torch 2.6 or newer, or train "
            "without --fsdp (DDP)"
        ) from None


def refuse_fsdp_in_one_process() -> NoReturn:
    """Raise the :class:`ConfigError` of ``--fsdp`` outside a torchrun job."""
    raise ConfigError(
        "--fsdp (train.fsdp) shards the model across the processes of a torchrun job, and "
        "this run is one process: start it with torchrun --nproc_per_node N -m "
        "invertible_train ... --fsdp, or drop --fsdp"
    )


def _holds_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def shard_units(model: nn.Module, mixed_precision: bool = False) -> list[nn.Module]:
    """The modules of ``model`` that become FSDP2 units, innermost first (the root, which
    :func:`shard_model` adds last, is not listed); see the module docstring."""
    blocks: list[nn.Module] = []
    claimed: list[str] = []  # a sequence's or checkpointable module's path: its insides are its
    for name, module in model.named_modules():
        if any(outer == "" or name.startswith(f"{outer}.") for outer in claimed):
            continue
        if isinstance(module, ReversibleSequence):
            claimed.append(name)
            blocks.extend(block for block in module if _holds_parameters(block))
        elif is_checkpointable(module) and module is not model:
            claimed.append(name)
            if _holds_parameters(module):
                blocks.append(module)
    if not mixed_precision:
        return blocks
    norms = [
        m for m in model.modules() if isinstance(m, NORMALIZATION_LAYERS) and _holds_parameters(m)
    ]
    return [*norms, *blocks]


def mixed_precision_policy(param_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """FSDP2's ``MixedPrecisionPolicy`` for ``--amp``: compute and gather parameters in
    ``param_dtype``, reduce gradients in float32, leave inputs as they come (None: the
    default policy, full precision)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if param_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
    )


def shard_model(
    model: nn.Module,
    mesh: DeviceMesh,
    param_dtype: torch.dtype | None = None,
    methods: Sequence[str] = (),
) -> nn.Module:
    """Shard ``model`` in place with ``fully_shard`` over ``mesh``: each of
    :func:`shard_units`, then the root; returns ``model``.

    ``param_dtype`` (the ``--amp`` dtype) gives every unit :func:`mixed_precision_policy`
    but the normalisation layers, which keep float32. ``methods``: methods of the model the
    caller calls besides ``forward`` (a density model's ``log_prob`` and ``sample``),
    registered with FSDP so that they gather the root's parameters as ``forward`` does.
    The model's parameters must be the same on every rank (the same seed): FSDP2 shards
    what each rank holds, it does not broadcast.
    """
    from torch.distributed.fsdp import (
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    policy = mixed_precision_policy(param_dtype)
    full_precision = MixedPrecisionPolicy()
    for unit in shard_units(model, mixed_precision=param_dtype is not None):
        keeps_float32 = isinstance(unit, NORMALIZATION_LAYERS)
        fully_shard(unit, mesh=mesh, mp_policy=full_precision if keeps_float32 else policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for name in methods:
        register_fsdp_forward_method(model, name)
    return model


def reshard(model: nn.Module) -> None:
    """Free every gathered parameter of the sharded ``model``, leaving each module holding
    its shards. FSDP2 keeps the root's parameters gathered after a forward pass until the
    backward pass (``reshard_after_forward`` is off for the root), so after a forward
    without backward (evaluation, sampling) the model holds whole parameters that its
    optimizer does not know; checkpointing needs the shards. A model without FSDP units is
    left alone."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
