"""The network of an experiment, built by name: from ``invertible_models``' registry, or
from torchvision (``tv:resnet18``) or timm (``timm:vit_tiny_patch16_224``).

:func:`check_model_config` checks ``[model]`` before anything is built (so ``--print-config``
and the first second of a run catch a typo in the name). :func:`build_model` builds it; an
option the model does not take (``--set model.options.bogus=1``) or a value it refuses is a
:class:`~invertible_train.config.ConfigError` that names the key and lists the model's
options.

``model.reversible`` (``--reversible momentum|two_stream``) makes the built network
reversible with ``invertible_models.make_reversible`` (its coefficients from
``model.reversible_options``): a torchvision ResNet or a timm ViT then trains with memory
flat in depth, with the same parameters and ``state_dict`` keys. A timm ViT is built for the
data's image size: :func:`with_data_image_size` sets ``model.options.img_size`` from the
dataset when the experiment does not.

``model.memory_saving`` reaches models that have the switch (RevNets: reversible stages
that recompute instead of storing; converted networks); :func:`has_memory_saving` tells
which do, so that results record the setting only where it means something.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from invertible_core import ActNorm
from invertible_models import ConversionError, create_model, list_models, make_reversible
from invertible_models.convert import METHODS
from invertible_train.config import (
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    apply_values,
)

__all__ = [
    "TIMM_PREFIX",
    "TORCHVISION_PREFIX",
    "build_model",
    "check_model_config",
    "has_memory_saving",
    "initialise_data_dependent_layers",
    "model_options",
    "with_data_image_size",
]

#: model names from torchvision's and timm's registries carry these prefixes
TORCHVISION_PREFIX, TIMM_PREFIX = "tv:", "timm:"
#: the side of the images of the datasets whose size is fixed (others: ``data.image_size``)
_DATASET_IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "digits": 8}

#: set by the harness itself, not through ``model.options``.
_HARNESS_KEYS = frozenset({"num_classes", "memory_saving"})


def model_options(model: nn.Module) -> list[str]:
    """The keyword options of ``model``'s class (its ``__init__`` parameters with defaults),
    less those the harness sets itself."""
    parameters = inspect.signature(type(model).__init__).parameters.values()
    names = {
        p.name
        for p in parameters
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty
    }
    return sorted(names - _HARNESS_KEYS)


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ConfigError(
            "timm: models need timm, which is not installed: pip install "
            "'invertible-models[timm]' (or pip install timm)"
        ) from None
    return timm


def _check_name(name: str) -> None:
    if name.startswith(TORCHVISION_PREFIX):
        import torchvision

        known = torchvision.models.list_models(module=torchvision.models)
        if name[len(TORCHVISION_PREFIX) :] not in known:
            raise ConfigError(
                f"model.name {name!r}: torchvision has no classification model "
                f"{name[len(TORCHVISION_PREFIX) :]!r}; e.g. tv:resnet18, tv:resnet50 "
                "(torchvision.models.list_models())"
            )
    elif name.startswith(TIMM_PREFIX):
        if not _timm().is_model(name[len(TIMM_PREFIX) :]):
            raise ConfigError(
                f"model.name {name!r}: timm has no model {name[len(TIMM_PREFIX) :]!r}; e.g. "
                "timm:vit_tiny_patch16_224 (timm.list_models())"
            )
    elif name not in list_models():
        raise ConfigError(
            f"model.name must be one of {', '.join(list_models())}, or tv:NAME (torchvision) "
            f"or timm:NAME (timm); got {name!r}"
        )


def check_model_config(cfg: ModelConfig) -> None:
    """Raise :class:`ConfigError` for an unknown model name or conversion method, or an option
    the harness owns."""
    _check_name(cfg.name)
    if cfg.reversible and cfg.reversible not in METHODS:
        raise ConfigError(
            f"model.reversible must be one of {', '.join(METHODS)} (or empty); got "
            f"{cfg.reversible!r}"
        )
    if cfg.reversible_options and not cfg.reversible:
        raise ConfigError(
            "model.reversible_options are the coefficients of model.reversible, which is not "
            "set; pass --reversible momentum or two_stream"
        )
    for key in sorted(_HARNESS_KEYS & set(cfg.options)):
        owner = (
            "model.memory_saving (--no-memory-saving)" if key == "memory_saving" else "the dataset"
        )
        raise ConfigError(f"model.options.{key} is set by the harness, from {owner}")


def with_data_image_size(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with ``model.options.img_size`` set to the data's image size for a timm model
    that has none (timm builds its ViTs for 224x224 images by default)."""
    if not cfg.model.name.startswith(TIMM_PREFIX) or "img_size" in cfg.model.options:
        return cfg
    size = _DATASET_IMAGE_SIZE.get(cfg.data.dataset, cfg.data.image_size)
    return apply_values(cfg, {"model.options.img_size": size}, source="the data's image size")


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int = 3) -> nn.Module:
    """The network named in ``cfg``: from ``invertible_models``' registry, torchvision
    (``tv:NAME``) or timm (``timm:NAME``); made reversible when ``cfg.reversible`` says so.

    ``in_channels`` other than 3 (``digits`` is grey) is passed to the model as
    ``in_channels`` (timm: ``in_chans``) unless ``model.options`` sets it; torchvision's
    models take 3 channels only.
    """
    check_model_config(cfg)
    if cfg.name.startswith((TORCHVISION_PREFIX, TIMM_PREFIX)):
        model = _foreign_model(cfg, num_classes, in_channels)
    else:
        model = _zoo_model(cfg, num_classes, in_channels)
    if not cfg.reversible:
        return model
    # unset: the converted network's own default, which saves memory
    saving = True if cfg.memory_saving is None else cfg.memory_saving
    try:
        return make_reversible(
            model, cfg.reversible, memory_saving=saving, **cfg.reversible_options
        )
    except (ConversionError, TypeError, ValueError) as exc:
        raise ConfigError(f"model.reversible = {cfg.reversible!r}: {exc}") from None


