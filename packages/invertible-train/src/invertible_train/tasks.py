"""What a model learns and how it is measured: classification or density estimation.

The trainer is given a :class:`Task` and asks it everything that depends on what is being
learned: the view of a batch the model sees, the module the loop calls (and DDP wraps), the
loss, the sums a logged figure is computed from, the headline metric that picks
``best.pt``, and what to save after an evaluation. The loop itself has no branch on the
kind of model. :func:`task_for` picks the task from the model's interface:

* :class:`Classification` (any network returning logits): cross-entropy; logs ``loss`` and
  ``accuracy``, evaluates ``test_loss`` and ``test_accuracy`` (higher is better).
* :class:`DensityEstimation` (a model with ``log_prob(x)`` giving each sample's
  log-likelihood in nats, and ``sample(n)``): negative log-likelihood in bits per
  dimension; logs ``loss`` and ``bits_per_dim``, evaluates ``test_loss`` and
  ``test_bits_per_dim`` (lower is better), and writes a PNG grid of samples at every
  evaluation.

NOTE [bits per dimension]: 8-bit images are discrete, a density is continuous. As in Glow
(Kingma and Dhariwal, 2018) and RealNVP, each pixel value ``k`` in ``0..255`` is dequantised
to ``y = (k + u) / 256`` with ``u ~ U(0, 1)``: the data become ``y in [0, 1)``, the ``k / 256``
grid plus ``U(0, 1/256)`` noise. The model's ``log_prob(y)`` is a density on ``[0, 1)^D``;
the probability of the 256^D bin of ``k`` is at least ``E_u[p(y)] / 256^D`` (Jensen), so

    bits/dim = -(log_prob(y) - D * ln(256)) / (D * ln(2))

is an upper bound on the model's code length of the discrete image, in bits per pixel
channel (``D = C * H * W``). A model that is uniform on ``[0, 1)^D`` (``log_prob = 0``)
scores exactly 8. Training minimises the same quantity (its gradient is the NLL's, scaled).
Test images are dequantised with noise fixed per test image, so evaluations are comparable
across iterations, runs and numbers of processes; training noise is drawn per (seed, iteration, rank),
so resumed runs stay bit-exact.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from invertible_train.data import BatchTransform

__all__ = [
    "SAMPLE_GRID",
    "Classification",
    "DensityEstimation",
    "Task",
    "bits_per_dim",
    "dequantize",
    "is_density_model",
    "task_for",
]

#: samples drawn for the grid saved at each evaluation of a density model (8 x 8).
SAMPLE_GRID = 64


class Task(ABC):
    """The seam between the training loop and what is learned (see the module docstring)."""

    #: ``"classification"`` or ``"density"``, recorded in ``summary.json``.
    name: str
    #: the figure logged next to ``loss`` for training batches (``accuracy``...).
    train_metric: str
    #: its name on the progress bar.
    abbreviation: str
    #: the headline evaluation figure: ``best.pt`` is the model that scored best on it.
    metric: str
    higher_is_better: bool

    def __init__(self, transform: BatchTransform) -> None:
        self.transform = transform

    def forward_module(self, model: nn.Module) -> nn.Module:
        """The module the training loop calls on a batch (and DistributedDataParallel wraps)."""
        return model

    @abstractmethod
    def train_view(self, images: Tensor, iteration: int, rank: int) -> Tensor:
        """Model input for ``uint8`` training batch number ``iteration`` (augmented)."""

    @abstractmethod
    def test_view(self, images: Tensor, indices: Sequence[int]) -> Tensor:
        """Model input for ``uint8`` test images (never augmented); ``indices``: the position
        of each in the test set."""

    @abstractmethod
    def loss(self, output: Tensor, labels: Tensor) -> Tensor:
        """The training objective of a batch (a mean over its samples)."""

    @abstractmethod
    def sums(self, output: Tensor, labels: Tensor, loss: Tensor) -> Tensor:
        """float64 ``[loss sum, metric sum, count]`` of a batch whose mean loss is ``loss``, to
        be added up (and reduced over processes) before :meth:`figures` divides. Detached;
        no device synchronisation."""

    def figures(self, sums: Tensor, prefix: str = "") -> dict[str, float]:
        """``{metric, loss}`` (keys prefixed, e.g. ``test_``) from added-up :meth:`sums`."""
        loss_sum, metric_sum, count = sums.tolist()
        count = max(count, 1.0)
        return {
            f"{prefix}{self.train_metric}": metric_sum / count,
            f"{prefix}loss": loss_sum / count,
        }

    def better(self, value: float, best: float | None) -> bool:
        """Whether ``value`` of :attr:`metric` beats ``best`` (None: nothing yet)."""
        if best is None or not math.isfinite(best):
            return math.isfinite(value)
        return value > best if self.higher_is_better else value < best

    def after_evaluation(self, model: nn.Module, results_dir: Path, iteration: int) -> Any:
        """Called on the main process after each evaluation; returns an image to log, if any."""
        return None


class Classification(Task):
    """Logits and labels: cross-entropy, accuracy. Inputs normalised with the training
    set's statistics, training batches augmented."""

    name = "classification"
    train_metric = "accuracy"
    abbreviation = "acc"
    metric = "test_accuracy"
    higher_is_better = True

    def train_view(self, images: Tensor, iteration: int, rank: int) -> Tensor:
        return self.transform.train(images, iteration, rank)

    def test_view(self, images: Tensor, indices: Sequence[int]) -> Tensor:
        return self.transform.test(images)

    def loss(self, output: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(output, labels)

    def sums(self, output: Tensor, labels: Tensor, loss: Tensor) -> Tensor:
        count = labels.numel()
        correct = (output.detach().argmax(1) == labels).sum()
        return torch.stack(
            [
                loss.detach().double() * count,
                correct.double(),
                torch.tensor(float(count), dtype=torch.float64, device=labels.device),
            ]
        )


def is_density_model(model: nn.Module) -> bool:
    """Whether ``model`` offers ``log_prob(x)`` and ``sample(n)``: a density model."""
    return callable(getattr(model, "log_prob", None)) and callable(getattr(model, "sample", None))


def dequantize(images: Tensor, generator: torch.Generator) -> Tensor:
    """``uint8`` images to ``(k + u) / 256`` in [0, 1), ``u ~ U(0, 1)`` drawn from ``generator``
    (a CPU generator: the noise depends on its seed alone, on any device)."""
    noise = torch.rand(images.shape, generator=generator).to(images.device)
    return (images.to(torch.float32) + noise) / 256.0


def bits_per_dim(log_prob: Tensor, dims: int) -> Tensor:
    """Per-sample bits per dimension of dequantised 8-bit data (NOTE [bits per dimension])."""
    return -(log_prob.double() - dims * math.log(256.0)) / (dims * math.log(2.0))


class _LogProb(nn.Module):
    """Calls ``model.log_prob``: the module DDP wraps, so gradients are synchronised."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.log_prob(x)  # type: ignore[no-any-return, operator]


class DensityEstimation(Task):
    """Negative log-likelihood in bits per dimension, samples saved at each evaluation.

    The model sees dequantised images in [0, 1) (NOTE [bits per dimension]): training
    batches augmented as configured (``data.horizontal_flip``; set ``data.crop_padding =
    0``, since zero padding adds black borders no real image has), then dequantised; the
    dataset's normalisation statistics are not applied.
    """

    name = "density"
    train_metric = "bits_per_dim"
    abbreviation = "bpd"
    metric = "test_bits_per_dim"
    higher_is_better = False

    def forward_module(self, model: nn.Module) -> nn.Module:
        return _LogProb(model)

    def train_view(self, images: Tensor, iteration: int, rank: int) -> Tensor:
        images = self.transform.augmented(images, iteration, rank)
        return dequantize(images, self.transform.generator(iteration, rank, stream=1))

    def test_view(self, images: Tensor, indices: Sequence[int]) -> Tensor:
        # the noise of test image i depends on i alone: the same for any batch size and
        # number of processes, and at every evaluation
        noise = torch.stack(
            [
                torch.rand(images.shape[1:], generator=torch.Generator().manual_seed(i))
                for i in indices
            ]
        )
        return (images.to(torch.float32) + noise.to(images.device)) / 256.0

    def __init__(self, transform: BatchTransform, dims: int) -> None:
        super().__init__(transform)
        #: ``C * H * W`` of the images: the D of bits per dimension.
        self.dims = dims

    def loss(self, output: Tensor, labels: Tensor) -> Tensor:
        return bits_per_dim(output, self.dims).float().mean()

    def sums(self, output: Tensor, labels: Tensor, loss: Tensor) -> Tensor:
        count = float(output.shape[0])
        total = loss.detach().double() * count
        return torch.stack(
            [total, total, torch.tensor(count, dtype=torch.float64, device=total.device)]
        )

    def after_evaluation(self, model: nn.Module, results_dir: Path, iteration: int) -> Tensor:
        """Write ``samples/iteration-NNNNNNN.png``: a grid of :data:`SAMPLE_GRID` samples.

        Drawn from a fixed seed with the random state forked, so the grids of successive
        evaluations show the same latent points and training's random state is untouched.
        """
        from torchvision.utils import make_grid, save_image

        device = next(model.parameters()).device
        devices = [device.index or 0] if device.type == "cuda" else []
        was_training = model.training
        model.eval()
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(0)
            samples = model.sample(SAMPLE_GRID)  # type: ignore[operator]
        model.train(was_training)
        grid = make_grid(samples.detach().float().clamp(0, 1).cpu(), nrow=8)
        folder = results_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        save_image(grid, folder / f"iteration-{iteration:07d}.png")
        return grid


def task_for(model: nn.Module, transform: BatchTransform, image_shape: tuple[int, ...]) -> Task:
    """:class:`DensityEstimation` for a model with ``log_prob`` and ``sample``, else
    :class:`Classification`; ``image_shape`` is ``(C, H, W)`` of the dataset's images."""
    if is_density_model(model):
        return DensityEstimation(transform, math.prod(image_shape))
    return Classification(transform)
