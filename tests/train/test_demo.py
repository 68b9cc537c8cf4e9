"""``invertible-demo``: trains, reports accuracy, compares memory and time with and without
saving, says what its figures mean, and never oversubscribes the machine."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from invertible_train import demo

TINY = ["--model", "tiny", "--steps", "20", "--image-size", "8", "--threads", "1"]


def test_demo_trains_and_prints_the_memory_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main([*TINY, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "images/s" in out
    assert "memory saving" in out and "activations MiB" in out and "step time ms" in out
    assert "\non " in out and "\noff " in out


def test_revnet38_saves_memory_and_the_closing_lines_say_what_that_means_and_costs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--steps", "3", "--image-size", "8", "--batch-size", "8", "--threads", "1"]
    assert demo.main([*argv, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "\nactivations: what the forward pass keeps for the backward pass" in out
    assert "\nstep peak: the most memory one whole step" in out
    rows = {
        row.split()[0]: [float(v) for v in row.split()[1:]]
        for row in out.splitlines()
        if re.match(r"(on|off) +[0-9.]+ +[0-9.]+ +[0-9]+$", row)
    }
    (on_act, on_peak, on_ms), (off_act, off_peak, off_ms) = rows["on"], rows["off"]
    found = re.search(
        r"memory saving keeps ([0-9.]+)x fewer activation bytes and a ([0-9.]+)x lower step "
        r"peak, for ([0-9.]+)x the step time",
        out,
    )
    assert found is not None, out
    activations, peak, time = (float(g) for g in found.groups())
    # the table's figures are rounded to 0.01 MiB, the printed ratios come from exact bytes
    assert activations == pytest.approx(off_act / on_act, rel=0.05) and activations > 1
    assert peak == pytest.approx(off_peak / on_peak, rel=0.05) and peak > 1
    assert time > 0 and on_ms > 0 and off_ms > 0


def test_the_demo_prints_progress_lines_when_stdout_is_not_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert demo.main(TINY) == 0  # capsys: stdout is not a terminal
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if ": iteration " in line]
    assert [line.split("iteration ")[1].split(",")[0] for line in lines] == [
        f"{i:>2}/20" for i in range(2, 21, 2)
    ]
    assert all("loss" in line and "images/s" in line for line in lines)


def test_the_demo_run_twice_in_one_results_folder_reports_the_finished_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*TINY, "--quiet", "--results-dir", str(tmp_path)]
    assert demo.main(argv) == 0
    first = capsys.readouterr().out
    assert demo.main(argv) == 0
    second = capsys.readouterr().out
    assert "tiny-synthetic: finished earlier (iteration 20" in second
    accuracy = [line for line in first.splitlines() if line.startswith("test accuracy")]
    assert len(accuracy) == 1 and accuracy[0] in second.splitlines()  # the measured figures


def test_another_demo_in_the_same_results_folder_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo.main([*TINY, "--quiet", "--results-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    assert demo.main([*TINY, "--quiet", "--results-dir", str(tmp_path), "--lr", "0.01"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("invertible-demo: error: ") and len(err.splitlines()) == 1
    assert "optimizer.lr: 0.05 -> 0.01" in err


@pytest.mark.parametrize(
    ("cpus", "load", "threads"),
    [(2, 0.0, 2), (2, 0.3, 1), (2, 1.2, 1), (2, 3.7, 1), (16, 2.5, 13), (16, 0.0, 16),
     (4, None, 1)],
)  # fmt: skip
def test_threads_are_the_cores_the_load_leaves_idle(
    cpus: int, load: float | None, threads: int
) -> None:
    assert demo.choose_threads(cpus, load) == threads


def test_the_demo_says_how_many_threads_it_uses_and_uses_them(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (1.2, 1.0, 1.0))
    monkeypatch.setattr(demo.os, "sched_getaffinity", lambda pid: {0, 1})
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        argv = ["--model", "tiny", "--steps", "2", "--image-size", "8", "--quiet"]
        assert demo.main(argv) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    first = capsys.readouterr().out.splitlines()[0]
    assert first.endswith("CPU, 1 thread (2 cores, load average 1.20; --threads N to choose)")


@pytest.mark.parametrize("option", ["--steps", "--batch-size", "--image-size", "--lr", "--threads"])
def test_a_non_positive_value_is_a_usage_error_not_a_traceback(
    capsys: pytest.CaptureFixture[str], option: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        demo.main([option, "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: must be greater than 0, got 0" in err and "Traceback" not in err


def test_an_unknown_model_is_one_line_before_anything_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert demo.main(["--model", "nosuchnet", "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("invertible-demo: error: model.name must be one of")
    assert len(err.splitlines()) == 1
