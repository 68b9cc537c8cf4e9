"""Nothing the user owns is lost: names stay inside the results folder, ``--fresh`` deletes only
this harness's results, unusable checkpoints fall back to the previous one, a folder of
results is never started over silently, and every invalid experiment is one line, exit 2."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from invertible_train.checkpoint import load_checkpoint
from invertible_train.cli import main
from invertible_train.results import MARKER

from .conftest import FAST

Run = Callable[..., int]
#: FAST with the console output a user sees
LOUD = [arg for arg in FAST if arg != "--quiet"]


def records(results: Path, kind: str) -> list[dict]:
    lines = (results / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", [".", "..", "../elsewhere", "a/b", "/tmp/x", ""])
def test_a_name_that_is_not_one_folder_name_touches_nothing(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parent = tmp_path / "X"
    results = parent / "sub"
    (results / "sibling").mkdir(parents=True)
    (results / "sibling" / MARKER).write_text("results")
    (results / "sibling" / "metrics.jsonl").write_text("{}\n")
    (parent / "unrelated.txt").write_text("mine")
    before = tree(tmp_path)
    argv = ["tiny", "synthetic", *FAST, "--iterations", "2", "--fresh"]
    assert main([*argv, "--name", name, "--results-dir", str(results)]) == 2
    err = capsys.readouterr().err
    assert "is not a folder name" in err and len(err.splitlines()) == 1
    assert tree(tmp_path) == before


def test_fresh_deletes_what_the_harness_wrote_and_nothing_else(
    run_cli: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("tiny", "synthetic", "--iterations", "4") == 0
    results = tmp_path / "results" / "tiny-synthetic"
    assert set(json.loads((results / MARKER).read_text())["written"]) == {
        "checkpoints", "config.toml", "metrics.jsonl", "summary.json",
    }  # fmt: skip
    (results / "notes.txt").write_text("the user's, kept")
    (results / "figures").mkdir()
    (results / "figures" / "curve.png").write_bytes(b"the user's too")
    assert run_cli("tiny", "synthetic", "--iterations", "4", "--fresh") == 0
    assert (results / "notes.txt").read_text() == "the user's, kept"
    assert (results / "figures" / "curve.png").read_bytes() == b"the user's too"
    assert not records(results, "resumed")  # started over: what it wrote was deleted
    assert load_checkpoint(results / "checkpoints" / "last.pt")["iteration"] == 4

    # looks like results (config.toml, checkpoints/), but no marker: not ours to delete
    (results / MARKER).unlink()
    before = tree(results)
    capsys.readouterr()
    assert run_cli("tiny", "synthetic", "--iterations", "4", "--fresh") == 1
    assert "is not a results folder of invertible-train" in capsys.readouterr().err
    assert tree(results) == before


@pytest.mark.parametrize("fresh", [False, True], ids=["resume", "fresh"])
@pytest.mark.parametrize("name", [None, "mine"], ids=["default-name", "named"])
def test_a_folder_the_harness_did_not_make_is_refused_in_one_line_and_left_alone(
    run_cli: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str | None,
    fresh: bool,
) -> None:  # fmt: skip
    results = tmp_path / "results" / (name or "tiny-synthetic")
    results.mkdir(parents=True)
    (results / "notes.txt").write_text("years of work")
    before = tree(tmp_path)
    args = [*(["--name", name] if name else []), *(["--fresh"] if fresh else [])]
    assert run_cli("tiny", "synthetic", "--iterations", "4", *args) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("invertible-train: error: ")
    assert f"{results} is not a results folder of invertible-train" in err
    assert "notes.txt" in err and "--name" in err
    assert tree(tmp_path) == before and not (results / MARKER).exists()


def test_an_empty_folder_is_made_a_results_folder(run_cli: Run, tmp_path: Path) -> None:
    results = tmp_path / "results" / "mine"
    results.mkdir(parents=True)
    assert run_cli("tiny", "synthetic", "--iterations", "4", "--name", "mine") == 0
    assert (results / MARKER).is_file() and (results / "summary.json").is_file()


def test_fresh_does_not_follow_a_link_out_of_the_results_folder(
    run_cli: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("tiny", "synthetic", "--iterations", "4", "--name", "real") == 0
    real = tmp_path / "results" / "real"
    (tmp_path / "results" / "link").symlink_to(real, target_is_directory=True)
    assert run_cli("tiny", "synthetic", "--iterations", "4", "--name", "link", "--fresh") == 1
    assert "is not a results folder" in capsys.readouterr().err
    assert (real / "checkpoints" / "last.pt").exists()


def test_an_unusable_last_checkpoint_resumes_from_the_previous_one(
    run_cli: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = [
        "--set", "train.checkpoint_every=5", "--set", "train.log_every=5",
        "--set", "train.eval_every=10", "--set", "scheduler.name=constant",
    ]  # fmt: skip
    assert run_cli("tiny", "synthetic", "--iterations", "30", "--name", "whole", *common) == 0
    assert run_cli("tiny", "synthetic", "--iterations", "20", "--name", "run", *common) == 0
    run = tmp_path / "results" / "run"
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:-1000])  # a copy cut short
    capsys.readouterr()
    assert run_cli("tiny", "synthetic", "--iterations", "30", "--name", "run", *common) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("invertible-train: warning: checkpoint")
    assert "last.pt is corrupt" in err and "resuming from" in err and "(iteration 15)" in err
    assert "weights_only" not in err
    assert (run / "checkpoints" / "last.pt.unusable").exists()  # kept, not deleted
    assert [r["iteration"] for r in records(run, "resumed")] == [15]
    assert records(run, "resumed")[0]["checkpoint"] == "checkpoints/previous.pt"
    iterations = [r["iteration"] for r in records(run, "train")]
    assert iterations == list(range(5, 31, 5))  # one line per iteration: none twice
    whole = load_checkpoint(tmp_path / "results/whole/checkpoints/last.pt")["model"]
    resumed = load_checkpoint(last)["model"]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_folder_of_results_without_checkpoints_is_never_started_over_silently(
    run_cli: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("tiny", "synthetic", "--iterations", "10") == 0
    results = tmp_path / "results" / "tiny-synthetic"
    (results / "checkpoints" / "last.pt").unlink()
    (results / "checkpoints" / "previous.pt").unlink()
    before = tree(results)
    capsys.readouterr()
    assert run_cli("tiny", "synthetic", "--iterations", "10") == 1
    err = capsys.readouterr().err
    assert "holds results of an earlier run" in err and "best.pt" in err and "--fresh" in err
    assert tree(results) == before  # metrics, summary, best.pt, TensorBoard: untouched
    assert run_cli("tiny", "synthetic", "--iterations", "10", "--fresh") == 0
    assert not records(results, "resumed")


def test_every_unusable_last_checkpoint_is_kept_numbered(
    run_cli: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--set", "train.checkpoint_every=5", "--set", "scheduler.name=constant"]
    run = tmp_path / "results" / "tiny-synthetic"
    last = run / "checkpoints" / "last.pt"
    cut = []
    for iterations in (10, 20, 30):
        assert run_cli("tiny", "synthetic", "--iterations", str(iterations), *common) == 0
        if iterations < 30:
            cut.append(last.read_bytes()[:-1000])  # a copy cut short, twice
            last.write_bytes(cut[-1])
    assert (run / "checkpoints" / "last.pt.unusable").read_bytes() == cut[0]
    assert (run / "checkpoints" / "last.pt.unusable.1").read_bytes() == cut[1]
    err = capsys.readouterr().err
    assert "moved it to last.pt.unusable;" in err and "moved it to last.pt.unusable.1;" in err
    assert load_checkpoint(last)["iteration"] == 30


def test_rerunning_a_finished_run_reports_it_and_rewrites_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["tiny", "synthetic", *LOUD, "--iterations", "10", "--results-dir", str(tmp_path)]
    assert main([*argv, "--set", "train.tensorboard=true"]) == 0
    results = tmp_path / "tiny-synthetic"
    summary = json.loads((results / "summary.json").read_text())
    assert summary["images_per_second"] > 0 and summary["train_seconds"] > 0
    before = tree(results)
    capsys.readouterr()
    assert main([*argv, "--set", "train.tensorboard=true"]) == 0
    out = capsys.readouterr().out
    assert "tiny-synthetic: finished earlier (iteration 10" in out and "--fresh" in out
    assert f"test accuracy {summary['test_accuracy']:.4f}" in out  # its figures, reported
    assert tree(results) == before  # summary, logs, checkpoints, TensorBoard: as they were


def test_a_finished_run_without_its_summary_writes_it_with_the_measured_figures(
    run_cli: Run, tmp_path: Path
) -> None:
    """Killed after its last checkpoint, before its summary: the rerun writes the summary
    with the training time the checkpoint recorded, not null images/s and zero seconds."""
    assert run_cli("tiny", "synthetic", "--iterations", "10") == 0
    results = tmp_path / "results" / "tiny-synthetic"
    whole = json.loads((results / "summary.json").read_text())
    (results / "summary.json").unlink()
    assert run_cli("tiny", "synthetic", "--iterations", "10") == 0
    rewritten = json.loads((results / "summary.json").read_text())
    assert rewritten["iterations"] == 10 and rewritten["test_loss"] == whole["test_loss"]
    assert rewritten["train_seconds"] == pytest.approx(whole["train_seconds"], rel=0.05)
    assert rewritten["images_per_second"] == pytest.approx(whole["images_per_second"], rel=0.05)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ["--set", "model.options.bogus=1"],
            "model.options.bogus is not an option of tiny; its options: ",
        ),
        (["--set", "optimizer.lr=-0.1"], "optimizer.lr must be a positive number; got -0.1"),
        (["--lr", "0"], "optimizer.lr must be a positive number; got 0"),
        (
            ["--set", "model.options.num_classes=3"],
            "model.options.num_classes is set by the harness",
        ),
        (["--set", "scheduler.milestones=[40000]"], "scheduler.milestones[0] is 40000.0"),
        (["--set", "optimizer.name=lion"], "optimizer.name must be one of adam, adamw, sgd"),
        (["--set", "train.device=tpu"], "train.device must be auto, cpu, cuda or cuda:N"),
        (["--epochs", "0"], "--epochs must be at least 1; got 0"),
        (["--iterations", "-3"], "--iterations must be at least 1; got -3"),
        (["--batch-size", "0"], "--batch-size must be at least 1; got 0"),
        (["--threads", "0"], "--threads must be at least 1; got 0"),
    ],
)
def test_an_invalid_experiment_is_one_line_and_exit_2(
    run_cli: Run, capsys: pytest.CaptureFixture[str], args: list[str], says: str
) -> None:
    length = [] if {"--epochs", "--iterations"} & set(args) else ["--iterations", "2"]
    assert run_cli("tiny", "synthetic", *length, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("invertible-train: error: ") and says in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(("model", "dataset"), [("nosuchnet", "synthetic"), ("tiny", "mnist")])
def test_print_config_of_an_unknown_model_or_dataset_fails(
    capsys: pytest.CaptureFixture[str], model: str, dataset: str
) -> None:
    assert main([model, dataset, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "must be one of" in err and len(err.splitlines()) == 1


def test_a_results_dir_with_a_file_in_its_path_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("not a folder")
    argv = ["tiny", "synthetic", *FAST, "--iterations", "2"]
    assert main([*argv, "--results-dir", str(tmp_path / "file" / "sub")]) == 2
    err = capsys.readouterr().err
    assert "--results-dir: cannot write the results folder" in err and "Not a directory" in err
    assert len(err.splitlines()) == 1 and (tmp_path / "file").read_text() == "not a folder"


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere"
)
def test_a_results_dir_without_permission_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        argv = ["tiny", "synthetic", *FAST, "--iterations", "2", "--results-dir", str(locked)]
        assert main(argv) == 2
    finally:
        locked.chmod(0o755)
    err = capsys.readouterr().err
    assert "--results-dir: cannot write" in err and "Permission denied" in err
