"""invertible-core: memory-efficient invertible (reversible) layers for PyTorch.

Every block honours one small contract (:class:`InvertibleBlock`: ``forward`` and
``inverse``, with side inputs; :class:`LogDetBlock` adds log-determinants); a block whose
inverse calls the functions its forward calls shares them (:func:`shared_call`) and is
recomputed once. Couplings turn any functions into such blocks; invertible layers (:class:`InvertibleDownsampling`,
:class:`HaarDownsampling`, :class:`InvertibleConv1x1`, :class:`ActNorm`,
:class:`Permutation`) change shape or mix channels and report their log-determinants, for
fully invertible nets and flows, in 1D, 2D and 3D; :class:`OrthogonalDownsampling` and
:class:`OrthogonalUpsampling` learn it (iUNets), :class:`ChannelSplit` and
:class:`ChannelConcat` factor channels out and back in. A :class:`ReversibleSequence` trains
a chain of any of them with memory flat in depth, a :class:`ReversibleUNet` a U of them; the :class:`InvertibleModuleWrapper` (MemCNN's API) saves
memory around any single invertible module; :func:`is_invertible_module` checks
invertibility without side effects. :func:`fit_memory_budget` chooses, for a memory budget,
which blocks keep their activations and which recompute them (a :class:`MemoryPlan`), by
measuring the project's one :class:`TrainingStep`.

The measuring machinery (the planner's fitting and costs, the training step, the memory
measurement) loads when one of its names is first used, so that ``import invertible_core``
costs only the layers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from invertible_core._version import __version__
from invertible_core.actnorm import ActNorm
from invertible_core.channel_mixing import InvertibleConv1x1, Permutation
from invertible_core.channel_split import ChannelConcat, ChannelSplit
from invertible_core.checks import is_invertible_module
from invertible_core.contract import InvertibleBlock, LogDetBlock
from invertible_core.couplings import (
    AdditiveCoupling,
    AffineAdapterNaive,
    AffineAdapterSigmoid,
    AffineCoupling,
    Coupling,
    Partition,
    UnknownCouplingError,
    create_coupling,
)
from invertible_core.fixed_point import round_to_grid
from invertible_core.orthogonal_resampling import OrthogonalDownsampling, OrthogonalUpsampling
from invertible_core.planner.plan import (
    MemoryBudgetError,
    MemoryPlan,
    PlanMismatchError,
    UnitCost,
    format_bytes,
    parse_bytes,
)
from invertible_core.planner.switches import (
    Checkpointable,
    CheckpointableModule,
    MemorySaving,
    MemorySwitches,
    SwitchState,
    is_checkpointable,
    run_checkpointed,
)
from invertible_core.recompute import (
    call_with_logdet,
    is_recomputing,
    report_logdet,
    shared_call,
    wants_logdet,
    with_logdet,
)
from invertible_core.resampling import HaarDownsampling, InvertibleDownsampling
from invertible_core.sequence import ReversibleSequence
from invertible_core.unet import ReversibleUNet
from invertible_core.wrapper import InvertibleModuleWrapper, ReversibleBlock

if TYPE_CHECKING:
    from invertible_core.memory import (
        MemoryStats,
        mark_phase,
        measure_memory,
        measure_memory_phases,
    )
    from invertible_core.planner.fit import (
        FrontierPoint,
        MemoryProfile,
        fit_memory_budget,
        measure_minimum_peak,
    )
    from invertible_core.planner.step import (
        NonFiniteLossError,
        StepMemory,
        TrainingStep,
        measure_step_memory,
        median_step_seconds,
    )

#: the names loaded on first use, and the module of each
_LAZY = {
    **dict.fromkeys(
        ("MemoryStats", "mark_phase", "measure_memory", "measure_memory_phases"),
        "invertible_core.memory",
    ),
    **dict.fromkeys(
        ("FrontierPoint", "MemoryProfile", "fit_memory_budget", "measure_minimum_peak"),
        "invertible_core.planner.fit",
    ),
    **dict.fromkeys(
        (
            "NonFiniteLossError",
            "StepMemory",
            "TrainingStep",
            "measure_step_memory",
            "median_step_seconds",
        ),
        "invertible_core.planner.step",
    ),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'invertible_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is an ordinary one
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AffineAdapterNaive",
    "AffineAdapterSigmoid",
    "AffineCoupling",
    "ChannelConcat",
    "ChannelSplit",
    "Checkpointable",
    "CheckpointableModule",
    "Coupling",
    "FrontierPoint",
    "HaarDownsampling",
    "InvertibleBlock",
    "InvertibleConv1x1",
    "InvertibleDownsampling",
    "InvertibleModuleWrapper",
    "LogDetBlock",
    "MemoryBudgetError",
    "MemoryPlan",
    "MemoryProfile",
    "MemorySaving",
    "MemoryStats",
    "MemorySwitches",
    "NonFiniteLossError",
    "OrthogonalDownsampling",
    "OrthogonalUpsampling",
    "Partition",
    "Permutation",
    "PlanMismatchError",
    "ReversibleBlock",
    "ReversibleSequence",
    "ReversibleUNet",
    "StepMemory",
    "SwitchState",
    "TrainingStep",
    "UnitCost",
    "UnknownCouplingError",
    "__version__",
    "call_with_logdet",
    "create_coupling",
    "fit_memory_budget",
    "format_bytes",
    "is_checkpointable",
    "is_invertible_module",
    "is_recomputing",
    "mark_phase",
    "measure_memory",
    "measure_memory_phases",
    "measure_minimum_peak",
    "measure_step_memory",
    "median_step_seconds",
    "parse_bytes",
    "report_logdet",
    "round_to_grid",
    "run_checkpointed",
    "shared_call",
    "wants_logdet",
    "with_logdet",
]
