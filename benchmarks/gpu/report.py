"""Markdown from a GPU suite record: the suite's own page, the site's tables, a summary.

Every table is laid out from the suite's plan (``plan.py``), not from whatever rows a record
happens to hold, so a missing row shows as "not run" and the site's tables have the same rows
before and after a run. Given no record at all, every cell says "to be measured": those are
the tables the documentation site (``docs/results/gpu.md``) shows until a GPU run's record is
committed; the site lays them out from the newest one when it is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from plan import (
    AMPS,
    FIT_BATCH_MODELS,
    MEMCNN_ACTIVATION_MB,
    MEMORY_MODELS,
    MEMORY_PRECISIONS,
    THROUGHPUT_MODELS,
)

TO_BE_MEASURED = "to be measured"
NOT_RUN = "not run"
MIB = 2**20
GIB = 2**30

Record = dict[str, Any] | None
Row = dict[str, Any]


# -- reading a record ------------------------------------------------------------------------
def stage_of(record: Record, name: str) -> dict[str, Any] | None:
    """The driver's entry for stage ``name``."""
    if record is None:
        return None
    for stage in record.get("stages", []):
        if stage.get("name") == name:
            return stage  # type: ignore[no-any-return]
    return None


def result_of(record: Record, name: str) -> dict[str, Any]:
    """What stage ``name`` wrote (empty when it wrote nothing)."""
    stage = stage_of(record, name)
    result = stage.get("result") if stage else None
    return result if isinstance(result, dict) else {}


def find(rows: list[Row], **keys: Any) -> Row | None:
    """The first row whose fields equal ``keys``."""
    for row in rows:
        if all(row.get(k) == v for k, v in keys.items()):
            return row
    return None


def cell(record: Record, row: Row | None, value: Callable[[Row], str]) -> str:
    """A table cell: the value of a measured row, or what became of the row."""
    if record is None:
        return TO_BE_MEASURED
    if row is None:
        return NOT_RUN
    status = row.get("status")
    if status in ("ok", "failed"):
        try:
            text = value(row)
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            return "error"
        return text if status == "ok" else f"{text} (failed)"
    if status == "skipped":
        return NOT_RUN
    if status == "running":  # the stage was killed while it measured this row
        return "unfinished"
    return "error"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def mib(value: float) -> str:
    return f"{value / MIB:.1f}"


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


# -- the tables ------------------------------------------------------------------------------
def environment_table(record: Record) -> str:
    facts = result_of(record, "environment").get("facts") or {}
    if record is None:
        values = [TO_BE_MEASURED] * 6
    else:
        commit = (record.get("git") or {}).get("commit") or "unknown"
        dirty = (record.get("git") or {}).get("dirty")
        gpu = facts.get("gpu") or ("CPU (dry run)" if record.get("dry_run") else "unknown")
        memory = facts.get("gpu_memory_gib")
        values = [
            str(record.get("date")),
            f"{gpu}" + (f", {memory:.0f} GiB" if isinstance(memory, (int, float)) else ""),
            str(facts.get("torch", "unknown")),
            str(facts.get("torch_cuda") or "none"),
            str(facts.get("python", "unknown")),
            f"`{commit[:12]}`" + (" (uncommitted changes)" if dirty else ""),
        ]
    return table(["date", "GPU", "torch", "CUDA", "Python", "commit"], [values])


def tests_table(record: Record) -> str:
    stage = stage_of(record, "tests")
    result = result_of(record, "tests")
    if record is None:
        values = [TO_BE_MEASURED] * 5
    elif stage is None or "passed" not in result:
        values = [NOT_RUN] * 4 + [stage["status"] if stage else NOT_RUN]
    else:
        errors = result.get("error", 0) + result.get("collection_errors", 0)
        values = [
            str(result.get("passed", 0)),
            str(result.get("failed", 0)),
            str(errors + result.get("unfinished", 0)),
            str(result.get("skipped", 0)),
            stage["status"],
        ]
    return table(["passed", "failed", "errors / unfinished", "skipped", "stage"], [values])


def _saving_label(model: str, saving: bool) -> str:
    if not saving:
        return "off"
    return "on (checkpointed blocks)" if model.startswith("resnet") else "on"


def memory_table(record: Record) -> str:
    rows: list[Row] = result_of(record, "memory").get("rows", [])
    body = []
    for model in MEMORY_MODELS:
        for saving in (False, True):
            memcnn = (
                MEMCNN_ACTIVATION_MB.get(model) if saving == model.startswith("revnet") else None
            )
            line = [model, _saving_label(model, saving), "" if memcnn is None else f"{memcnn}"]
            for precision in MEMORY_PRECISIONS:
                row = find(rows, model=model, precision=precision, saving=saving)
                line.append(cell(record, row, lambda r: f"{r['step_peak_mib']:.1f}"))
                line.append(cell(record, row, lambda r: ms(r["step_seconds"])))
            body.append(line)
    header = ["model", "saving", "MemCNN (MB)"]
    for precision in MEMORY_PRECISIONS:
        header += [f"{precision} step peak (MiB)", f"{precision} step (ms)"]
    text = table(header, body)
    ratio = _ratio(record, rows)
    return (
        f"{text}\n\nRevNet-164 (saving) / ResNet-164 (plain) step peak, fp32: {ratio} "
        "(MemCNN: 17.6%)."
    )


def _ratio(record: Record, rows: list[Row]) -> str:
    if record is None:
        return TO_BE_MEASURED
    rev = find(rows, model="revnet164", precision="fp32", saving=True, status="ok")
    res = find(rows, model="resnet164", precision="fp32", saving=False, status="ok")
    if rev is None or res is None or not res.get("step_peak_mib"):
        return NOT_RUN
    return f"{100 * rev['step_peak_mib'] / res['step_peak_mib']:.1f}%"


