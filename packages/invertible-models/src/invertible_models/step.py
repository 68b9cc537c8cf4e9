"""The zoo's training step: a model by name, a synthetic batch, its loss, SGD with momentum.

What ``invertible-profile`` measures (and its ``--budget`` plans): the core's one
:class:`~invertible_core.TrainingStep`, made for a model of the zoo by
:func:`training_step`. By default the batch is synthetic (``batch_size`` random
``3 x image_size x image_size`` images, random labels), the loss is cross-entropy and the
optimizer SGD with momentum 0.9 at learning rate 0.01. A density model (one with
``log_prob``, such as ``glow``, whose forward is its per-sample log-likelihood) gets images
in ``[0, 1]`` with the model's ``in_channels``, its mean negative log-likelihood per
dimension as the loss, and learning rate 1e-3. A caller with a batch, a loss or an
optimizer of its own (a training harness) passes them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from invertible_models.registry import create_model

if TYPE_CHECKING:  # the measuring machinery loads when a step is made, not on import
    from invertible_core import TrainingStep

__all__ = [
    "build_model",
    "is_density_model",
    "is_segmentation_model",
    "negative_log_likelihood",
    "training_step",
]


def build_model(
    name: str, *, image_size: int = 32, num_classes: int = 10, **options: Any
) -> nn.Module:
    """``create_model(name, ...)`` for ``image_size`` images: a model whose class takes an
    ``image_size`` (the transformers, Glow) is built for that size."""
    model = create_model(name, num_classes=num_classes, **options)
    parameter = inspect.signature(type(model).__init__).parameters.get("image_size")
    if parameter is not None and "image_size" not in options and parameter.default != image_size:
        model = create_model(name, num_classes=num_classes, image_size=image_size, **options)
    return model


def is_density_model(model: nn.Module) -> bool:
    """Whether ``model`` is a density model (it has ``log_prob``; its forward is that)."""
    return callable(getattr(model, "log_prob", None))


def is_segmentation_model(model: nn.Module) -> bool:
    """Whether ``model`` is a segmentation model: it declares ``spatial_dims`` (2 or 3) and
    returns class logits per position, ``(batch, num_classes, *spatial)``."""
    return isinstance(getattr(model, "spatial_dims", None), int)


def negative_log_likelihood(log_prob: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss of a density model's step: the batch's mean negative log-likelihood (nats);
    ``labels`` are ignored."""
    del labels
    return -log_prob.mean()


def training_step(
    model: nn.Module,
    *,
    batch_size: int = 32,
    image_size: int = 32,
    num_classes: int = 10,
    device: str | torch.device = "cpu",
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    loss: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    check_finite: bool = True,
) -> TrainingStep:
    """The training step of ``model`` (moved to the device, in training mode), as the module
    docstring says; ``images``, ``labels``, ``loss(output, labels)`` and ``optimizer(model)``
    (a factory) replace the defaults; ``autocast_dtype``, ``scaler`` and ``check_finite`` are
    the :class:`~invertible_core.TrainingStep`'s."""
    device = torch.device(device) if images is None else images.device
    model = model.to(device).train()
    density = is_density_model(model)
    segmentation = is_segmentation_model(model)
    if images is None:
        channels = int(getattr(model, "in_channels", 3)) if density or segmentation else 3
        axes = int(getattr(model, "spatial_dims", 2))
        shape = (batch_size, channels, *([image_size] * axes))
        images = torch.rand(shape, device=device) if density else torch.randn(shape, device=device)
    if labels is None:
        # a segmentation model: one class per position, from its own number of classes
        classes = int(getattr(model, "num_classes", num_classes)) if segmentation else num_classes
        positions = tuple(images.shape[2:]) if segmentation else ()
        labels = torch.randint(0, classes, (images.shape[0], *positions), device=device)
    if loss is None:
        dims = images[0].numel()
        loss = (
            (lambda log_prob, labels: negative_log_likelihood(log_prob, labels) / dims)
            if density
            else nn.CrossEntropyLoss()
        )
    if optimizer is None:
        # a flow stepped at the classifiers' 0.01 diverges within a few steps of training
        # (K=32 Glow on digits: NaN at step 5); the measurements rewind to one state, and
        # 1e-3 keeps even their first steps well inside the finite
        lr = 1e-3 if density else 0.01
        made: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    else:
        made = optimizer(model)
    from invertible_core import TrainingStep

    return TrainingStep(
        model,
        images,
        targets=labels,
        loss_fn=loss,
        optimizer=made,
        scaler=scaler,
        autocast_dtype=autocast_dtype,
        check_finite=check_finite,
    )
