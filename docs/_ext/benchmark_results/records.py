"""A benchmark's JSON record, read for a table, and the tables made of it.

A record is what a benchmark wrote under ``benchmarks/results/`` (``core.json``, ...). A
table reads fields from it by path; a field the record lacks is a :class:`RecordError` that
names the file, the field, the table that needs it and the command that writes the record
again, so a rerun that renamed or dropped a field fails the documentation build with that
sentence instead of a ``KeyError`` (or, worse, a table with a hole in it).

Standard library only: the tests (``tests/repo/test_results_pages.py``) use it without Sphinx.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "RESULTS_DIR",
    "Record",
    "RecordError",
    "RecordSpec",
    "Table",
    "TableSpec",
    "format_value",
    "mib",
    "number",
    "ratio",
    "relative_error",
    "short",
    "threads",
]

REPO_ROOT = Path(__file__).resolve().parents[3]
#: where the benchmarks write their records
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
MIB = 1024 * 1024


class RecordError(ValueError):
    """A record cannot give a table what it needs; the message says what and what to do."""


@dataclass(frozen=True)
class RecordSpec:
    """A benchmark's record: its file, the command that writes it, what the run measured on.

    ``conditions(record)`` says, in a few words, under what the figures were taken (device,
    threads, torch); it is printed under every table of the record. An ``optional`` record
    may be absent (a benchmark not run yet): its tables then say so instead of failing.
    """

    file: str
    command: str
    conditions: Callable[[Record], str]
    optional: bool = False

    @property
    def path(self) -> Path:
        return RESULTS_DIR / self.file

    def load(self, user: str, results_dir: Path | None = None) -> Record | None:
        """The record, read for ``user`` (``"the table 'core:conv'"``: what needs it, for the
        errors); ``None`` when an optional record is absent."""
        path = (results_dir or RESULTS_DIR) / self.file
        if not path.is_file():
            if self.optional:
                return None
            raise RecordError(
                f"benchmarks/results/{self.file} is missing, and {user} needs it: run "
                f"`{self.command}` (and commit the record)"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RecordError(
                f"benchmarks/results/{self.file} is not valid JSON ({exc}); run "
                f"`{self.command}` to write it again"
            ) from None
        return Record(self, user, data, path)


@dataclass(frozen=True)
class Record:
    """The data of one record, read on behalf of one table or sentence (``user``)."""

    spec: RecordSpec
    user: str
    data: Any
    path: Path

    def missing(self, what: str) -> RecordError:
        return RecordError(
            f"benchmarks/results/{self.spec.file}: {self.user} needs {what}, "
            f"which the record lacks; rerun `{self.spec.command}` to write a complete record "
            "(or change the table in docs/_ext/benchmark_results/ to what the benchmark writes "
            "now)"
        )

    def get(self, *path: str | int, within: Any = None) -> Any:
        """The field at ``path`` (keys and list indices) of the record, or of ``within``."""
        value = self.data if within is None else within
        for depth, key in enumerate(path):
            try:
                value = value[key]
            except (KeyError, IndexError, TypeError):
                where = "/".join(str(k) for k in path[: depth + 1])
                raise self.missing(f"the field '{where}'") from None
        return value

    def rows(self, *path: str | int) -> list[dict[str, Any]]:
        """A list of objects at ``path``; an empty list is missing data too."""
        found = self.get(*path)
        if not isinstance(found, list) or not found:
            raise self.missing(f"a non-empty list at '{'/'.join(str(k) for k in path)}'")
        return found

    def find(self, rows: Iterable[dict[str, Any]], **match: Any) -> dict[str, Any]:
        """The one row whose fields equal ``match``."""
        for row in rows:
            if all(row.get(key) == value for key, value in match.items()):
                return row
        wanted = ", ".join(f"{key}={value!r}" for key, value in match.items())
        raise self.missing(f"a row with {wanted}")

    def field(self, row: dict[str, Any], key: str) -> Any:
        """``row[key]``, or the error that names the row and the key."""
        if key not in row:
            name = next((str(row[k]) for k in ("label", "method", "model", "name") if k in row), "")
            raise self.missing(f"the field '{key}' in its row {name!r}".replace(" ''", ""))
        return row[key]

    def conditions(self) -> str:
        return self.spec.conditions(self)


@dataclass
class Table:
    """A Markdown table: a header, rows of cells (Markdown inline text), notes under it."""

    header: Sequence[str]
    rows: list[Sequence[str]] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        if len(cells) != len(self.header):
            raise ValueError(f"{len(cells)} cells for {len(self.header)} columns: {cells}")
        self.rows.append([str(cell) for cell in cells])

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


@dataclass(frozen=True)
class TableSpec:
    """A table made from one record: its name (``core:conv``), the record, the builder."""

    name: str
    record: RecordSpec
    build: Callable[[Record], Table]

    def render(self, results_dir: Path | None = None) -> str | None:
        """The table as Markdown with its source line; ``None``: its optional record is absent."""
        record = self.record.load(f"the table '{self.name}'", results_dir)
        if record is None:
            return None
        table = self.build(record)
        if not table.rows:
            raise record.missing("at least one row")
        source = (
            f"From `benchmarks/results/{self.record.file}` ({record.conditions()}), written by "
            f"`{self.record.command}`."
        )
        return f"{table.markdown()}\n\n{source}"


# -- formatting, one way for every table --------------------------------------------------------


def number(value: float, digits: int = 2) -> str:
    """``value`` with ``digits`` decimals, thousands separated for large integers."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return f"{value:.{digits}f}"


def mib(value_bytes: float, digits: int = 1) -> str:
    """Bytes as MiB."""
    return number(value_bytes / MIB, digits)


def ratio(value: float, digits: int = 2) -> str:
    return number(value, digits)


def threads(count: int) -> str:
    return f"{count} thread" if count == 1 else f"{count} threads"


def short(text: object, limit: int = 90) -> str:
    """An error message cut to fit a cell, at a word."""
    text = str(text)
    if len(text) <= limit:
        return text
    return text[: text.rfind(" ", 0, limit)] + " ..."


def relative_error(value: float) -> str:
    """An error: exactly 0 stays ``0`` (it means bit-exact), else two significant digits."""
    if value == 0:
        return "0"
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf"
    return f"{value:.1e}"


_FORMAT = re.compile(r"^(?P<unit>MiB|pct)?(?P<spec>.*)$")


def format_value(value: Any, spec: str = "") -> str:
    """``value`` in a Python format ``spec``, after an optional unit: ``MiB.1f`` divides bytes
    by 2**20, ``pct.1f`` multiplies a fraction by 100 (``{result}`` in a page uses these)."""
    found = _FORMAT.match(spec)
    assert found is not None
    unit, spec = found.group("unit"), found.group("spec")
    if unit is not None:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"{unit} needs a number, got {value!r}")
        value = value / MIB if unit == "MiB" else value * 100
    if spec == "e":
        return relative_error(value)
    return format(value, spec)
