"""Fill the README's GPU tables from a GPU suite record (``gpu-<date>.json``).

    python benchmarks/gpu/fill_readme.py benchmarks/results/gpu-2027-01-15.json
    python benchmarks/gpu/fill_readme.py --placeholders     # back to "to be measured"

The README marks each table with a pair of HTML comments, ``<!-- gpu-table:NAME -->`` and
``<!-- /gpu-table:NAME -->`` (NAME: one of ``report.README_TABLES``); everything between
them is replaced by the table that ``report.py`` lays out from the record, the same one the
suite's own ``gpu-<date>.md`` shows. The rest of the README is left byte for byte, and the
file is replaced atomically, only once every table has been rendered. A dry run's record
(toy sizes on the CPU) is refused unless ``--allow-dry-run``: its numbers are not results.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from record import SCHEMA, read_json, write_text
from report import README_TABLES

ROOT = Path(__file__).resolve().parents[2]


class FillError(ValueError):
    """The README or the record cannot be used; the message says why and what to do."""


def marker_pattern(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- gpu-table:{re.escape(name)} -->\n)(.*?)(<!-- /gpu-table:{re.escape(name)} -->)",
        re.DOTALL,
    )


def fill(text: str, record: dict[str, Any] | None) -> str:
    """``text`` with every GPU table replaced from ``record`` (``None``: placeholders)."""
    for name, render in README_TABLES.items():
        pattern = marker_pattern(name)
        found = len(pattern.findall(text))
        if found != 1:
            raise FillError(
                f"the README needs exactly one '<!-- gpu-table:{name} -->' ... "
                f"'<!-- /gpu-table:{name} -->' pair, found {found}; put the pair back where "
                "that table belongs"
            )
        table = render(record)
        text = pattern.sub(lambda m: f"{m.group(1)}{table}\n{m.group(3)}", text)
    return text


def load_record(path: Path, allow_dry_run: bool) -> dict[str, Any]:
    record = read_json(path)
    if not isinstance(record, dict) or "stages" not in record:
        raise FillError(f"{path} is not a GPU suite record (benchmarks/gpu/run.sh writes one)")
    if record.get("schema") != SCHEMA:
        raise FillError(
            f"{path} has schema {record.get('schema')!r}, this script reads schema {SCHEMA}; "
            "rerun the suite of this checkout"
        )
    if record.get("dry_run") and not allow_dry_run:
        raise FillError(
            f"{path} is a dry run (toy sizes on the CPU), not a measurement; pass "
            "--allow-dry-run to fill the tables with it anyway"
        )
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("record", nargs="?", type=Path, help="gpu-<date>.json of a GPU run")
    source.add_argument(
        "--placeholders", action="store_true", help='put "to be measured" tables back'
    )
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--allow-dry-run", action="store_true")
    args = parser.parse_args(argv)
    try:
        record = None if args.placeholders else load_record(args.record, args.allow_dry_run)
        text = args.readme.read_text(encoding="utf-8")
        filled = fill(text, record)
    except (FillError, OSError) as exc:
        print(f"fill_readme: {exc}", file=sys.stderr)
        return 2
    if filled != text:
        write_text(args.readme, filled)
    what = "placeholders" if record is None else f"the run of {record.get('date')}"
    print(f"fill_readme: {len(README_TABLES)} GPU tables in {args.readme} now hold {what}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
