"""One training step: the unit every measurement of this project is made of.

:class:`TrainingStep` is forward, loss, backward and the optimizer's step of a module on a
fixed batch, with the caller's optimizer, ``torch.autocast`` dtype and
``torch.amp.GradScaler``, callable again and again. The memory planner
(:func:`~invertible_core.fit_memory_budget`), the zoo's profiler (``invertible-profile``),
the training harness's memory figures (``summary.json``), the demo and the benchmarks all
measure this object, so a figure means the same wherever it is printed.

The quantities, one name each (bytes; tensors that share a storage count once):

``state_bytes``
    parameters, buffers, their gradients and the optimizer's state: what training holds
    whatever the batch.
``batch_bytes``
    the step's inputs and targets, and the gradients of inputs that are leaves requiring
    grad.
``held_bytes``
    both together: allocated before a step and still after it.
``step_peak_bytes``
    the most the step allocates beyond ``held_bytes`` at any instant: the activations and
    temporaries of forward, loss, backward and the optimizer step.
``peak_bytes``
    ``held_bytes + step_peak_bytes``: what the step needs in all, what a memory budget
    counts.
``activation_bytes``
    what a training-mode forward pass leaves allocated for backward, its output included:
    what memory saving reduces.

:func:`measure_step_memory` measures them (exactly on the CPU, with the allocator's counters
on CUDA) and :func:`median_step_seconds` times steps. Both *rewind*: every measured step
starts from one state of the model (``StateSnapshot``: parameters, buffers, the
optimizer's and the scaler's state, put back between steps, outside what is measured), so
they measure what a step costs at that state, whatever the learning rate, and never carry
the model off to NaN. A step whose loss is not finite raises :class:`NonFiniteLossError`
before its backward: the cost of NaN arithmetic is not the cost of training, and a
measurement that meets one records nothing.
"""

from __future__ import annotations

import copy
import gc
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from invertible_core.memory import measure_memory

__all__ = [
    "Clock",
    "NonFiniteLossError",
    "StateSnapshot",
    "StepMemory",
    "TrainingStep",
    "measure_step_memory",
    "median_step_seconds",
    "sum_of_outputs",
]

Clock = Literal["wall", "cpu"]


class NonFiniteLossError(FloatingPointError):
    """A training step's loss was NaN or infinite (raised before its backward).

    Attributes:
        loss: the loss's value.
        step: how many steps the :class:`TrainingStep` had taken before this one.
    """

    def __init__(self, message: str, loss: float, step: int) -> None:
        super().__init__(message)
        self.loss = loss
        self.step = step


def sum_of_outputs(out: Any) -> Tensor:
    """The default loss: the sum of every floating output that requires grad."""
    parts = [t.float().sum() for t in tensors(out) if t.is_floating_point() and t.requires_grad]
    if not parts:
        raise ValueError(
            "no output of the module requires grad, so a training step has nothing to "
            "backpropagate; pass loss_fn, or inputs/parameters that need grad"
        )
    return torch.stack(parts).sum()


