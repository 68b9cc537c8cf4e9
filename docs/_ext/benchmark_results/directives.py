"""The Sphinx side of ``benchmark_results``: the ``results-table`` directive and the
``{result}`` role (what they do: the package's docstring)."""

from __future__ import annotations

import shlex
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective, SphinxRole

from . import RECORDS, TABLES, lookup
from .records import RecordError, format_value

__all__ = ["setup"]

logger = logging.getLogger(__name__)


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
