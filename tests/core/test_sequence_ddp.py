"""ReversibleSequence under DistributedDataParallel: two CPU processes on the gloo backend.

The gradients after one step must equal those of one process on the full batch, with no
"marked ready twice" or unused-parameter errors (find_unused_parameters stays False), also
for a chain conditioned on a side input made by a learnable MLP (its gradient comes back
through every block's autograd node).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from invertible_core import AdditiveCoupling, ReversibleSequence

WORLD_SIZE = 2


class Conditioned(nn.Module):
    """A residual function that also takes a per-sample embedding (a side input)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Dropout(0.1))
        self.emb = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.emb(emb)[:, :, None, None]


class Net(nn.Module):
    """Stem, a reversible chain conditioned on an embedding from a learnable MLP, head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.embed = nn.Sequential(nn.Linear(1, 3), nn.Tanh())
        self.body = ReversibleSequence(AdditiveCoupling(Conditioned()) for _ in range(3))
        self.head = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.embed(x.mean(dim=(1, 2, 3))[:, None])  # gradients reach the MLP via the chain
        return self.head(self.body(self.stem(x), emb).flatten(1))


def build_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Net()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)


def _worker(rank: int, store_dir: str, out_dir: str, steps: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=WORLD_SIZE
    )
    try:
        model = nn.parallel.DistributedDataParallel(build_model())
        x, y = batch()
        per_rank = x.shape[0] // WORLD_SIZE
        xs, ys = (
            x[rank * per_rank : (rank + 1) * per_rank],
            y[rank * per_rank : (rank + 1) * per_rank],
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(steps):
            torch.manual_seed(
                1000 + step
            )  # dropout: same seed on both ranks, repeated in recompute
            opt.zero_grad()
            nn.functional.cross_entropy(model(xs), ys).backward()
            if step == 0:
                grads = [p.grad.detach().clone() for p in model.module.parameters()]
            opt.step()
        if rank == 0:
            torch.save(
                {"grads": grads, "params": [p.detach().clone() for p in model.module.parameters()]},
                Path(out_dir) / "ddp.pt",
            )
        # free DDP before the group: when DDP's reducer is the group's last holder, gloo's
        # destructor joins its threads holding the GIL and can deadlock (seen on torch 2.13)
        del model, opt
        gc.collect()
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_equal_single_process_full_batch(
    tmp_path: Path, spawn_ranks: Callable[..., None]
) -> None:
    steps = 3
    spawn_ranks(_worker, (str(tmp_path), str(tmp_path), steps), nprocs=WORLD_SIZE)
    result = torch.load(tmp_path / "ddp.pt", weights_only=True)

    # reference: one process, plain autograd (no saving), the same data split per "rank"
    # and the same dropout seeds, gradients averaged as DDP does
    model = build_model()
    model.body.memory_saving = False
    x, y = batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    per_rank = x.shape[0] // WORLD_SIZE
    for step in range(steps):
        opt.zero_grad()
        for rank in range(WORLD_SIZE):
            torch.manual_seed(1000 + step)
            sl = slice(rank * per_rank, (rank + 1) * per_rank)
            (nn.functional.cross_entropy(model(x[sl]), y[sl]) / WORLD_SIZE).backward()
        if step == 0:
            ref_grads = [p.grad.detach().clone() for p in model.parameters()]
        opt.step()
    for g, r in zip(result["grads"], ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    for p, q in zip(result["params"], model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