class TrainingStep:
    """Forward, loss, backward and optimizer step of ``module`` on a fixed batch.

    Each call zeroes the gradients (in place by default, so that after the first call they
    stay allocated between steps as in a training loop, and a step's peak counts only what
    the step adds), runs ``module(*inputs, **forward_kwargs)`` and the loss under
    ``torch.autocast(autocast_dtype)`` (none when ``None``), checks that the loss is finite,
    backpropagates (through ``scaler.scale`` when a scaler is given) and steps the optimizer
    (``scaler.step`` and ``scaler.update`` with a scaler). It returns the loss, detached.
    The module runs as it is: put it in training mode first.

    Args:
        module: the network.
        *inputs: what ``module`` is called with.
        loss_fn: ``loss_fn(output)``, or ``loss_fn(output, targets)`` when ``targets`` is
            given; a scalar tensor. Default (without targets): the sum of the floating
            outputs.
        targets: the batch's targets (labels), held by the step and passed to ``loss_fn``.
        optimizer: the caller's optimizer; ``None`` takes no optimizer step.
        scaler: a ``torch.amp.GradScaler`` (fp16 training); ``None`` for none.
        autocast_dtype: run forward and loss under ``torch.autocast`` in this dtype.
        set_to_none: free the gradients before each step instead of zeroing them (the
            step's peak then counts the gradients it creates).
        check_finite: raise :class:`NonFiniteLossError` when the loss is not finite (a
            device synchronisation per step on CUDA; a throughput loop that must not wait
            turns it off and checks the returned losses afterwards).
        forward_kwargs: keyword inputs of ``module``.
    """

    def __init__(
        self,
        module: nn.Module,
        *inputs: Any,
        loss_fn: Callable[..., Tensor] | None = None,
        targets: Any = None,
        optimizer: torch.optim.Optimizer | None = None,
        scaler: torch.amp.GradScaler | None = None,
        autocast_dtype: torch.dtype | None = None,
        set_to_none: bool = False,
        check_finite: bool = True,
        forward_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"TrainingStep: expected an nn.Module, got {type(module).__name__}")
        if targets is not None and loss_fn is None:
            raise TypeError("TrainingStep: with targets, pass loss_fn(output, targets)")
        self.module = module
        self.inputs = inputs
        self.forward_kwargs = dict(forward_kwargs or {})
        self.targets = targets
        self.loss_fn: Callable[..., Tensor] = loss_fn if loss_fn is not None else sum_of_outputs
        self.optimizer = optimizer
        self.scaler = scaler
        self.autocast_dtype = autocast_dtype
        self.set_to_none = set_to_none
        self.check_finite = check_finite
        self.device = device_of(module, (inputs, self.forward_kwargs, targets))
        #: steps taken so far
        self.calls = 0

    # -- running ------------------------------------------------------------------------------
    def __call__(self) -> Tensor:
        self.zero_grad()
        with self.autocast():
            loss = self.loss(self.module(*self.inputs, **self.forward_kwargs))
        if self.check_finite:
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"the loss of training step {self.calls + 1} is {value}: the model (or its "
                    "learning rate) has diverged, and NaN arithmetic is not what a training "
                    "step costs",
                    value,
                    self.calls,
                )
        scaler = self.scaler if self.scaler is not None and self.scaler.is_enabled() else None
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if self.optimizer is not None:
            if scaler is not None:
                scaler.step(self.optimizer)
                scaler.update()
            else:
                self.optimizer.step()
        self.calls += 1
        return loss.detach()

    def forward(self) -> Any:
        """The training-mode forward pass alone (its result holds what backward needs)."""
        with self.autocast():
            return self.module(*self.inputs, **self.forward_kwargs)

    def loss(self, output: Any) -> Tensor:
        """The step's loss of ``output``; ``TypeError`` unless it is a scalar tensor."""
        loss = self.loss_fn(output) if self.targets is None else self.loss_fn(output, self.targets)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise TypeError(
                "loss_fn must return a scalar tensor (the loss of the step), got "
                + type(loss).__name__
                + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else "")
            )
        return loss

    def autocast(self) -> Any:
        """The autocast context of the step (a null context without ``autocast_dtype``)."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def zero_grad(self) -> None:
        """Zero the gradients in place (free them with ``set_to_none``)."""
        with torch.no_grad():
            for t in self.gradient_holders():
                if t.grad is None:
                    continue
                if self.set_to_none:
                    t.grad = None
                else:
                    t.grad.zero_()

    def release_gradients(self) -> None:
        """Free the gradients now (with ``set_to_none``, so that the next step, which would
        free them, frees nothing allocated before it)."""
        if self.set_to_none:
            for t in self.gradient_holders():
                t.grad = None

    def seconds(self, clock: Clock = "wall") -> float:
        """Time of one step, synchronised before and after on CUDA.

        ``clock="wall"`` is elapsed time; ``"cpu"`` is the CPU time this process used (all
        its threads), which other processes on a shared machine barely disturb.
        """
        timer = time.process_time if clock == "cpu" else time.perf_counter
        synchronize(self.device)
        start = timer()
        self()
        synchronize(self.device)
        return timer() - start

    # -- what it holds ---------------------------------------------------------------------
    def input_tensors(self) -> list[Tensor]:
        """The tensors of the inputs and keyword inputs."""
        return list(tensors((self.inputs, self.forward_kwargs)))

    def gradient_holders(self) -> list[Tensor]:
        """The parameters, and the inputs that are leaves requiring grad."""
        leaves = [t for t in self.input_tensors() if t.is_leaf and t.requires_grad]
        return [*self.module.parameters(), *leaves]

    def state_tensors(self) -> list[Tensor]:
        """Parameters, buffers, their gradients and the optimizer's state tensors."""
        params = list(self.module.parameters())
        found = [*params, *self.module.buffers()]
        found += [p.grad for p in params if p.grad is not None]
        if self.optimizer is not None:
            for state in self.optimizer.state.values():
                found += [t for t in state.values() if isinstance(t, Tensor)]
        return found

    def batch_tensors(self) -> list[Tensor]:
        """Inputs, targets and the gradients of leaf inputs."""
        found = [*self.input_tensors(), *tensors(self.targets)]
        found += [t.grad for t in self.input_tensors() if t.grad is not None]
        return found

    def state_bytes(self) -> int:
        """``state_bytes`` (see the module docstring), as it is now."""
        return storage_bytes(self.state_tensors())

    def batch_bytes(self) -> int:
        """``batch_bytes`` (see the module docstring), as it is now."""
        return storage_bytes(self.batch_tensors())

    def held_bytes(self) -> int:
        """``held_bytes`` (see the module docstring), as it is now."""
        return storage_bytes([*self.state_tensors(), *self.batch_tensors()])


