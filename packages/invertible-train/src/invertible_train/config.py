"""Experiments as data: a typed schema, TOML experiment files with inheritance, overrides.

An experiment is a TOML file. It may name a parent with ``extends = "NAME"`` (a file shipped
in ``invertible_train/experiments/``, e.g. ``"recipe"`` or ``"revnet38"``) or
``extends = "PATH"`` (relative to the extending file); the child's keys win, tables are
merged key by key. The merged result is checked against :class:`ExperimentConfig`: an
unknown key is an error that lists the valid keys of its table, a value of the wrong type
is an error that names the key and the expected type. Nothing in a file is ever imported
or executed: models, optimizers and schedules are names looked up in registries.

Registry names (models, datasets, optimizers, schedules) are checked by the modules that
own the registries (``invertible_train.optim``, ``invertible_train.data``,
``invertible_train.model``), not here: this module is the schema every other module
imports, and imports none of them.

Why a dataclass schema and not free dicts: a typo in a config file (``lr_milestones`` for
``milestones``) would otherwise be ignored silently and the run would train with the
default, which is exactly the failure that costs a week of GPU time.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from invertible_core import parse_bytes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "AMP_MODES",
    "SCHEDULE_UNITS",
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "ModelConfig",
    "OptimizerConfig",
    "SchedulerConfig",
    "TrainConfig",
    "apply_overrides",
    "apply_values",
    "check_run_name",
    "config_from_dict",
    "config_to_dict",
    "dump_toml",
    "list_experiments",
    "load_experiment",
    "resolve_intervals",
]

AMP_MODES = ("off", "bf16", "fp16")
#: how ``scheduler.milestones`` and ``scheduler.warmup`` count: fractions of the run's
#: iterations, or iteration numbers.
SCHEDULE_UNITS = ("fraction", "iteration")


class ConfigError(ValueError):
    """An experiment file or override is invalid; the message names the key and the fix."""


@dataclass
class ModelConfig:
    """Which network to build: a name from ``invertible_models.list_models()``, or
    ``tv:NAME`` (torchvision) or ``timm:NAME`` (timm)."""

    name: str = ""
    #: for models with a ``memory_saving`` switch: recompute instead of storing activations
    #: (reversible networks rebuild them, plain ones checkpoint their blocks). Unset: the
    #: model's own default, as timm has it (reversible networks save, plain ones train
    #: plainly). May change when a run resumes: it changes what is stored, not what is
    #: computed.
    memory_saving: bool | None = None
    #: extra keyword arguments for ``create_model`` (e.g. a width), passed through as-is.
    options: dict[str, Any] = field(default_factory=dict)
    #: make the network reversible (``invertible_models.make_reversible``): ``momentum`` or
    #: ``two_stream``; empty: train it as built.
    reversible: str = ""
    #: the conversion's coefficients (``gamma``; ``alpha``, ``beta``).
    reversible_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Dataset, batching and augmentation (augmentation touches training data only)."""

    #: ``cifar10``, ``cifar100``, ``digits``, ``synthetic`` or ``imagefolder:PATH``.
    dataset: str = "cifar10"
    data_dir: str = "data"
    download: bool = True
    batch_size: int = 100
    eval_batch_size: int = 500
    #: DataLoader worker processes; 0 loads in the main process (best for in-memory data).
    workers: int = 0
    augment: bool = True
    crop_padding: int = 4
    horizontal_flip: bool = True
    #: side of the square images for ``imagefolder`` (resized) and ``synthetic``.
    image_size: int = 32
    synthetic_classes: int = 10
    synthetic_train_size: int = 5000
    synthetic_test_size: int = 1000


@dataclass
class OptimizerConfig:
    """Optimizer by registry name (see ``invertible_train.optim.OPTIMIZERS``)."""

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    nesterov: bool = False


@dataclass
class SchedulerConfig:
    """Learning-rate schedule by registry name; stepped once per iteration.

    Positions in the schedule (``milestones``, ``warmup``) count in ``unit``: fractions of
    the run's iterations (the default, so a shorter run keeps the shape of the schedule) or
    iteration numbers.
    """

    name: str = "multistep"
    #: where the lr is multiplied by ``gamma`` (``multistep``): halfway and at three quarters.
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    gamma: float = 0.1
    #: ``fraction`` (of the run's iterations) or ``iteration``.
    unit: str = "fraction"
    #: length of the linear warmup of ``warmup_cosine``, in ``unit``.
    warmup: float = 0.0


