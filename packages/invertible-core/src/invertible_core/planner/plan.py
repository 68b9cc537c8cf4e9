"""What a memory plan is: per-switch choices between storing and recomputing, as data.

A network has two kinds of memory switch (:mod:`invertible_core.planner.switches`): each
block of a :class:`~invertible_core.ReversibleSequence` is *rebuilt* in backward from its
output or *kept* (``keep_blocks``), and each checkpointable module is *checkpointed* or
*stores* its activations. A :class:`MemoryPlan` holds one choice per switch, names the
switches by their module paths (``module.named_modules()``), and carries what the planner
predicted and measured. It is plain data: printed as a table, written as JSON
(:meth:`MemoryPlan.to_json`) and applied again to the same network without measuring
anything (:meth:`MemoryPlan.apply`), which checks first that the network has exactly the
switches the plan names. :func:`~invertible_core.fit_memory_budget` makes plans.

The quantities, one name each (bytes, exact on the CPU, ``max_memory_allocated`` on CUDA;
:class:`~invertible_core.TrainingStep` defines the step): a plan's *peak* (``*_peak_bytes``)
is everything the training step holds at its highest point: the held state (parameters,
buffers, gradients, the optimizer's state, the batch; ``reserved_bytes`` beyond it) plus the
step's own activations and temporaries. A switch's ``stored_bytes`` is what storing it
holds for backward beyond recomputing it.

Budgets and sizes are bytes; :func:`parse_bytes` reads ``"6GiB"``, ``"512MiB"``,
``"1.5GB"`` (binary units ``KiB``/``MiB``/``GiB``/``TiB``, decimal units ``kB``/``MB``/
``GB``/``TB``, ``B``), and :func:`format_bytes` writes sizes for people.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from torch import nn

from invertible_core.planner.switches import MemorySwitches, SwitchState
from invertible_core.sequence import ReversibleSequence

__all__ = [
    "MemoryBudgetError",
    "MemoryPlan",
    "PlanMismatchError",
    "UnitCost",
    "format_bytes",
    "parse_bytes",
]

#: the ``format`` field of a plan's JSON, and its version (2: ``stored_bytes``, which
#: version 1 called ``activation_bytes``; both are read)
PLAN_FORMAT = "invertible-memory-plan"
PLAN_VERSION = 2
READABLE_VERSIONS = (1, 2)

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*")


class MemoryBudgetError(ValueError):
    """The budget is below the least memory the step can run in (every block rebuilt or
    checkpointed); ``minimum_bytes`` is that least memory."""

    def __init__(self, message: str, budget_bytes: int, minimum_bytes: int) -> None:
        super().__init__(message)
        self.budget_bytes = budget_bytes
        self.minimum_bytes = minimum_bytes


class PlanMismatchError(ValueError):
    """A plan applied to a network whose switches are not the ones the plan names."""


def parse_bytes(value: int | str, what: str = "budget") -> int:
    """A size in bytes from an int or a string such as ``"6GiB"``, ``"512MiB"``, ``"1.5GB"``.

    Raises ``ValueError`` (naming ``what``) for anything else: an unknown or ambiguous unit
    (``"6G"``: write ``6GiB`` for ``6 * 2**30`` or ``6GB`` for ``6 * 10**9``), a negative,
    zero or non-finite size, a bool.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(
            f"{what} must be a number of bytes (int) or a size such as '6GiB', got {value!r}"
        )
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.fullmatch(value)
        unit = match.group(2).lower() if match else ""
        if match is None or (unit not in _UNITS and unit != ""):
            hint = ""
            if match is not None and unit in ("k", "m", "g", "t"):
                up = unit.upper()
                hint = f" ('{up}' is ambiguous: write {up}iB for powers of 2, {up}B for 10s)"
            raise ValueError(
                f"{what} {value!r} is not a size{hint}; write a number with a unit: B, KiB, "
                "MiB, GiB, TiB (powers of 2) or kB, MB, GB, TB (powers of 10), e.g. '6GiB'"
            )
        number = float(match.group(1))
        if not math.isfinite(number):
            raise ValueError(f"{what} {value!r} is not a finite size")
        size = round(number * _UNITS[unit or "b"])
    if size <= 0:
        raise ValueError(f"{what} must be a positive size, got {value!r}")
    return size


