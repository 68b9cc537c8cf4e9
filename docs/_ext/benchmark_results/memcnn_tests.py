"""Tables of ``memcnn_tests.py`` (``memcnn_tests.json``): MemCNN 1.5.2's own model tests run
against ``invertible_core`` through a thin alias."""

from __future__ import annotations

from .records import Record, RecordSpec, Table, TableSpec

MEMCNN_TESTS = RecordSpec(
    "memcnn_tests.json",
    "python benchmarks/memcnn_tests.py --json benchmarks/results/memcnn_tests.json",
    lambda record: "MemCNN 1.5.2's tests, CPU",
)


def _counts_table(record: Record) -> Table:
    counts = record.get("counts")
    table = Table(["passed", "failed", "skipped", "the failing tests"])
    failed = record.get("failed")
    table.add(
        record.get("passed", within=counts),
        record.get("failed", within=counts),
        record.get("skipped", within=counts),
        ", ".join(f"`{name}`" for name in failed) if failed else "none",
    )
    return table


TABLES = [TableSpec("memcnn-tests:counts", MEMCNN_TESTS, _counts_table)]