class StateSnapshot:
    """What a step changes, copied to the CPU (taking no device memory): the module's
    parameters and buffers, the optimizer's state and the scaler's; :meth:`restore` writes
    it back in place (the same tensors: nothing is allocated anew where a state tensor
    exists). Gradients are not kept: each step zeroes or frees them first."""

    def __init__(self, step: TrainingStep) -> None:
        self.step = step
        module = step.module
        self.tensors = [
            (t, t.detach().to("cpu", copy=True)) for t in [*module.parameters(), *module.buffers()]
        ]
        self.optimizer: dict[Any, dict[str, Any]] | None = None
        if step.optimizer is not None:
            self.optimizer = {
                param: {key: _cpu_copy(value) for key, value in state.items()}
                for param, state in step.optimizer.state.items()
            }
        self.scaler = None if step.scaler is None else _cpu_copy(step.scaler.state_dict())

    def restore(self) -> None:
        """Put the module, the optimizer and the scaler back as they were."""
        step = self.step
        with torch.no_grad():
            for t, saved in self.tensors:
                t.copy_(saved)
            if step.optimizer is not None and self.optimizer is not None:
                states = step.optimizer.state
                for param in [p for p in states if p not in self.optimizer]:
                    del states[param]
                for param, saved_state in self.optimizer.items():
                    current = states[param]
                    for key in [k for k in current if k not in saved_state]:
                        del current[key]
                    for key, value in saved_state.items():
                        now = current.get(key)
                        if isinstance(value, Tensor) and isinstance(now, Tensor):
                            now.copy_(value)
                        elif isinstance(value, Tensor):
                            current[key] = value.to(param.device, copy=True)
                        else:
                            current[key] = copy.deepcopy(value)
        if step.scaler is not None and self.scaler is not None:
            step.scaler.load_state_dict(self.scaler)


