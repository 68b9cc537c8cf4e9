"""What a model learns and how it is measured: classification or density estimation.

The trainer is given a :class:`Task` and asks it everything that depends on what is being
learned: the view of a batch the model sees, the module the loop calls (and DDP wraps), the
loss, the sums a logged figure is computed from, the headline metric that picks
``best.pt``, and what to save after an evaluation. The loop itself has no branch on the
kind of model. :func:`task_for` picks the task from the model's interface:

* :class:`Classification` (any network returning logits): cross-entropy; logs ``loss`` and
  ``accuracy``, evaluates ``test_loss`` and ``test_accuracy`` (higher is better).
* :class:`DensityEstimation` (a model with ``log_prob(x)`` giving each discrete image's
  log-likelihood in nats, and ``sample(n)``): negative log-likelihood in bits per
  dimension; logs ``loss`` and ``bits_per_dim``, evaluates ``test_loss`` and
  ``test_bits_per_dim`` (lower is better), and writes a PNG grid of samples at every
  evaluation.

NOTE [bits per dimension]: images are discrete, a flow's density is continuous. Each value
of an image is one of ``L`` levels ``k`` (``L = 256`` for 8-bit images; 17 for ``digits``,
whose scans hold 0..16: :attr:`~invertible_train.data.ImageData.levels`). Dequantisation
(Glow, RealNVP) spreads each level over its bin: ``y = (k + u) / L`` with ``u ~ U(0, 1)``,
and a density ``p`` of ``y`` gives the discrete image a probability of at least
``exp(E_u[log p(y)]) / L^D`` (Jensen), ``D = C * H * W``.

Exactly one place dequantises: the model. The harness gives ``log_prob`` the discrete
images, as levels ``k / (L - 1)`` in ``[0, 1]``
(:meth:`~invertible_train.data.BatchTransform.discrete`: ``x / 255`` for 8-bit images,
``k / 16`` for digits), and ``log_prob(x)`` returns each image's log-likelihood in nats *of
the discrete image*: for a dequantising flow ``log p(y) - D ln L``, as
``invertible_models.Glow.log_prob`` does (noise, bin width and the ``D ln L`` term are the
model's business). One convention for bits per dimension follows, for any ``L``:

    bits/dim = -log_prob(x) / (D * ln(2))

an upper bound (in expectation over the noise) on the model's code length of the discrete
image, in bits per value. A model uniform over the levels (``log_prob = -D ln L``) scores
``log2(L)``: 8 for 8-bit images, ``log2(17) = 4.09`` for digits. A model must be built for
the data's levels: a density model whose ``num_bins`` differs from them is refused
(:func:`check_density_model`), since its figures would be those of other data. Training
minimises the same quantity (its gradient is the NLL's, scaled).

The model draws its noise from torch's random generator: in training that is part of the
random state every checkpoint holds (a resumed run stays bit-exact); evaluation runs with
the random state forked and seeded per test batch
(:class:`~invertible_train.evaluation.Evaluator`), so every evaluation of a run sees the
same noise and leaves training's random stream alone.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from invertible_train.config import ConfigError
from invertible_train.data.transforms import BatchTransform

__all__ = [
    "SAMPLE_GRID",
    "TASK_FACTORIES",
    "Classification",
    "DensityEstimation",
    "Task",
    "bits_per_dim",
    "check_density_model",
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
    #: entries of the results folder the task writes beside the trainer's (recorded in the
    #: folder's marker, so that ``--fresh`` deletes them and nothing else).
    writes: tuple[str, ...] = ()
    #: methods of the model the harness calls besides ``forward`` (through
    #: :meth:`forward_module` or :meth:`after_evaluation`); a sharded model (``--fsdp``)
    #: gathers its parameters around each, as around ``forward``.
    model_methods: tuple[str, ...] = ()
    #: the length of :meth:`sums` (the trainer and the evaluator add them up); entry 2 is
    #: the number of samples
    sums_size: int = 3

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

    def after_evaluation(
        self, model: nn.Module, results_dir: Path, iteration: int, write: bool = True
    ) -> Any:
        """Called after each evaluation (on the main process; on every process when the
        model is sharded, whose forward is a collective, with ``write`` only on the main
        one); returns an image to log, if any."""
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


def bits_per_dim(log_prob: Tensor, dims: int) -> Tensor:
    """Per-sample bits per dimension of discrete images whose log-likelihood (nats) is
    ``log_prob``: ``-log_prob / (dims * ln 2)`` (NOTE [bits per dimension])."""
    return -log_prob.double() / (dims * math.log(2.0))


def check_density_model(model: nn.Module, image_shape: tuple[int, ...], levels: int) -> None:
    """Raise :class:`~invertible_train.config.ConfigError` when a density model was built for
    other images: ``num_bins`` (levels per value), ``in_channels`` or ``image_size``, where
    the model has them, must be those of the data (``image_shape`` is ``(C, H, W)``)."""
    name = type(model).__name__
    bins = getattr(model, "num_bins", None)
    if isinstance(bins, int) and bins != levels:
        raise ConfigError(
            f"{name} models {bins} levels per value, but the dataset's images have {levels}: "
            f"set model.options.num_bins = {levels} (bits per dimension would otherwise be "
            "those of other data)"
        )
    channels, height, width = image_shape
    shape = f"{channels}x{height}x{width}"
    built_channels = getattr(model, "in_channels", None)
    if isinstance(built_channels, int) and built_channels != channels:
        raise ConfigError(
            f"{name} is built for in_channels = {built_channels}, but the dataset's images "
            f"are {shape}: set model.options.in_channels = {channels}"
        )
    size = getattr(model, "image_size", None)
    if isinstance(size, int) and (size, size) != (height, width):
        # every dataset of the harness has square images (imagefolder: data.image_size)
        raise ConfigError(
            f"{name} is built for image_size = {size}, but the dataset's images are {shape}: "
            f"set model.options.image_size = {height}"
        )


class _LogProb(nn.Module):
    """Calls ``model.log_prob``: the module DDP wraps, so gradients are synchronised."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.log_prob(x)  # type: ignore[no-any-return, operator]


