"""The GPU suite works before any GPU sees it: its dry run, its time boxes, its site tables.

A lent GPU gives this project a few minutes, once; the suite (``benchmarks/gpu``) must work
the first time. So its whole dry run (every stage at toy sizes on the CPU) runs here end to
end and its record is checked stage by stage, the driver's time boxing is checked with
stages that hang or crash, the largest-batch search with a synthetic memory model, and the
documentation site's GPU tables (``docs/results/gpu.md``) with a synthetic GPU record.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
GPU = ROOT / "benchmarks" / "gpu"
#: the documentation build's tables (``benchmark_results``), importable from here
DOCS_EXT = ROOT / "docs" / "_ext"
#: the suite's own modules, importable by these names once GPU is on sys.path
SUITE_MODULES = (
    "record", "plan", "report", "common", "suite", "stage_fit_batch", "stage_tests",
)  # fmt: skip
#: a dry run takes about 2 minutes on a loaded 2-core machine; this is the hang guard, below
#: pytest-timeout's 600 s per test (pyproject.toml), so that a hang fails this test alone
#: instead of stopping the whole session
DRY_RUN_TIMEOUT = 480


@pytest.fixture(scope="module")
def gpu() -> Iterator[dict[str, ModuleType]]:
    """The suite's modules, imported from ``benchmarks/gpu`` and forgotten afterwards.

    Their names are plain (``record``, ``report``): they are kept off ``sys.path`` and out
    of ``sys.modules`` for every other test.
    """
    import importlib

    clash = [name for name in SUITE_MODULES if name in sys.modules]
    assert not clash, f"modules named like the suite's are already imported: {clash}"
    sys.path.insert(0, str(GPU))
    try:
        yield {name: importlib.import_module(name) for name in SUITE_MODULES}
    finally:
        sys.path.remove(str(GPU))
        for name in (*SUITE_MODULES, "pytest_outcomes"):
            sys.modules.pop(name, None)


# -- the dry run, end to end -----------------------------------------------------------------
@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("gpu-suite")
    before = sorted((ROOT / "benchmarks" / "results").glob("*"))
    started = time.monotonic()
    done = subprocess.run(
        ["bash", str(GPU / "run.sh"), "--dry-run", "--out", str(out)],
        # one torch thread per process: the dry run's stages are CPU smoke runs, and two
        # threads per process crawl on a 2-core machine that is doing anything else
        env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=DRY_RUN_TIMEOUT,
    )
    return {
        "done": done,
        "seconds": time.monotonic() - started,
        "out": out,
        "files": sorted(p.name for p in out.iterdir()),
        "results_before": before,
    }


def _record(dry_run: dict[str, Any]) -> dict[str, Any]:
    (name,) = (f for f in dry_run["files"] if f.endswith(".json"))
    return json.loads((dry_run["out"] / name).read_text())  # type: ignore[no-any-return]


def _stage(record: dict[str, Any], name: str) -> dict[str, Any]:
    (stage,) = (s for s in record["stages"] if s["name"] == name)
    return stage  # type: ignore[no-any-return]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@pytest.mark.slow
def test_the_dry_run_ends_cleanly_and_writes_its_three_files_only_where_told(
    dry_run: dict[str, Any],
) -> None:
    done = dry_run["done"]
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "| stage | status |" in done.stdout  # the printed summary
    stem = dry_run["files"][0].rsplit(".", 1)[0]
    assert stem.startswith("gpu-dry-run-")
    assert dry_run["files"] == [f"{stem}.json", f"{stem}.log", f"{stem}.md"]
    assert sorted((ROOT / "benchmarks" / "results").glob("*")) == dry_run["results_before"]


@pytest.mark.slow
def test_the_dry_run_records_every_stage_with_a_known_status(
    dry_run: dict[str, Any], gpu: dict[str, ModuleType]
) -> None:
    record = _record(dry_run)
    assert record["dry_run"] is True and record["device"] == "cpu"
    assert record["schema"] == gpu["record"].SCHEMA
    assert [s["name"] for s in record["stages"]] == list(gpu["suite"].STAGE_NAMES)
    for stage in record["stages"]:
        assert stage["status"] in gpu["record"].STATUSES
        assert _number(stage["seconds"]) and stage["seconds"] <= stage["budget_s"] + 10
        # a dry run on a working checkout: nothing fails, nothing runs out of time
        assert stage["status"] == "ok", stage["error_tail"]
    assert record["wall_s"] <= record["deadline_s"]
    facts = _stage(record, "environment")["result"]["facts"]
    assert facts["torch"] and facts["cuda_available"] is False
    packages = facts["packages"]
    assert all(str(ROOT / "packages") in p["path"] for p in packages.values())  # src/, not site


@pytest.mark.slow
def test_the_dry_run_collects_the_cuda_tests_of_every_package_and_skips_them_on_the_cpu(
    dry_run: dict[str, Any],
) -> None:
    result = _stage(_record(dry_run), "tests")["result"]
    assert {
        "tests/core/test_cuda.py",
        "tests/models/test_zoo_cuda.py",
        "tests/train/test_cuda.py",
    } <= set(result["files"])
    assert [r["folder"] for r in result["runs"]] == ["tests/core", "tests/models", "tests/train"]
    assert result["failed"] == result["error"] == result["collection_errors"] == 0
    assert result["passed"] == 0 and result["skipped"] >= 15
    assert set(result["skip_reasons"]) == {"Skipped: needs a CUDA device"}


@pytest.mark.slow
def test_the_dry_run_measures_every_row_of_the_memory_table(
    dry_run: dict[str, Any], gpu: dict[str, ModuleType]
) -> None:
    rows = _stage(_record(dry_run), "memory")["result"]["rows"]
    plan = gpu["plan"]
    assert len(rows) == len(plan.MEMORY_MODELS) * len(plan.MEMORY_PRECISIONS) * 2
    for row in rows:
        assert row["status"] == "ok", row.get("error")
        for field in ("step_peak_mib", "activation_mib", "state_mib", "step_seconds"):
            assert _number(row[field]) and row[field] > 0, field
    memcnn = {(r["model"], r["precision"], r["saving"]): r["memcnn_mb"] for r in rows}
    assert memcnn[("revnet164", "fp32", True)] == 432.7
    assert memcnn[("resnet164", "fp32", False)] == 2452.8
    assert memcnn[("resnet164", "bf16", False)] is None
    # saving is what the row says: a checkpointed ResNet keeps fewer activations than its
    # plain self, and so does a RevNet
    activations = {(r["model"], r["precision"], r["saving"]): r["activation_mib"] for r in rows}
    for model in ("resnet32", "revnet38"):
        assert activations[(model, "fp32", True)] < activations[(model, "fp32", False)]


@pytest.mark.slow
def test_the_dry_run_measures_throughput_of_every_row_the_transformer_included(
    dry_run: dict[str, Any], gpu: dict[str, ModuleType]
) -> None:
    result = _stage(_record(dry_run), "throughput")["result"]
    plan = gpu["plan"]
    rows = result["rows"]
    assert {(r["model"], r["amp"], r["saving"]) for r in rows} == {
        (m, a, s) for m in plan.THROUGHPUT_MODELS for a in plan.AMPS for s in (True, False)
    }
    for row in rows:
        assert row["status"] == "ok", row.get("error") or row.get("note")
        assert _number(row["images_per_second"]) and row["images_per_second"] > 0
        assert (row["loss_scale"] is not None) == (row["amp"] == "fp16")


@pytest.mark.slow
def test_the_dry_run_finds_the_largest_batch_within_the_budget(dry_run: dict[str, Any]) -> None:
    result = _stage(_record(dry_run), "fit_batch")["result"]
    budget = result["conditions"]["budget_bytes"]
    for row in result["rows"]:
        assert row["status"] == "ok", row.get("error")
        assert isinstance(row["largest_batch"], int) and row["largest_batch"] >= 1
        assert row["peak_bytes_at_largest"] <= budget
        fitting = [t["batch"] for t in row["tries"] if t["fits"]]
        assert max(fitting) == row["largest_batch"]
        assert all(t["peak_bytes"] > budget for t in row["tries"] if not t["fits"])
        assert row["memory_saving"] is (row["model"] == "revnet164")  # each model's default
        profiler = row["profiler"]
        assert profiler["status"] == "ok", profiler.get("output_tail")
        assert isinstance(profiler["largest_batch"], int) and profiler["largest_batch"] >= 1


@pytest.mark.slow
def test_the_dry_runs_markdown_holds_every_table_of_its_record(
    dry_run: dict[str, Any], gpu: dict[str, ModuleType]
) -> None:
    record = _record(dry_run)
    (name,) = (f for f in dry_run["files"] if f.endswith(".md"))
    markdown = (dry_run["out"] / name).read_text()
    assert markdown.startswith("# GPU suite, ") and "dry run" in markdown.splitlines()[0]
    for render in gpu["report"].SITE_TABLES.values():
        assert render(record) in markdown
    assert "to be measured" not in markdown


# -- the driver's time boxes -----------------------------------------------------------------
def _run_fake_stage(gpu: dict[str, ModuleType], tmp_path: Path, body: str, box: float) -> dict:
    script = tmp_path / "fake_stage.py"
    script.write_text(
        "import argparse, json, sys, time\n"
        "p = argparse.ArgumentParser(); p.add_argument('--result'); p.add_argument('--budget-s')\n"
        "p.add_argument('--device'); p.add_argument('--dry-run', action='store_true')\n"
        "args = p.parse_args()\n" + body
    )
    suite = gpu["suite"]
    stage = suite.Stage("fake", str(script), box, box)
    log_path = tmp_path / "suite.log"
    with log_path.open("ab") as log:
        return suite.run_stage(  # type: ignore[no-any-return]
            stage, box, device="cpu", dry_run=True, env=dict(os.environ),
            work=tmp_path, log=log, log_path=log_path,
        )  # fmt: skip


def test_a_stage_that_outlives_its_box_is_killed_and_recorded_with_its_rows(
    gpu: dict[str, ModuleType], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpu["suite"], "GRACE_S", 0.5)
    body = (
        "print('measuring the first row', flush=True)\n"
        "json.dump({'status': 'running', 'rows': [{'model': 'a', 'status': 'ok'}]},"
        " open(args.result, 'w'))\n"
        "signal_ignored = __import__('signal').signal(15, lambda *a: None)\n"  # ignores SIGTERM
        "time.sleep(60)\n"
    )
    started = time.monotonic()
    entry = _run_fake_stage(gpu, tmp_path, body, box=2.0)
    assert time.monotonic() - started < 20  # SIGKILL after the grace period
    assert entry["status"] == "timeout"
    assert entry["result"]["rows"] == [{"model": "a", "status": "ok"}]
    assert "measuring the first row" in entry["error_tail"]


def test_a_stage_that_crashes_is_an_error_with_the_tail_of_its_output(
    gpu: dict[str, ModuleType], tmp_path: Path
) -> None:
    entry = _run_fake_stage(gpu, tmp_path, "raise RuntimeError('CUDA error: no kernel')\n", 30.0)
    assert entry["status"] == "error" and entry["exit_code"] == 1
    assert "RuntimeError: CUDA error: no kernel" in entry["error_tail"]


def test_a_stage_that_exits_without_a_final_status_is_an_error(
    gpu: dict[str, ModuleType], tmp_path: Path
) -> None:
    body = "json.dump({'status': 'running', 'rows': []}, open(args.result, 'w'))\n"
    entry = _run_fake_stage(gpu, tmp_path, body, 30.0)
    assert entry["status"] == "error"
    assert "without writing a final result" in entry["error_tail"]


def test_a_stage_is_never_given_the_budgets_of_the_stages_after_it(
    gpu: dict[str, ModuleType],
) -> None:
    suite = gpu["suite"]
    budgets = [s.gpu_budget_s for s in suite.STAGES]
    deadline = suite.DEADLINE_S["gpu"]
    assert sum(budgets) <= deadline  # the nominal plan fits the 8 minutes
    for i in range(len(budgets)):
        later = sum(budgets[i + 1 :])
        for remaining in (deadline, deadline / 2, later + 30, later):
            allotted = suite.allotment(i, remaining, dry_run=False)
            assert allotted <= max(0.0, remaining - later)
            assert allotted <= 2 * budgets[i]
    # unused time flows on: an early stage that finished fast leaves more to the next
    assert suite.allotment(1, deadline - 5, False) > budgets[1]


def test_output_files_never_replace_an_earlier_run_of_the_same_day(
    gpu: dict[str, ModuleType], tmp_path: Path
) -> None:
    import datetime as dt

    day = dt.date(2027, 1, 15)
    suite = gpu["suite"]
    assert suite.output_stem(tmp_path, False, day) == "gpu-2027-01-15"
    (tmp_path / "gpu-2027-01-15.md").write_text("earlier")
    assert suite.output_stem(tmp_path, False, day) == "gpu-2027-01-15-2"
    assert suite.output_stem(tmp_path, True, day) == "gpu-dry-run-2027-01-15"


# -- the largest-batch search, on a memory model -------------------------------------------
def _linear_peak(fixed: int, per_image: int, limit: int | None = None):  # type: ignore[no-untyped-def]
    import torch

    calls: list[int] = []

    def peak(batch: int) -> int:
        calls.append(batch)
        if limit is not None and batch > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return fixed + per_image * batch

    return peak, calls


@pytest.mark.parametrize("per_image", [3_000_000, 19_000_000])
def test_the_search_finds_the_exact_largest_fitting_batch_in_few_tries(
    gpu: dict[str, ModuleType], per_image: int
) -> None:
    fit = gpu["stage_fit_batch"]
    budget, fixed = 40 * 2**30, 500_000_000
    peak, calls = _linear_peak(fixed, per_image)
    found = fit.search(
        peak, budget=budget, start=128, max_tries=12,
        box=gpu["common"].TimeBox(60), deadline_s=60,
    )  # fmt: skip
    assert len(calls) <= 7  # the line through two tries predicts the rest
    assert found["largest_batch"] == (budget - fixed) // per_image
    assert found["peak_bytes_at_largest"] == peak(found["largest_batch"])
    assert found["exact"] and found["stopped"] == "bracketed"


def test_the_search_counts_out_of_memory_as_not_fitting_and_honours_its_caps(
    gpu: dict[str, ModuleType],
) -> None:
    fit = gpu["stage_fit_batch"]
    box = gpu["common"].TimeBox(60)
    # the device runs out at 1000 although the budget would allow more
    peak, calls = _linear_peak(0, 1000, limit=1000)
    found = fit.search(peak, budget=10**9, start=128, max_tries=20, box=box, deadline_s=60)
    assert found["largest_batch"] == 1000 and found["exact"]
    assert any(t.get("error") == "out of memory" for t in found["tries"])
    peak, calls = _linear_peak(0, 1000)
    capped = fit.search(peak, budget=10**9, start=2, max_tries=3, box=box, deadline_s=60)
    assert len(calls) == 3 and capped["stopped"] == "max_tries" and not capped["exact"]


def test_a_search_out_of_time_stops_before_the_try_that_would_not_fit_and_keeps_its_tries(
    gpu: dict[str, ModuleType],
) -> None:
    fit = gpu["stage_fit_batch"]
    saved: list[int] = []

    def slow_peak(batch: int) -> int:
        time.sleep(0.2)
        return 1000 * batch

    tries: list[dict[str, Any]] = []
    found = fit.search(
        slow_peak, budget=10**9, start=128, max_tries=12,
        box=gpu["common"].TimeBox(60), deadline_s=0.5,
        tries=tries, on_try=lambda: saved.append(len(tries)),
    )  # fmt: skip
    assert found["stopped"] == "time box" and found["largest_batch"] == 128
    assert found["tries"] is tries and saved == [1]


def test_the_time_of_a_larger_try_is_estimated_from_the_cost_per_image(
    gpu: dict[str, ModuleType],
) -> None:
    estimate = gpu["stage_fit_batch"].estimate_seconds
    tries = [{"batch": 128, "seconds": 0.05}, {"batch": 256, "seconds": 0.08}]
    per_image = 0.03 / 128
    assert estimate(tries, 12_000) == pytest.approx(1.3 * (0.08 + per_image * 11_744) + 0.5)
    # a pair made noisy by a slow first try still charges a quarter of the mean cost
    noisy = [{"batch": 128, "seconds": 0.5}, {"batch": 256, "seconds": 0.08}]
    assert estimate(noisy, 12_000) == pytest.approx(1.3 * (0.08 + 0.25 * 0.08 / 256 * 11_744) + 0.5)


# -- the site's GPU tables ------------------------------------------------------------------
def _synthetic_record(gpu: dict[str, ModuleType]) -> dict[str, Any]:
    """A GPU run's record with every row measured, and numbers that are easy to spot."""
    plan = gpu["plan"]
    memory = [
        {
            "model": m, "precision": p, "saving": s, "status": "ok",
            "step_peak_mib": 100.0 + i, "step_seconds": 0.0123,
        }
        for i, (m, p, s) in enumerate(
            (m, p, s) for m in plan.MEMORY_MODELS for p in plan.MEMORY_PRECISIONS for s in (False, True)
        )
    ]  # fmt: skip
    throughput = [
        {"model": m, "amp": a, "saving": s, "status": "ok", "images_per_second": 12345.6}
        for m in plan.THROUGHPUT_MODELS for a in plan.AMPS for s in (True, False)
    ]  # fmt: skip
    fit = [
        {
            "model": m, "status": "ok", "largest_batch": 12_288, "exact": True,
            "peak_bytes_at_largest": 39 * 2**30,
            "profiler": {"status": "ok", "largest_batch": 24_576},
        }
        for m in plan.FIT_BATCH_MODELS
    ]  # fmt: skip

    def stage(name: str, result: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "status": "ok", "seconds": 1.0, "budget_s": 60.0, "result": result}

    return {
        "schema": gpu["record"].SCHEMA, "date": "2027-01-15", "dry_run": False,
        "git": {"commit": "0123456789abcdef", "dirty": False},
        "stages": [
            stage("environment", {"status": "ok", "facts": {
                "gpu": "NVIDIA H200", "gpu_memory_gib": 139.8, "torch": "2.11.0",
                "torch_cuda": "12.8", "python": "3.12.3",
            }}),
            stage("tests", {"status": "ok", "passed": 31, "failed": 0, "error": 0,
                            "skipped": 0, "unfinished": 0, "collection_errors": 0}),
            stage("memory", {"status": "ok", "rows": memory}),
            stage("throughput", {"status": "ok", "rows": throughput}),
            stage("fit_batch", {"status": "ok", "rows": fit,
                                "conditions": {"budget_bytes": 40 * 2**30}}),
        ],
    }  # fmt: skip


