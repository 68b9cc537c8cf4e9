"""Distributed training: the torchrun environment, SyncBatchNorm, a trainer given a job.

What one process can check runs in-process. The gradient test spawns two ranks
(``torch.multiprocessing``, FileStore rendezvous, gloo) that train through a
:class:`Trainer` given the job's :class:`DistributedContext`; the job tests start
``torchrun`` itself, the README's command line, as a subprocess with two CPU processes.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import signal
import socket
import subprocess
import sys
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from invertible_core import AdditiveCoupling, ReversibleSequence
from invertible_models import create_model
from invertible_train.checkpoint import load_checkpoint
from invertible_train.cli import evaluate_main
from invertible_train.config import ConfigError, ExperimentConfig, apply_values, load_experiment
from invertible_train.data import ImageData, InMemoryImages, channel_stats, synthetic_images
from invertible_train.distributed import process_group, torchrun_ranks
from invertible_train.results import ResultsDirError
from invertible_train.strategy import Distribution, SingleProcess
from invertible_train.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm
from invertible_train.trainer import Trainer

from .conftest import FAST
from .processes import kill_job, start_and_wait_for_checkpoint

WORLD_SIZE = 2
#: Bound on ``max|ddp - single| / max|single|`` per tensor. The two runs sum BatchNorm
#: statistics in different orders, and the reversible stages round activations to a
#: fixed-point grid (2**-16), where a last-bit difference can move a value by one grid step;
#: measured: at most 5e-5 (revnet38, 8x8 images, batch 8). ABS absorbs tensors whose exact
#: gradient is zero (float noise of ~1e-9).
REL, ABS = 2e-4, 1e-8


def assert_close_to_scale(got: torch.Tensor, expected: torch.Tensor, what: str) -> float:
    """Check ``max|got - expected| <= REL * max|expected| + ABS``; returns the ratio."""
    difference = float((got - expected).abs().max())
    scale = float(expected.abs().max())
    assert difference <= REL * scale + ABS, f"{what}: {difference:.2e} at scale {scale:.2e}"
    return difference / scale if scale > ABS * 100 else 0.0


# -- in one process ------------------------------------------------------------------------


def test_torchrun_is_recognised_by_its_environment() -> None:
    assert torchrun_ranks({}) is None
    assert torchrun_ranks({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    with pytest.raises(ConfigError, match="LOCAL_RANK is not"):
        torchrun_ranks({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="must be integers"):
        torchrun_ranks({"RANK": "zero", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(ConfigError, match="do not fit"):
        torchrun_ranks({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_without_torchrun_there_is_no_process_group() -> None:
    with process_group(torch.device("cpu"), env={}) as job:
        assert job is None
        assert not dist.is_initialized()


def test_nccl_on_the_cpu_is_refused_before_joining() -> None:
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="nccl needs CUDA"), process_group(cpu, "nccl", env=env):
        pass
    with (
        pytest.raises(ConfigError, match="unknown backend 'mpi'"),
        process_group(cpu, "mpi", env=env),
    ):
        pass
    assert not dist.is_initialized()


def test_the_process_group_is_destroyed_when_the_run_fails(tmp_path: Path) -> None:
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    store = f"file://{tmp_path / 'store'}"
    with pytest.raises(KeyError), process_group(torch.device("cpu"), init_method=store, env=env):
        assert dist.is_initialized()
        raise KeyError("failed mid-run")
    assert not dist.is_initialized()


def test_sync_batchnorm_conversion_keeps_parameters_buffers_and_keys() -> None:
    model = create_model("revnet38", num_classes=10)
    params, buffers = list(model.parameters()), list(model.buffers())
    keys = list(model.state_dict())
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model.eval()
    converted = convert_sync_batchnorm(model)
    assert sum(isinstance(m, SyncBatchNorm) for m in converted.modules()) == batchnorms
    assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    assert all(a is b for a, b in zip(converted.parameters(), params, strict=True))
    assert all(a is b for a, b in zip(converted.buffers(), buffers, strict=True))
    assert list(converted.state_dict()) == keys
    assert not any(m.training for m in converted.modules())


def test_sync_batchnorm_in_one_process_is_batchnorm() -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4, momentum=None))
    synced = convert_sync_batchnorm(copy.deepcopy(plain))
    x = torch.randn(6, 3, 5, 5)
    for mode in (True, False):
        plain.train(mode)
        synced.train(mode)
        torch.testing.assert_close(synced(x), plain(x))
        for a, b in zip(synced.buffers(), plain.buffers(), strict=True):
            torch.testing.assert_close(a, b)


def test_sync_batchnorm_in_a_reversible_block_counts_each_batch_once() -> None:
    # the memory-saving recompute runs the layer again; its running statistics must move
    # once per step, to the values plain autograd gives
    torch.manual_seed(0)
    residual = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2))
    saving = ReversibleSequence(AdditiveCoupling(convert_sync_batchnorm(residual)))
    plain = copy.deepcopy(saving)
    plain.memory_saving = False
    x = torch.randn(6, 4, 3, 3)
    for seq in (saving, plain):
        seq(x.clone().requires_grad_()).square().sum().backward()
    for a, b in zip(saving.buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    layer = saving[0].Fm[1]
    assert isinstance(layer, SyncBatchNorm) and int(layer.num_batches_tracked) == 1


def test_both_strategies_offer_what_a_trainer_asks_for(tmp_path: Path) -> None:
    assert isinstance(SingleProcess(), Distribution)
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    with process_group(torch.device("cpu"), init_method=f"file://{tmp_path / 's'}", env=env) as job:
        assert isinstance(job, Distribution)


def tiny_experiment(iterations: int, sync_bn: bool = False) -> ExperimentConfig:
    return apply_values(
        load_experiment("tiny"),
        {
            "data.dataset": "synthetic",
            "data.image_size": 8,
            "data.crop_padding": 1,
            "data.synthetic_train_size": 128,
            "data.synthetic_test_size": 32,
            "data.batch_size": 16,
            "train.iterations": iterations,
            "train.epochs": 0,
            "train.log_every": 5,
            "train.eval_every": 10,
            "train.checkpoint_every": 6,
            "train.tensorboard": False,
            "train.measure_memory": False,
            "train.sync_bn": sync_bn,
            # a schedule independent of the length: the runs below resume with another one
            "scheduler.name": "constant",
        },
    )


def test_a_one_process_job_trains_like_a_plain_run(tmp_path: Path) -> None:
    """DDP, SyncBatchNorm, the reductions and the rank-0 resume change nothing for one rank."""
    plain = Trainer(tiny_experiment(20, sync_bn=True), tmp_path / "plain", quiet=True)
    expected = plain.fit()
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    store = f"file://{tmp_path / 'store'}"
    with process_group(torch.device("cpu"), init_method=store, env=env) as job:
        assert job is not None and job.backend == "gloo" and job.is_main_process
        for iterations in (12, 20):  # the second resumes from the first's checkpoint
            trainer = Trainer(
                tiny_experiment(iterations, sync_bn=True), tmp_path / "job", quiet=True,
                distribution=job,
            )  # fmt: skip
            summary = trainer.fit()
    assert not dist.is_initialized()  # destroyed on leaving the block
    assert summary["test_accuracy"] == expected["test_accuracy"]
    assert summary["test_loss"] == expected["test_loss"]
    assert [r["iteration"] for r in records(tmp_path / "job", "resumed")] == [12]
    ours = load_checkpoint(tmp_path / "job" / "checkpoints" / "last.pt")
    theirs = load_checkpoint(tmp_path / "plain" / "checkpoints" / "last.pt")
    for name, tensor in theirs["model"].items():
        assert torch.equal(ours["model"][name], tensor), name


def test_a_run_resumes_only_with_the_sync_bn_it_was_trained_with(tmp_path: Path) -> None:
    """``train.sync_bn`` is a config key: the resume check covers it like any other."""
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    for resume_with_sync_bn, trains in ((True, True), (False, False)):
        run = tmp_path / f"job-{resume_with_sync_bn}"
        with process_group(torch.device("cpu"), init_method=f"file://{run}-s1", env=env) as job:
            assert job is not None
            Trainer(tiny_experiment(6, sync_bn=True), run, quiet=True, distribution=job).fit()
        with process_group(torch.device("cpu"), init_method=f"file://{run}-s2", env=env) as job:
            assert job is not None
            again = Trainer(
                tiny_experiment(12, sync_bn=resume_with_sync_bn), run, quiet=True,
                distribution=job,
            )  # fmt: skip
            if trains:
                assert again.fit()["iterations"] == 12
            else:
                with pytest.raises(ResultsDirError, match="train.sync_bn: True -> False"):
                    again.fit()


def test_leaving_the_job_frees_ddp_before_the_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DDP's reducer must not be the process group's last holder (gloo can deadlock then).

    The trainer outlives the block here, as a trainer held by the caller or by a traceback
    would; leaving the block closes it, so its DDP wrapper is gone before the group is
    destroyed, and it refuses to train on without the other ranks.
    """
    alive_at_destroy: list[bool] = []
    destroy = dist.destroy_process_group

    def watching_destroy(*args: object, **kwargs: object) -> None:
        alive_at_destroy.append(wrapper() is not None)
        destroy(*args, **kwargs)

    monkeypatch.setattr(dist, "destroy_process_group", watching_destroy)
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    with process_group(torch.device("cpu"), init_method=f"file://{tmp_path / 's'}", env=env) as job:
        assert job is not None
        trainer = Trainer(tiny_experiment(2), tmp_path / "job", quiet=True, distribution=job)
        wrapper = weakref.ref(trainer.wrapped_model)
        assert isinstance(trainer.wrapped_model, nn.parallel.DistributedDataParallel)
        assert trainer.wrapped_model.module is trainer.model  # the bare net, as DDP names it
        trainer.fit()
    assert alive_at_destroy == [False]
    assert trainer.closed and trainer.wrapped_model is trainer.model
    images, labels = next(iter(trainer.loader))
    with pytest.raises(RuntimeError, match="closed .its process group ended"):
        trainer.train_step(images, labels)


