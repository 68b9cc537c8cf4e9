"""Sharded training (``--fsdp``): the FSDP2 units, mixed precision, sharded checkpoints.

In one process: which modules become units; a one-rank job (gloo, FileStore) for what a
sharded model computes under ``--amp`` and what is refused; the sharded checkpoint folder
(atomic, rotation, metadata read as data, tensors only, unusable ones set aside) on a model
in one process, where DCP writes and reads as it does for a job. Two spawned ranks check
the gradients against one process on the whole batch; ``torchrun`` jobs with two CPU
processes check what users run: a job killed (SIGKILL) or stopped (SIGTERM) after a
checkpoint resumes and ends with bit-for-bit the model and optimizer state of an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import signal
import subprocess
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from invertible_models import create_model
from invertible_train.checkpoint import CheckpointError, CheckpointStore, save_checkpoint
from invertible_train.cli import evaluate_main
from invertible_train.config import ConfigError, ExperimentConfig, apply_values
from invertible_train.distributed import DistributedContext, process_group
from invertible_train.results import ResultsDirError
from invertible_train.resume import find_resume_point
from invertible_train.sharded_checkpoint import (
    STATE_FILE,
    ShardedCheckpointStore,
    load_sharded_state,
    read_tensors,
)
from invertible_train.sharding import shard_units
from invertible_train.strategy import SingleProcess
from invertible_train.trainer import Trainer

from .conftest import FAST
from .processes import kill_job, start_and_wait_for_checkpoint
from .test_distributed import (
    LAUNCH,
    TIMEOUT,
    WORLD_SIZE,
    assert_close_to_scale,
    environment,
    records,
    revnet_data,
    revnet_experiment,
    torchrun,
)

fsdp2 = pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch 2.6")
if not hasattr(fsdp2, "fully_shard"):  # pragma: no cover - torch < 2.6
    pytest.skip("FSDP2 (fully_shard) needs torch 2.6", allow_module_level=True)


# -- the units --------------------------------------------------------------------------------


def unit_names(model: nn.Module, mixed_precision: bool = False) -> list[str]:
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(unit)] for unit in shard_units(model, mixed_precision)]


def test_every_coupling_and_every_residual_block_is_a_unit() -> None:
    revnet = create_model("revnet38")  # stages of 3, 3, 3 blocks; a transition opens 2 and 3
    couplings = [
        f"stages.{s}.blocks.{b}" for s, count in enumerate((3, 2, 2)) for b in range(count)
    ]
    transitions = ["stages.1.transition", "stages.2.transition"]
    assert sorted(unit_names(revnet)) == sorted(["stem", *transitions, *couplings])
    resnet = create_model("resnet32")  # 3 stages of 5 residual blocks
    residual = [f"stages.{s}.{b}" for s in range(3) for b in range(5)]
    assert sorted(unit_names(resnet)) == sorted(["stem", *residual])
    for name in ("vit_tiny", "revvit_tiny"):  # 12 transformer blocks, or 12 couplings
        assert unit_names(create_model(name)) == [f"blocks.{i}" for i in range(12)]
    assert unit_names(create_model("tiny")) == []  # nothing but the root


def test_with_mixed_precision_each_normalisation_layer_is_a_unit_first() -> None:
    revnet = create_model("revnet38")
    norms = [n for n, m in revnet.named_modules() if isinstance(m, nn.BatchNorm2d)]
    names = unit_names(revnet, mixed_precision=True)
    assert names[: len(norms)] == norms  # nested inside the blocks: sharded before them
    assert sorted(names[len(norms) :]) == sorted(unit_names(revnet))


# -- one rank, in this process ------------------------------------------------------------------


@contextlib.contextmanager
def one_rank_job(tmp_path: Path) -> Iterator[DistributedContext]:
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    store = f"file://{tmp_path / 'store'}"
    with process_group(torch.device("cpu"), "gloo", init_method=store, env=env) as job:
        assert job is not None
        yield job


def sharded_experiment(**values: object) -> ExperimentConfig:
    return apply_values(
        revnet_experiment(),
        {"train.fsdp": True, "train.sync_bn": False, "train.measure_memory": False, **values},
    )


def test_with_amp_blocks_compute_in_bf16_while_norms_shards_and_the_stream_stay_float32(
    tmp_path: Path,
) -> None:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    seen: dict[str, list[torch.dtype]] = {"conv": [], "norm": [], "block output": []}
    with one_rank_job(tmp_path) as job:
        trainer = Trainer(
            sharded_experiment(**{"train.amp": "bf16"}), tmp_path / "run", quiet=True,
            data=revnet_data(), distribution=job,
        )  # fmt: skip
        model = trainer.model
        block = model.stages[0].blocks[0]
        assert isinstance(block, FSDPModule) and isinstance(model, FSDPModule)
        block.Fm.conv1.register_forward_pre_hook(
            lambda m, args: seen["conv"].append(m.weight.dtype)
        )
        block.Fm.bn2.register_forward_pre_hook(lambda m, args: seen["norm"].append(m.weight.dtype))
        block.register_forward_hook(
            lambda m, args, out: seen["block output"].extend(
                t.dtype for t in (out if isinstance(out, tuple) else (out,))
            )
        )
        images, labels = revnet_data().train.__getitems__(range(8))
        loss, _ = trainer.train_step(images, labels)
        assert torch.isfinite(loss)
        for name, p in model.named_parameters():
            assert isinstance(p, DTensor) and p.dtype == torch.float32, name
            assert p.grad is not None and p.grad.dtype == torch.float32, name
    assert seen["conv"] and set(seen["conv"]) == {torch.bfloat16}  # forward and recompute
    assert seen["norm"] and set(seen["norm"]) == {torch.float32}
    assert seen["block output"] and set(seen["block output"]) == {torch.float32}


def test_a_checkpoint_after_an_evaluation_holds_the_shards_the_optimizer_steps(
    tmp_path: Path,
) -> None:
    """An evaluation leaves the root's parameters gathered (FSDP2 reshards the root only
    after a backward); a converted torchvision ResNet (its own state-dict keys, a root
    with the classifier) is then checkpointed, resumed, and read whole in one process."""
    pytest.importorskip("torchvision")
    cfg = apply_values(
        sharded_experiment(),
        {
            "model.name": "tv:resnet18", "model.reversible": "momentum",
            "train.iterations": 2, "train.eval_every": 1, "train.checkpoint_every": 1,
            "train.tensorboard": False, "data.image_size": 16,
        },
    )  # fmt: skip
    data = revnet_data(size=16)
    with one_rank_job(tmp_path) as job:
        trainer = Trainer(cfg, tmp_path / "run", quiet=True, data=data, distribution=job)
        assert trainer.fit()["iterations"] == 2
        head = trainer.model.fc.weight.full_tensor().detach().clone()
        resumed = Trainer(
            apply_values(cfg, {"train.iterations": 3}), tmp_path / "run", quiet=True,
            data=data, distribution=job,
        )  # fmt: skip
        assert resumed.fit()["iterations"] == 3
    saved = read_tensors(tmp_path / "run" / "checkpoints" / "previous.dcp")  # iteration 2
    assert torch.equal(saved["model.fc.weight"], head)


def test_a_memory_budget_is_refused_for_a_sharded_model(tmp_path: Path) -> None:
    with one_rank_job(tmp_path) as job, pytest.raises(ConfigError, match="cannot plan a sharded"):
        Trainer(
            sharded_experiment(**{"train.memory_budget": "1GiB"}), tmp_path / "run",
            data=revnet_data(), distribution=job,
        )  # fmt: skip


def test_fsdp_in_one_process_is_refused_before_anything_is_written(
    run_cli: Callable[..., int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("tiny", "synthetic", "--fsdp") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "torchrun --nproc_per_node N" in err
    assert not (tmp_path / "results").exists()
    with pytest.raises(ConfigError, match="this run is one process"):
        Trainer(sharded_experiment(), tmp_path / "api", data=revnet_data())


def test_a_torch_without_fsdp2_is_refused_naming_the_version_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(fsdp2, "fully_shard")  # as in torch 2.4 and 2.5
    with one_rank_job(tmp_path) as job, pytest.raises(ConfigError, match="torch 2.6 or newer"):
        Trainer(sharded_experiment(), tmp_path / "run", data=revnet_data(), distribution=job)


def test_a_sharded_run_leaves_a_folder_it_did_not_make_alone(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    with one_rank_job(tmp_path) as job:
        trainer = Trainer(
            sharded_experiment(), mine, quiet=True, data=revnet_data(), distribution=job
        )
        with pytest.raises(ResultsDirError, match="not a results folder"):
            trainer.fit()
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


# -- the sharded checkpoint folder, on a model in one process ------------------------------------


def trained(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A small model after one SGD step (momentum buffers exist)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model(torch.randn(6, 3)).square().sum().backward()
    optimizer.step()
    return model, optimizer


def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(99)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_sharded_checkpoint_restores_model_and_optimizer_and_leaves_nothing_temporary(
    tmp_path: Path,
) -> None:
    store = ShardedCheckpointStore(tmp_path / "checkpoints")
    model, optimizer = trained(0)
    store.save_last({"iteration": 1}, model, optimizer)
    assert listing(store.folder) == ["last.dcp"]
    assert listing(store.last) == [".metadata", "__0_0.distcp", STATE_FILE]
    state = store.read(store.last)
    assert state["iteration"] == 1 and state["layout"] == "sharded"
    other, other_optimizer = fresh()
    load_sharded_state(store.last, state, other, other_optimizer)
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert other_optimizer.param_groups[0]["lr"] == 0.1  # a non-tensor entry, from state.pt
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(
            optimizer.state[p]["momentum_buffer"], other_optimizer.state[q]["momentum_buffer"]
        )


def test_each_new_last_keeps_the_one_before_as_previous(tmp_path: Path) -> None:
    store = ShardedCheckpointStore(tmp_path)
    model, optimizer = trained(0)
    for iteration in (1, 2, 3):
        store.save_last({"iteration": iteration}, model, optimizer)
    store.save_best({"iteration": 2}, model, optimizer)
    store.save_best({"iteration": 3}, model, optimizer)
    assert listing(tmp_path) == ["best.dcp", "last.dcp", "previous.dcp"]
    assert [store.read(p)["iteration"] for p in (store.last, store.previous, store.best)] == [
        3,
        2,
        3,
    ]


def test_a_failed_write_keeps_the_checkpoints_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch.distributed.checkpoint import FileSystemWriter

    store = ShardedCheckpointStore(tmp_path)
    model, optimizer = trained(0)
    store.save_last({"iteration": 1}, model, optimizer)
    store.save_last({"iteration": 2}, model, optimizer)

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", disk_full)
    with pytest.raises(CheckpointError, match="writing checkpoint .*last.dcp failed .*No space"):
        store.save_last({"iteration": 3}, model, optimizer)
    monkeypatch.undo()
    assert listing(tmp_path) == ["last.dcp", "previous.dcp"]  # no temporary folder left
    assert [store.read(p)["iteration"] for p in (store.last, store.previous)] == [2, 1]


def test_a_kill_mid_write_leaves_a_temporary_folder_that_is_removed_and_nothing_lost(
    tmp_path: Path,
) -> None:
    store = ShardedCheckpointStore(tmp_path)
    model, optimizer = trained(0)
    store.save_last({"iteration": 1}, model, optimizer)
    store.save_last({"iteration": 2}, model, optimizer)
    store.save_best({"iteration": 2}, model, optimizer)
    # killed while writing the next one, and between moving previous.dcp and best.dcp out of
    # the way and the newer ones moving in
    (tmp_path / ".last.dcp.abcd.tmp").mkdir()
    (tmp_path / ".last.dcp.abcd.tmp" / "__0_0.distcp").write_bytes(b"half")
    os.replace(store.previous, tmp_path / ".previous.dcp.1234.old")
    os.replace(store.best, tmp_path / ".best.dcp.5678.old")
    store.remove_stale()
    assert listing(tmp_path) == ["best.dcp", "last.dcp", "previous.dcp"]
    assert [store.read(p)["iteration"] for p in (store.last, store.previous, store.best)] == [
        2,
        1,
        2,
    ]


class Runs:
    """Unpickling this opens (creates) a file: code that a checkpoint must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


