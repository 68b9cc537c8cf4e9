"""The network :func:`~invertible_models.make_reversible` returns, and how it is built.

The converted network is a new module tree around the original's modules: containers on the
way to a rewired part are shallow copies (:func:`shallow_copy`: the same children, the same
parameters, their own dictionaries), rewired parts are new modules holding the original
blocks, and everything else is the original module itself. So the original keeps working,
unchanged, and both compute with the same parameter objects: an optimizer over the
original's parameters trains the converted network.

Its class is the original's class with :class:`ConvertedModel` mixed in
(``ReversibleResNet`` for a ``ResNet``), as ``torch.distributed.fsdp.fully_shard`` mixes
its own class in: ``isinstance(converted, ResNet)`` holds, attributes and methods are the
original's, and the mixin adds the zoo's switch ``memory_saving`` (a property, applied at
once), ``checkpoint_kept``, the method's ``coefficients`` and the ``conversion`` record.
It pickles and deep-copies (the class is rebuilt from the original's).

State dict: keys are the ORIGINAL's. A rewired block lives at a new path (``layer1.1``
inside a run), so :meth:`ConvertedModel.state_dict` writes each parameter and buffer under
the name it has in the original network, and loading accepts those names: the original's
checkpoint loads into the converted network and the converted network's into the original
(``strict``, both ways). ``named_parameters()`` shows the new paths.
"""

from __future__ import annotations

import copy
from typing import Any, cast

from torch import nn

from invertible_core import MemorySaving, MemorySwitches, SwitchState
from invertible_models.conversion.context import ConversionRecord
from invertible_models.conversion.method import Coefficients
from invertible_models.conversion.run import ReversibleRun
from invertible_models.conversion.stage import KeptBlock

__all__ = ["ConvertedModel", "adopt", "converted_class", "shallow_copy"]


def shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object with the same children, parameters and buffers as ``module``,
    whose own dictionaries (children, parameters, hooks, ...) are copies: replacing a child
    of the copy leaves ``module`` as it was."""
    new = copy.copy(module)
    for name, value in list(vars(new).items()):
        if isinstance(value, (dict, set, list)):
            vars(new)[name] = copy.copy(value)
    return new


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _state_names(module: nn.Module) -> list[str]:
    """The module's own state_dict entries: parameters and persistent buffers."""
    names = [n for n, p in module._parameters.items() if p is not None]
    names += [
        n
        for n, b in module._buffers.items()
        if b is not None and n not in module._non_persistent_buffers_set
    ]
    return names


