"""``summary.json``'s memory figures: the run's own next step, never a diverged one.

The harness measures one training step of the final model (``Evaluator.step_memory``) with
the run's optimizer (its class, groups and state), on copies, so the run is untouched; a
step whose loss is not finite is not measured, and says so.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from invertible_core import TrainingStep, measure_step_memory
from invertible_train.config import apply_values, load_experiment
from invertible_train.trainer import Trainer


class CountingSGD(torch.optim.SGD):
    """SGD that counts its steps (its copies count into the same class attribute)."""

    steps = 0

    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        type(self).steps += 1
        return super().step(closure)


@pytest.fixture
def trained(tmp_path: Path) -> Trainer:
    cfg = apply_values(
        load_experiment("tiny"),
        {
            "data.dataset": "synthetic", "data.image_size": 8, "data.synthetic_train_size": 64,
            "data.synthetic_test_size": 32, "data.batch_size": 16, "train.iterations": 2,
            "train.tensorboard": False, "train.measure_memory": False,
        },
    )  # fmt: skip
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.fit()
    return trainer


def test_the_measured_step_is_the_runs_own_and_leaves_the_run_untouched(
    trained: Trainer,
) -> None:
    model = trained.model
    optimizer = CountingSGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.nn.functional.cross_entropy(
        model(torch.randn(4, 3, 8, 8)), torch.zeros(4).long()
    ).backward()
    optimizer.step()  # a state of its own: momentum buffers
    params = {k: v.clone() for k, v in model.state_dict().items()}
    state = copy.deepcopy(optimizer.state_dict())
    steps = CountingSGD.steps
    figures = trained.evaluator.step_memory(model, 16, optimizer=optimizer)
    assert CountingSGD.steps - steps == 3  # two warm-up steps and the measured one, of a copy
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    after = optimizer.state_dict()
    assert after["param_groups"] == state["param_groups"]
    assert all(
        torch.equal(after["state"][i]["momentum_buffer"], s["momentum_buffer"])
        for i, s in state["state"].items()
    )
    # the same figures as the one measurement of the project, on the same step
    images, labels = next(iter(trained.evaluator.loader))
    twin, twin_optimizer = copy.deepcopy((model, optimizer))
    expected = measure_step_memory(
        TrainingStep(
            twin.train(),
            trained.transform.test(images[:16]),
            targets=labels[:16],
            loss_fn=F.cross_entropy,
            optimizer=twin_optimizer,
        )
    )
    assert figures == {
        "activation_bytes": expected.activation_bytes,
        "step_peak_bytes": expected.step_peak_bytes,
    }


def test_a_diverged_model_is_not_measured_and_a_warning_says_so(trained: Trainer) -> None:
    model = trained.model
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.warns(RuntimeWarning, match="was not measured: the loss of training step 1 is nan"):
        figures = trained.evaluator.step_memory(model, 16, optimizer=trained.optimizer)
    assert figures == {"activation_bytes": None, "step_peak_bytes": None}
