"""Evaluation: a model's test figures on the untouched test set, summed over processes.

:class:`Evaluator` holds this process's share of the test set (images ``rank``,
``rank + world_size``, ... under torchrun) and the :class:`~invertible_train.tasks.Task`
that turns a batch into sums (loss, accuracy or bits per dimension, count). The sums are
reduced over processes before dividing, so the figures are those of the whole test set for
any number of processes; the main process's buffers (BatchNorm statistics) are broadcast
first, so the model evaluated is the one it checkpoints. Test images are never augmented
and never enter a statistic. Random numbers drawn while evaluating (a density model's
dequantisation noise) come from a seed fixed per test batch, with the random state forked:
each evaluation of a run draws the same ones, and training's random state is untouched.

A sharded model (``--fsdp``) gathers its parameters in every forward, a collective that
every rank must join: there (``collective=True``) each rank runs as many forwards as the
rank with the most test batches, a rank with fewer ending with forwards whose outputs are
not counted.

It also measures one training step of a model on a test batch
(:meth:`Evaluator.step_memory`): the run's own step (its optimizer with its state, its
autocast and scaler) on a copy of the model, measured as ``invertible-profile`` measures
(:func:`invertible_core.measure_step_memory`), so that ``summary.json``'s figures are those
of the next step the run would take. A step whose loss is not finite is not measured.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from invertible_train.data import make_loader
from invertible_train.strategy import Distribution
from invertible_train.tasks import Task

__all__ = ["Evaluator"]


class Evaluator:
    """The test figures of a model (see the module docstring).

    ``autocast`` returns the context the forward pass runs in (mixed precision or none);
    ``collective``: the model's forward is a collective (a sharded model), see the module
    docstring.
    """

    def __init__(
        self,
        test: Dataset[Any],
        batch_size: int,
        task: Task,
        distribution: Distribution,
        autocast: Callable[[], contextlib.AbstractContextManager[Any]],
        workers: int = 0,
        collective: bool = False,
    ) -> None:
        self.task = task
        self.distribution = distribution
        self.device = distribution.device
        self.batch_size = batch_size
        self.autocast = autocast
        rank, world_size = distribution.rank, distribution.world_size
        #: this process's test images, as positions in the test set.
        self.indices = list(range(rank, len(test), world_size))  # type: ignore[arg-type]
        self.test = test
        #: forwards this process runs per evaluation: its batches, or under a sharded model
        #: (``collective``) those of the rank with the most test images.
        most = -(-len(test) // world_size) if collective else len(self.indices)  # type: ignore[arg-type]
        self.forwards = -(-most // batch_size)
        self.loader = make_loader(
            test,
            batch_size,
            sampler=self.indices,  # type: ignore[arg-type]
            workers=workers,
            pin_memory=self.device.type == "cuda",
        )

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
        """This process's test batches on the device, with the test-set index of each image."""
        for number, (images, labels) in enumerate(self.loader):
            start = number * self.batch_size
            indices = self.indices[start : start + labels.shape[0]]
            images = images.to(self.device, non_blocking=True)
            yield images, labels.to(self.device, non_blocking=True), indices

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """``test_loss`` and the task's figure (``test_accuracy``, ``test_bits_per_dim``)."""
        self.distribution.broadcast_buffers(model)
        # the bare model: DDP's forward may broadcast buffers, a collective that ranks with
        # different numbers of test batches would not all join
        forward = self.task.forward_module(model)
        was_training = model.training
        model.eval()
        sums = torch.zeros(self.task.sums_size, dtype=torch.float64, device=self.device)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        # random numbers a model draws here (a flow's dequantisation noise) come from a
        # seed fixed per test batch, with the random state forked: every evaluation of a
        # run sees the same ones, and training's random stream never depends on evaluation
        with torch.random.fork_rng(devices=devices):
            for images, labels, indices in self.batches():
                torch.manual_seed(indices[0])
                with self.autocast():
                    output = forward(self.task.test_view(images, indices))
                output = output.float()
                sums += self.task.sums(output, labels, self.task.loss(output, labels))
            # forwards that only join the collectives of ranks with one more batch
            for _ in range(self.forwards - len(self.loader)):
                image = self.test[0][0].unsqueeze(0).to(self.device)
                with self.autocast():
                    forward(self.task.test_view(image, [0]))
        model.train(was_training)
        return self.task.figures(self.distribution.reduce(sums), prefix="test_")

    def step_memory(
        self,
        model: nn.Module,
        batch_size: int,
        amp_dtype: torch.dtype | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> dict[str, int | None]:
        """``activation_bytes`` and ``step_peak_bytes`` of one training step of ``model`` on
        ``batch_size`` test images (the quantities of :mod:`invertible_core.planner.step`).

        The step is the run's: a copy of ``optimizer`` with its state (momentum, Adam's
        moments, each group's learning rate) and of ``scaler``, on a copy of the model,
        under ``amp_dtype``, with the random state forked, so nothing a run depends on
        changes (without an optimizer the step takes no optimizer step). When the step's
        loss is not finite (a run that diverged), nothing is measured: a warning says so
        and both figures are ``None``.
        """
        # the measuring machinery loads only when a run measures
        from invertible_core import NonFiniteLossError, TrainingStep, measure_step_memory

        images, labels, indices = next(self.batches())
        n = min(batch_size, labels.shape[0])
        x = self.task.test_view(images[:n], indices[:n])
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            # one deep copy of the three: the optimizer's copy holds the model copy's
            # parameters (and their state), not the run's
            twin, twin_optimizer, twin_scaler = copy.deepcopy((model, optimizer, scaler))
            step = TrainingStep(
                self.task.forward_module(twin.train()),
                x,
                targets=labels[:n],
                loss_fn=self.task.loss,
                optimizer=twin_optimizer,
                scaler=twin_scaler,
                autocast_dtype=amp_dtype,
            )
            try:
                memory = measure_step_memory(step)
            except NonFiniteLossError as exc:
                warnings.warn(
                    f"the training-step memory of the final model was not measured: {exc}; "
                    "summary.json records none",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return {"activation_bytes": None, "step_peak_bytes": None}
        return {
            "activation_bytes": memory.activation_bytes,
            "step_peak_bytes": memory.step_peak_bytes,
        }
