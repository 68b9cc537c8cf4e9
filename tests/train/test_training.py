"""End-to-end runs of ``invertible-train`` on data the tests make themselves."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from invertible_train.checkpoint import load_checkpoint
from invertible_train.cli import evaluate_main, main
from invertible_train.config import ConfigError, apply_values, load_experiment
from invertible_train.model import build_model
from invertible_train.strategy import SingleProcess, select_device
from invertible_train.trainer import Trainer

from .conftest import FAST
from .datasets import trust_written_cifar, write_cifar10, write_image_folder

Run = Callable[..., int]


def records(results: Path, kind: str) -> list[dict]:
    lines = (results / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_synthetic_run_writes_every_result(run_cli: Run, tmp_path: Path) -> None:
    status = run_cli(
        "tiny", "synthetic", "--iterations", "40",
        "--set", "train.log_every=10", "--set", "train.eval_every=20",
        "--set", "train.checkpoint_every=15", "--set", "train.tensorboard=true",
        "--set", "train.measure_memory=true",
    )  # fmt: skip
    assert status == 0
    results = tmp_path / "results" / "tiny-synthetic"
    assert load_experiment(config_file=results / "config.toml").train.iterations == 40
    assert [r["iteration"] for r in records(results, "train")] == [10, 20, 30, 40]
    assert [r["iteration"] for r in records(results, "eval")] == [20, 40]
    train = records(results, "train")[-1]
    assert {"loss", "accuracy", "lr", "images_per_second", "epoch"} <= set(train)
    summary = json.loads((results / "summary.json").read_text())
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["test_accuracy"] == records(results, "eval")[-1]["test_accuracy"]
    assert summary["test_loss"] > 0 and summary["parameters"] > 0
    assert summary["activation_bytes"] > 0 and summary["step_peak_bytes"] > 0
    assert summary["images_per_second"] > 0 and summary["iterations"] == 40
    assert set(summary["versions"]) >= {
        "invertible-core", "invertible-models", "invertible-train", "torch"
    }  # fmt: skip
    assert load_checkpoint(results / "checkpoints" / "last.pt")["iteration"] == 40
    assert (results / "checkpoints" / "best.pt").exists()
    assert list((results / "tensorboard").glob("events.out.tfevents.*"))


def test_synthetic_data_is_learnable(run_cli: Run, tmp_path: Path) -> None:
    assert run_cli("tiny", "synthetic", "--iterations", "150", "--lr", "0.05") == 0
    summary = json.loads((tmp_path / "results/tiny-synthetic/summary.json").read_text())
    assert summary["test_accuracy"] > 0.5  # chance is 0.1


def test_interrupted_run_resumes_to_the_same_weights_in_process(
    run_cli: Run, tmp_path: Path
) -> None:
    # a schedule that does not depend on the length, which this test changes
    common = ["--set", "train.checkpoint_every=5", "--set", "train.log_every=5",
              "--set", "scheduler.name=constant"]  # fmt: skip
    assert run_cli("tiny", "synthetic", "--iterations", "30", "--name", "whole", *common) == 0
    # 17 iterations is mid-epoch (16 batches per epoch); extending the length is allowed
    assert run_cli("tiny", "synthetic", "--iterations", "17", "--name", "split", *common) == 0
    split = tmp_path / "results" / "split"
    with (split / "metrics.jsonl").open("a") as handle:  # logged after the checkpoint, then killed
        handle.write(json.dumps({"kind": "train", "iteration": 25}) + "\n")
    assert run_cli("tiny", "synthetic", "--iterations", "30", "--name", "split", *common) == 0
    whole = load_checkpoint(tmp_path / "results/whole/checkpoints/last.pt")["model"]
    resumed = load_checkpoint(split / "checkpoints/last.pt")["model"]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    iterations = [r["iteration"] for r in records(split, "train")]
    assert iterations == sorted(set(iterations)) and iterations[-1] == 30
    assert [r["iteration"] for r in records(split, "resumed")] == [17]


def test_rerunning_a_finished_run_trains_no_further(run_cli: Run, tmp_path: Path) -> None:
    assert run_cli("tiny", "synthetic", "--iterations", "10") == 0
    results = tmp_path / "results" / "tiny-synthetic"
    before = load_checkpoint(results / "checkpoints" / "last.pt")["model"]
    assert run_cli("tiny", "synthetic", "--iterations", "10") == 0
    after = load_checkpoint(results / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((results / "summary.json").read_text())["iterations"] == 10


def test_fresh_removes_earlier_results(run_cli: Run, tmp_path: Path) -> None:
    assert run_cli("tiny", "synthetic", "--iterations", "10", "--set", "train.log_every=1") == 0
    results = tmp_path / "results" / "tiny-synthetic"
    (results / "mine.txt").write_text("not the harness's")
    assert run_cli("tiny", "synthetic", "--iterations", "4", "--fresh") == 0
    assert (results / "mine.txt").exists()  # only what the harness wrote is removed
    assert not records(results, "resumed")
    assert [r["iteration"] for r in records(results, "train")] == [1, 2, 3, 4]


def test_fresh_refuses_to_delete_a_folder_that_is_not_results(
    run_cli: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    precious = tmp_path / "results" / "tiny-synthetic"
    precious.mkdir(parents=True)
    (precious / "thesis.tex").write_text("years of work")
    assert run_cli("tiny", "synthetic", "--iterations", "5", "--fresh") == 1
    assert (precious / "thesis.tex").exists()
    assert "is not a results folder of invertible-train" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    run_cli: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # tiny_nan returns NaN logits from its sixth training step on
    status = run_cli(
        "tiny_nan", "synthetic", "--iterations", "20", "--set", "train.checkpoint_every=2"
    )
    assert status == 3
    err = capsys.readouterr().err
    assert "non-finite training loss at iteration 6" in err and "last.pt" in err
    results = tmp_path / "results" / "tiny_nan-synthetic"
    state = load_checkpoint(results / "checkpoints" / "last.pt")
    assert state["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert records(results, "stopped")
    assert not (results / "summary.json").exists()


def test_a_huge_learning_rate_stops_cleanly(
    run_cli: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("tiny", "synthetic", "--iterations", "50", "--set", "optimizer.lr=1e30") == 3
    assert "non-finite training loss" in capsys.readouterr().err


def test_corrupt_checkpoints_give_a_clear_error(
    run_cli: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("tiny", "synthetic", "--iterations", "5") == 0
    checkpoints = tmp_path / "results" / "tiny-synthetic" / "checkpoints"
    for name in ("last.pt", "previous.pt"):
        path = checkpoints / name
        path.write_bytes(path.read_bytes()[:100])
    assert run_cli("tiny", "synthetic", "--iterations", "10") == 1
    err = capsys.readouterr().err
    assert str(checkpoints / "last.pt") in err and str(checkpoints / "previous.pt") in err
    assert "corrupt" in err and "--fresh" in err
    assert "Traceback" not in err and "weights_only" not in err and len(err.splitlines()) == 1


def test_resuming_a_different_experiment_is_refused(
    run_cli: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("tiny", "synthetic", "--iterations", "5") == 0
    assert run_cli("tiny", "synthetic", "--iterations", "10", "--lr", "0.01") == 1
    assert "optimizer.lr: 0.1 -> 0.01" in capsys.readouterr().err


def test_incompatible_checkpoint_contents_are_reported(
    run_cli: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("tiny", "synthetic", "--iterations", "5") == 0
    last = tmp_path / "results" / "tiny-synthetic" / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["model"].pop("head.weight")
    torch.save(state, last)
    assert run_cli("tiny", "synthetic", "--iterations", "10") == 1
    assert "does not fit this experiment" in capsys.readouterr().err


def test_cifar10_folder_trains_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run
) -> None:
    write_cifar10(tmp_path / "data", per_batch=20, test_size=20)
    trust_written_cifar(monkeypatch, tmp_path / "data")
    status = run_cli("tiny", "cifar10", "--data-dir", str(tmp_path / "data"), "--iterations", "8")
    assert status == 0
    summary = json.loads((tmp_path / "results/tiny-cifar10/summary.json").read_text())
    assert summary["dataset"] == "cifar10" and summary["iterations"] == 8


def test_image_folder_trains_end_to_end_and_evaluates(
    tmp_path: Path, run_cli: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    write_image_folder(tmp_path / "pets", per_class=8)
    status = run_cli(
        "tiny", f"imagefolder:{tmp_path / 'pets'}", "--iterations", "12", "--batch-size", "8"
    )
    assert status == 0
    results = tmp_path / "results" / "tiny-imagefolder-pets"
    summary = json.loads((results / "summary.json").read_text())
    capsys.readouterr()
    assert evaluate_main([str(results), "--checkpoint", "last", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert evaluated["iteration"] == 12


def test_evaluate_command_reports_best_and_errors(
    run_cli: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("tiny", "synthetic", "--iterations", "10", "--set", "train.eval_every=10") == 0
    results = tmp_path / "results" / "tiny-synthetic"
    capsys.readouterr()
    assert evaluate_main([str(results), "--batch-size", "32", "--no-cuda"]) == 0
    assert "best.pt (iteration 10): test accuracy" in capsys.readouterr().out
    assert evaluate_main([str(tmp_path / "nowhere")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert evaluate_main([str(results), "--batch-size", "0"]) == 2
    assert "data.eval_batch_size must be a positive number; got 0" in capsys.readouterr().err
    (results / "checkpoints" / "best.pt").unlink()
    assert evaluate_main([str(results), "--data-dir", str(tmp_path)]) == 0
    assert "last.pt" in capsys.readouterr().out


def test_evaluate_says_which_model_it_evaluates(
    run_cli: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    every = ["--set", "train.eval_every=5", "--set", "train.checkpoint_every=5"]
    assert run_cli("tiny", "synthetic", "--iterations", "10", *every) == 0
    results = tmp_path / "results" / "tiny-synthetic"
    capsys.readouterr()
    assert evaluate_main([str(results)]) == 0
    said = capsys.readouterr().out.splitlines()[0]
    assert said.startswith(f"evaluating {results / 'checkpoints' / 'best.pt'}: the model with ")
    assert "best test accuracy" in said and "--checkpoint final" in said
    assert evaluate_main([str(results), "--checkpoint", "previous"]) == 0
    assert "the checkpoint before last.pt (iteration 5 of 10)" in capsys.readouterr().out


def test_evaluate_final_is_the_model_the_summary_describes(
    run_cli: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("tiny", "synthetic", "--iterations", "10", "--set", "train.eval_every=5") == 0
    results = tmp_path / "results" / "tiny-synthetic"
    summary = json.loads((results / "summary.json").read_text())
    capsys.readouterr()
    assert evaluate_main([str(results), "--checkpoint", "final", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["which"] == "final" and evaluated["iteration"] == summary["iterations"]
    assert evaluated["test_accuracy"] == summary["test_accuracy"]
    assert evaluated["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-6)

    # a summary of another iteration than last.pt's, or none: no final model to evaluate
    (results / "summary.json").write_text(json.dumps({**summary, "iterations": 7}))
    assert evaluate_main([str(results), "--checkpoint", "final"]) == 1
    assert "describes the model of iteration 7, but" in capsys.readouterr().err
    (results / "summary.json").unlink()
    assert evaluate_main([str(results), "--checkpoint", "final"]) == 1
    assert "has no summary.json" in capsys.readouterr().err


def test_a_resumed_run_says_so_with_the_iteration_and_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loud = [arg for arg in FAST if arg != "--quiet"]
    argv = ["tiny", "synthetic", *loud, "--set", "train.checkpoint_every=5",
            "--set", "scheduler.name=constant", "--results-dir", str(tmp_path)]  # fmt: skip
    assert main([*argv, "--iterations", "17"]) == 0
    assert "resuming" not in capsys.readouterr().out
    assert main([*argv, "--iterations", "30"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        "tiny-synthetic: resuming from checkpoints/last.pt at iteration 17 of 30\n"
    )
    assert main([*argv, "--iterations", "40", "--quiet"]) == 0
    assert capsys.readouterr().out == ""


def test_epochs_set_the_length_in_whole_epochs(run_cli: Run, tmp_path: Path) -> None:
    assert run_cli("tiny", "synthetic", "--epochs", "2") == 0
    summary = json.loads((tmp_path / "results/tiny-synthetic/summary.json").read_text())
    assert summary["iterations"] == 32 and summary["epochs"] == 2.0  # 256 / 16 = 16 per epoch


def test_bf16_autocast_trains_on_the_cpu(run_cli: Run, tmp_path: Path) -> None:
    assert run_cli("tiny", "synthetic", "--iterations", "6", "--amp", "bf16", "--set",
                   "train.measure_memory=true") == 0  # fmt: skip
    summary = json.loads((tmp_path / "results/tiny-synthetic/summary.json").read_text())
    assert summary["amp"] == "bf16" and summary["test_loss"] > 0


def test_bad_experiment_exits_2_with_the_message(
    run_cli: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("tiny", "synthetic", "--set", "train.iteratons=5") == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.iteratons'" in err and "iterations" in err
    assert run_cli("nosuchnet", "synthetic", "--iterations", "2") == 2
    assert "model.name must be one of" in capsys.readouterr().err
    assert run_cli("tiny", "mnist", "--iterations", "2") == 2
    assert "data.dataset must be one of cifar10, cifar100, digits" in capsys.readouterr().err


def test_print_config_shows_the_resolved_experiment(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["revnet38", "cifar100", "--print-config", "--lr", "0.2", "--workers", "3",
                 "--seed", "4", "--data-dir", "/d", "--set", "data.batch_size=50"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    for line in ('name = "revnet38"', "lr = 0.2", "workers = 3", "seed = 4", 'data_dir = "/d"',
                 "batch_size = 50", 'dataset = "cifar100"'):  # fmt: skip
        assert line in out


def test_every_option_has_help_text() -> None:
    from invertible_train.cli import build_eval_parser, build_parser

    for parser in (build_parser(), build_eval_parser()):
        for action in parser._actions:
            assert action.help, action.dest


def test_python_dash_m_runs_the_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "invertible_train", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--fresh" in out.stdout and "--no-cuda" in out.stdout


def test_device_selection() -> None:
    assert select_device("auto", no_cuda=True).type == "cpu"
    assert select_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert select_device("auto").type == "cpu"
        with pytest.raises(ConfigError, match="CUDA is not available"):
            select_device("cuda")


def test_trainer_checks_batch_against_processes_and_data() -> None:
    cfg = apply_values(
        load_experiment("tiny"),
        {"data.dataset": "synthetic", "data.synthetic_train_size": 10, "data.image_size": 8,
         "data.synthetic_test_size": 10, "data.batch_size": 16},
    )  # fmt: skip
    with pytest.raises(ConfigError, match="exceeds the 10 training images"):
        Trainer(cfg, "unused")

    class ThreeProcesses(SingleProcess):
        world_size = 3

    with pytest.raises(ConfigError, match="not divisible by 3 processes"):
        Trainer(cfg, "unused", distribution=ThreeProcesses())


def test_build_model_passes_options_through() -> None:
    cfg = apply_values(load_experiment("tiny"), {"model.options": {"width": 4}})
    model = build_model(cfg.model, num_classes=3)
    assert model.head.weight.shape == (3, 4)


def test_a_checkpoint_write_cut_short_by_a_kill_is_cleaned_up(run_cli: Run, tmp_path: Path) -> None:
    assert run_cli("tiny", "synthetic", "--iterations", "5") == 0
    checkpoints = tmp_path / "results" / "tiny-synthetic" / "checkpoints"
    (checkpoints / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    assert run_cli("tiny", "synthetic", "--iterations", "8") == 0
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.pt", "last.pt", "previous.pt"]
    assert load_checkpoint(checkpoints / "last.pt")["iteration"] == 8


def test_a_run_killed_before_its_first_checkpoint_starts_over(run_cli: Run, tmp_path: Path) -> None:
    common = ["--iterations", "5", "--set", "train.log_every=1", "--set", "train.eval_every=5"]
    assert run_cli("tiny", "synthetic", *common) == 0
    results = tmp_path / "results" / "tiny-synthetic"
    # what a run killed at iteration 3, before its first checkpoint and evaluation, leaves
    for path in (results / "checkpoints").iterdir():
        path.unlink()
    (results / "summary.json").unlink()
    kept = [r for r in records(results, "train") if r["iteration"] <= 3]
    (results / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    assert run_cli("tiny", "synthetic", *common) == 0
    assert [r["iteration"] for r in records(results, "train")] == [1, 2, 3, 4, 5]


def test_resuming_with_another_number_of_processes_is_refused(
    run_cli: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("tiny", "synthetic", "--iterations", "5") == 0
    last = tmp_path / "results" / "tiny-synthetic" / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["sampler"]["num_replicas"] = 2
    torch.save(state, last)
    assert run_cli("tiny", "synthetic", "--iterations", "8") == 1
    assert "written by 2 processes" in capsys.readouterr().err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_shows_loss_accuracy_and_throughput_on_a_terminal(
    run_cli: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert run_cli("tiny", "synthetic", "--iterations", "20", "--set", "train.log_every=10",
                   fast=False) == 0  # fmt: skip
    shown = terminal.getvalue()
    assert "20/20" in shown and "loss=" in shown and "acc=" in shown and "img_s=" in shown


def test_progress_bar_is_silent_when_quiet_or_not_a_terminal(
    run_cli: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert run_cli("tiny", "synthetic", "--iterations", "5") == 0  # FAST includes --quiet
    assert terminal.getvalue() == ""
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    assert run_cli("tiny", "synthetic", "--iterations", "5", "--fresh", fast=False) == 0
    assert pipe.getvalue() == ""


def test_loader_workers_do_not_change_what_is_learned(run_cli: Run, tmp_path: Path) -> None:
    assert run_cli("tiny", "synthetic", "--iterations", "20", "--name", "main") == 0
    assert run_cli("tiny", "synthetic", "--iterations", "20", "--name", "workers",
                   "--workers", "2") == 0  # fmt: skip
    a = load_checkpoint(tmp_path / "results/main/checkpoints/last.pt")["model"]
    b = load_checkpoint(tmp_path / "results/workers/checkpoints/last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