def format_bytes(size: float) -> str:
    """``size`` bytes for people: ``"512 B"``, ``"1.50 KiB"``, ``"6.00 GiB"``."""
    if abs(size) < 1024:
        return f"{int(size)} B"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= scale:
            return f"{size / scale:.2f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


Choice = Literal["keep", "rebuild", "store", "checkpoint"]


@dataclass(frozen=True)
class UnitCost:
    """One switch of a plan, what its two choices cost, and the choice made.

    Attributes:
        name: ``"stages.0.blocks[3]"`` for block 3 of a sequence, the module path for a
            checkpointable module.
        kind: ``"block"`` (of a sequence: ``keep`` or ``rebuild``) or ``"checkpointable"``
            (``store`` or ``checkpoint``).
        stored_bytes: what the storing choice (``keep``, ``store``) holds for backward
            beyond the recomputing one, measured on the planned input shape.
        recompute_seconds: what the recomputing choice costs more per step (the measured
            forward time of the block; inverse and forward for blocks without a fused
            backward step).
        choice: the plan's choice.
    """

    name: str
    kind: Literal["block", "checkpointable"]
    stored_bytes: int
    recompute_seconds: float
    choice: Choice

    @property
    def stores(self) -> bool:
        """Whether the choice stores the activations (``keep`` or ``store``)."""
        return self.choice in ("keep", "store")


