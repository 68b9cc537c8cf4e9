"""Tables of ``bench_budget.py`` (``budget.json``): planned steps from the minimum to plain
autograd's peak, against ``torch.utils.checkpoint`` every k blocks."""

from __future__ import annotations

from .records import Record, RecordSpec, Table, TableSpec, mib, ratio, threads


def _conditions(record: Record) -> str:
    env = record.get("environment")
    return (
        f"{record.get('device', within=env)}, {threads(record.get('threads', within=env))}, "
        f"torch {record.get('torch', within=env)}"
    )


BUDGET = RecordSpec("budget.json", "python benchmarks/bench_budget.py", _conditions)

#: a ratio at a budget outside the frontier (below the minimum peak or above plain autograd's)
OUTSIDE = "outside the frontier"

#: how each network of the record reads (N: the blocks of its chain)
NETWORKS = {"conv": "conv chain, N={n}", "transformer": "transformer chain, N={n}"}


def _frontier_table(record: Record) -> Table:
    table = Table(
        [
            "network",
            "minimum peak (MiB)",
            "plain peak (MiB)",
            "checkpoint per block: peak (MiB)",
            "its step / the plan's at that peak",
            "plan at half plain: step x plain",
            "full recompute: step x plain",
            "plan at the minimum / full recompute",
            "max peak / budget",
        ]
    )
    for name in record.get("results"):
        blocks = len(record.rows("results", name, "checkpoint"))
        targets = record.get("results", name, "targets")

        def target(key: str, targets: dict[str, float | None] = targets) -> float | None:
            value = record.get(key, within=targets)
            return None if value is None else float(value)

        def shown(key: str, digits: int = 2) -> str:
            """A target's ratio, or why there is none: the bench writes null when that budget
            lies outside the frontier (below the minimum or above plain autograd's peak)."""
            value = target(key)
            return OUTSIDE if value is None else ratio(value, digits)

        faster = target("checkpoint_per_block_over_plan_time")
        table.add(
            NETWORKS.get(name, name).format(n=blocks),
            mib(record.get("results", name, "minimum_peak_bytes")),
            mib(record.get("results", name, "plain_peak_bytes")),
            mib(record.get("results", name, "checkpoint_per_block_peak_bytes")),
            f"**{ratio(faster)}**"
            if faster is not None and faster >= 1.15
            else shown("checkpoint_per_block_over_plan_time"),
            shown("half_plain_plan_time_vs_plain"),
            shown("full_recompute_time_vs_plain"),
            shown("minimum_plan_time_vs_full_recompute"),
            shown("max_peak_vs_budget", 3),
        )
    return table


TABLES = [TableSpec("budget:frontier", BUDGET, _frontier_table)]