def _cpu_copy(value: Any) -> Any:
    """A deep copy of ``value`` with every tensor on the CPU."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(v) for v in value)
    return copy.deepcopy(value)


@dataclass(frozen=True)
class StepMemory:
    """What one steady-state training step costs in memory, in bytes (the quantities of
    :mod:`invertible_core.planner.step`)."""

    activation_bytes: int
    step_peak_bytes: int
    state_bytes: int
    batch_bytes: int
    held_bytes: int

    @property
    def peak_bytes(self) -> int:
        """Everything the step needs: ``held_bytes + step_peak_bytes``."""
        return self.held_bytes + self.step_peak_bytes


def measure_step_memory(step: TrainingStep, warmup: int = 2) -> StepMemory:
    """Measure one steady-state step of ``step`` (:func:`~invertible_core.measure_memory`).

    ``warmup`` steps run first (gradients and the optimizer's state allocated, one-off
    initialisations such as ActNorm's done), then one measured step, then one measured
    forward pass. Every step after the first starts from the state the first left (a
    ``StateSnapshot``, restored between steps), and the module is left in that state:
    measure a copy when it must stay as it was. Raises :class:`NonFiniteLossError`
    (nothing measured) when a loss on the way is not finite.
    """
    if warmup < 0:
        raise ValueError(f"warmup must be at least 0, got {warmup}")
    snapshot: StateSnapshot | None = None
    for _ in range(warmup):
        if snapshot is not None:
            snapshot.restore()
        step()
        snapshot = snapshot or StateSnapshot(step)
    if snapshot is not None:
        snapshot.restore()
    step.release_gradients()
    gc.collect()  # garbage of the warm-up is freed now, not inside the measurement
    state, batch, held = step.state_bytes(), step.batch_bytes(), step.held_bytes()
    _, stats = measure_memory(step, device=step.device)
    if snapshot is not None:
        snapshot.restore()
    output, forward = measure_memory(step.forward, device=step.device)
    del output
    if snapshot is not None:
        snapshot.restore()  # the forward moved BatchNorm's statistics
    return StepMemory(
        activation_bytes=forward.retained_bytes,
        step_peak_bytes=stats.peak_bytes,
        state_bytes=state,
        batch_bytes=batch,
        held_bytes=held,
    )


def median_step_seconds(
    steps: Sequence[TrainingStep], repeats: int, clock: Clock = "wall"
) -> list[float]:
    """Median time of a step of each of ``steps``, timed in interleaved rounds (A, B, A,
    B...), so that load on a shared machine falls on all alike and their ratios hold.

    Every timed step starts from the state its step was in when this was called (a
    ``StateSnapshot`` restored before each, untimed), and is left there; warm the
    steps up first. Raises :class:`NonFiniteLossError` when a loss is not finite.
    """
    snapshots = [StateSnapshot(step) for step in steps]
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for record, step, snapshot in zip(times, steps, snapshots):
            snapshot.restore()
            record.append(step.seconds(clock))
    for snapshot in snapshots:
        snapshot.restore()
    return [statistics.median(record) for record in times]


# -- tensors and storages -------------------------------------------------------------------
def tensors(value: Any) -> Iterator[Tensor]:
    """Every tensor in ``value`` (tensors, tuples, lists and mappings of them)."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from tensors(v)
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from tensors(v)


def storage_key(t: Tensor) -> tuple[int, str]:
    """What identifies ``t``'s storage: its address and device."""
    try:
        return t.untyped_storage().data_ptr(), str(t.device)
    except (RuntimeError, NotImplementedError):  # pragma: no cover - storage-less tensors
        return id(t), "id"


def storage_bytes(found: Sequence[Tensor]) -> int:
    """Bytes of the distinct storages of ``found``."""
    seen: dict[tuple[int, str], int] = {}
    for t in found:
        try:
            seen[storage_key(t)] = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # pragma: no cover
            seen[storage_key(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def device_of(module: nn.Module, inputs: Any) -> torch.device:
    """The device of ``module``'s first parameter, else of the first input tensor, else CPU."""
    for p in module.parameters():
        return p.device
    for t in tensors(inputs):
        return t.device
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA); nothing elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
