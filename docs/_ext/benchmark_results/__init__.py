"""Benchmark tables made at build time from the records under ``benchmarks/results/``.

Every table of measured figures on the site is made from its benchmark's JSON record when
the site is built, never copied by hand: rerun a benchmark, commit its record, and the next
build shows the new figures. In a page (MyST)::

    ```{results-table} core:conv
    ```

puts the table ``core:conv`` there (the names: :data:`TABLES`), with a line saying which
record it comes from, under what conditions it was measured and which command writes it;
and ``{result}`core.json results/conv/16/sequence/time_vs_plain .2f``` puts one value of a
record into a sentence (a path of keys and list indices, ``[key=value]`` picking the row of
a list whose ``key`` is ``value``; a format: Python's, after an optional unit ``MiB`` or
``pct``). A record that lacks a field a table or a sentence needs is a warning that names
the file, the field and the command that writes it again, so the strict build fails with
that sentence. An optional record that is absent (a benchmark not run yet) is said so on the
page instead.

Each benchmark's tables are defined in one module of this package (``core``, ``budget``, ...);
``headline`` makes the READMEs' headline tables from the same records.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective, SphinxRole

from . import (
    accuracy,
    budget,
    convert,
    core,
    fsdp,
    gpu,
    memcnn_tests,
    models,
    resampling,
    segmentation,
    unet,
)
from .gpu import GpuTableSpec
from .records import Record, RecordError, RecordSpec, TableSpec, format_value

__all__ = ["RECORDS", "TABLES", "lookup", "setup"]

logger = logging.getLogger(__name__)

#: every table the pages may show, by name
TABLES: dict[str, TableSpec | GpuTableSpec] = {
    spec.name: spec
    for module in (
        core,
        budget,
        models,
        convert,
        unet,
        resampling,
        segmentation,
        memcnn_tests,
        accuracy,
        fsdp,
        gpu,
    )
    for spec in module.TABLES
}
#: every record a sentence may quote (``{result}``), by file name
RECORDS: dict[str, RecordSpec] = {
    spec.record.file: spec.record for spec in TABLES.values() if isinstance(spec, TableSpec)
}


class ResultsTable(SphinxDirective):
    """``{results-table} NAME``: the table ``NAME`` made from its record."""

    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        name = self.arguments[0]
        spec = TABLES.get(name)
        if spec is None:
            logger.warning(
                "unknown results table %r; the tables are: %s",
                name,
                ", ".join(sorted(TABLES)),
                location=self.get_location(),
            )
            return []
        self.env.note_dependency(str(spec.record.path))
        try:
            markdown = spec.render()
        except RecordError as error:
            logger.warning("%s", error, location=self.get_location())
            return [nodes.paragraph(text=f"This table could not be made: {error}")]
        if markdown is None:
            markdown = (
                f"No record yet: `{spec.record.command}` writes "
                f"`benchmarks/results/{spec.record.file}`; once it is committed, its table "
                "appears here."
            )
        container = nodes.container(classes=["results-table"])
        self.state.nested_parse(StringList(markdown.splitlines()), self.content_offset, container)
        return [container]


_STEP = re.compile(r"\[[^\]]*\]|[^/]+")


def lookup(record: Record, path: str) -> Any:
    """The value at ``path`` (``a/b/0/[key=value]/c``; a ``[key=value]`` may hold ``/``) of
    ``record``."""
    value: Any = record.data
    for step in _STEP.findall(path):
        if step.startswith("[") and step.endswith("]") and "=" in step:
            key, _, wanted = step[1:-1].partition("=")
            rows = value if isinstance(value, list) else []
            found = [row for row in rows if isinstance(row, dict) and str(row.get(key)) == wanted]
            if not found:
                raise record.missing(f"a row with {key}={wanted!r} at '{path}'")
            value = found[0]
        elif isinstance(value, list) and step.lstrip("-").isdigit():
            value = record.get(int(step), within=value)
        else:
            value = record.get(step, within=value)
    return value


class ResultValue(SphinxRole):
    """``{result}`FILE PATH [FORMAT]```: one value of a record, formatted, in a sentence."""

    def run(self) -> tuple[list[nodes.Node], list[nodes.system_message]]:
        try:
            words = shlex.split(self.text)
        except ValueError as exc:
            words, problem = [], str(exc)
        else:
            problem = ""
        if not 2 <= len(words) <= 3:
            logger.warning(
                "{result} takes 'FILE PATH [FORMAT]', got %r %s",
                self.text,
                problem,
                location=self.get_location(),
            )
            return [nodes.literal(text=self.text)], []
        file, path, spec = words[0], words[1], words[2] if len(words) == 3 else ""
        record_spec = RECORDS.get(file)
        if record_spec is None:
            logger.warning(
                "{result}: no table is made from %r; the records are: %s",
                file,
                ", ".join(sorted(RECORDS)),
                location=self.get_location(),
            )
            return [nodes.literal(text=self.text)], []
        self.env.note_dependency(str(record_spec.path))
        try:
            record = record_spec.load(f"a sentence of docs/{self.env.docname}.md")
            if record is None:
                text = "(not measured yet)"
            else:
                text = format_value(lookup(record, path), spec)
        except (RecordError, TypeError, ValueError) as error:
            logger.warning("%s", error, location=self.get_location())
            return [nodes.literal(text=self.text)], []
        return [nodes.inline(text=text, classes=["result"])], []


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("results-table", ResultsTable)
    app.add_role("result", ResultValue())
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
