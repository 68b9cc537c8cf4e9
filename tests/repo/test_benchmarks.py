"""The benchmarks still run: each script, at smoke-test size, prints a table and writes JSON.

Speed and memory targets are judged from full benchmark runs (`tox -e bench`), never here;
this only keeps the scripts from rotting as the packages change, and checks that what
bench_core reports is well formed: our rows are numbers, ratios are positive, gradient
errors are small, and a peer that is missing or fails is reported, not dropped. The peers
are installed in the bench environment only; here they may be absent. The JSON a smoke run
writes makes the documentation site's tables of that benchmark (``docs/_ext/benchmark_results``),
so a benchmark that renames or drops a field the site reads fails here, before its record
is rerun.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
DOCS_EXT = Path(__file__).resolve().parents[2] / "docs" / "_ext"

CASES = {
    "bench_accuracy.py": (["--quick"], "--json", {"runs", "pairs", "glow"}),
    "bench_models.py": (
        [
            "--quick",
            "--only",
            "revnet38",
            "revnet38 nosave",
            "revvit_tiny d6",
            "vit_tiny d6",
            "irevnet d3",
            "irevnet reconstruction",
        ],
        "--json",
        {"profiles", "ratios"},
    ),
    "bench_budget.py": (["--quick"], "--json", {"results", "targets", "environment"}),
    "bench_demo.py": (["--quick", "--threads", "1", "auto"], "--json", {"runs", "environment"}),
    "bench_unet.py": (["--quick", "--steps", "1"], "--json", {"profiles", "ratios", "sizes"}),
    "bench_resampling.py": (["--quick"], "--json", {"outputs", "flows"}),
    "bench_segmentation.py": (["--quick"], "--json", {"runs", "dice", "parity"}),
    "bench_train.py": (
        ["--iterations", "4", "--repeats", "1", "--image-size", "8"],
        "--output",
        {"hand_images_per_second", "harness_images_per_second", "overhead_percent"},
    ),
}

#: the site's tables a benchmark's smoke record makes (the record's file name, the tables);
#: tables of rows a smoke run leaves out (``bench_models --only``) are not listed
SITE_TABLES: dict[str, tuple[str, list[str]]] = {
    "bench_accuracy.py": ("accuracy.json", ["accuracy:digits", "accuracy:parity"]),
    "bench_models.py": (
        "models.json",
        ["models:cnn", "models:transformers", "models:flows", "models:reconstruction"],
    ),
    "bench_budget.py": ("budget.json", ["budget:frontier"]),
    "bench_unet.py": ("unet.json", ["unet:profiles", "unet:ratios"]),
    "bench_resampling.py": ("resampling.json", ["resampling:outputs", "resampling:flows"]),
    "bench_segmentation.py": ("segmentation-shapes2d.json", ["segmentation:shapes2d"]),
    "bench_core.py": ("core.json", ["core:conv", "core:transformer", "core:flatness"]),
    "bench_convert.py": (
        "convert.json",
        [
            "convert:memory",
            "convert:gradients",
            "convert:distance-momentum",
            "convert:distance-two-stream",
            "convert:schedule",
            "convert:parity",
        ],
    ),
}

OURS = ("plain", "plain_blocks", "wrapper", "sequence", "sequence_fixed16", "checkpoint")
PEERS = ("memcnn", "revlib", "revtorch", "reformer")


def _run(
    script: str, args: list[str], json_flag: str, out: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args, json_flag, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow  # a fresh interpreter that imports torch, then a benchmark at smoke size
@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_runs_and_writes_json(script: str, tmp_path: Path) -> None:
    args, json_flag, keys = CASES[script]
    out = tmp_path / "result.json"
    committed = _committed_records()
    done = _run(script, args, json_flag, out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _committed_records() == committed, (
        f"{script} {' '.join(args)} {json_flag} PATH changed benchmarks/results/: a smoke run "
        "must write only where it is told, never over the records the site is made from"
    )
    assert done.stdout.strip(), "a benchmark prints a table"
    assert keys <= set(json.loads(out.read_text()))
    if script in SITE_TABLES:
        _site_tables_render(script, out, tmp_path / "site")


def _committed_records() -> dict[str, bytes]:
    """The bytes of every file under benchmarks/results/ (the records the site is made from)."""
    folder = BENCHMARKS / "results"
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*")) if p.is_file()}


def _site_tables_render(script: str, record: Path, folder: Path) -> None:
    """The site's tables of ``script`` are made from the record its smoke run wrote."""
    sys.path.insert(0, str(DOCS_EXT))
    try:
        from benchmark_results import TABLES
    finally:
        sys.path.remove(str(DOCS_EXT))
    file, names = SITE_TABLES[script]
    folder.mkdir()
    shutil.copy(record, folder / file)
    for name in names:
        table = TABLES[name].render(folder)
        assert table is not None, name
        lines = table.splitlines()
        # a header, its rule and at least one row made from the record
        assert lines[0].startswith("| ") and lines[1].startswith("|---"), f"{name}: {table}"
        assert lines[2].startswith("| "), f"{name}: {table}"


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """One smoke run of bench_core (with ``--compile`` on the quick aot_eager backend)."""
    out = tmp_path_factory.mktemp("bench_core") / "core.json"
    done = _run(
        "bench_core.py", ["--quick", "--compile", "--compile-backend", "aot_eager"], "--json", out
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text()), done.stdout


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Any:
    """bench_core imported in-process (its helpers are modules next to it)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_core

    return bench_core


def _chains(payload: dict[str, Any]) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    return [
        (f"{c} N={n}", rows) for c, by_n in payload["results"].items() for n, rows in by_n.items()
    ]


@pytest.mark.slow  # a fresh interpreter that imports torch, then a benchmark at smoke size
def test_core_prints_a_table_per_chain_and_writes_json(core: tuple[dict[str, Any], str]) -> None:
    payload, stdout = core
    assert {"results", "ratios", "flatness", "compile", "environment"} <= set(payload)
    assert set(payload["results"]) == {"conv", "transformer"}
    for title in ("conv chain", "transformer chain", "flatness", "torch.compile"):
        assert title in stdout


@pytest.mark.slow  # a fresh interpreter that imports torch, then a benchmark at smoke size
def test_core_record_makes_the_sites_tables(
    core: tuple[dict[str, Any], str], tmp_path: Path
) -> None:
    record = tmp_path / "core.json"
    record.write_text(json.dumps(core[0]))
    _site_tables_render("bench_core.py", record, tmp_path / "site")


@pytest.mark.slow  # a fresh interpreter that imports torch, then a benchmark at smoke size
def test_core_rows_of_ours_are_numbers_with_small_gradient_errors(
    core: tuple[dict[str, Any], str],
) -> None:
    payload, _ = core
    for chain, rows in _chains(payload):
        for method in OURS:
            row = rows[method]
            assert row["status"] == "ok", (chain, method, row)
            for key in ("peak_mib", "peak_kept_grads_mib", "step_s", "time_vs_plain"):
                assert row[key] > 0, (chain, method, key)
            # float32 rounding of a short chain: far below a wrong gradient; none in float64
            assert row["grad_error"] <= 1e-4, (chain, method, row["grad_error"])
            assert row["grad_error_float64"] <= 1e-10, (chain, method)
        assert rows["plain"]["time_vs_plain"] == 1.0
        assert rows["plain"]["grad_error"] == 0.0
        # fixed-point couplings rebuild bit-exact inputs: memory saving changes no gradient
        assert rows["sequence_fixed16"]["grad_error"] <= 1e-6, chain


@pytest.mark.slow  # a fresh interpreter that imports torch, then a benchmark at smoke size
def test_core_reports_every_peer_ran_or_why_not(core: tuple[dict[str, Any], str]) -> None:
    payload, _ = core
    for chain, rows in _chains(payload):
        for peer in PEERS:
            row = rows[peer]
            assert row["peer"] is True
            assert row["status"] in ("ok", "failed", "not installed", "not importable"), row
            if row["status"] == "ok":
                assert row["peak_mib"] > 0 and row["step_s"] > 0 and row["grad_error"] >= 0
                assert row["grad_error_float64"] >= 0
                assert row["peak_vs_leanest_peer"] >= 1.0
            else:
                assert row["error"], (chain, peer)
    conv = payload["results"]["conv"]
    # reformer's blocks always split dim 2; the conv chain splits the channels (dim 1)
    assert conv[next(iter(conv))]["reformer"]["status"] != "ok"


@pytest.mark.slow  # a fresh interpreter that imports torch, then a benchmark at smoke size
def test_core_flatness_checks_report_both_depths_and_gradients(
    core: tuple[dict[str, Any], str],
) -> None:
    payload, _ = core
    assert set(payload["flatness"]) == {"conditioned", "flow"}
    for check, entry in payload["flatness"].items():
        lo, hi = (str(d) for d in entry["depths"])
        for mode in ("peak_mib", "peak_kept_grads_mib"):
            for method in ("sequence", "plain"):
                assert entry[mode][method][lo] > 0 and entry[mode][method][hi] > 0, check
        assert entry["peak_kept_grads_hi_over_lo"]["sequence"] > 0
        # side inputs (the embedding MLP's gradient) and log-dets: as plain autograd
        assert entry["grad_error_at_lo"] <= 1e-4, check


@pytest.mark.slow  # a fresh interpreter that imports torch, then a benchmark at smoke size
def test_core_compiled_blocks_run_in_the_recompute_with_equal_gradients(
    core: tuple[dict[str, Any], str],
) -> None:
    result = core[0]["compile"]
    assert result["equal"] and result["grad_error_sequence"] <= 1e-4
    calls = result["compiled_calls_per_step"]
    # forward and recompute of F and G per block, against forward only for plain autograd
    assert calls["sequence_compiled"] == 4 * result["depth"]
    assert calls["plain_compiled"] == 2 * result["depth"]


def test_a_peer_that_is_not_installed_is_reported_with_the_fix(
    bench: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import peers

    def missing() -> Any:
        raise ImportError("No module named 'ghost'")

    spec = peers.PeerSpec("ghost-dist-never-published", "0.1", missing, peers._revtorch)
    monkeypatch.setattr(peers, "PEERS", {"ghost": spec})
    ghost = peers.load_peers()["ghost"]
    assert ghost.build is None and ghost.version is None
    assert ghost.status == "not installed" and ghost.missing is not None
    assert "pip install --no-deps ghost-dist-never-published==0.1" in ghost.missing


def test_a_file_of_a_package_loads_without_running_the_package_init(
    bench: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import peers

    package = tmp_path / "heavy_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('needs einops')\n")
    (package / "reversible.py").write_text("ANSWER = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = peers.load_file("heavy_pkg", "reversible.py")
    assert module.ANSWER == 42
    assert "heavy_pkg" not in sys.modules


class _Raising(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("cannot split this layout")


class _Scaled(nn.Module):
    """A 'peer' that computes twice the chain: its gradients are wrong."""

    def __init__(self, chain: nn.Module) -> None:
        super().__init__()
        self.chain = chain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.chain(x)


def test_missing_failing_and_wrong_peers_are_rows_not_gaps(bench: Any) -> None:
    import chains
    import peers
    from invertible_core import AdditiveCoupling, ReversibleSequence

    def wrong(pairs: Any, split_dim: int) -> nn.Module:
        blocks = [AdditiveCoupling(f, g, split_dim=split_dim) for f, g in pairs]
        return _Scaled(ReversibleSequence(blocks))

    fake = {
        "absent": peers.Peer("absent", None, None, "ImportError: absent", "not installed"),
        "broken": peers.Peer("broken", "1.0", lambda pairs, split_dim: _Raising()),
        "wrong": peers.Peer("wrong", "2.0", wrong),
    }
    args = argparse.Namespace(warmup=0, repeats=1)
    chain = chains.conv_chain(depth=2, channels=8, batch=2, size=4)
    rows = bench.bench_chain(chain, fake, args, torch.device("cpu"))
    assert rows["absent"]["status"] == "not installed"
    assert rows["broken"]["status"] == "failed"
    assert "cannot split this layout" in rows["broken"]["error"]
    assert rows["wrong"]["status"] == "ok" and rows["wrong"]["grad_error"] > 0.5
    assert rows["wrong"]["grad_error_float64"] > 0.5
    # the only peer that ran has wrong gradients: no "fastest correct peer" to compare with
    assert rows["sequence"]["time_vs_fastest_peer"] is None
    assert rows["sequence"]["peak_vs_leanest_peer"] == pytest.approx(
        rows["sequence"]["peak_mib"] / rows["wrong"]["peak_mib"]
    )
    assert rows["sequence"]["status"] == "ok" and rows["sequence"]["grad_error"] <= 1e-4


def test_the_bench_env_installs_every_peer_at_the_version_bench_core_expects(bench: Any) -> None:
    import configparser

    import peers

    parser = configparser.ConfigParser(interpolation=None)
    parser.read(BENCHMARKS.parent / "tox.ini", encoding="utf-8")
    commands_pre = parser["testenv:bench"]["commands_pre"]
    for spec in peers.PEERS.values():
        assert f"{spec.distribution}=={spec.pinned}" in commands_pre, spec.distribution
    assert "pip install --no-deps" in commands_pre


@pytest.mark.slow  # a fresh interpreter that imports torch, then a benchmark at smoke size
def test_budget_plans_stay_within_their_budgets_and_the_plot_is_drawn(tmp_path: Path) -> None:
    out = tmp_path / "budget.json"
    done = _run("bench_budget.py", ["--quick", "--only", "conv", "revnet38"], "--json", out)
    assert done.returncode == 0, done.stderr[-2000:]
    payload = json.loads(out.read_text())
    assert set(payload["results"]) == {"conv", "revnet38"}
    for name, result in payload["results"].items():
        frontier = result["frontier"]
        budgets = [p["budget_bytes"] for p in frontier]
        assert budgets == sorted(budgets) and len(budgets) >= 3, name
        assert budgets[0] == result["minimum_peak_bytes"], name
        assert budgets[-1] == result["plain_peak_bytes"], name
        # measured exactly, and refined until within: never above its budget
        assert all(p["peak_bytes"] <= p["budget_bytes"] for p in frontier), name
        assert frontier[-1]["stored"] == frontier[-1]["switches"], name  # plain: all stored
        assert [r["k"] for r in result["checkpoint"]] == [1, 2], name
        assert all(r["peak_bytes"] > 0 and r["step_s"] > 0 for r in result["checkpoint"])
        assert payload["targets"][name]["peak_within_1.05_budget"] is True
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.fixture(scope="module")
def convert(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """One smoke run of bench_convert (every section, at quick size)."""
    out = tmp_path_factory.mktemp("bench_convert") / "convert.json"
    done = _run("bench_convert.py", ["--quick"], "--json", out)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text()), done.stdout


def test_convert_prints_every_table_and_writes_json(convert: tuple[dict[str, Any], str]) -> None:
    payload, stdout = convert
    assert {"gradients", "distance", "schedule", "memory", "parity", "environment"} <= set(payload)
    for title in (
        "Gradients",
        "Output at conversion",
        "schedule's path",
        "Forward-retained",
        "parity",
    ):
        assert title in stdout


def test_convert_record_makes_the_sites_tables(
    convert: tuple[dict[str, Any], str], tmp_path: Path
) -> None:
    record = tmp_path / "convert.json"
    record.write_text(json.dumps(convert[0]))
    _site_tables_render("bench_convert.py", record, tmp_path / "site")


def test_convert_gradients_with_saving_are_plain_autograd_s(
    convert: tuple[dict[str, Any], str],
) -> None:
    rows = convert[0]["gradients"]
    ours = [r for r in rows if r["method"] in ("momentum", "two_stream")]
    assert len(ours) >= 10
    assert all(r["error"] <= 1e-6 for r in ours), ours
    peer = [r for r in rows if r["method"].startswith("momentumnet")]
    assert len(peer) == 1 and (peer[0]["error"] is not None or peer[0]["note"])


def test_convert_memory_of_the_conversions_is_flat_in_depth(
    convert: tuple[dict[str, Any], str],
) -> None:
    rows = [r for r in convert[0]["memory"] if "retained_mib" in r]
    for network in ("resnet50", "ViT-S"):
        growth = {}
        flat = ("make_reversible momentum", "make_reversible two_stream alpha 0, no anchors")
        for variant in ("original", *flat):
            by_depth = [r for r in rows if r["network"] == network and r["variant"] == variant]
            assert len(by_depth) == 2, (network, variant)
            lo, hi = sorted(by_depth, key=lambda r: r["depth"])
            growth[variant] = hi["retained_mib"] - lo["retained_mib"]
        # the engine's bookkeeping may grow (written BatchNorm statistics), activations not
        assert growth["original"] > 0
        for variant in flat:
            assert 0 <= growth[variant] <= 0.1 * growth["original"], (network, variant, growth)
