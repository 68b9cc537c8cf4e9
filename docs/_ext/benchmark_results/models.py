"""Tables of ``bench_models.py`` (``models.json``): one training step of the zoo's networks,
plain against reversible: the CNNs of the RevNet paper, ViT against RevViT at three depths,
i-RevNet and Glow (beside FrEIA); the i-RevNet's reconstruction."""

from __future__ import annotations

from typing import Any

from .records import Record, RecordSpec, Table, TableSpec, number, ratio, threads


def _conditions(record: Record) -> str:
    c = record.get("conditions")
    return (
        f"{record.get('device', within=c)}, {threads(record.get('threads', within=c))}, torch "
        f"{record.get('torch', within=c)}, batch {record.get('batch_size', within=c)} (transformers "
        f"{record.get('transformer_batch_size', within=c)}; Glow "
        f"{record.get('glow_batch_size', within=c)} digits), step time the median of "
        f"{record.get('steps', within=c)} steps, {record.get('clock', within=c)} clock"
    )


MODELS = RecordSpec("models.json", "python benchmarks/bench_models.py", _conditions)

#: which table a row belongs to, by the first word of its label
FAMILIES = {
    "cnn": ("resnet", "revnet"),
    "transformers": ("vit", "revvit"),
    "flows": ("irevnet", "glow", "freia"),
}


def _family(label: str) -> str | None:
    first = label.split()[0]
    for family, names in FAMILIES.items():
        if any(first.startswith(name) for name in names):
            return family
    return None


def _label(label: str) -> str:
    """A recorded row label as the tables read it."""
    label = label.replace("+checkpoint", "+ checkpoint").replace("+ckpt", "+ checkpoint")
    return label.replace(" nosave", ", saving off").replace("freia", "FrEIA")


def _ratio_label(ratio: str) -> str:
    """A recorded ratio's description as the tables read it."""
    ratio = ratio.replace("saving / nosave", "saving on / off").replace(" nosave", " saving off")
    return ratio.replace("+ckpt", " + checkpoint").replace("freia", "FrEIA")


def _profiles_table(record: Record, family: str) -> Table:
    table = Table(
        ["model", "params", "param MiB", "state MiB", "step peak MiB", "activ. MiB", "step s"]
    )
    for profile in record.rows("profiles"):
        label = str(record.field(profile, "label"))
        if _family(label) != family:
            continue
        table.add(
            _label(label),
            f"{record.field(profile, 'parameters'):,}",
            number(record.field(profile, "parameter_mib"), 2),
            number(record.field(profile, "state_mib"), 2),
            number(record.field(profile, "step_peak_mib"), 1),
            number(record.field(profile, "activation_mib"), 1),
            f"{record.field(profile, 'step_seconds'):.3f}",
        )
    return table


def _ratios_table(record: Record, family: str) -> Table:
    table = Table(["ratio", "value", "target", "met"])
    for row in record.rows("ratios"):
        what = str(record.field(row, "ratio"))
        if _family(what) != family:
            continue
        target: Any = record.field(row, "target")
        met = record.field(row, "met")
        table.add(
            _ratio_label(what),
            ratio(record.field(row, "value"), 3),
            "" if target is None else f"<= {target:.2f}",
            "" if met is None else ("yes" if met else "no"),
        )
    return table


def _reconstruction_table(record: Record) -> Table:
    table = Table(
        ["fixed point", "stem padding", "mode", "max abs error", "to the grid", "relative L2"]
    )
    for row in record.rows("irevnet_reconstruction"):
        bits = record.field(row, "fixed_point_bits")
        grid = record.field(row, "max_abs_error_to_grid")
        table.add(
            "off" if bits is None else f"{bits} bits",
            record.field(row, "stem_padding"),
            record.field(row, "mode"),
            f"{record.field(row, 'max_abs_error'):.3g}",
            "" if bits is None else (f"**{grid:.3g}**" if grid == 0 else f"{grid:.3g}"),
            f"{record.field(row, 'relative_l2_error'):.2g}",
        )
    return table


TABLES = [
    *(
        TableSpec(f"models:{family}", MODELS, lambda r, f=family: _profiles_table(r, f))
        for family in FAMILIES
    ),
    *(
        TableSpec(f"models:{family}-ratios", MODELS, lambda r, f=family: _ratios_table(r, f))
        for family in FAMILIES
    ),
    TableSpec("models:reconstruction", MODELS, _reconstruction_table),
]
