"""One conversion in progress: its settings, the parts it builds, and the record it keeps.

The architecture rewirings (:mod:`~invertible_models.conversion.torchvision_resnet`,
:mod:`~invertible_models.conversion.torch_encoder`, :mod:`~invertible_models.conversion.
timm_vit`, :mod:`~invertible_models.conversion.sequential`) say which blocks of a network
are residual units and build its new parts through a :class:`ConversionContext`, which
applies the method and the memory settings the same way everywhere and records, in a
:class:`ConversionRecord`, what became reversible and what was kept and why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import nn

from invertible_models.conversion.method import Coefficients, ConversionMethod
from invertible_models.conversion.run import ReversibleRun
from invertible_models.conversion.stage import KeptBlock, ReversibleStage
from invertible_models.conversion.units import ResidualUnit

__all__ = ["ConversionContext", "ConversionError", "ConversionRecord", "UnitsOf"]

#: a block and its path -> its residual units, or why it stays as it was
UnitsOf = Callable[[nn.Module, str], "list[ResidualUnit] | str"]


class ConversionError(ValueError):
    """``make_reversible`` cannot convert a model, or a part of it; the message names what
    and says what would work."""


@dataclass
class ConversionRecord:
    """What a conversion did, by module path in the original network.

    Attributes:
        method: ``"momentum"`` or ``"two_stream"``.
        runs: ``(path, units)`` per reversible run: the original blocks it replaces (a
            range such as ``layer3.1-5``) and how many residual units it computes.
        kept: ``(path, reason)`` per block left as it was inside a converted stage.
    """

    method: str
    runs: list[tuple[str, int]] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)

    @property
    def num_units(self) -> int:
        """Residual units made reversible, over all runs."""
        return sum(n for _, n in self.runs)

    def summary(self) -> str:
        """One line per run and kept block, for people."""
        lines = [f"{self.method}: {self.num_units} residual units in {len(self.runs)} run(s)"]
        lines += [f"  reversible {path}: {n} unit{'s' if n != 1 else ''}" for path, n in self.runs]
        lines += [f"  kept {path}: {reason}" for path, reason in self.kept]
        return "\n".join(lines)


@dataclass
class ConversionContext:
    """The settings of one ``make_reversible`` call and the builder of its parts."""

    method: ConversionMethod
    coefficients: Coefficients
    memory_saving: bool
    checkpoint_kept: bool
    anchor_every: int = 0
    record: ConversionRecord = field(init=False)

    def __post_init__(self) -> None:
        self.record = ConversionRecord(self.method.name)

    def run(self, units: list[ResidualUnit], where: str) -> ReversibleRun:
        """One reversible run of ``units`` (recorded under ``where``)."""
        self.record.runs.append((where, len(units)))
        return ReversibleRun(
            units, self.method, self.coefficients, self.memory_saving, self.anchor_every
        )

    def stage(
        self, blocks: Iterable[tuple[str, nn.Module]], units_of: UnitsOf, where: str
    ) -> ReversibleStage:
        """The stage of ``blocks`` (named children of the module at ``where``): each maximal
        stretch of blocks with residual units becomes one run, every other block a
        :class:`KeptBlock`."""
        parts: list[nn.Module] = []
        pending: list[ResidualUnit] = []
        names: list[str] = []

        def flush() -> None:
            if pending:
                span = names[0] if len(names) == 1 else f"{names[0]}-{names[-1]}"
                parts.append(self.run(list(pending), f"{where}.{span}" if where else span))
                pending.clear()
                names.clear()

        for name, block in blocks:
            path = f"{where}.{name}" if where else name
            units = units_of(block, path)
            if isinstance(units, str):
                flush()
                parts.append(KeptBlock(block, self.memory_saving and self.checkpoint_kept))
                self.record.kept.append((path, units))
            else:
                pending.extend(units)
                names.append(name)
        flush()
        return ReversibleStage(*parts)