def throughput_table(record: Record) -> str:
    rows: list[Row] = result_of(record, "throughput").get("rows", [])
    body = []
    for model in THROUGHPUT_MODELS:
        for saving in (True, False):
            line = [model, _saving_label(model, saving)]
            for amp in AMPS:
                row = find(rows, model=model, amp=amp, saving=saving)
                line.append(cell(record, row, lambda r: f"{r['images_per_second']:,.0f}"))
            body.append(line)
    header = ["model", "saving", "bf16 (images/s)", "fp16 + GradScaler (images/s)"]
    return table(header, body)


def _budget_text(record: Record) -> str:
    budget = (result_of(record, "fit_batch").get("conditions") or {}).get("budget_bytes")
    if not budget:
        return "40 GiB"
    return f"{budget / GIB:g} GiB" if budget >= GIB else f"{budget / MIB:g} MiB"


def _largest(row: Row) -> str:
    if row.get("largest_batch") is None:
        return "none fits"
    return f"{row['largest_batch']:,}" + ("" if row.get("exact") else " (at least)")


def _profiler_cell(record: Record, row: Row | None) -> str:
    if record is None:
        return TO_BE_MEASURED
    profiler = (row or {}).get("profiler") or {}
    status = profiler.get("status")
    if status == "ok" and profiler.get("largest_batch") is not None:
        return f"{profiler['largest_batch']:,}"
    return str(status or NOT_RUN)


def fit_batch_table(record: Record) -> str:
    rows: list[Row] = result_of(record, "fit_batch").get("rows", [])
    budget = _budget_text(record)
    body = []
    for model in FIT_BATCH_MODELS:
        row = find(rows, model=model)
        body.append(
            [
                model,
                cell(record, row, _largest),
                cell(record, row, lambda r: f"{r['peak_bytes_at_largest'] / GIB:.2f}"),
                _profiler_cell(record, row),
            ]
        )
    header = [
        "model",
        f"largest batch in {budget} (suite's search)",
        "peak at that batch (GiB)",
        f"`invertible-profile --budget {budget.replace(' ', '')} --fit-batch`",
    ]
    return table(header, body)


#: the site's GPU tables, by name (``docs/_ext/benchmark_results/gpu.py`` shows them)
SITE_TABLES: dict[str, Callable[[Record], str]] = {
    "environment": environment_table,
    "tests": tests_table,
    "memory": memory_table,
    "throughput": throughput_table,
    "fit-batch": fit_batch_table,
}


# -- the suite's own page --------------------------------------------------------------------
def stages_table(record: dict[str, Any]) -> str:
    body = []
    for stage in record.get("stages", []):
        result = stage.get("result") or {}
        note = result.get("note") or ""
        if stage["status"] in ("error", "timeout") and stage.get("error_tail"):
            lines = [ln for ln in stage["error_tail"].strip().splitlines() if ln.strip()]
            note = note or (lines[-1] if lines else "")
        body.append(
            [
                stage["name"],
                stage["status"],
                f"{stage['seconds']:.1f}",
                f"{stage['budget_s']:.0f}",
                note.replace("|", "/")[:200],
            ]
        )
    return table(["stage", "status", "seconds", "box (s)", "note"], body)


def _problems(record: dict[str, Any]) -> str:
    problems = result_of(record, "tests").get("problems") or []
    if not problems:
        return ""
    lines = ["", "Tests that did not pass:", ""]
    for p in problems:
        message = (p.get("message") or "").strip().splitlines()
        lines.append(f"- `{p['nodeid']}` ({p['outcome']}): {message[-1] if message else ''}")
    return "\n".join(lines)


def _tails(record: dict[str, Any]) -> str:
    parts = []
    for stage in record.get("stages", []):
        if stage.get("error_tail"):
            parts += [
                f"### {stage['name']} ({stage['status']})",
                "",
                "```",
                stage["error_tail"].rstrip(),
                "```",
                "",
            ]
    return "\n".join(parts)


def _conditions(result: dict[str, Any]) -> str:
    if not result.get("conditions"):
        return "Not measured."
    sizes = ", ".join(f"{k} {v}" for k, v in result["conditions"].items())
    definition = result.get("definition")
    return f"Conditions: {sizes}." + (f" Definition: {definition}." if definition else "")


def suite_markdown(record: dict[str, Any]) -> str:
    """The page ``gpu-<date>.md``: environment, stage statuses, every table, error tails."""
    memory = result_of(record, "memory")
    title = f"# GPU suite, {record.get('date')}" + (
        " (dry run: toy sizes on the CPU)" if record.get("dry_run") else ""
    )
    sections = [
        title,
        environment_table(record),
        "## Stages",
        stages_table(record),
        "## CUDA-only tests",
        tests_table(record) + _problems(record),
        "## Memory (MemCNN's table)",
        _conditions(memory),
        memory_table(record),
        "## Training throughput",
        throughput_table(record),
        "## Largest batch within the budget",
        fit_batch_table(record),
    ]
    tails = _tails(record)
    if tails:
        sections += ["## Output tails of the stages that did not pass", tails]
    return "\n\n".join(sections) + "\n"


def summary_text(record: dict[str, Any]) -> str:
    """What the driver prints at the end: the stage statuses and every table, no tails."""
    return "\n\n".join(
        [
            stages_table(record),
            tests_table(record) + _problems(record),
            memory_table(record),
            throughput_table(record),
            fit_batch_table(record),
        ]
    )
