"""The READMEs' headline tables: a few figures per README, from the same records as the
site's tables, each row linking to the page that holds the whole table.

A README keeps its headline table between ``<!-- headline-table -->`` and
``<!-- /headline-table -->``. ``python docs/_ext/readme_headlines.py`` rewrites those blocks
from the records (``--check`` only compares), and ``tests/repo/test_results_pages.py`` fails
when a README's block differs from what the records give: a figure typed into a README by
hand, or a record rerun without its README rewritten.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .accuracy import ACCURACY
from .budget import BUDGET
from .convert import CONVERT
from .core import CORE
from .models import MODELS
from .records import REPO_ROOT, Record, RecordSpec, Table, number, ratio
from .segmentation import segmentation_record
from .unet import UNET, step_peak_mib

__all__ = ["HEADLINES", "MARKERS", "Headline", "headline_block", "replace_block"]

MARKERS = ("<!-- headline-table -->", "<!-- /headline-table -->")


@dataclass(frozen=True)
class Row:
    """One headline: what was measured, the figure, the results page (``results/core``)."""

    record: RecordSpec
    what: str
    figure: Callable[[Record], str]
    page: str

    def cells(self, readme: Path, results_dir: Path | None) -> list[str]:
        record = self.record.load(f"the headline '{self.what}'", results_dir)
        if record is None:  # an optional record not committed yet: say so, with its command
            figure = f"not measured yet: `{self.record.command}` writes its record"
        else:
            figure = self.figure(record)
        link = Path("docs", f"{self.page}.md")
        relative = Path(*[".."] * len(readme.parent.relative_to(REPO_ROOT).parts), link)
        return [self.what, figure, f"[{self.page}]({relative.as_posix()})"]


def _profile(record: Record, label: str) -> dict[str, float]:
    return record.find(record.rows("profiles"), label=label)


def _ratio(record: Record, name: str) -> float:
    return float(record.field(record.find(record.rows("ratios"), ratio=name), "value"))


def _revnet164(record: Record) -> str:
    rev, res = _profile(record, "revnet164"), _profile(record, "resnet164")
    saving = _ratio(record, "revnet164 step: saving / nosave")
    return (
        f"step peak {number(record.field(rev, 'step_peak_mib'), 1)} MiB against "
        f"{number(record.field(res, 'step_peak_mib'), 1)} MiB "
        f"({ratio(_ratio(record, 'revnet164 peak / resnet164 peak'))}x), for {ratio(saving)}x "
        "the step time of RevNet-164 without saving"
    )


def _revvit_depth(record: Record) -> str:
    return (
        f"RevViT-tiny's step peak from depth 6 to 24: "
        f"{ratio(_ratio(record, 'revvit_tiny peak: d24 / d6'))}x (ViT-tiny: "
        f"{ratio(_ratio(record, 'vit_tiny peak: d24 / d6'))}x)"
    )


def _conv_chain(record: Record) -> str:
    results = record.get("results", "conv", "16")
    sequence, plain = record.get("sequence", within=results), record.get("plain", within=results)
    fixed = record.get("sequence_fixed16", within=results)
    return (
        f"peak {number(record.field(sequence, 'peak_mib'), 1)} MiB against plain autograd's "
        f"{number(record.field(plain, 'peak_mib'), 1)}, step "
        f"{ratio(record.field(sequence, 'time_vs_plain'))}x plain's "
        f"({ratio(record.field(sequence, 'time_vs_fastest_peer'))}x the fastest correct peer's); "
        f"gradient error {record.field(fixed, 'grad_error'):g} with `fixed_point_bits=16`"
    )


def _flatness(record: Record) -> str:
    chain = record.get("flatness", "conditioned")
    lo, hi = record.get("depths", within=chain)
    return (
        f"peak beyond the model state from {lo} to {hi} blocks: "
        f"{ratio(record.get('peak_kept_grads_hi_over_lo', 'sequence', within=chain))}x "
        f"(plain autograd: {ratio(record.get('peak_kept_grads_hi_over_lo', 'plain', within=chain), 1)}x)"
    )


def _budget(record: Record) -> str:
    targets = record.get("results", "conv", "targets")
    return (
        f"{ratio(record.get('checkpoint_per_block_over_plan_time', within=targets))}x faster "
        "than `torch.utils.checkpoint` per block, in the same memory"
    )


def _convert(record: Record) -> str:
    rows = record.rows("memory")
    depths = sorted({int(record.field(r, "depth")) for r in rows if r.get("network") == "resnet50"})
    deepest = depths[-1]

    def retained(variant: str) -> float:
        row = record.find(rows, network="resnet50", variant=variant, depth=deepest)
        return float(record.field(row, "retained_mib"))

    return (
        f"activations kept for backward at {deepest} blocks in `layer3`: "
        f"{number(retained('make_reversible momentum'), 1)} MiB against "
        f"{number(retained('original'), 1)} MiB"
    )


def _unet(record: Record) -> str:
    iunet = _profile(record, "iunet 2d d30")
    twin = _profile(record, "unet 2d d30")
    return (
        f"step peak {number(step_peak_mib(record, iunet), 1)} MiB against "
        f"{number(step_peak_mib(record, twin), 1)} MiB"
    )


def _accuracy(record: Record) -> str:
    pair = record.find(record.rows("pairs"), plain="resnet32", reversible="revnet38")
    rev, plain = record.field(pair, "revnet38"), record.field(pair, "resnet32")
    within = "within" if record.field(pair, "within_spread") else "outside"
    return (
        f"test accuracy {100 * record.get('mean', within=rev):.2f}% against "
        f"{100 * record.get('mean', within=plain):.2f}%, {within} the seeds' spread"
    )


def _segmentation(record: Record) -> str:
    dice = record.get("dice")
    return (
        f"test Dice {record.get('iunet', 'mean', within=dice):.4f} against "
        f"{record.get('unet', 'mean', within=dice):.4f}"
    )


ROWS = {
    "revnet164": Row(
        MODELS,
        "RevNet-164 against ResNet-164, one training step (CPU, batch 32)",
        _revnet164,
        "results/models",
    ),
    "revvit": Row(
        MODELS, "RevViT-tiny against ViT-tiny, depth 6 to 24", _revvit_depth, "results/models"
    ),
    "conv-chain": Row(
        CORE, "16 conv couplings in one `ReversibleSequence`", _conv_chain, "results/core"
    ),
    "flatness": Row(
        CORE, "a conditioned reversible transformer, 4 to 32 blocks", _flatness, "results/core"
    ),
    "budget": Row(
        BUDGET,
        "a step planned by `fit_memory_budget` (16 conv couplings)",
        _budget,
        "results/budget",
    ),
    "convert": Row(
        CONVERT, "torchvision's ResNet-50 through `make_reversible`", _convert, "results/convert"
    ),
    "unet": Row(UNET, "a 2D iUNet against its plain twin, depth 30", _unet, "results/unet"),
    "accuracy": Row(
        ACCURACY,
        "RevNet-38 against ResNet-32 on the digits, 3 seeds",
        _accuracy,
        "results/accuracy",
    ),
    "segmentation": Row(
        segmentation_record("shapes2d", False),
        "the iUNet against its twin on `shapes2d`, 3 seeds",
        _segmentation,
        "results/unet",
    ),
}


@dataclass(frozen=True)
class Headline:
    """A README's headline table: which rows."""

    readme: str
    rows: tuple[str, ...]

    @property
    def path(self) -> Path:
        return REPO_ROOT / self.readme

    def table(self, results_dir: Path | None = None) -> Table:
        table = Table(["measured", "result", "the whole table"])
        for key in self.rows:
            table.add(*ROWS[key].cells(self.path, results_dir))
        return table


HEADLINES = [
    Headline("README.md", ("revnet164", "conv-chain", "budget", "convert", "unet", "accuracy")),
    Headline("packages/invertible-core/README.md", ("conv-chain", "flatness", "budget")),
    Headline("packages/invertible-models/README.md", ("revnet164", "revvit", "convert", "unet")),
    Headline("packages/invertible-train/README.md", ("accuracy", "segmentation")),
]


def headline_block(headline: Headline, results_dir: Path | None = None) -> str:
    """The block between the markers, markers included."""
    start, end = MARKERS
    return f"{start}\n{headline.table(results_dir).markdown()}\n{end}"


def replace_block(text: str, block: str, readme: str) -> str:
    """``text`` with its one marked block replaced by ``block``."""
    start, end = MARKERS
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    found = len(pattern.findall(text))
    if found != 1:
        raise ValueError(
            f"{readme} needs exactly one '{start}' ... '{end}' pair around its headline table, "
            f"found {found}"
        )
    return pattern.sub(lambda _: block, text)