def _name_maps(original: nn.Module, converted: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    """(state_dict key, module path) maps from the converted network to the original, for
    every module the two share (matched by identity)."""
    paths: dict[int, list[str]] = {}
    for path, module in original.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    used: dict[int, int] = {}
    keys: dict[str, str] = {}
    modules: dict[str, str] = {}
    for path, module in converted.named_modules(remove_duplicate=False):
        candidates = paths.get(id(module))
        if not candidates:
            continue
        index = used.get(id(module), 0)
        used[id(module)] = index + 1
        old = candidates[min(index, len(candidates) - 1)]
        if old != path:
            modules[path] = old
            for name in _state_names(module):
                keys[_join(path, name)] = _join(old, name)
    return keys, modules


class ConvertedModel(MemorySaving, nn.Module):
    """Mixed into the class of every network :func:`~invertible_models.make_reversible`
    returns (never instantiated alone).

    ``memory_saving`` is the core's one switch (:class:`~invertible_core.MemorySaving`):
    ``True`` sets every run to rebuild its activations (and, with ``checkpoint_kept``, every
    kept block to be checkpointed), ``False`` is plain autograd; reading it says whether the
    switches are as ``True`` sets them (a memory plan may have set some otherwise).
    ``set_grad_checkpointing(enable)``, timm's name, sets it too.

    Attributes:
        conversion: the :class:`~invertible_models.conversion.ConversionRecord`: the method,
            each reversible run and each block kept as it was, by original path.
        coefficients: the method's coefficients (``gamma``; ``alpha`` and ``beta``), shared
            by every coupling and read at every call; change them with
            :meth:`set_coefficients` or a
            :class:`~invertible_models.conversion.CoefficientSchedule`.
    """

    conversion: ConversionRecord
    coefficients: Coefficients
    _checkpoint_kept: bool
    _anchor_every: int
    _base_class: type[nn.Module]
    _original_keys: dict[str, str]
    _converted_keys: dict[str, str]
    _original_paths: dict[str, str]
    _original_order: dict[str, int]

    # -- the switches ---------------------------------------------------------------------
    # ``memory_saving`` is the core's one switch (:class:`~invertible_core.MemorySaving`) over
    # the runs' sequences and the kept blocks; only what "on" means is said here.
    def memory_saving_state(self, enabled: bool) -> SwitchState:
        """The switches as ``memory_saving = enabled`` sets them: every run rebuilding its
        activations, and the kept blocks checkpointed when ``checkpoint_kept``; off, plain
        autograd everywhere."""
        switches = MemorySwitches(self)
        state = switches.uniform(enabled)
        if not enabled or self._checkpoint_kept:
            return state
        kept = {n for n, m in switches.checkpointables.items() if isinstance(m, KeptBlock)}
        return SwitchState(
            saving=state.saving,
            keep=state.keep,
            checkpointed={n: on and n not in kept for n, on in state.checkpointed.items()},
        )

    @property
    def checkpoint_kept(self) -> bool:
        """Whether saving memory also checkpoints the blocks kept as they were inside
        converted stages (a ResNet's stem and downsampling blocks); applies at once while
        ``memory_saving`` is on."""
        return self._checkpoint_kept

    @checkpoint_kept.setter
    def checkpoint_kept(self, value: bool) -> None:
        saving = self.memory_saving
        self._checkpoint_kept = bool(value)
        if saving:
            self.memory_saving = True

    @property
    def anchor_every(self) -> int:
        """Keep the exact state after every k-th coupling of each run (0: none): bounds the
        float rounding of rebuilt activations where the inverse is ill-conditioned, at one
        stored state per anchor. Setting it applies to every run at once."""
        return self._anchor_every

    @anchor_every.setter
    def anchor_every(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"anchor_every must be an int >= 0, got {value!r}")
        for run in self.runs():
            run.blocks.anchor_every = value
        self._anchor_every = value

    def runs(self) -> list[ReversibleRun]:
        """The reversible runs, in module order."""
        return [m for m in self.modules() if isinstance(m, ReversibleRun)]

    def kept_blocks(self) -> list[KeptBlock]:
        """The blocks kept as they were inside converted stages, in module order."""
        return [m for m in self.modules() if isinstance(m, KeptBlock)]

    def set_coefficients(self, **values: float) -> None:
        """Change the method's coefficients (``gamma=``; ``alpha=``, ``beta=``) for every
        coupling; checked first, ``ValueError`` for a value out of range."""
        self.coefficients.set(**values)

    # -- the original's state_dict names ------------------------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """``nn.Module.state_dict`` under the ORIGINAL network's keys (see the module doc)."""
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        out = super().state_dict(*args, **kwargs)
        # the original's keys, in the original's order (ours, then any other key, in place)
        ours: list[tuple[str, Any]] = []
        others: list[tuple[str, Any]] = []
        for key, value in out.items():
            if key.startswith(prefix):
                relative = key[len(prefix) :]
                ours.append((self._original_keys.get(relative, relative), value))
            else:
                others.append((key, value))
        order = self._original_order
        ours.sort(key=lambda item: order.get(item[0], len(order)))
        out.clear()
        for key, value in others:
            out[key] = value
        for key, value in ours:
            out[prefix + key] = value
        metadata = getattr(out, "_metadata", None)
        if metadata is not None:
            renamed: dict[str, Any] = {}
            moved: dict[str, Any] = {}
            for key, value in metadata.items():
                relative = _relative_path(key, prefix)
                if relative is not None and relative in self._original_paths:
                    moved[_absolute_path(self._original_paths[relative], prefix)] = value
                else:
                    renamed[key] = value
            metadata.clear()
            metadata.update(renamed)
            metadata.update(moved)  # the original module's entry wins over a wrapper's
        return out

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Runs before the children load (torch loads a module, then its children from the
        # same dictionary, torch's copy of the caller's): original keys become this tree's.
        for key in [k for k in state_dict if k.startswith(prefix)]:
            new = self._converted_keys.get(key[len(prefix) :])
            if new is not None:
                state_dict[prefix + new] = state_dict.pop(key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # -- pickling ---------------------------------------------------------------------------
    def __reduce_ex__(self, protocol: Any) -> Any:
        # the class is made at run time: rebuild it from the original's class
        return (_new_converted, (self._base_class,), dict(vars(self)))


def _relative_path(key: str, prefix: str) -> str | None:
    """A metadata key (a module path) relative to the module at ``prefix``, or None."""
    if not prefix:
        return key
    if key == prefix[:-1]:
        return ""
    return key[len(prefix) :] if key.startswith(prefix) else None


def _absolute_path(relative: str, prefix: str) -> str:
    if not relative:
        return prefix[:-1]
    return prefix + relative


_CLASSES: dict[type[nn.Module], type[ConvertedModel]] = {}


def converted_class(base: type[nn.Module]) -> type[ConvertedModel]:
    """``base`` with :class:`ConvertedModel` mixed in (``ReversibleResNet`` for
    ``ResNet``), made once per class."""
    if issubclass(base, ConvertedModel):
        return base
    cls = _CLASSES.get(base)
    if cls is None:
        name = (
            base.__name__
            if base.__name__.startswith("Reversible")
            else f"Reversible{base.__name__}"
        )
        cls = cast(
            type[ConvertedModel],
            type(name, (ConvertedModel, base), {"__module__": __name__, "__qualname__": name}),
        )
        _CLASSES[base] = cls
    return cls


def _new_converted(base: type[nn.Module]) -> ConvertedModel:
    cls = converted_class(base)
    return cls.__new__(cls)


def adopt(
    original: nn.Module,
    converted: nn.Module,
    record: ConversionRecord,
    coefficients: Coefficients,
    memory_saving: bool,
    checkpoint_kept: bool,
    anchor_every: int = 0,
) -> ConvertedModel:
    """Make ``converted`` (a new object: a shallow copy or a new module) the converted
    network of ``original``: mix :class:`ConvertedModel` into its class, record the
    original's state_dict names, and set the switches."""
    if converted is original or isinstance(converted, ConvertedModel):
        raise AssertionError("adopt() needs a new, unconverted root object")
    base = type(converted)
    converted.__class__ = converted_class(base)
    root = cast(ConvertedModel, converted)
    keys, modules = _name_maps(original, root)
    vars(root).update(
        _base_class=base,
        _original_keys=keys,
        _converted_keys={old: new for new, old in keys.items()},
        _original_paths=modules,
        _original_order={key: i for i, key in enumerate(original.state_dict())},
        _checkpoint_kept=bool(checkpoint_kept),
        _anchor_every=anchor_every,
        conversion=record,
        coefficients=coefficients,
    )
    root.memory_saving = memory_saving
    return root