@dataclass
class TrainConfig:
    """Length, precision, device and how often to log, evaluate and checkpoint."""

    iterations: int = 80000
    #: when > 0, train this many epochs instead (overrides ``iterations``).
    epochs: int = 0
    seed: int = 0
    amp: str = "off"
    #: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
    device: str = "auto"
    #: intervals in iterations; 0 sizes them to the run (see :func:`resolve_intervals`).
    log_every: int = 0
    eval_every: int = 0
    checkpoint_every: int = 0
    tensorboard: bool = True
    #: measure activation memory of one training step at the end (profiler on the CPU).
    measure_memory: bool = True
    #: torch's intra-op CPU threads (``torch.set_num_threads``); 0 leaves torch's default.
    threads: int = 0
    #: under torchrun, BatchNorm layers normalise with the statistics of the global batch.
    sync_bn: bool = False
    #: under torchrun, shard every block with FSDP2 instead of replicating the model with
    #: DDP; checkpoints are sharded (``torch.distributed.checkpoint``): see
    #: ``invertible_train.sharding``.
    fsdp: bool = False
    #: plan what to store and what to recompute for this peak memory per process ("6GiB",
    #: "512MiB"; "" plans nothing): see ``invertible_train.budget``.
    memory_budget: str = ""


@dataclass
class ExperimentConfig:
    """A whole experiment. ``name`` is the results subdirectory (default: model-dataset)."""

    name: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def run_name(self) -> str:
        """The results subdirectory: ``name`` if set, else ``<model>-<dataset>``."""
        if self.name:
            return self.name
        dataset = self.data.dataset
        if dataset.startswith("imagefolder:"):
            dataset = "imagefolder-" + (Path(dataset.split(":", 1)[1]).name or "images")
        return f"{self.model.name}-{dataset}"


def check_run_name(name: str, key: str = "name") -> str:
    """``name`` when it can name a folder inside the results folder, else a ConfigError.

    One path component: not empty, not ``.`` or ``..``, no path separator, no NUL. A name
    that is a path would put results (and what ``--fresh`` deletes) outside the results
    folder.
    """
    separators = {"/", "\\"}
    bad = (
        not name
        or name in (".", "..")
        or any(sep in name for sep in separators)
        or "\0" in name
        or Path(name).is_absolute()
    )
    if bad:
        raise ConfigError(
            f"{key} {name!r} is not a folder name: use one path component (letters, digits, "
            "'-', '_', '.'), not '.', '..' or a path; results always go inside --results-dir"
        )
    return name


#: the recipe's intervals: an 80,000-iteration run logs every 100 iterations, evaluates
#: every 2,000 and checkpoints every 1,000 (800, 40 and 80 times); shorter runs scale down.
_INTERVALS = {"log_every": (100, 100), "eval_every": (20, 2000), "checkpoint_every": (20, 1000)}


