"""Tables of ``bench_resampling.py`` (``resampling.json``): FrEIA 0.2's downsampling layers
beside ours (the same outputs? the caller's tensor left alone?) and a flow's memory."""

from __future__ import annotations

from .records import Record, RecordSpec, Table, TableSpec, number, relative_error, short


def _conditions(record: Record) -> str:
    sizes = record.get("flow_sizes")
    return (
        f"CPU, torch {record.get('environment', 'torch')}; flows of {record.get('steps', within=sizes)}"
        f" ActNorm + affine coupling steps, hidden {record.get('hidden', within=sizes)}, batch "
        f"{record.get('batch', within=sizes)} of side {record.get('size', within=sizes)}"
    )


RESAMPLING = RecordSpec("resampling.json", "python benchmarks/bench_resampling.py", _conditions)


def _yes(value: object) -> str:
    return "yes" if value else "**no**"


def _outputs_table(record: Record) -> Table:
    table = Table(
        [
            "FrEIA 0.2",
            "ours",
            "forward: max abs difference",
            "bit-identical",
            "inverse: max abs difference",
            "FrEIA's inverse leaves its input alone",
        ]
    )
    for row in record.rows("outputs"):
        if "result" in row:  # FrEIA could not run it: the error it raised
            table.add(record.field(row, "freia"), "", short(row["result"]), "", "", "")
            continue
        table.add(
            record.field(row, "freia"),
            f"`{record.field(row, 'ours')}`",
            relative_error(record.field(row, "forward_max_abs_diff")),
            _yes(record.field(row, "bit_identical")),
            relative_error(record.field(row, "inverse_max_abs_diff")),
            _yes(record.field(row, "freia_inverse_left_its_input_alone")),
        )
    return table


def _flows_table(record: Record) -> Table:
    table = Table(["flow", "peak MiB", "activ. MiB", "parameters"])
    for row in record.rows("flows"):
        if "result" in row:
            table.add(record.field(row, "flow"), short(row["result"]), "", "")
            continue
        table.add(
            record.field(row, "flow"),
            number(record.field(row, "peak_mib"), 2),
            number(record.field(row, "activation_mib"), 2),
            f"{record.field(row, 'parameters'):,}",
        )
    return table


TABLES = [
    TableSpec("resampling:outputs", RESAMPLING, _outputs_table),
    TableSpec("resampling:flows", RESAMPLING, _flows_table),
]
