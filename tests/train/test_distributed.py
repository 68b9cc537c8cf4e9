"""Distributed training: two CPU processes on the gloo backend, launched as users launch them.

The gradient test spawns two ranks (``torch.multiprocessing``, FileStore rendezvous) that
train through :class:`DistributedTrainer`; the other tests start ``torchrun`` itself, the
command line of the README, as a subprocess.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from invertible_train.config import ExperimentConfig, apply_values, load_experiment
from invertible_train.data import ImageData, InMemoryImages, channel_stats, synthetic_images
from invertible_train.distributed import (
    DistributedTrainer,
    SyncBatchNorm,
    process_group,
)
from invertible_train.engine import Trainer

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

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


# -- gradients equal one process on the full batch -------------------------------------------


def revnet_experiment() -> ExperimentConfig:
    """revnet38 on 8x8 images, memory saving on, no augmentation (the ranks' views match)."""
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
        },
    )


def revnet_data() -> ImageData:
    train = InMemoryImages(*synthetic_images(32, 10, 8, seed=1))
    test = InMemoryImages(*synthetic_images(8, 10, 8, seed=2))
    mean, std = channel_stats(train)
    return ImageData(train=train, test=test, num_classes=10, mean=mean, std=std)


def one_step(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Gradients, updated weights and BatchNorm statistics after one training step."""
    trainer.model.train()
    trainer.train_step(images, labels)
    return {
        "grads": {n: p.grad.clone() for n, p in trainer.module.named_parameters()},
        "state": {n: t.clone() for n, t in trainer.module.state_dict().items()},
        "sync_layers": sum(isinstance(m, SyncBatchNorm) for m in trainer.module.modules()),
    }


def _rank_step(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    env = {"RANK": str(rank), "WORLD_SIZE": str(WORLD_SIZE), "LOCAL_RANK": str(rank)}
    with process_group(torch.device("cpu"), "gloo", init_method=f"file://{store}", env=env) as ctx:
        assert ctx is not None
        trainer = DistributedTrainer(
            revnet_experiment(), Path(out) / "results", ctx, sync_bn=True, data=revnet_data()
        )
        images, labels = revnet_data().train.__getitems__(range(8))
        share = slice(rank * 4, rank * 4 + 4)  # this rank's half of the global batch
        torch.save(one_step(trainer, images[share], labels[share]), Path(out) / f"rank{rank}.pt")


def test_ddp_syncbn_gradients_equal_one_process_on_the_full_batch(tmp_path: Path) -> None:
    mp.spawn(
        _rank_step, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD_SIZE, join=True
    )
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
