"""Tables of ``bench_fsdp.py`` (``fsdp.json``): reversible transformers sharded with FSDP2 on
2 gloo ranks, every method measured per rank. The record is optional: until the benchmark
has been run and its record committed, the page says so."""

from __future__ import annotations

from typing import Any

from .records import Record, RecordSpec, Table, TableSpec, mib, ratio, short


def _conditions(record: Record) -> str:
    s = record.get("settings")
    return (
        f"{record.get('world_size')} {record.get('backend')} ranks, torch {record.get('torch')}, "
        f"width {record.get('width', within=s)}, {record.get('tokens', within=s)} tokens, batch "
        f"{record.get('batch', within=s)} per rank, step time the median of "
        f"{record.get('repeats', within=s)} rounds"
    )


FSDP = RecordSpec("fsdp.json", "python benchmarks/bench_fsdp.py", _conditions, optional=True)


def _memory_table(record: Record) -> Table:
    rows = record.rows("rows")
    depths = sorted({int(record.field(r, "depth")) for r in rows})
    lo, hi = depths[0], depths[-1]
    table = Table(
        [
            "method",
            *(f"forward-retained MiB, depth {d}" for d in depths),
            f"depth {hi} / depth {lo}",
            f"step peak MiB, depth {hi}",
            f"step s, depth {hi}",
            "all-gathers / reduce-scatters per step",
        ]
    )
    methods = list(dict.fromkeys(str(record.field(r, "method")) for r in rows))
    for method in methods:
        mine: dict[int, dict[str, Any]] = {
            int(r["depth"]): r for r in rows if r.get("method") == method
        }
        failed = next((r["error"] for r in mine.values() if "error" in r), None)
        if failed is not None:
            table.add(f"`{method}`", short(failed), *[""] * (len(depths) + 3))
            continue
        retained = [
            record.field(record.find(rows, method=method, depth=d), "forward_retained_bytes")
            for d in depths
        ]
        top = mine[hi]
        table.add(
            f"`{method}`",
            *(mib(value, 2) for value in retained),
            ratio(retained[-1] / max(retained[0], 1)),
            mib(record.field(top, "step_peak_bytes"), 2),
            f"{record.field(top, 'step_seconds'):.3f}",
            f"{record.field(top, 'all_gather_per_step')} / "
            f"{record.field(top, 'reduce_scatter_per_step')}",
        )
    return table


TABLES = [TableSpec("fsdp:memory", FSDP, _memory_table)]
