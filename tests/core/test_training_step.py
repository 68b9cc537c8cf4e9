"""The one training step (``TrainingStep``) and what is measured on it.

Forward, loss, backward and the caller's optimizer step, under the caller's autocast and
scaler; a loss that is not finite stops the step before its backward; the measurements
rewind, so that every measured step starts from one state of the model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from invertible_core import (
    NonFiniteLossError,
    StepMemory,
    TrainingStep,
    measure_step_memory,
    median_step_seconds,
)


def classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 8, generator=g), torch.randint(0, 4, (6,), generator=g)


def test_a_step_is_forward_loss_backward_and_the_callers_optimizer_step() -> None:
    model, (x, y) = classifier(), batch()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    step = TrainingStep(
        model, x, targets=y, loss_fn=nn.functional.cross_entropy, optimizer=optimizer
    )
    loss = step()
    expected_optimizer = torch.optim.Adam(reference.parameters(), lr=0.1)
    expected = nn.functional.cross_entropy(reference(x), y)
    expected.backward()
    expected_optimizer.step()
    assert torch.equal(loss, expected.detach()) and not loss.requires_grad
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert step.calls == 1


def test_gradients_stay_allocated_and_zeroed_in_place_unless_set_to_none() -> None:
    model, (x, y) = classifier(), batch()
    step = TrainingStep(model, x, targets=y, loss_fn=nn.functional.cross_entropy)
    step()
    grads = [p.grad for p in model.parameters()]
    step()
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))  # the same tensors
    freeing = TrainingStep(model, x, targets=y, loss_fn=nn.functional.cross_entropy)
    freeing.set_to_none = True
    freeing()
    assert all(p.grad is not g for p, g in zip(model.parameters(), grads))


def test_the_scaler_scales_the_loss_and_steps_the_optimizer() -> None:
    model, (x, y) = classifier(), batch()
    reference = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: list[Tensor] = []
    model[0].weight.register_hook(lambda g: seen.append(g.detach().clone()))
    step = TrainingStep(
        model,
        x,
        targets=y,
        loss_fn=nn.functional.cross_entropy,
        optimizer=optimizer,
        scaler=scaler,
    )
    step()
    nn.functional.cross_entropy(reference(x), y).backward()
    # the gradient backpropagated was the scaled one; the step used it unscaled
    torch.testing.assert_close(seen[0], 2.0**10 * reference[0].weight.grad)
    with torch.no_grad():
        for q in reference.parameters():
            q -= 0.1 * q.grad
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


def test_autocast_runs_forward_and_loss_in_the_callers_dtype() -> None:
    model, (x, _) = classifier(), batch()
    dtypes: list[torch.dtype] = []
    model[2].register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    TrainingStep(model, x, autocast_dtype=torch.bfloat16)()
    TrainingStep(model, x)()
    assert dtypes == [torch.bfloat16, torch.float32]


def test_a_loss_that_is_not_finite_stops_the_step_before_its_backward() -> None:
    model, (x, _) = classifier(), batch()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = TrainingStep(
        model, x, loss_fn=lambda out: out.sum() * torch.tensor(float("nan")), optimizer=optimizer
    )
    with pytest.raises(NonFiniteLossError, match="loss of training step 1 is nan") as info:
        step()
    assert info.value.step == 0 and info.value.loss != info.value.loss
    assert all(p.grad is None for p in model.parameters())  # no backward ran
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    step.check_finite = False  # a loop that checks the returned losses itself
    assert torch.isnan(step())


def test_a_step_refuses_what_is_no_loss_and_targets_without_a_loss() -> None:
    model, (x, y) = classifier(), batch()
    with pytest.raises(TypeError, match="must return a scalar tensor"):
        TrainingStep(model, x, loss_fn=lambda out: out)()
    with pytest.raises(TypeError, match="with targets, pass loss_fn"):
        TrainingStep(model, x, targets=y)


def test_the_held_quantities_are_distinct_storages_named_once() -> None:
    model, (x, y) = classifier(), batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = TrainingStep(
        model, x, targets=y, loss_fn=nn.functional.cross_entropy, optimizer=optimizer
    )
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert step.state_bytes() == parameter_bytes  # before a step: no gradient, no momentum
    step()
    assert step.state_bytes() == 3 * parameter_bytes  # parameters, gradients, momentum
    assert step.batch_bytes() == x.numel() * 4 + y.numel() * 8
    assert step.held_bytes() == step.state_bytes() + step.batch_bytes()


def test_measured_memory_is_exact_and_its_quantities_add_up() -> None:
    model, (x, y) = classifier(), batch()
    step = TrainingStep(
        model,
        x,
        targets=y,
        loss_fn=nn.functional.cross_entropy,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
    )
    memory = measure_step_memory(step)
    assert isinstance(memory, StepMemory)
    assert memory.held_bytes == memory.state_bytes + memory.batch_bytes
    assert memory.peak_bytes == memory.held_bytes + memory.step_peak_bytes
    # the forward keeps the hidden layer for backward (tanh's output, the second Linear's
    # input: one tensor) and returns the logits: (6, 16) and (6, 4) float32, to the byte
    assert memory.activation_bytes == (6 * 16 + 6 * 4) * 4
    assert memory.step_peak_bytes >= memory.activation_bytes
    assert measure_step_memory(step) == memory  # a steady state: the same to the byte


def test_measured_steps_all_start_from_the_state_the_first_step_left() -> None:
    """A model that training would carry off (here: to a NaN, after three steps) is
    measured where it is: the measurements rewind between steps."""

    class Runaway(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))
            self.seen: list[float] = []

        def forward(self, x: Tensor) -> Tensor:
            self.seen.append(float(self.w.detach()))
            scale = torch.where(self.w < -0.05, torch.nan, 1.0)  # w falls 0.03, then 0.057
            return (self.w * x).sum() * scale

    model = Runaway()
    step = TrainingStep(
        model, torch.ones(3), optimizer=torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    )
    measure_step_memory(step, warmup=2)
    median_step_seconds([step], repeats=3)
    first, *later = model.seen
    assert first == 0.0 and len(later) == 1 + 1 + 1 + 3  # warm-up, step, forward, timed
    assert later == [pytest.approx(-0.03)] * len(later)
    assert float(model.w.detach()) == pytest.approx(-0.03)  # left where the first step left it
    with pytest.raises(NonFiniteLossError, match="step 8"):  # trained on, it diverges
        step(), step()