def test_metadata_that_would_run_code_is_refused_and_the_run_falls_back(tmp_path: Path) -> None:
    store = ShardedCheckpointStore(tmp_path / "checkpoints")
    model, optimizer = trained(0)
    store.save_last({"iteration": 1}, model, optimizer)
    store.save_last({"iteration": 2}, model, optimizer)
    marker = tmp_path / "code-ran"
    (store.last / ".metadata").write_bytes(pickle.dumps(Runs(marker)))
    with pytest.raises(CheckpointError, match=r"not DCP's metadata \(it asks for .*open"):
        store.read(store.last)
    with pytest.raises(CheckpointError):  # the loader reads it the same way
        load_sharded_state(store.last, store.read(store.previous), *fresh())
    found = store.latest()
    assert found is not None and found.path == store.previous and found.state["iteration"] == 1
    assert found.skipped is not None and "last.dcp" in found.skipped
    assert not marker.exists()


def test_metadata_that_would_change_a_class_is_refused_and_the_class_kept(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.metadata import Metadata

    before = Metadata.__eq__
    store = ShardedCheckpointStore(tmp_path)
    store.save_last({"iteration": 1}, *trained(0))
    # protocol 4: GLOBAL Metadata, then BUILD with state (None, {"__eq__": 1}): setattr on
    # the class itself
    crafted = (
        b"\x80\x04ctorch.distributed.checkpoint.metadata\nMetadata\nN}\x8c\x06__eq__K\x01s\x86b."
    )
    (store.last / ".metadata").write_bytes(crafted)
    with pytest.raises(CheckpointError, match="changes the classes it builds"):
        store.read(store.last)
    assert Metadata.__eq__ is before


def test_a_checkpoint_entry_that_is_not_a_tensor_is_never_unpickled(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    marker = tmp_path / "code-ran"
    folder = tmp_path / "last.dcp"
    model, optimizer = trained(0)
    weights, optimizer_state = get_state_dict(model, optimizer)
    weights["0.weight"] = Runs(marker)  # type: ignore[assignment]  # saved as pickled bytes
    written = {"model": weights, "optimizer": {"state": optimizer_state["state"]}}
    with warnings.catch_warnings():  # DCP's notice that it runs in one process
        warnings.simplefilter("ignore")
        dcp.save(written, checkpoint_id=folder, no_dist=True)
    save_checkpoint({"layout": "sharded", "sharded_state": {}}, folder / STATE_FILE)
    with pytest.raises(CheckpointError, match="entries that are not tensors .*model.0.weight"):
        ShardedCheckpointStore(tmp_path).read(folder)
    with pytest.raises(CheckpointError, match="not a tensor"):
        load_sharded_state(folder, {"sharded_state": {}}, model, optimizer)
    assert not marker.exists()


def test_an_unusable_last_is_passed_over_and_every_one_kept_numbered(tmp_path: Path) -> None:
    store = ShardedCheckpointStore(tmp_path)
    model, optimizer = trained(0)
    for round_ in (1, 2):
        store.save_last({"iteration": 2 * round_ - 1}, model, optimizer)
        store.save_last({"iteration": 2 * round_}, model, optimizer)
        shard = store.last / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:-100])  # a copy cut short
        with pytest.raises(CheckpointError, match="incomplete: its shard __0_0.distcp"):
            store.read(store.last)
        loaded = store.load_latest()
        assert loaded is not None and loaded[0]["iteration"] == 2 * round_ - 1
        assert loaded[1] == store.previous and loaded[2] is not None
    assert listing(tmp_path) == ["last.dcp.unusable", "last.dcp.unusable.1", "previous.dcp"]