def _foreign_model(cfg: ModelConfig, num_classes: int, in_channels: int) -> nn.Module:
    """A torchvision or timm model, untrained (the harness trains from its initialisation)."""
    options = dict(cfg.options)
    if cfg.name.startswith(TORCHVISION_PREFIX):
        import torchvision

        if in_channels != 3:
            raise ConfigError(
                f"{cfg.name} takes 3-channel images, but the dataset has {in_channels}; use a "
                "colour dataset (cifar10, cifar100, synthetic, imagefolder:PATH) or a zoo or "
                "timm: model"
            )
        build: Callable[..., nn.Module] = torchvision.models.get_model
        name = cfg.name[len(TORCHVISION_PREFIX) :]
    else:
        options.setdefault("in_chans", in_channels)
        build = _timm().create_model
        name = cfg.name[len(TIMM_PREFIX) :]
    try:
        return build(name, num_classes=num_classes, **options)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise ConfigError(
            f"model.options: {cfg.name} cannot be built with {options} "
            f"({type(exc).__name__}: {exc})"
        ) from None


def _zoo_model(cfg: ModelConfig, num_classes: int, in_channels: int) -> nn.Module:
    options = dict(cfg.options)
    if in_channels != 3:
        options.setdefault("in_channels", in_channels)
    if cfg.memory_saving is not None:  # unset: the model's own default
        options["memory_saving"] = cfg.memory_saving
    try:
        return create_model(cfg.name, num_classes=num_classes, **options)
    except (TypeError, ValueError) as exc:
        found = re.search(r"keyword argument '(\w+)'", str(exc))
        if found is None:
            raise ConfigError(
                f"model.options: {cfg.name} cannot be built with {options} "
                f"({type(exc).__name__}: {exc})"
            ) from None
        allowed = model_options(create_model(cfg.name, num_classes=num_classes))
        if found.group(1) == "in_channels" and "in_channels" not in cfg.options:
            raise ConfigError(
                f"data.dataset has {in_channels}-channel images, but {cfg.name} takes no "
                f"in_channels option (its options: {', '.join(allowed) or '(none)'}); use a "
                "model that does (the zoo's ResNets and RevNets)"
            ) from None
        raise ConfigError(
            f"model.options.{found.group(1)} is not an option of {cfg.name}; its options: "
            f"{', '.join(allowed) or '(none)'}"
        ) from None


def has_memory_saving(model: nn.Module) -> bool:
    """Whether ``model`` has a ``memory_saving`` switch (what ``model.memory_saving`` sets)."""
    return hasattr(model, "memory_saving")


def initialise_data_dependent_layers(
    model: nn.Module, first_batch: Callable[[], Tensor], forward: nn.Module
) -> bool:
    """Initialise data-dependent layers (``ActNorm``) from one batch, before DDP wraps ``model``.

    An ``ActNorm`` sets its scale and bias from the first batch it sees. Under
    ``DistributedDataParallel`` each process would see its own first batch and keep its own
    parameters (DDP broadcasts parameters once, when it wraps the model), and the ranks would
    train different models. So, when the model has such layers still uninitialised, every
    process runs ``forward`` once, without grad, on the same ``first_batch()`` (the first
    training images, identical on every rank) before wrapping: all ranks initialise alike.
    The caller's random streams are left as they were. Returns whether it ran.
    """
    if not any(isinstance(m, ActNorm) and not m.is_initialized() for m in model.modules()):
        return False
    was_training = model.training
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        forward.train()(first_batch())
    model.train(was_training)
    return True
