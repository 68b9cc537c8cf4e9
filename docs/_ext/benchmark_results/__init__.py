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
``headline`` makes the READMEs' headline tables from the same records; ``directives`` is the
Sphinx extension (``docs/conf.py`` loads ``benchmark_results.directives``). Everything but
``directives`` is standard library only, so the tests use it without Sphinx.
"""

from __future__ import annotations

import re
from typing import Any

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
from .records import Record, RecordSpec, TableSpec

__all__ = ["RECORDS", "TABLES", "lookup"]

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
