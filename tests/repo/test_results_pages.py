"""The benchmark tables of the site and the READMEs are made from the committed records.

Every table of measured figures on the documentation site is made, when the site is built,
from its benchmark's JSON record under ``benchmarks/results/`` (``docs/_ext/benchmark_results``);
the READMEs' headline tables are made from the same records and checked here. So:

- every table renders from the committed records, and is shown on exactly one page;
- every ``{result}`` a page quotes is in its record;
- a record that lacks a field a table needs fails with a sentence naming the file, the field,
  the table and the command that writes the record again; a missing record too, unless it
  is optional (a benchmark not run yet: its page says so);
- a table shows the record's figures (change the record, the table changes);
- each README's headline table is exactly what the records give.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = REPO_ROOT / "docs"
RESULTS = REPO_ROOT / "benchmarks" / "results"

sys.path.insert(0, str(DOCS / "_ext"))
from benchmark_results import RECORDS, TABLES, lookup  # noqa: E402
from benchmark_results.headline import (  # noqa: E402
    HEADLINES,
    MARKERS,
    headline_block,
    replace_block,
)
from benchmark_results.records import RecordError, TableSpec, format_value  # noqa: E402

PAGES = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.relative_to(DOCS).parts)
DIRECTIVE = re.compile(r"^```\{results-table\}\s+(\S+)\s*$", re.MULTILINE)
ROLE = re.compile(r"\{result\}`([^`]+)`")


#: what a page shows as an example, not as content: a block fenced by four or more backticks
#: (a fenced block shown inside it) and double-backtick inline code
EXAMPLE_BLOCK = re.compile(r"^(`{4,})[^\n]*\n.*?^\1\s*$", re.MULTILINE | re.DOTALL)
EXAMPLE_INLINE = re.compile(r"(?<!`)``(?!`)[^\n]+?(?<!`)``(?!`)")


def page_text(page: Path) -> str:
    """A page's Markdown without the examples it shows of the directive and the role."""
    return EXAMPLE_INLINE.sub("", EXAMPLE_BLOCK.sub("", page.read_text(encoding="utf-8")))


def shown_tables() -> Counter[str]:
    return Counter(name for page in PAGES for name in DIRECTIVE.findall(page_text(page)))


def quoted_results() -> list[tuple[str, str]]:
    return [
        (page.relative_to(DOCS).as_posix(), text)
        for page in PAGES
        for text in ROLE.findall(page_text(page).replace("\n", " "))
    ]


@pytest.mark.parametrize("name", sorted(TABLES))
def test_every_table_is_made_from_the_committed_records(name: str) -> None:
    spec = TABLES[name]
    rendered = spec.render()
    if rendered is None:  # an optional record not committed yet: its page says so
        assert isinstance(spec, TableSpec) and spec.record.optional
        assert not spec.record.path.exists()
        return
    assert rendered.startswith("| ") and "\n|---" in rendered
    assert "written by `" in rendered or "No GPU run is recorded yet" in rendered


def test_every_table_is_shown_on_exactly_one_page() -> None:
    shown = shown_tables()
    assert set(shown) <= set(TABLES), (
        f"pages show tables nobody defines: {set(shown) - set(TABLES)}"
    )
    assert set(TABLES) <= set(shown), f"tables no page shows: {sorted(set(TABLES) - set(shown))}"
    twice = {name: count for name, count in shown.items() if count > 1}
    assert not twice, f"a table shown on several pages (a figure appears twice): {twice}"


def test_the_pages_quote_results() -> None:
    assert len(quoted_results()) >= 20


@pytest.mark.parametrize(("page", "text"), quoted_results())
def test_every_result_a_page_quotes_is_in_its_record(page: str, text: str) -> None:
    file, path, *spec = shlex.split(text)
    assert file in RECORDS, f"{page}: {{result}}`{text}` names no record the site knows"
    record = RECORDS[file].load(f"a sentence of {page}")
    if record is None:  # an optional record not committed yet: the sentence says so
        assert RECORDS[file].optional and not RECORDS[file].path.exists()
        return
    value = lookup(record, path)
    assert format_value(value, spec[0] if spec else "")


@pytest.fixture
def results_copy(tmp_path: Path) -> Path:
    """The committed records, copied, for a test to break."""
    for record in RESULTS.glob("*.json"):
        shutil.copy(record, tmp_path / record.name)
    return tmp_path