@pytest.fixture
def site_gpu_tables() -> Iterator[dict[str, Any]]:
    """The documentation build's GPU tables (``docs/_ext/benchmark_results/gpu.py``), by name."""
    sys.path.insert(0, str(DOCS_EXT))
    try:
        from benchmark_results import gpu as site

        yield {spec.table: spec for spec in site.TABLES}
    finally:
        sys.path.remove(str(DOCS_EXT))


def test_the_site_lays_out_a_gpu_records_figures_in_every_table(
    gpu: dict[str, ModuleType], site_gpu_tables: dict[str, Any], tmp_path: Path
) -> None:
    record = _synthetic_record(gpu)
    (tmp_path / "gpu-2027-01-15.json").write_text(json.dumps(record))
    assert set(site_gpu_tables) == set(gpu["report"].SITE_TABLES)
    pages = {name: spec.render(tmp_path) for name, spec in site_gpu_tables.items()}
    for name, page in pages.items():
        assert page.startswith(gpu["report"].SITE_TABLES[name](record)), name
        assert "to be measured" not in page and "gpu-2027-01-15.json" in page
    shown = "\n".join(pages.values())
    for figure in (
        "NVIDIA H200",
        "`0123456789ab`",
        "| 31 |",
        "| 100.0 | 12.3 |",
        "12,346",
        "12,288",
        "39.00",
        "24,576",
    ):
        assert figure in shown, figure  # fmt: skip
    memory = _stage(record, "memory")["result"]["rows"]
    revnet = next(
        r
        for r in memory
        if (r["model"], r["precision"], r["saving"]) == ("revnet164", "fp32", True)
    )
    resnet = next(
        r
        for r in memory
        if (r["model"], r["precision"], r["saving"]) == ("resnet164", "fp32", False)
    )
    ratio = 100 * revnet["step_peak_mib"] / resnet["step_peak_mib"]
    assert f"fp32: {ratio:.1f}% (MemCNN: 17.6%)" in pages["memory"]