def test_checkpoints_of_the_other_layout_are_never_passed_over(tmp_path: Path) -> None:
    cfg = ExperimentConfig()
    plain = tmp_path / "plain"
    CheckpointStore(plain / "checkpoints").save_last({"iteration": 1})
    with pytest.raises(ResultsDirError, match=r"run without --fsdp \(last.pt\).*rerun without"):
        find_resume_point(
            plain, ShardedCheckpointStore(plain / "checkpoints"), cfg, SingleProcess()
        )
    sharded = tmp_path / "sharded"
    ShardedCheckpointStore(sharded / "checkpoints").save_last({"iteration": 1}, *trained(0))
    with pytest.raises(ResultsDirError, match=r"run with --fsdp \(last.dcp\).*rerun with --fsdp"):
        find_resume_point(sharded, CheckpointStore(sharded / "checkpoints"), cfg, SingleProcess())


# -- two ranks: gradients equal one process on the full batch ----------------------------------


def gathered_step(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Gradients and updated state after one step, each gathered whole (every rank calls)."""

    def whole(t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor's shards

    trainer.wrapped_model.train()
    trainer.train_step(images, labels)
    return {
        "grads": {n: whole(p.grad).clone() for n, p in trainer.model.named_parameters()},
        "state": {n: whole(t).clone() for n, t in trainer.model.state_dict().items()},
    }


def _rank_step(rank: int, store: str, out: str) -> None:
    from torch.distributed.fsdp import FSDPModule

    torch.set_num_threads(1)
    env = {"RANK": str(rank), "WORLD_SIZE": str(WORLD_SIZE), "LOCAL_RANK": str(rank)}
    with process_group(torch.device("cpu"), "gloo", init_method=f"file://{store}", env=env) as ctx:
        assert ctx is not None
        cfg = apply_values(revnet_experiment(), {"train.fsdp": True, "train.measure_memory": False})
        trainer = Trainer(cfg, Path(out) / "results", data=revnet_data(), distribution=ctx)
        units = sorted(n for n, m in trainer.model.named_modules() if isinstance(m, FSDPModule))
        images, labels = revnet_data().train.__getitems__(range(8))
        share = slice(rank * 4, rank * 4 + 4)  # this rank's half of the global batch
        result = gathered_step(trainer, images[share], labels[share])
        torch.save({**result, "units": units}, Path(out) / f"rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.distributed
def test_sharded_syncbn_gradients_equal_one_process_on_the_full_batch(
    tmp_path: Path, spawn_ranks: Callable[..., None]
) -> None:
    spawn_ranks(_rank_step, (str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD_SIZE)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    couplings = [
        f"stages.{s}.blocks.{b}" for s, count in enumerate((3, 2, 2)) for b in range(count)
    ]
    expected_units = ["", "stages.1.transition", "stages.2.transition", "stem", *couplings]
    assert ranks[0]["units"] == sorted(expected_units)

    single = Trainer(
        apply_values(revnet_experiment(), {"train.measure_memory": False}),
        tmp_path / "single", data=revnet_data(),
    )  # fmt: skip
    images, labels = revnet_data().train.__getitems__(range(8))
    single.wrapped_model.train()
    single.train_step(images, labels)
    expected = {
        "grads": {n: p.grad for n, p in single.model.named_parameters()},
        "state": dict(single.model.state_dict()),
    }
    for kind, values in expected.items():
        assert set(ranks[0][kind]) == set(values)  # every parameter got a gradient
        for name, value in values.items():
            for rank in ranks:
                if value.is_floating_point():
                    assert_close_to_scale(rank[kind][name], value, f"{kind} {name}")
                else:
                    assert torch.equal(rank[kind][name], value), name


# -- torchrun, as users run it ------------------------------------------------------------------

ITERATIONS = 40
RUN = "tiny_revnet-synthetic"


def sharded_command(results: Path, *extra: str) -> list[str]:
    return torchrun(
        str(LAUNCH), "tiny_revnet", "synthetic", *FAST, "--no-cuda", "--fsdp",
        "--iterations", str(ITERATIONS),
        "--set", "train.checkpoint_every=7",
        "--set", "train.eval_every=20",
        "--set", "train.log_every=10",
        # 65 test images: rank 0 evaluates 33 (three batches of 16), rank 1 32 (two)
        "--set", "data.synthetic_test_size=65",
        "--set", "data.eval_batch_size=16",
        "--results-dir", str(results), *extra,
    )  # fmt: skip


def run_job(results: Path) -> None:
    job = subprocess.run(
        sharded_command(results), env=environment(), capture_output=True, text=True,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert job.returncode == 0, job.stdout + job.stderr


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The results folder of the sharded 2-process job that nothing stopped."""
    results = tmp_path_factory.mktemp("sharded") / "results"
    run_job(results)
    return results / RUN


@pytest.mark.slow
@pytest.mark.distributed
def test_a_sharded_job_writes_checkpoint_folders_and_one_set_of_results(
    uninterrupted: Path,
) -> None:
    checkpoints = uninterrupted / "checkpoints"
    assert listing(checkpoints) == ["best.dcp", "last.dcp", "previous.dcp"]
    for folder in checkpoints.iterdir():  # one shard file per process
        assert listing(folder) == [".metadata", "__0_0.distcp", "__1_0.distcp", STATE_FILE]
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["world_size"] == WORLD_SIZE and summary["iterations"] == ITERATIONS
    assert summary["activation_bytes"] is None  # not measured for a sharded model
    assert [r["iteration"] for r in records(uninterrupted, "eval")] == [20, 40]
    # one process evaluates the final sharded checkpoint as the two did, uneven split and all
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = evaluate_main([str(uninterrupted), "--checkpoint", "final", "--no-cuda", "--json"])
    assert status == 0
    alone = json.loads(out.getvalue())
    assert alone["which"] == "final" and alone["checkpoint"].endswith("last.dcp")
    assert alone["test_accuracy"] == summary["test_accuracy"]
    assert alone["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-6)


def assert_same_tensors(ended: Path, uninterrupted: Path) -> None:
    """Every tensor of the two final checkpoints, model and optimizer state, bit for bit."""
    mine = read_tensors(ended / "checkpoints" / "last.dcp")
    theirs = read_tensors(uninterrupted / "checkpoints" / "last.dcp")
    assert set(mine) == set(theirs) and any(k.startswith("optimizer.") for k in mine)
    for key, tensor in theirs.items():
        assert torch.equal(mine[key], tensor), key


def start_and_wait_for_a_checkpoint(results: Path) -> tuple[subprocess.Popen, list[int]]:
    last = results / RUN / "checkpoints" / "last.dcp"
    return start_and_wait_for_checkpoint(sharded_command(results), last, environment(), TIMEOUT)


def iteration_of(results: Path) -> int:
    return int(ShardedCheckpointStore(results / "checkpoints").latest().state["iteration"])  # type: ignore[union-attr]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds workers through /proc")
def test_a_killed_sharded_job_resumes_and_ends_like_an_uninterrupted_one(
    tmp_path: Path, uninterrupted: Path
) -> None:
    agent, workers = start_and_wait_for_a_checkpoint(tmp_path)
    kill_job(agent)
    assert len(workers) == WORLD_SIZE, f"torchrun's workers, as found in /proc: {workers}"
    killed_at = iteration_of(tmp_path / RUN)
    assert 0 < killed_at < ITERATIONS, killed_at
    run_job(tmp_path)
    assert [r["iteration"] for r in records(tmp_path / RUN, "resumed")] == [killed_at]
    assert_same_tensors(tmp_path / RUN, uninterrupted)
    print(f"killed after iteration {killed_at} was checkpointed; resumed bit-exact")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds workers through /proc")
def test_a_sigterm_stops_every_rank_at_one_iteration_with_one_sharded_checkpoint(
    tmp_path: Path, uninterrupted: Path
) -> None:
    agent, workers = start_and_wait_for_a_checkpoint(tmp_path)
    try:
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=TIMEOUT)
    finally:
        kill_job(agent)
    assert len(workers) == WORLD_SIZE
    assert err.count("invertible-train: stopped by SIGTERM at iteration") == 1, err  # rank 0
    stopped_at = iteration_of(tmp_path / RUN)
    assert 0 < stopped_at < ITERATIONS and f"iteration {stopped_at} of" in err
    assert records(tmp_path / RUN, "stopped")[-1]["iteration"] == stopped_at
    run_job(tmp_path)
    assert_same_tensors(tmp_path / RUN, uninterrupted)
