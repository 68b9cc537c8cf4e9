"""Segmentation: a class per pixel (voxel), scored by Dice and per-class accuracy.

The task of a model that returns logits per position, ``(batch, classes, *S)`` for inputs
``(batch, channels, *S)`` (the zoo's ``iunet`` and ``unet``, which declare
``spatial_dims``), trained on data with a mask per input
(:mod:`invertible_train.segmentation_data`). The loss is cross-entropy averaged over
positions. The figures are computed from counts added up over a whole evaluation (and over
processes), not averaged over batches:

- ``dice``: the mean over the foreground classes ``k >= 1`` of ``2 |P_k & T_k| / (|P_k| +
  |T_k|)``, ``P_k`` the positions predicted ``k`` (the argmax), ``T_k`` those labelled ``k``;
  a class absent from both counts as 1 (nothing to find, nothing found). The headline figure
  (``test_dice`` picks ``best.pt``; higher is better);
- ``accuracy_k`` per class: ``|P_k & T_k| / |T_k|``, the share of class ``k``'s positions
  found (its recall), and ``accuracy``, the share of all positions right;
- ``loss``: the mean cross-entropy per sample.

Inputs are scaled to ``[0, 1]`` and standardised per channel with the training set's
statistics; there is no augmentation (a flip would have to move the mask too, and the
synthetic shapes come fresh from a generator).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from invertible_models.step import is_segmentation_model
from invertible_train.config import ConfigError
from invertible_train.data import BatchTransform
from invertible_train.tasks import TASK_FACTORIES, Task

__all__ = [
    "Segmentation",
    "check_segmentation_model",
    "is_segmentation_model",
    "segmentation_task",
]


def check_segmentation_model(model: nn.Module, image_shape: tuple[int, ...]) -> None:
    """:class:`~invertible_train.config.ConfigError` when a segmentation model was built for
    data of another dimension than the dataset's inputs ``(C, *S)``."""
    dims = len(image_shape) - 1
    built = int(getattr(model, "spatial_dims", dims))
    if built != dims:
        raise ConfigError(
            f"{type(model).__name__} is built for {built}D inputs, but the dataset's are "
            f"{dims}D {tuple(image_shape)}: set model.options.dim = {dims}"
        )


class Segmentation(Task):
    """Cross-entropy per position; Dice, per-class and overall accuracy (module docstring)."""

    name = "segmentation"
    train_metric = "dice"
    abbreviation = "dice"
    metric = "test_dice"
    higher_is_better = True

    def __init__(self, transform: BatchTransform, num_classes: int) -> None:
        super().__init__(transform)
        self.num_classes = num_classes
        #: ``[loss, correct, samples, positions]``, then per class ``[both, predicted,
        #: labelled]`` position counts
        self.sums_size = 4 + 3 * num_classes
        self.mean = transform.mean.flatten()
        self.std = transform.std.flatten()

    def _view(self, images: Tensor) -> Tensor:
        shape = (1, -1, *([1] * (images.dim() - 2)))
        return (images.to(torch.float32) / 255.0 - self.mean.view(shape)) / self.std.view(shape)

    def train_view(self, images: Tensor, iteration: int, rank: int) -> Tensor:
        return self._view(images)

    def test_view(self, images: Tensor, indices: Sequence[int]) -> Tensor:
        return self._view(images)

    def loss(self, output: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(output, labels)

    def sums(self, output: Tensor, labels: Tensor, loss: Tensor) -> Tensor:
        k = self.num_classes
        predicted = output.detach().argmax(1).flatten()
        truth = labels.flatten()
        both = torch.bincount(truth[predicted == truth], minlength=k)[:k]
        counts = [
            loss.detach().double() * labels.shape[0],
            (predicted == truth).sum().double(),
            torch.tensor(float(labels.shape[0]), dtype=torch.float64, device=labels.device),
            torch.tensor(float(truth.numel()), dtype=torch.float64, device=labels.device),
        ]
        per_class = torch.stack(
            [
                both,
                torch.bincount(predicted, minlength=k)[:k],
                torch.bincount(truth, minlength=k)[:k],
            ],
            dim=1,
        ).double()
        return torch.cat([torch.stack(counts), per_class.flatten()])

    def figures(self, sums: Tensor, prefix: str = "") -> dict[str, float]:
        loss_sum, correct, samples, positions = sums[:4].tolist()
        per_class = sums[4:].view(self.num_classes, 3)
        both, predicted, labelled = per_class.unbind(1)
        denominator = predicted + labelled
        dice = torch.where(denominator > 0, 2 * both / denominator.clamp_min(1), 1.0)
        found = torch.where(labelled > 0, both / labelled.clamp_min(1), float("nan"))
        figures = {
            f"{prefix}dice": float(dice[1:].mean()) if self.num_classes > 1 else float(dice[0]),
            f"{prefix}loss": loss_sum / max(samples, 1.0),
            f"{prefix}accuracy": correct / max(positions, 1.0),
        }
        for k, value in enumerate(found.tolist()):
            figures[f"{prefix}accuracy_{k}"] = value
        return figures


def segmentation_task(
    model: nn.Module, transform: BatchTransform, image_shape: tuple[int, ...]
) -> Segmentation | None:
    """:class:`Segmentation` for a segmentation model (checked against the inputs' shape
    ``(C, *S)``), else ``None``; registered in :data:`~invertible_train.tasks.TASK_FACTORIES`."""
    if not is_segmentation_model(model):
        return None
    check_segmentation_model(model, image_shape)
    return Segmentation(transform, int(getattr(model, "num_classes", 2)))


if segmentation_task not in TASK_FACTORIES:
    TASK_FACTORIES.append(segmentation_task)
