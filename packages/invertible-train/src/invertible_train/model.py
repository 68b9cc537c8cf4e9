"""The network of an experiment, built from ``invertible_models``' registry by name.

:func:`check_model_config` checks ``[model]`` before anything is built (so ``--print-config``
and the first second of a run catch a typo in the name). :func:`build_model` builds it; an
option the model does not take (``--set model.options.bogus=1``) or a value it refuses is a
:class:`~invertible_train.config.ConfigError` that names the key and lists the model's
options.

``model.memory_saving`` reaches models that have the switch (RevNets: reversible stages
that recompute instead of storing); :func:`has_memory_saving` tells which do, so that
results record the setting only where it means something.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable

import torch
from torch import Tensor, nn

from invertible_core import ActNorm
from invertible_models import create_model, list_models
from invertible_train.config import ConfigError, ModelConfig

__all__ = [
    "build_model",
    "check_model_config",
    "has_memory_saving",
    "initialise_data_dependent_layers",
    "model_options",
]

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


def check_model_config(cfg: ModelConfig) -> None:
    """Raise :class:`ConfigError` for an unknown model name or an option the harness owns."""
    known = list_models()
    if cfg.name not in known:
        raise ConfigError(f"model.name must be one of {', '.join(known)}; got {cfg.name!r}")
    for key in sorted(_HARNESS_KEYS & set(cfg.options)):
        owner = (
            "model.memory_saving (--no-memory-saving)" if key == "memory_saving" else "the dataset"
        )
        raise ConfigError(f"model.options.{key} is set by the harness, from {owner}")


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int = 3) -> nn.Module:
    """The network named in ``cfg``, from ``invertible_models``' registry.

    ``in_channels`` other than 3 (``digits`` is grey) is passed to the model as
    ``in_channels`` unless ``model.options`` sets it.
    """
    check_model_config(cfg)
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