@dataclass(frozen=True)
class MemoryPlan:
    """Per-block choices between storing and recomputing, with their predicted and measured cost.

    Peaks count everything the training step holds at its peak (the module docstring):
    its held state (parameters, buffers, gradients, the optimizer's state, the batch),
    ``reserved_bytes``, and the activations and temporaries of forward, backward and the
    optimizer step.

    Attributes:
        budget_bytes: the budget the plan was made for.
        keep: per sequence (module path), the indices of its kept blocks; the others are
            rebuilt.
        sequence_lengths: per sequence, its number of blocks (checked by :meth:`apply`).
        checkpointed: per checkpointable module (module path), whether it is checkpointed.
        units: every switch with its costs and choice, in the order the step runs them.
        predicted_peak_bytes, predicted_step_seconds: the planner's prediction.
        measured_peak_bytes, measured_step_seconds: one measured step with the plan applied
            (``None`` when not measured); the peak is exact (CPU allocation events, CUDA
            ``max_memory_allocated``), the time a median of a few steps.
        minimum_peak_bytes, plain_peak_bytes: measured peaks with everything recomputed and
            with everything stored (plain autograd).
        minimum_step_seconds, plain_step_seconds: their measured step times.
        reserved_bytes: memory outside the step that the budget covers too.
        device: where it was measured.
        refinements: measured steps beyond the first that it took to meet the budget.
        extra: JSON-ready notes of whoever made the plan (the profiler and the training
            harness record the batch's ``input_shape``, to tell when a plan still fits).
    """

    budget_bytes: int
    keep: Mapping[str, tuple[int, ...]]
    sequence_lengths: Mapping[str, int]
    checkpointed: Mapping[str, bool]
    units: tuple[UnitCost, ...] = ()
    predicted_peak_bytes: int = 0
    predicted_step_seconds: float = math.nan
    measured_peak_bytes: int | None = None
    measured_step_seconds: float | None = None
    minimum_peak_bytes: int = 0
    plain_peak_bytes: int = 0
    minimum_step_seconds: float = math.nan
    plain_step_seconds: float = math.nan
    reserved_bytes: int = 0
    device: str = "cpu"
    refinements: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)

    # -- applying ------------------------------------------------------------------------
    def apply(self, module: nn.Module) -> nn.Module:
        """Set ``module``'s switches as the plan says (no measuring); returns ``module``.

        Every sequence the plan names gets ``memory_saving=True`` and its ``keep_blocks``,
        every checkpointable module its ``checkpointed``. Raises :class:`PlanMismatchError`,
        before changing anything, when ``module`` does not have exactly the plan's switches
        (another model, another depth): the plan was made for another network.
        """
        switches = MemorySwitches(module)
        sequences, checkpointables = switches.sequences, switches.checkpointables
        problems = list(self._mismatches(sequences, checkpointables))
        if problems:
            raise PlanMismatchError(
                f"this memory plan does not fit {type(module).__name__}: "
                + "; ".join(problems[:6])
                + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
                + ". Make a plan for this network with fit_memory_budget()"
            )
        switches.set(self.switch_state())
        return module

    def switch_state(self) -> SwitchState:
        """The plan as a setting of every switch it names."""
        return SwitchState(
            saving=dict.fromkeys(self.sequence_lengths, True),
            keep={name: tuple(v) for name, v in self.keep.items()},
            checkpointed={name: bool(v) for name, v in self.checkpointed.items()},
        )

    def _mismatches(
        self, sequences: Mapping[str, ReversibleSequence], checkpointables: Mapping[str, Any]
    ) -> Iterator[str]:
        for name in sorted(set(self.sequence_lengths) - set(sequences)):
            yield f"it has no reversible sequence {_shown(name)}"
        for name in sorted(set(sequences) - set(self.sequence_lengths)):
            yield f"its reversible sequence {_shown(name)} is not in the plan"
        for name in sorted(set(self.sequence_lengths) & set(sequences)):
            if len(sequences[name]) != self.sequence_lengths[name]:
                yield (
                    f"sequence {_shown(name)} has {len(sequences[name])} blocks, the plan "
                    f"{self.sequence_lengths[name]}"
                )
        for name in sorted(set(self.checkpointed) - set(checkpointables)):
            yield f"it has no checkpointable module {_shown(name)}"
        for name in sorted(set(checkpointables) - set(self.checkpointed)):
            yield f"its checkpointable module {_shown(name)} is not in the plan"

    # -- reading -----------------------------------------------------------------------------
    @property
    def fits(self) -> bool:
        """Whether the measured (else the predicted) peak is within the budget."""
        peak = self.measured_peak_bytes
        return (peak if peak is not None else self.predicted_peak_bytes) <= self.budget_bytes

    def __str__(self) -> str:
        rows = [("switch", "choice", "stored", "recompute")]
        for name, choice, count, stored, seconds in _grouped(self.units):
            label = name if count == 1 else f"{name} ({count} blocks)"
            rows.append((label, choice, format_bytes(stored), f"{1e3 * seconds:.2f} ms"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [f"memory plan: budget {format_bytes(self.budget_bytes)} on {self.device}"]
        for i, row in enumerate(rows):
            lines.append(
                f"  {row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  "
                f"{row[3]:>{widths[3]}}"
            )
            if i == 0:
                lines.append("  " + "-" * (sum(widths) + 6))
        stored = sum(u.stored_bytes for u in self.units if u.stores)
        kept = sum(1 for u in self.units if u.stores)
        lines.append(
            f"  stores {kept} of {len(self.units)} switches ({format_bytes(stored)} stored for "
            "backward)"
        )
        lines.append(
            f"  peak: predicted {format_bytes(self.predicted_peak_bytes)}, measured "
            f"{_maybe(self.measured_peak_bytes, format_bytes)} (minimum "
            f"{format_bytes(self.minimum_peak_bytes)}, plain autograd "
            f"{format_bytes(self.plain_peak_bytes)})"
        )
        lines.append(
            f"  step: predicted {_seconds(self.predicted_step_seconds)}, measured "
            f"{_maybe(self.measured_step_seconds, _seconds)} (minimum "
            f"{_seconds(self.minimum_step_seconds)}, plain autograd "
            f"{_seconds(self.plain_step_seconds)})"
        )
        return "\n".join(lines)

    # -- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data (what :meth:`to_json` writes)."""
        data = asdict(self)
        data["keep"] = {k: list(v) for k, v in self.keep.items()}
        data["sequence_lengths"] = dict(self.sequence_lengths)
        data["checkpointed"] = dict(self.checkpointed)
        data["extra"] = dict(self.extra)
        for key, value in data.items():
            if isinstance(value, float) and not math.isfinite(value):
                data[key] = None  # JSON has no NaN
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, **data}

    def to_json(self, indent: int | None = 2) -> str:
        """The plan as a JSON document; :meth:`from_json` reads it back."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MemoryPlan:
        """A plan from :meth:`to_dict`'s data; ``ValueError`` saying what is wrong otherwise."""
        if not isinstance(data, Mapping) or data.get("format") != PLAN_FORMAT:
            raise ValueError(
                f"not a memory plan: expected a JSON object with format {PLAN_FORMAT!r}"
            )
        if data.get("version") not in READABLE_VERSIONS:
            raise ValueError(
                f"memory plan version {data.get('version')!r} is not supported (this "
                f"invertible-core reads versions {', '.join(map(str, READABLE_VERSIONS))}); "
                "make the plan again"
            )
        stored_key = "activation_bytes" if data["version"] == 1 else "stored_bytes"
        try:
            units = tuple(
                UnitCost(
                    name=str(u["name"]),
                    kind=u["kind"],
                    stored_bytes=int(u[stored_key]),
                    recompute_seconds=float(u["recompute_seconds"]),
                    choice=u["choice"],
                )
                for u in data.get("units", ())
            )
            plan = cls(
                budget_bytes=int(data["budget_bytes"]),
                keep={str(k): tuple(int(i) for i in v) for k, v in data["keep"].items()},
                sequence_lengths={str(k): int(v) for k, v in data["sequence_lengths"].items()},
                checkpointed={str(k): bool(v) for k, v in data["checkpointed"].items()},
                units=units,
            )
            numbers = {
                key: data[key]
                for key in (
                    "predicted_peak_bytes",
                    "predicted_step_seconds",
                    "measured_peak_bytes",
                    "measured_step_seconds",
                    "minimum_peak_bytes",
                    "plain_peak_bytes",
                    "minimum_step_seconds",
                    "plain_step_seconds",
                    "reserved_bytes",
                    "device",
                    "refinements",
                    "extra",
                )
                if key in data
            }
            for key in ("predicted_step_seconds", "minimum_step_seconds", "plain_step_seconds"):
                if key in numbers and numbers[key] is None:
                    numbers[key] = math.nan
            return replace(plan, **numbers)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"malformed memory plan ({type(exc).__name__}: {exc})") from None

    @classmethod
    def from_json(cls, text: str) -> MemoryPlan:
        """A plan from :meth:`to_json`'s text."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"a memory plan is JSON; this is not ({exc})") from None
        return cls.from_dict(data)


def _shown(name: str) -> str:
    return repr(name) if name else "(the module itself)"


def _maybe(value: Any, fmt: Any) -> str:
    return "-" if value is None else str(fmt(value))


def _seconds(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{1e3 * value:.1f} ms"


def _grouped(units: tuple[UnitCost, ...]) -> Iterator[tuple[str, str, int, int, float]]:
    """Consecutive blocks of one sequence with the same choice as one row:
    ``(label, choice, count, stored bytes, recompute seconds)``."""
    run: list[UnitCost] = []

    def owner(u: UnitCost) -> str | None:
        return u.name.rsplit("[", 1)[0] if u.kind == "block" else None

    def flush() -> Iterator[tuple[str, str, int, int, float]]:
        if not run:
            return
        first, last = run[0], run[-1]
        if len(run) == 1:
            label = first.name
        else:
            lo, hi = first.name.rsplit("[", 1)[1][:-1], last.name.rsplit("[", 1)[1][:-1]
            label = f"{owner(first)}[{lo}..{hi}]"
        yield (
            label,
            first.choice,
            len(run),
            sum(u.stored_bytes for u in run),
            sum(u.recompute_seconds for u in run),
        )
        run.clear()

    for unit in units:
        if run and (
            owner(unit) is None or owner(unit) != owner(run[-1]) or unit.choice != run[-1].choice
        ):
            yield from flush()
        run.append(unit)
    yield from flush()