def test_without_a_gpu_run_the_site_shows_placeholders_and_never_a_dry_run(
    gpu: dict[str, ModuleType], site_gpu_tables: dict[str, Any], tmp_path: Path
) -> None:
    """Until a GPU run's record is committed every cell says "to be measured"; a dry run's
    record (toy sizes on the CPU) is not a measurement and is never shown."""
    dry = copy.deepcopy(_synthetic_record(gpu))
    dry["dry_run"] = True
    (tmp_path / "gpu-2027-01-16.json").write_text(json.dumps(dry))
    for name, spec in site_gpu_tables.items():
        page = spec.render(tmp_path)
        assert page.startswith(gpu["report"].SITE_TABLES[name](None)), name
        assert "to be measured" in page and "No GPU run is recorded yet" in page
        assert "NVIDIA H200" not in page


def test_the_site_shows_the_newest_gpu_run(
    gpu: dict[str, ModuleType], site_gpu_tables: dict[str, Any], tmp_path: Path
) -> None:
    old, new = _synthetic_record(gpu), _synthetic_record(gpu)
    new["git"]["commit"] = "fedcba9876543210"
    (tmp_path / "gpu-2027-01-15.json").write_text(json.dumps(old))
    (tmp_path / "gpu-2027-02-01.json").write_text(json.dumps(new))
    page = site_gpu_tables["environment"].render(tmp_path)
    assert "`fedcba987654`" in page and "gpu-2027-02-01.json" in page
