"""One name, one constructor: the registry of the zoo.

Model files register their constructors with :func:`register_model`; users build models
with :func:`create_model` by name (``"revnet110"``), so configuration files and command
lines hold names, never import paths (loading classes from dotted paths in a config runs
arbitrary code). :func:`list_models` tells what exists.

This module is a leaf, as timm's ``_registry.py`` is: it imports no model file. The model
files import it and register themselves, and ``invertible_models/__init__.py`` imports the
model files, so any import of the package (``import invertible_models.registry`` included,
which runs the package's ``__init__`` first) fills the registry.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["create_model", "list_models", "register_model"]

ModelFn = TypeVar("ModelFn", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: ModelFn) -> ModelFn:
    """Register a model constructor under its function name; returns it unchanged.

    The constructor takes ``num_classes`` and keyword options; if it also takes
    ``memory_saving``, its default is the model's (off for plain networks, on for
    reversible ones) and :func:`create_model` passes a value given to it through.
    """
    name = fn.__name__
    if name in _MODELS and _MODELS[name] is not fn:
        raise ValueError(f"a model named {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """The registered model names, by family and then by depth (resnet32 before resnet110)."""
    return sorted(_MODELS, key=_natural_key)


def create_model(
    name: str, num_classes: int = 10, memory_saving: bool | None = None, **options: Any
) -> nn.Module:
    """Build the registered model ``name``.

    Args:
        name: a name from :func:`list_models`, e.g. ``"resnet110"`` or ``"revnet110"``.
        num_classes: outputs of the classifier (10 for CIFAR-10, 100 for CIFAR-100).
        memory_saving: the zoo's one switch, with one meaning on every model: trade compute
            for training memory. Reversible networks (RevNets, RevViTs, i-RevNet, Glow)
            rebuild their reversible blocks' activations in backward instead of storing
            them, and do so by default; plain networks (ResNets, ViTs) recompute each block
            with ``torch.utils.checkpoint`` when asked, and by default train plainly, as
            timm's networks do. ``None``: the model's default. Settable later through the
            model's ``memory_saving`` attribute (or timm's ``set_grad_checkpointing()``);
            it changes no parameter and no ``state_dict`` key. ``False``: plain autograd.
        **options: passed to the network class (e.g. ``checkpoint_transitions``,
            ``anchor_every``, ``stem``, ``in_channels``; ``depth``, ``embed_dim``,
            ``drop_path_rate`` for the transformers).

    Raises:
        ValueError: unknown ``name``; the message lists the known names.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    fn = _MODELS[name]
    if memory_saving is not None and "memory_saving" in inspect.signature(fn).parameters:
        options["memory_saving"] = memory_saving
    return fn(num_classes=num_classes, **options)


def _natural_key(name: str) -> tuple[str, int, str]:
    """Sort key that orders the digits of a name by value: ("resnet", 32, "")."""
    match = re.fullmatch(r"(\D*)(\d+)(.*)", name)
    if match is None:
        return name, -1, ""
    return match.group(1), int(match.group(2)), match.group(3)
