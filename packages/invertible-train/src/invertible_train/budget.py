"""``--memory-budget``: plan what a run stores and what it recomputes before it trains.

With ``train.memory_budget`` set (``--memory-budget 6GiB``), the trainer measures one
training step of its model on a batch of the run's real shape (its first ``batch_size``
training images per process, seen as the model sees them, without augmentation) with the
run's optimizer, and asks :func:`invertible_core.fit_memory_budget` for the fastest step
whose peak fits: which reversible blocks keep their activations, which non-reversible
blocks are checkpointed. The budget counts what the step holds at its peak: parameters,
gradients, the optimizer's state (measured: its step runs in the measured steps, and the
model and the optimizer are put back afterwards), the batch and the activations. The plan is applied to the model, logged (``metrics.jsonl``: a
``memory_plan`` record), kept in every checkpoint and written to ``summary.json``.

Resuming: a plan changes what is stored, never what is computed, so the budget may change
between a run and its resumption. A resumed run reuses the plan of its checkpoint when it
was made for the same budget, batch shape and kind of device (no measuring, and the same
choices as before); otherwise it plans again. Under torchrun the main process plans and
every process applies its plan.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from invertible_core import MemoryBudgetError, MemoryPlan, PlanMismatchError, parse_bytes
from invertible_train.config import ConfigError

__all__ = ["apply_plan", "plan_memory", "planning_batch", "reusable_plan"]


def planning_batch(
    dataset: Any, batch_size: int, view: Callable[[Tensor, list[int]], Tensor], device: torch.device
) -> tuple[Tensor, Tensor]:
    """The first ``batch_size`` training images and labels (repeated when the dataset is
    smaller), through ``view`` (the task's un-augmented view of a batch), on ``device``."""
    indices = [i % len(dataset) for i in range(batch_size)]
    items = [dataset[i] for i in indices]
    images = torch.stack([image for image, _ in items]).to(device)
    labels = torch.tensor([int(label) for _, label in items], device=device)
    return view(images, indices), labels


def reusable_plan(
    saved: Mapping[str, Any] | None, budget: str, shape: list[int], device: torch.device
) -> MemoryPlan | None:
    """The checkpoint's plan when it was made for this budget, batch shape and kind of
    device; else ``None`` (plan again)."""
    if not saved:
        return None
    try:
        plan = MemoryPlan.from_dict(saved)
    except ValueError:
        return None
    same = (
        plan.budget_bytes == parse_bytes(budget)
        and list(plan.extra.get("input_shape", [])) == shape
        and torch.device(plan.device).type == device.type
    )
    return plan if same else None


def plan_memory(
    module: nn.Module,
    images: Tensor,
    labels: Tensor,
    loss: Callable[[Tensor, Tensor], Tensor],
    optimizer: torch.optim.Optimizer,
    budget: str,
    amp_dtype: torch.dtype | None,
) -> MemoryPlan:
    """The plan of ``module`` for ``budget`` on this batch (measured, applied to ``module``).

    Raises :class:`~invertible_train.config.ConfigError` naming ``train.memory_budget`` when
    the budget is below the step's minimum (the message says the minimum), the model has
    nothing to plan, or a measured step's loss is not finite.
    """
    # the planner's measuring machinery loads only when a run has a budget
    from invertible_core import NonFiniteLossError, fit_memory_budget

    key = "train.memory_budget"
    try:
        plan = fit_memory_budget(
            module,
            images,
            budget=budget,
            loss_fn=lambda out: loss(out, labels),
            optimizer=optimizer,
            autocast_dtype=amp_dtype,
        )
    except MemoryBudgetError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    except NonFiniteLossError as exc:
        raise ConfigError(f"{key}: the step could not be measured: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}; drop --memory-budget for this model") from None
    return replace(plan, extra={**plan.extra, "input_shape": list(images.shape)})


def apply_plan(plan: MemoryPlan, module: nn.Module) -> bool:
    """Apply ``plan``; False when it does not fit ``module`` (then plan again)."""
    try:
        plan.apply(module)
    except PlanMismatchError:
        return False
    return True