def test_the_cli_joins_a_torchrun_job_and_leaves_it(
    run_cli: Callable[..., int], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The torchrun variables alone make ``invertible-train`` a rank (here of a 1-rank job)."""
    for name, value in {
        "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    assert run_cli("tiny", "synthetic", "--iterations", "5", "--sync-bn", "--fresh") == 0
    assert not dist.is_initialized()
    summary = json.loads((tmp_path / "results" / "tiny-synthetic" / "summary.json").read_text())
    assert summary["iterations"] == 5 and summary["world_size"] == 1


# -- gradients equal one process on the full batch -------------------------------------------


def revnet_experiment() -> ExperimentConfig:
    """revnet38 on 8x8 images, memory saving on, SyncBatchNorm, no augmentation (the ranks'
    views match)."""
    return apply_values(
        load_experiment("revnet38"),
        {
            "data.dataset": "synthetic",
            "data.image_size": 8,
            "data.synthetic_train_size": 32,
            "data.synthetic_test_size": 8,
            "data.batch_size": 8,
            "data.augment": False,
            "model.memory_saving": True,
            "train.tensorboard": False,
            "train.sync_bn": True,
        },
    )


def revnet_data(size: int = 8) -> ImageData:
    train = InMemoryImages(*synthetic_images(32, 10, size, seed=1))
    test = InMemoryImages(*synthetic_images(8, 10, size, seed=2))
    mean, std = channel_stats(train)
    return ImageData(train=train, test=test, num_classes=10, mean=mean, std=std)


def one_step(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Gradients, updated weights and BatchNorm statistics after one training step."""
    trainer.wrapped_model.train()
    trainer.train_step(images, labels)
    return {
        "grads": {n: p.grad.clone() for n, p in trainer.model.named_parameters()},
        "state": {n: t.clone() for n, t in trainer.model.state_dict().items()},
        "sync_layers": sum(isinstance(m, SyncBatchNorm) for m in trainer.model.modules()),
    }


def _rank_step(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    env = {"RANK": str(rank), "WORLD_SIZE": str(WORLD_SIZE), "LOCAL_RANK": str(rank)}
    with process_group(torch.device("cpu"), "gloo", init_method=f"file://{store}", env=env) as ctx:
        assert ctx is not None
        trainer = Trainer(
            revnet_experiment(), Path(out) / "results", data=revnet_data(), distribution=ctx
        )
        images, labels = revnet_data().train.__getitems__(range(8))
        share = slice(rank * 4, rank * 4 + 4)  # this rank's half of the global batch
        torch.save(one_step(trainer, images[share], labels[share]), Path(out) / f"rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_syncbn_gradients_equal_one_process_on_the_full_batch(
    tmp_path: Path, spawn_ranks: Callable[..., None]
) -> None:
    spawn_ranks(_rank_step, (str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD_SIZE)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]

    single = Trainer(revnet_experiment(), tmp_path / "single", data=revnet_data())
    images, labels = revnet_data().train.__getitems__(range(8))
    expected = one_step(single, images, labels)

    assert ranks[0]["sync_layers"] > 0  # every BatchNorm became a SyncBatchNorm
    worst = {"grads": 0.0, "state": 0.0}
    for kind in worst:
        for name, value in expected[kind].items():
            if not value.is_floating_point():  # num_batches_tracked
                assert all(torch.equal(rank[kind][name], value) for rank in ranks), name
                continue
            for rank in ranks:
                ratio = assert_close_to_scale(rank[kind][name], value, f"{kind} {name}")
                worst[kind] = max(worst[kind], ratio)
    print(
        f"largest relative difference: gradients {worst['grads']:.1e}, state {worst['state']:.1e}"
    )


# -- torchrun, as users run it -------------------------------------------------------------

LAUNCH = Path(__file__).with_name("launch.py")  # invertible-train with the tiny test models
#: seconds for any one torchrun: a hang guard (a hung collective must fail, not stall). Alone
#: a job here takes about 12 s; in a full CI run on a slow 2-core machine one job had not
#: written its first checkpoint after 120 s, so the guard leaves room for such machines.
TIMEOUT = 300


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it), for torchrun's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun(*args: str) -> list[str]:
    """``torchrun --nproc_per_node 2 ARGS`` on a free port, through this interpreter."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD_SIZE),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args,
    ]  # fmt: skip


def environment() -> dict[str, str]:
    # one thread per process: two processes share two cores with whatever else runs
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def records(results: Path, kind: str) -> list[dict]:
    lines = (results / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(scope="module")
def revnet_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The results folder of a short revnet38 job: torchrun, 2 CPU processes, --sync-bn."""
    results = tmp_path_factory.mktemp("job") / "results"
    run = subprocess.run(
        torchrun(
            "-m", "invertible_train", "revnet38", "synthetic", *FAST, "--no-cuda", "--sync-bn",
            "--iterations", "12",
            "--set", "train.log_every=4",
            "--set", "train.eval_every=6",
            "--set", "train.checkpoint_every=5",
            "--results-dir", str(results),
        ),
        env=environment(), capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    return results


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_job_writes_one_set_of_results_from_rank0(revnet_job: Path) -> None:
    written = sorted(str(p.relative_to(revnet_job)) for p in revnet_job.rglob("*"))
    assert written == [
        "revnet38-synthetic",
        "revnet38-synthetic/.invertible-train",
        "revnet38-synthetic/checkpoints",
        "revnet38-synthetic/checkpoints/best.pt",
        "revnet38-synthetic/checkpoints/last.pt",
        "revnet38-synthetic/checkpoints/previous.pt",
        "revnet38-synthetic/config.toml",
        "revnet38-synthetic/metrics.jsonl",
        "revnet38-synthetic/summary.json",
    ]
    results = revnet_job / "revnet38-synthetic"
    # each record once: one process wrote them
    assert [r["iteration"] for r in records(results, "train")] == [4, 8, 12]
    assert [r["iteration"] for r in records(results, "eval")] == [6, 12]
    summary = json.loads((results / "summary.json").read_text())
    assert summary["world_size"] == WORLD_SIZE and summary["iterations"] == 12
    assert load_checkpoint(results / "checkpoints" / "last.pt")["iteration"] == 12


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_evaluation_adds_up_to_one_process_on_the_whole_test_set(
    revnet_job: Path,
) -> None:
    results = revnet_job / "revnet38-synthetic"
    summary = json.loads((results / "summary.json").read_text())
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = evaluate_main([str(results), "--checkpoint", "last", "--no-cuda", "--json"])
    assert status == 0
    alone = json.loads(out.getvalue())
    assert alone["test_accuracy"] == summary["test_accuracy"]
    assert alone["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.distributed
def test_resuming_a_torchrun_job_with_one_process_is_refused(
    revnet_job: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from invertible_train.cli import main

    argv = ["revnet38", "synthetic", *FAST, "--no-cuda", "--iterations", "14"]
    assert main([*argv, "--results-dir", str(revnet_job)]) == 1
    assert "written by 2 processes; resume with the same number (now 1)" in capsys.readouterr().err


ITERATIONS = 300


def tiny_command(results: Path) -> list[str]:
    return torchrun(
        str(LAUNCH), "tiny", "synthetic", *FAST, "--no-cuda",
        "--iterations", str(ITERATIONS),
        "--set", "train.checkpoint_every=7",  # not a multiple of the 16 batches per epoch
        "--set", "train.eval_every=50",
        "--set", "train.log_every=10",
        "--results-dir", str(results),
    )  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted_job(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The last checkpoint of the 2-process tiny job that nothing stopped."""
    whole = tmp_path_factory.mktemp("whole")
    once = subprocess.run(
        tiny_command(whole), env=environment(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert once.returncode == 0, once.stdout + once.stderr
    return load_checkpoint(whole / "tiny-synthetic" / "checkpoints" / "last.pt")


def start_job_and_wait_for_a_checkpoint(results: Path) -> tuple[subprocess.Popen, list[int]]:
    last = results / "tiny-synthetic" / "checkpoints" / "last.pt"
    return start_and_wait_for_checkpoint(tiny_command(results), last, environment(), TIMEOUT)


def resume_and_compare(results: Path, stopped_at: int, uninterrupted: dict) -> None:
    again = subprocess.run(
        tiny_command(results), env=environment(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert again.returncode == 0, again.stdout + again.stderr
    resumed = [r["iteration"] for r in records(results / "tiny-synthetic", "resumed")]
    assert resumed == [stopped_at]
    ended = load_checkpoint(results / "tiny-synthetic" / "checkpoints" / "last.pt")
    assert ended["iteration"] == uninterrupted["iteration"] == ITERATIONS
    for name, tensor in uninterrupted["model"].items():
        assert torch.equal(tensor, ended["model"][name]), name


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds workers through /proc")
def test_killed_torchrun_job_resumes_and_ends_like_an_uninterrupted_one(
    tmp_path: Path, uninterrupted_job: dict
) -> None:
    killed = tmp_path / "killed"
    agent, workers = start_job_and_wait_for_a_checkpoint(killed)
    kill_job(agent)
    assert len(workers) == WORLD_SIZE, f"torchrun's workers, as found in /proc: {workers}"
    interrupted_at = load_checkpoint(killed / "tiny-synthetic/checkpoints/last.pt")["iteration"]
    assert 0 < interrupted_at < ITERATIONS, interrupted_at
    resume_and_compare(killed, interrupted_at, uninterrupted_job)
    print(f"killed after iteration {interrupted_at} was checkpointed; resumed bit-exact")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds workers through /proc")
def test_a_sigterm_to_torchrun_stops_every_rank_at_one_iteration_with_a_checkpoint(
    tmp_path: Path, uninterrupted_job: dict
) -> None:
    """torchrun passes SIGTERM on to its workers; they agree on where to stop, rank 0 saves."""
    stopped = tmp_path / "stopped"
    agent, workers = start_job_and_wait_for_a_checkpoint(stopped)
    try:
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=TIMEOUT)
    finally:
        kill_job(agent)
    assert len(workers) == WORLD_SIZE
    assert err.count("invertible-train: stopped by SIGTERM at iteration") == 1, err  # rank 0
    saved = load_checkpoint(stopped / "tiny-synthetic" / "checkpoints" / "last.pt")
    stopped_at = saved["iteration"]
    assert 0 < stopped_at < ITERATIONS and f"iteration {stopped_at} of" in err
    assert records(stopped / "tiny-synthetic", "stopped")[-1]["iteration"] == stopped_at
    resume_and_compare(stopped, stopped_at, uninterrupted_job)
