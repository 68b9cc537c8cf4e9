"""The memory switches of a network: what they are, and the one place that reads and sets them.

A network trained with this library has two kinds of switch that trade memory for time:

- each :class:`~invertible_core.ReversibleSequence` *saves* (``memory_saving``: every block
  rebuilt in backward from its output) or not (plain autograd), and while saving may *keep*
  chosen blocks (``keep_blocks``: stored as plain autograd stores them);
- each *checkpointable* module (:class:`Checkpointable`: a module with a bool
  ``checkpointed``) is *checkpointed* (its forward keeps only its input and recomputes the
  rest in backward, ``torch.utils.checkpoint``'s trade) or *stores* its activations.
  :class:`~invertible_core.CheckpointableModule` is the implementation: subclass it and write ``compute``.

:class:`MemorySwitches` finds every switch of a module by module path and reads them all
(:meth:`MemorySwitches.state`, a :class:`SwitchState`) or sets them all
(:meth:`MemorySwitches.set`): the one writer, used by a network's ``memory_saving``
(:class:`MemorySaving`), by :meth:`~invertible_core.MemoryPlan.apply` and by the planner
while it measures. No switch changes a parameter, a buffer or a ``state_dict`` key, nor
what is computed: only what is stored for backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, cast, runtime_checkable

import torch
from torch import Tensor, nn

from invertible_core.sequence import ReversibleSequence

__all__ = [
    "Checkpointable",
    "CheckpointableModule",
    "MemorySaving",
    "MemorySwitches",
    "SwitchState",
    "is_checkpointable",
    "run_checkpointed",
]


@runtime_checkable
class Checkpointable(Protocol):
    """A module whose activations can be recomputed instead of stored, one switch per module.

    ``checkpointed = True`` means: while training with grad enabled, the module's forward
    keeps only its input for backward and recomputes everything else there (one more
    forward of the module per backward; ``torch.utils.checkpoint``'s trade), with the same
    outputs, gradients and buffer updates as ``False``, which stores its activations as
    plain autograd does. In eval mode and without grad both are the plain forward.
    The attribute is read at every forward, so it may change at any time.
    :class:`~invertible_core.CheckpointableModule` implements it.
    """

    checkpointed: bool


def is_checkpointable(module: object) -> bool:
    """Whether ``module`` is an ``nn.Module`` with a bool ``checkpointed`` switch."""
    return isinstance(module, nn.Module) and isinstance(getattr(module, "checkpointed", None), bool)


class CheckpointableModule(nn.Module):
    """A module with the :class:`Checkpointable` switch: subclass it and write :meth:`compute`.

    While ``checkpointed`` is True, the module is training and grad is enabled, ``forward``
    runs :meth:`compute` through :func:`run_checkpointed` (only the input kept for backward,
    the rest recomputed there, BatchNorm statistics updated once); otherwise it is
    :meth:`compute` itself. Off by default. It is a plain attribute: no parameter, buffer or
    ``state_dict`` key.
    """

    checkpointed: bool = False

    def compute(self, x: Tensor) -> Tensor:
        """The module's function (what ``forward`` runs, checkpointed or not)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if self.checkpointed and self.training and torch.is_grad_enabled():
            return run_checkpointed(self, x, self.compute)
        return self.compute(x)


@contextmanager
def _batchnorm_statistics_restored(module: nn.Module) -> Iterator[None]:
    """Put every BatchNorm running statistic of ``module`` back as it was on entry.

    Switching ``track_running_stats`` off for the recompute (what the reversible engine
    does) would change what BatchNorm saves for backward, and ``torch.utils.checkpoint``
    checks that a recompute saves what the forward saved. Running the layer as it ran and
    restoring its few buffers afterwards keeps the recompute identical.
    """
    saved = [
        (buf, buf.clone())
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
        for buf in m.buffers()
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def run_checkpointed(
    module: nn.Module, x: Tensor, fn: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """``module(x)`` (or ``fn(x)``, a function of ``module``'s layers) that keeps only ``x``
    for backward and recomputes the rest there.

    ``torch.utils.checkpoint`` (non-reentrant, random state preserved, so dropout repeats).
    Costs one more forward of ``module`` per backward; saves every intermediate activation
    of ``module``. BatchNorm running statistics are updated once, as without checkpointing.
    Without grad mode it is a plain call.
    """
    from torch.utils.checkpoint import checkpoint

    call: Callable[[Tensor], Tensor] = fn if fn is not None else module
    if not torch.is_grad_enabled():
        return call(x)
    calls = 0

    def run(inp: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        if calls == 1:
            return call(inp)
        # the recompute repeats a forward that already updated BatchNorm's running
        # statistics; without restoring them they would move twice per step
        with _batchnorm_statistics_restored(module):
            return call(inp)

    out = checkpoint(run, x, use_reentrant=False)
    assert isinstance(out, Tensor)
    return out


@dataclass(frozen=True)
class SwitchState:
    """A setting of every memory switch of a network, by module path.

    Attributes:
        saving: per reversible sequence, its ``memory_saving``.
        keep: per reversible sequence, the indices of its kept blocks (while saving).
        checkpointed: per checkpointable module, its ``checkpointed``.
    """

    saving: Mapping[str, bool] = field(default_factory=dict)
    keep: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    checkpointed: Mapping[str, bool] = field(default_factory=dict)


class MemorySwitches:
    """The memory switches inside ``module``: its reversible sequences and its checkpointable
    modules, each by module path (``""`` is ``module`` itself).

    A switch inside another one (a checkpointable inside a checkpointed module, a
    sequence's blocks) is not a switch of its own: the outer one decides. ``exclude(name,
    module)`` leaves switches out (a network whose ``memory_saving`` does not reach some).
    """

    def __init__(
        self, module: nn.Module, exclude: Callable[[str, nn.Module], bool] | None = None
    ) -> None:
        self.sequences: dict[str, ReversibleSequence] = {}
        self.checkpointables: dict[str, nn.Module] = {}
        claimed: list[str] = []
        for name, child in module.named_modules():
            if any(outer == "" or name.startswith(f"{outer}.") for outer in claimed):
                continue
            if isinstance(child, ReversibleSequence):
                claimed.append(name)
                if exclude is None or not exclude(name, child):
                    self.sequences[name] = child
            elif is_checkpointable(child):
                claimed.append(name)
                if exclude is None or not exclude(name, child):
                    self.checkpointables[name] = child

    def __bool__(self) -> bool:
        return bool(self.sequences or self.checkpointables)

    def state(self) -> SwitchState:
        """Every switch as it is now."""
        return SwitchState(
            saving={n: bool(s.memory_saving) for n, s in self.sequences.items()},
            keep={n: tuple(s.keep_blocks) for n, s in self.sequences.items()},
            checkpointed={
                n: bool(cast(Checkpointable, m).checkpointed)
                for n, m in self.checkpointables.items()
            },
        )

    def uniform(self, recompute: bool) -> SwitchState:
        """Every switch recomputing (sequences saving, nothing kept; modules checkpointed),
        or, with ``recompute=False``, every switch storing (plain autograd)."""
        return SwitchState(
            saving=dict.fromkeys(self.sequences, recompute),
            keep={n: () for n in self.sequences},
            checkpointed=dict.fromkeys(self.checkpointables, recompute),
        )

    def set(self, state: SwitchState) -> None:
        """Set the switches ``state`` names (``KeyError`` for a name this module lacks)."""
        for name, saving in state.saving.items():
            self.sequences[name].memory_saving = saving
        for name, keep in state.keep.items():
            self.sequences[name].keep_blocks = list(keep)
        for name, on in state.checkpointed.items():
            cast(Checkpointable, self.checkpointables[name]).checkpointed = on

    @contextmanager
    def restored(self) -> Iterator[None]:
        """The block may set switches; they are as before afterwards."""
        before = self.state()
        try:
            yield
        finally:
            self.set(before)


class MemorySaving:
    """``memory_saving``, one switch over the memory switches of a network (a mixin for an
    ``nn.Module``).

    ``memory_saving = True`` sets every switch of the network as
    :meth:`memory_saving_state` says (by default: every switch recomputes; sequences rebuild
    every block, checkpointable modules are checkpointed), ``False`` as it says for off (by
    default: every switch stores, plain autograd). Reading it says whether the switches are
    as ``memory_saving = True`` set them (a memory plan that stores some makes it False).
    :meth:`set_grad_checkpointing` is timm's name for setting it. It is no attribute of its
    own: the switches are the state.
    """

    def memory_saving_state(self, enabled: bool) -> SwitchState:
        """The switches as ``memory_saving = enabled`` sets them; a network whose switch
        does not reach every block (a ResNet's stem) overrides this."""
        return MemorySwitches(cast(nn.Module, self)).uniform(enabled)

    @property
    def memory_saving(self) -> bool:
        """Whether the switches are as ``memory_saving = True`` sets them."""
        switches = MemorySwitches(cast(nn.Module, self))
        return bool(switches) and switches.state() == self.memory_saving_state(True)

    @memory_saving.setter
    def memory_saving(self, value: bool) -> None:
        MemorySwitches(cast(nn.Module, self)).set(self.memory_saving_state(bool(value)))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's name: ``memory_saving = enable``."""
        self.memory_saving = enable
