"""Tables of ``bench_unet.py`` (``unet.json``): the iUNet against its plain twin and against
itself under plain autograd, at three depths, in 2D and 3D."""

from __future__ import annotations

import re
from typing import Any

from .records import Record, RecordSpec, Table, TableSpec, number, ratio, threads


def _conditions(record: Record) -> str:
    env = record.get("environment")
    return (
        f"CPU, {threads(record.get('threads', within=env))}, torch "
        f"{record.get('torch', within=env)}, step time the median of "
        f"{record.get('rounds', within=env)} interleaved rounds of {record.get('clock', within=env)} "
        "time"
    )


UNET = RecordSpec("unet.json", "python benchmarks/bench_unet.py", _conditions)


def step_peak_mib(record: Record, profile: dict[str, Any]) -> float:
    """The step peak of a profile (``peak_step_mib`` in records written before the profiler
    named it ``step_peak_mib``)."""
    if "step_peak_mib" in profile:
        return float(profile["step_peak_mib"])
    return float(record.field(profile, "peak_step_mib"))


def _profiles_table(record: Record) -> Table:
    table = Table(["model", "params", "state MiB", "peak MiB", "activ. MiB", "step s"])
    for profile in record.rows("profiles"):
        label = str(record.field(profile, "label"))
        label = re.sub(r" d(\d+)$", r", depth \1", label)
        peak = number(step_peak_mib(record, profile), 1)
        table.add(
            f"**{label}**" if label.startswith("iunet ") and "nosave" not in label else label,
            f"{record.field(profile, 'parameters'):,}",
            number(record.field(profile, "state_mib"), 1),
            peak,
            number(record.field(profile, "activation_mib"), 1),
            f"{record.field(profile, 'step_seconds'):.3f}",
        )
    return table


def _ratios_table(record: Record) -> Table:
    """The record's ratios, 2D and 3D side by side (each ratio is recorded once per dim)."""
    by_dim: dict[str, dict[str, dict[str, Any]]] = {}
    for row in record.rows("ratios"):
        dim, _, what = str(record.field(row, "ratio")).partition(" ")
        by_dim.setdefault(what, {})[dim] = row
    table = Table(["ratio", "2D", "3D", "target", "met"])
    for what, dims in by_dim.items():
        cells = [
            ratio(record.field(dims[d], "value"), 3) if d in dims else "" for d in ("2D", "3D")
        ]
        targets = {dims[d].get("target") for d in dims}
        target = next(iter(targets)) if len(targets) == 1 else None
        met = [dims[d].get("met") for d in dims]
        table.add(
            what,
            *cells,
            f"<= {target:g}" if target is not None else "",
            ("yes" if all(met) else "no") if None not in met else "",
        )
    return table


TABLES = [
    TableSpec("unet:profiles", UNET, _profiles_table),
    TableSpec("unet:ratios", UNET, _ratios_table),
]
