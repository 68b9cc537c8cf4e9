"""Tables of ``bench_segmentation.py`` (``segmentation-DATASET.json``): the iUNet and its
plain twin trained through the harness with several seeds; parity of test Dice."""

from __future__ import annotations

import statistics

from .records import Record, RecordSpec, Table, TableSpec, threads


def _conditions(record: Record) -> str:
    env = record.get("environment")
    return (
        f"CPU, {threads(record.get('threads', within=env))}, torch {record.get('torch', within=env)}"
        f", {record.get('iterations')} iterations per run"
    )


def segmentation_record(dataset: str, optional: bool) -> RecordSpec:
    return RecordSpec(
        f"segmentation-{dataset}.json",
        f"python benchmarks/bench_segmentation.py --dataset {dataset}",
        _conditions,
        optional=optional,
    )


#: the plain twin every model is compared with
PLAIN = "unet"
#: how each model reads
MODELS = {"unet": "`unet` (plain twin)", "iunet": "`iunet` (memory saving)"}


def _dice_table(record: Record) -> Table:
    runs = record.rows("runs")
    table = Table(
        [
            "model",
            "parameters",
            "test Dice per seed",
            "mean",
            "range",
            "accuracy per class (mean over seeds)",
            "mean - twin's: within the spread",
        ]
    )
    summaries = record.get("dice")
    twin = record.get(PLAIN, within=summaries)
    for model, dice in summaries.items():
        mine = [r for r in runs if r.get("model") == model]
        if not mine:
            raise record.missing(f"runs of the model '{model}'")
        per_class = [record.field(r, "test_accuracy_per_class") for r in mine]
        means = [statistics.fmean(values) for values in zip(*per_class)]
        table.add(
            MODELS.get(model, model),
            f"{record.field(mine[0], 'parameters'):,}",
            ", ".join(f"{record.field(r, 'test_dice'):.4f}" for r in mine),
            f"{record.get('mean', within=dice):.4f}",
            f"{record.get('range', within=dice):.4f}",
            ", ".join(f"{m:.3f}" for m in means),
            "" if model == PLAIN else _parity(record, dice, twin),
        )
    return table


def _parity(record: Record, dice: dict[str, float], twin: dict[str, float]) -> str:
    gap = record.get("mean", within=dice) - record.get("mean", within=twin)
    allowed = max(record.get("range", within=dice), record.get("range", within=twin))
    verdict = "yes" if abs(gap) <= allowed else "**no**"
    return f"{verdict}: {gap:+.4f}, spread {allowed:.4f}"


TABLES = [
    TableSpec("segmentation:shapes2d", segmentation_record("shapes2d", False), _dice_table),
    TableSpec("segmentation:shapes3d", segmentation_record("shapes3d", True), _dice_table),
]