def edit_record(folder: Path, file: str, change: Any) -> None:
    path = folder / file
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def test_a_record_without_a_field_a_table_needs_fails_naming_file_field_table_and_command(
    results_copy: Path,
) -> None:
    edit_record(
        results_copy, "core.json", lambda d: d["results"]["conv"]["16"]["sequence"].pop("peak_mib")
    )
    with pytest.raises(RecordError) as failed:
        TABLES["core:conv"].render(results_copy)
    message = str(failed.value)
    for part in ("benchmarks/results/core.json", "'peak_mib'", "'core:conv'"):
        assert part in message, message
    assert "python benchmarks/bench_core.py" in message
    TABLES["core:transformer"].render(results_copy)  # the other chain's table is whole


def test_a_record_without_a_row_a_table_needs_fails_naming_the_row(results_copy: Path) -> None:
    edit_record(
        results_copy,
        "convert.json",
        lambda d: d.update(
            memory=[r for r in d["memory"] if r["depth"] != 12 or r["variant"] != "original"]
        ),
    )
    with pytest.raises(RecordError, match=r"convert\.json.*'convert:memory'.*depth=12"):
        TABLES["convert:memory"].render(results_copy)


def test_a_missing_record_fails_unless_it_is_optional(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match=r"budget\.json is missing.*bench_budget\.py"):
        TABLES["budget:frontier"].render(tmp_path)
    fsdp = TABLES["fsdp:memory"]
    assert isinstance(fsdp, TableSpec) and fsdp.record.optional
    assert fsdp.render(tmp_path) is None


def test_a_table_shows_the_figures_of_its_record(results_copy: Path) -> None:
    def set_peak(data: dict[str, Any]) -> None:
        data["results"]["conv"]["16"]["sequence"]["peak_mib"] = 12345.678

    edit_record(results_copy, "core.json", set_peak)
    rows = TABLES["core:conv"].render(results_copy)
    assert rows is not None
    (sequence,) = [
        line for line in rows.splitlines() if line.startswith("| `ReversibleSequence` |")
    ]
    assert sequence.split(" | ")[1] == "12345.7"


def test_the_fsdp_table_reads_what_bench_fsdp_writes(tmp_path: Path) -> None:
    """bench_fsdp's record (its own layout, as the script writes it) makes the table; the record
    is not committed yet, so this keeps the table honest until it is."""
    rows = [
        {
            "method": method,
            "depth": depth,
            "forward_retained_bytes": 2**20 * (depth if method == "plain" else 1),
            "step_peak_bytes": 3 * 2**20,
            "step_seconds": 0.25,
            "all_gather_per_step": 2 * depth,
            "reduce_scatter_per_step": depth,
            "gradient_norm": 1.0,
        }
        for method in ("plain", "sequence/block")
        for depth in (4, 16)
    ]
    rows.append({"method": "revlib", "depth": 4, "error": "not installed: No module named revlib"})
    record = {
        "benchmark": "bench_fsdp",
        "torch": "2.14.1",
        "python": "3.11",
        "machine": "x86_64",
        "world_size": 2,
        "backend": "gloo",
        "settings": {
            "depths": [4, 16],
            "width": 128,
            "heads": 4,
            "tokens": 128,
            "batch": 4,
            "repeats": 5,
        },
        "rows": rows,
    }
    (tmp_path / "fsdp.json").write_text(json.dumps(record), encoding="utf-8")
    table = TABLES["fsdp:memory"].render(tmp_path)
    assert table is not None
    assert "| `plain` | 4.00 | 16.00 | 4.00 | 3.00 | 0.250 | 32 / 16 |" in table
    assert "| `sequence/block` | 1.00 | 1.00 | 1.00 |" in table
    assert "not installed" in table and "2 gloo ranks" in table


@pytest.mark.parametrize("headline", HEADLINES, ids=[h.readme for h in HEADLINES])
def test_each_readme_headline_table_is_what_the_records_give(headline: Any) -> None:
    text = headline.path.read_text(encoding="utf-8")
    block = headline_block(headline)
    assert block in text, (
        f"{headline.readme}'s headline table is not what the records give: run "
        "python docs/_ext/readme_headlines.py (and commit the README with the record)"
    )
    assert replace_block(text, block, headline.readme) == text


def test_a_headline_follows_its_record(results_copy: Path) -> None:
    (headline,) = [h for h in HEADLINES if h.readme == "packages/invertible-core/README.md"]
    before = headline_block(headline, results_copy)

    def set_peak(data: dict[str, Any]) -> None:
        data["results"]["conv"]["16"]["sequence"]["peak_mib"] = 99.94

    edit_record(results_copy, "core.json", set_peak)
    after = headline_block(headline, results_copy)
    assert before != after and "peak 99.9 MiB" in after


def test_a_readme_without_its_headline_markers_is_refused() -> None:
    start, end = MARKERS
    with pytest.raises(ValueError, match="exactly one"):
        replace_block(f"no markers here, and one lone {start}", f"{start}\n{end}", "README.md")