def resolve_intervals(train: TrainConfig, total_iterations: int) -> dict[str, int]:
    """``log_every``, ``eval_every``, ``checkpoint_every`` in iterations for a run's length.

    A key set to a positive value keeps it; 0 means "fit the run": about 100 logged points
    (at most every 100 iterations), about 20 evaluations (at most every 2,000) and 20
    checkpoints (at most every 1,000), at least every iteration.
    """
    out = {}
    for key, (times, cap) in _INTERVALS.items():
        value = getattr(train, key)
        out[key] = value if value > 0 else max(1, min(cap, total_iterations // times))
    return out


_INHERIT_KEY = "extends"


def list_experiments() -> list[str]:
    """Names of the experiment files shipped with the package (usable in ``extends``)."""
    folder = resources.files("invertible_train") / "experiments"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def _read_shipped(name: str) -> str:
    path = resources.files("invertible_train") / "experiments" / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(
            f"no shipped experiment named {name!r}; shipped: {', '.join(list_experiments())}"
        )
    return path.read_text(encoding="utf-8")


def _parse(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from None


def _load_raw(ref: str, base_dir: Path | None, seen: tuple[str, ...]) -> dict[str, Any]:
    """Read one experiment (shipped name or path) and merge it over its ``extends`` chain."""
    is_path = ref.endswith(".toml") or "/" in ref or "\\" in ref
    if is_path:
        path = Path(ref)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"experiment file {source} does not exist")
        text, next_base = path.read_text(encoding="utf-8"), path.parent
    else:
        source = f"shipped experiment {ref!r}"
        text, next_base = _read_shipped(ref), None
    if source in seen:
        raise ConfigError(f"'{_INHERIT_KEY}' cycle: {' -> '.join((*seen, source))}")
    raw = _parse(text, source)
    parent = raw.pop(_INHERIT_KEY, None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise ConfigError(f"'{_INHERIT_KEY}' in {source} must be a string, got {parent!r}")
    return _merge(_load_raw(parent, next_base, (*seen, source)), raw)


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_experiment(
    model: str | None = None,
    config_file: str | Path | None = None,
    overrides: Iterable[str] = (),
    dataset: str | None = None,
) -> ExperimentConfig:
    """Resolve an experiment: file (or the model's shipped default), then ``--set`` overrides.

    Without ``config_file`` the shipped experiment named ``MODEL-DATASET`` is used when there
    is one (``glow-digits``: the model sized for that data), else the one named after the
    model, else the shipped ``recipe`` (the RevNet paper's CIFAR recipe). ``model``, when
    given, always sets ``model.name``; ``dataset`` only picks the file.
    """
    shipped = list_experiments()
    if config_file is not None:
        raw = _load_raw(str(config_file), None, ())
    elif model is not None and f"{model}-{dataset}" in shipped:
        raw = _load_raw(f"{model}-{dataset}", None, ())
    elif model is not None and model in shipped:
        raw = _load_raw(model, None, ())
    else:
        raw = _load_raw("recipe", None, ())
    if model is not None:
        raw.setdefault("model", {})
        if not isinstance(raw["model"], dict):
            raise ConfigError("'model' must be a table")
        raw["model"]["name"] = model
    source = str(config_file) if config_file is not None else "the experiment"
    cfg = config_from_dict(raw, source=source)
    return apply_overrides(cfg, overrides)


def config_from_dict(raw: Mapping[str, Any], source: str = "config") -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from nested dicts (e.g. parsed TOML)."""
    cfg = _build(ExperimentConfig, raw, prefix="", source=source)
    assert isinstance(cfg, ExperimentConfig)
    _check_values(cfg)
    return cfg


def _build(cls: type, raw: Mapping[str, Any], prefix: str, source: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: [{prefix.rstrip('.')}] must be a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in hints:
            where = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
            raise ConfigError(
                f"{source}: unknown key {prefix + key!r}; valid keys at {where}: {', '.join(names)}"
            )
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(typing.cast(type, hint), value, f"{prefix}{key}.", source)
        else:
            kwargs[key] = _coerce(value, hint, prefix + key, source)
    return cls(**kwargs)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check ``value`` against a schema type; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    ok: bool
    optional = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(optional) == 1:
        return None if value is None else _coerce(value, optional[0], key, source)
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
    elif hint is str:
        ok = isinstance(value, str)
    elif origin is list:
        (item,) = typing.get_args(hint)
        ok = isinstance(value, list)
        if ok:
            value = [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    elif origin is dict:
        ok = isinstance(value, dict)
        value = dict(value) if ok else value
    else:  # pragma: no cover - the schema uses only the types above
        raise TypeError(f"unsupported schema type {hint!r} for {key}")
    if not ok:
        raise ConfigError(
            f"{source}: {key} expects {_type_name(hint)}, got {value!r} ({type(value).__name__})"
        )
    return value


def _check_values(cfg: ExperimentConfig) -> None:
    """Checks a type cannot express: ranges, choices, names (registry names: elsewhere)."""

    def choose(key: str, value: str, choices: Iterable[str]) -> None:
        choices = sorted(choices)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")

    if cfg.name:
        check_run_name(cfg.name)
    choose("train.amp", cfg.train.amp, AMP_MODES)
    choose("scheduler.unit", cfg.scheduler.unit, SCHEDULE_UNITS)
    positive: dict[str, float] = {
        "data.batch_size": cfg.data.batch_size,
        "data.eval_batch_size": cfg.data.eval_batch_size,
        "data.image_size": cfg.data.image_size,
        "data.synthetic_classes": cfg.data.synthetic_classes,
        "data.synthetic_train_size": cfg.data.synthetic_train_size,
        "data.synthetic_test_size": cfg.data.synthetic_test_size,
        "optimizer.lr": cfg.optimizer.lr,
        "scheduler.gamma": cfg.scheduler.gamma,
    }
    for key, value in positive.items():
        if not value > 0 or not math.isfinite(value):
            raise ConfigError(f"{key} must be a positive number; got {value}")
    non_negative: dict[str, float] = {
        "train.iterations": cfg.train.iterations,
        "train.epochs": cfg.train.epochs,
        "train.log_every": cfg.train.log_every,
        "train.eval_every": cfg.train.eval_every,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "train.threads": cfg.train.threads,
        "data.workers": cfg.data.workers,
        "data.crop_padding": cfg.data.crop_padding,
        "optimizer.weight_decay": cfg.optimizer.weight_decay,
        "scheduler.warmup": cfg.scheduler.warmup,
    }
    for key, amount in non_negative.items():
        if not amount >= 0 or not math.isfinite(amount):
            raise ConfigError(f"{key} must be a number >= 0; got {amount}")
    if not 0 <= cfg.optimizer.momentum < 1:
        raise ConfigError(f"optimizer.momentum must be in [0, 1); got {cfg.optimizer.momentum}")
    if cfg.train.memory_budget:
        try:
            parse_bytes(cfg.train.memory_budget, "train.memory_budget")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if cfg.train.iterations == 0 and cfg.train.epochs == 0:
        raise ConfigError("set train.iterations or train.epochs (--iterations / --epochs)")
    _check_schedule(cfg.scheduler)


def _check_schedule(cfg: SchedulerConfig) -> None:
    fraction = cfg.unit == "fraction"
    for i, value in enumerate(cfg.milestones):
        key = f"scheduler.milestones[{i}]"
        if fraction and not 0 < value <= 1:
            raise ConfigError(
                f"{key} is {value}, but with scheduler.unit = 'fraction' milestones are "
                "fractions of the run in (0, 1] (0.5: halfway); for iteration numbers set "
                "scheduler.unit = 'iteration'"
            )
        if not fraction and not (math.isfinite(value) and value >= 1 and value == int(value)):
            raise ConfigError(
                f"{key} is {value}, but with scheduler.unit = 'iteration' milestones are "
                "whole iteration numbers from 1"
            )
    if fraction and cfg.warmup >= 1:
        raise ConfigError(
            f"scheduler.warmup is {cfg.warmup}, but with scheduler.unit = 'fraction' it is a "
            "fraction of the run in [0, 1); for iterations set scheduler.unit = 'iteration'"
        )
    if not fraction and cfg.warmup != int(cfg.warmup):
        raise ConfigError(
            f"scheduler.warmup is {cfg.warmup}, but with scheduler.unit = 'iteration' it is a "
            "whole number of iterations"
        )


def apply_overrides(cfg: ExperimentConfig, overrides: Iterable[str]) -> ExperimentConfig:
    """Apply ``key=value`` overrides (``--set``), type-checked like a file.

    The value is read as a TOML value (``0.05``, ``true``, ``[1, 2]``, ``"text"``); a bare
    word that is not valid TOML is taken as a string (``--set model.name=revnet38``).
    """
    values: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value (e.g. optimizer.lr=0.05), got {item!r}")
        try:
            values[key] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            values[key] = text
    return apply_values(cfg, values, source="--set")


def apply_values(
    cfg: ExperimentConfig, values: Mapping[str, Any], source: str = "override"
) -> ExperimentConfig:
    """A copy of ``cfg`` with dotted keys (``optimizer.lr``) set, validated like a file."""
    if not values:
        return cfg
    raw = config_to_dict(cfg)
    for key, value in values.items():
        parts = key.split(".")
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})  # an unknown table: the schema check names it
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: {key}: {part!r} is not a table")
            node = child
        node[parts[-1]] = value
    return config_from_dict(raw, source=source)


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as nested plain dicts (for TOML, JSON and checkpoints)."""
    return dataclasses.asdict(cfg)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} ({type(value).__name__}) to TOML")


def dump_toml(data: Mapping[str, Any]) -> str:
    """Write nested dicts of scalars and lists as TOML (enough for a resolved config); a
    ``None`` (an unset option) is left out."""
    lines: list[str] = []

    def table(node: Mapping[str, Any], path: str) -> None:
        # an unset value (None) is written as absent, which reads back as unset
        scalars = {k: v for k, v in node.items() if not isinstance(v, dict) and v is not None}
        tables = {k: v for k, v in node.items() if isinstance(v, dict)}
        if path:
            lines.append(f"\n[{path}]")
        for key, value in scalars.items():
            lines.append(f"{key} = {_toml_value(value)}")
        for key, value in tables.items():
            table(value, f"{path}.{key}" if path else key)

    table(data, "")
    return "\n".join(lines).lstrip("\n") + "\n"
