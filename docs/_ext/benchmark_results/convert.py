"""Tables of ``bench_convert.py`` (``convert.json``): ``make_reversible`` on torchvision,
timm and torch networks: gradients, where each method starts, the coefficient schedule,
memory against depth, and fine-tuning parity on the digits."""

from __future__ import annotations

from typing import Any

from .records import Record, RecordSpec, Table, TableSpec, number, relative_error, short, threads


def _conditions(record: Record) -> str:
    config, env = record.get("config"), record.get("environment")
    return (
        f"CPU, {threads(record.get('threads', within=env))}, torch "
        f"{record.get('torch', within=env)}, momentumnet {record.get('momentumnet', within=env)}, "
        f"{record.get('date', within=config)}; times are the process's CPU time"
    )


CONVERT = RecordSpec("convert.json", "python benchmarks/bench_convert.py", _conditions)

#: how each variant of the memory section reads
VARIANTS = {
    "original": "original",
    "original + checkpoint per block": "original, checkpoint per block",
    "make_reversible momentum": "`momentum`",
    "make_reversible two_stream": "`two_stream` (anchored)",
    "make_reversible two_stream alpha 0, no anchors": "`two_stream`, alpha 0, no anchors",
    "momentumnet transform_to_momentumnet": "momentumnet",
}
#: how each method of the gradient section reads
METHODS = {
    "momentum": "`momentum`",
    "two_stream": "`two_stream` (anchored)",
    "two_stream alpha 0, no anchors": "`two_stream`, alpha 0, no anchors",
}


def _in_order(values: list[Any]) -> list[Any]:
    """The distinct values, in the order they first appear."""
    return list(dict.fromkeys(values))


def _memory_table(record: Record) -> Table:
    rows = record.rows("memory")
    keys = _in_order([(record.field(r, "network"), record.field(r, "variant")) for r in rows])
    depths_of = {
        network: sorted({record.field(r, "depth") for r in rows if r.get("network") == network})
        for network, _ in keys
    }
    shared = len({tuple(d) for d in depths_of.values()}) == 1
    # one set of depths for every network goes into the heading; otherwise (a smoke run sizes
    # each network its own way) each network says its depths
    heading = (
        f"retained MiB, depth {' / '.join(str(d) for d in next(iter(depths_of.values())))}"
        if shared
        else "retained MiB, per depth"
    )
    table = Table(["network", "variant", heading, "step peak MiB", "step time / original"])
    for network, variant in keys:
        depths = depths_of[network]
        mine = [record.find(rows, network=network, variant=variant, depth=d) for d in depths]

        def cells(key: str, digits: int, mine: list[dict[str, Any]] = mine) -> str:
            return " / ".join(number(record.field(row, key), digits) for row in mine)

        label = network if shared else f"{network} (depth {' / '.join(map(str, depths))})"
        note = next((row["note"] for row in mine if "note" in row), None)
        if note is not None:  # a variant that could not be built or measured says why
            table.add(label, VARIANTS.get(variant, variant), short(note), "", "")
            continue
        table.add(
            label,
            VARIANTS.get(variant, variant),
            cells("retained_mib", 1),
            cells("peak_mib", 1),
            cells("time_ratio", 2),
        )
    return table


def _gradients_table(record: Record) -> Table:
    rows = [r for r in record.rows("gradients") if r.get("method") in METHODS]
    methods = _in_order([record.field(r, "method") for r in rows])
    table = Table(["network", *(METHODS[m] for m in methods)])
    for network in _in_order([record.field(r, "network") for r in rows]):
        errors = [
            relative_error(record.field(record.find(rows, network=network, method=m), "error"))
            for m in methods
        ]
        table.add(network, *errors)
    return table


def _distance_table(record: Record, method: str, coefficient: str) -> Table:
    rows = [r for r in record.rows("distance") if r.get("method") == method]
    if not rows:
        raise record.missing(f"rows of the method '{method}' in 'distance'")
    values = _in_order([record.field(r, coefficient) for r in rows])
    table = Table([f"`{method}`", *(f"`{coefficient}={v:g}`" for v in values)])
    for network in _in_order([record.field(r, "network") for r in rows]):
        cells = []
        for value in values:
            row = record.find(rows, network=network, **{coefficient: value})
            cell = (
                f"{record.field(row, 'distance'):.1e} "
                f"({relative_error(record.field(row, 'reconstruction_f32'))})"
            )
            if row.get("accuracy") is not None:
                cell += f", {100 * row['accuracy']:.1f}%"
            cells.append(cell)
        table.add(network, *cells)
    return table


def _schedule_table(record: Record) -> Table:
    table = Table(
        [
            "network",
            "alpha",
            "beta",
            "distance",
            "reconstruction f32",
            "gradient error f32",
            "retained MiB",
            "anchored: gradient error f32",
            "retained MiB",
        ]
    )
    for row in record.rows("schedule"):
        table.add(
            record.field(row, "network"),
            number(record.field(row, "alpha"), 2),
            number(record.field(row, "beta"), 3),
            f"{record.field(row, 'distance'):.1e}",
            relative_error(record.field(row, "reconstruction_f32")),
            relative_error(record.field(row, "gradient_error_f32")),
            number(record.field(row, "retained_mib"), 2),
            relative_error(record.field(row, "gradient_error_f32_anchored")),
            number(record.field(row, "retained_mib_anchored"), 2),
        )
    return table


def _parity_table(record: Record) -> Table:
    runs = record.rows("parity", "runs")
    seeds = _in_order([record.field(r, "seed") for r in runs])
    table = Table(
        [
            "variant",
            "at conversion: mean",
            *(f"seed {s}" for s in seeds),
            "mean",
            "std",
            "range",
            "within the spread",
        ]
    )
    for variant, summary in record.get("parity", "summary").items():

        def pct(value: float) -> str:
            return number(100 * value, 2)

        accuracies = [
            pct(record.field(record.find(runs, variant=variant, seed=s), "accuracy")) for s in seeds
        ]
        at_conversion = summary.get("at_conversion")
        at_conversion_mean = (
            pct(record.get("mean", within=at_conversion))
            if at_conversion
            else pct(record.get("mean", within=summary))
        )
        parity = summary.get("parity")
        verdict = ""
        if parity:
            met = "yes" if record.get("met", within=parity) else "no"
            verdict = (
                f"{met}: gap {pct(record.get('gap', within=parity))} <= "
                f"{pct(record.get('allowed', within=parity))}"
            )
        table.add(
            variant,
            at_conversion_mean,
            *accuracies,
            pct(record.get("mean", within=summary)),
            pct(record.get("std", within=summary)),
            pct(record.get("range", within=summary)),
            verdict,
        )
    return table


TABLES = [
    TableSpec("convert:memory", CONVERT, _memory_table),
    TableSpec("convert:gradients", CONVERT, _gradients_table),
    TableSpec(
        "convert:distance-momentum",
        CONVERT,
        lambda record: _distance_table(record, "momentum", "gamma"),
    ),
    TableSpec(
        "convert:distance-two-stream",
        CONVERT,
        lambda record: _distance_table(record, "two_stream", "beta"),
    ),
    TableSpec("convert:schedule", CONVERT, _schedule_table),
    TableSpec("convert:parity", CONVERT, _parity_table),
]