class DensityEstimation(Task):
    """Negative log-likelihood in bits per dimension, samples saved at each evaluation.

    The model sees the discrete images as levels ``k / (levels - 1)`` and dequantises them
    itself (NOTE [bits per dimension]): training batches augmented as configured
    (``data.horizontal_flip``; set ``data.crop_padding = 0``, since zero padding adds black
    borders no real image has); the dataset's normalisation statistics are not applied.
    """

    name = "density"
    train_metric = "bits_per_dim"
    abbreviation = "bpd"
    metric = "test_bits_per_dim"
    higher_is_better = False
    writes = ("samples",)
    model_methods = ("log_prob", "sample")

    def __init__(self, transform: BatchTransform, dims: int) -> None:
        super().__init__(transform)
        #: ``C * H * W`` of the images: the D of bits per dimension.
        self.dims = dims

    def forward_module(self, model: nn.Module) -> nn.Module:
        return _LogProb(model)

    def train_view(self, images: Tensor, iteration: int, rank: int) -> Tensor:
        return self.transform.discrete(self.transform.augmented(images, iteration, rank))

    def test_view(self, images: Tensor, indices: Sequence[int]) -> Tensor:
        return self.transform.discrete(images)

    def loss(self, output: Tensor, labels: Tensor) -> Tensor:
        return bits_per_dim(output, self.dims).float().mean()

    def sums(self, output: Tensor, labels: Tensor, loss: Tensor) -> Tensor:
        count = float(output.shape[0])
        total = loss.detach().double() * count
        return torch.stack(
            [total, total, torch.tensor(count, dtype=torch.float64, device=total.device)]
        )

    def after_evaluation(
        self, model: nn.Module, results_dir: Path, iteration: int, write: bool = True
    ) -> Tensor:
        """Write ``samples/iteration-NNNNNNN.png`` (where ``write``): a grid of
        :data:`~invertible_train.tasks.SAMPLE_GRID` samples.

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
        if not write:
            return grid
        folder = results_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        save_image(grid, folder / f"iteration-{iteration:07d}.png")
        return grid


#: the tasks of other modules, asked first and in order by :func:`task_for`: each returns its
#: task for a model it recognises, else ``None`` (:mod:`invertible_train.segmentation`
#: registers segmentation's; the package's ``__init__`` imports it)
TASK_FACTORIES: list[Callable[[nn.Module, BatchTransform, tuple[int, ...]], Task | None]] = []


def task_for(model: nn.Module, transform: BatchTransform, image_shape: tuple[int, ...]) -> Task:
    """The task of a registered factory that recognises the model (:data:`TASK_FACTORIES`:
    segmentation), else :class:`DensityEstimation` for a model with ``log_prob`` and
    ``sample`` (checked against the data by :func:`check_density_model`, the levels being
    ``transform.levels``), else :class:`Classification`; ``image_shape`` is ``(C, H, W)``
    of the dataset's images."""
    for factory in TASK_FACTORIES:
        task = factory(model, transform, image_shape)
        if task is not None:
            return task
    if is_density_model(model):
        check_density_model(model, image_shape, transform.levels)
        return DensityEstimation(transform, math.prod(image_shape))
    return Classification(transform)
