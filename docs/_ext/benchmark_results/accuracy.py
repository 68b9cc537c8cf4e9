"""Tables of ``bench_accuracy.py`` (``accuracy.json``): does a reversible twin lose accuracy
against its plain one? Several seeds each, trained through the harness on the digits."""

from __future__ import annotations

from .records import Record, RecordSpec, Table, TableSpec, number, threads


def _conditions(record: Record) -> str:
    iterations = record.get("iterations")
    return (
        f"CPU, {threads(record.get('threads'))}, {record.get('dataset')}: "
        f"{record.get('train_size')} training and {record.get('test_size')} test images; "
        f"{record.get('cnn', within=iterations)} iterations for the CNNs, "
        f"{record.get('vit', within=iterations)} for the transformers"
    )


#: optional: the record was never committed (the README's former figures were typed in by
#: hand); until a run's record is, the page and the headlines say that it is not measured yet
ACCURACY = RecordSpec(
    "accuracy.json",
    "OMP_NUM_THREADS=1 python benchmarks/bench_accuracy.py",
    _conditions,
    optional=True,
)


def _parity_table(record: Record) -> Table:
    runs = record.rows("runs")
    seeds = record.get("seeds")
    table = Table(["model", "parameters", *(f"seed {s}" for s in seeds), "mean", "std", "range"])
    for pair in record.rows("pairs"):
        for role in ("plain", "reversible"):
            model = record.field(pair, role)
            stats = record.field(pair, model)
            mine = [record.find(runs, model=model, seed=s) for s in seeds]

            def pct(value: float) -> str:
                return number(100 * value, 2)

            table.add(
                model,
                f"{record.field(mine[0], 'parameters'):,}",
                *(pct(record.field(r, "test_accuracy")) for r in mine),
                pct(record.get("mean", within=stats)),
                pct(record.get("std", within=stats)),
                pct(record.get("range", within=stats)),
            )
    return table


def _verdict_table(record: Record) -> Table:
    table = Table(["reversible - plain", "difference (points)", "seeds' spread", "parity"])
    for pair in record.rows("pairs"):
        table.add(
            f"{record.field(pair, 'reversible')} - {record.field(pair, 'plain')}",
            f"{100 * record.field(pair, 'difference'):+.2f}",
            number(100 * record.field(pair, "allowed"), 2),
            "within the spread" if record.field(pair, "within_spread") else "**outside**",
        )
    return table


TABLES = [
    TableSpec("accuracy:digits", ACCURACY, _parity_table),
    TableSpec("accuracy:parity", ACCURACY, _verdict_table),
]
