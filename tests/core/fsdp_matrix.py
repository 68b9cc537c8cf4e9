"""The sharded-training matrix: FSDP2 and FSDP1 over our memory-saving bodies, 2 gloo ranks.

One spawn runs every case in the same two processes (a fresh process group per spawn costs
seconds, a case costs milliseconds). Each case builds a small model, trains a sharded copy
for 3 SGD steps on the two ranks' halves of a batch and, in the same process, an unsharded
copy on the whole batch with plain autograd (``memory_saving=False``); it records the
largest parameter and gradient difference after the 3 steps, the parameters that received
no gradient, and the all-gathers and reduce-scatters per step. The same body without memory
saving under the same sharding gives the collective counts of plain FSDP to compare with.

Bodies: ``sequence`` (a ReversibleSequence of couplings), ``keep`` (the same with
``keep_blocks=2``), ``wrapper`` (an ``nn.Sequential`` of InvertibleModuleWrapper'd couplings),
``conditioned`` (a sequence conditioned on an embedding from a learnable MLP), ``flow``
(ActNorm, InvertibleConv1x1 and affine couplings trained by negative log-likelihood).
Units: ``block`` (each block), ``fg`` (each Fm and Gm), ``sequence`` (the body), ``root``.
"""

from __future__ import annotations

import copy
import gc
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from invertible_core import (
    ActNorm,
    AdditiveCoupling,
    AffineAdapterSigmoid,
    AffineCoupling,
    InvertibleConv1x1,
    InvertibleModuleWrapper,
    ReversibleSequence,
    call_with_logdet,
    measure_memory,
)

WORLD_SIZE = 2
BATCH = 4
DEPTH = 4  # blocks (flow: steps of ActNorm, InvertibleConv1x1, coupling)
STEPS = int(os.environ.get("MATRIX_STEPS", "3"))
LR = 0.1
BODIES = ("sequence", "keep", "wrapper", "conditioned", "flow")
UNITS = ("block", "fg", "sequence", "root")


def fsdp2_available() -> bool:
    """FSDP2 (``fully_shard``) with CPU tensors on the gloo backend: torch 2.6 and newer."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def mlp(width: int) -> nn.Module:
    """A pre-norm MLP at ``width`` (LayerNorm: an op that refuses mixed DTensor inputs)."""
    return nn.Sequential(
        nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
    )


class ConditionedMLP(nn.Module):
    def __init__(self, width: int, emb: int) -> None:
        super().__init__()
        self.body = mlp(width)
        self.emb = nn.Linear(emb, width)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.body(x) + self.emb(emb)[:, None, :]


def coupling(width: int, emb: int | None = None) -> AdditiveCoupling:
    half = width // 2
    if emb is None:
        return AdditiveCoupling(mlp(half), mlp(half), split_dim=-1)
    return AdditiveCoupling(ConditionedMLP(half, emb), ConditionedMLP(half, emb), split_dim=-1)


class Model(nn.Module):
    """A root with a parameter of its own (the head), around one of the bodies."""

    def __init__(self, body: str, depth: int = DEPTH, width: int = 8) -> None:
        super().__init__()
        self.kind = body
        if body == "flow":
            blocks: list[nn.Module] = []
            for _ in range(depth):
                net = nn.Sequential(
                    nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)
                )
                blocks += [
                    ActNorm(4),
                    InvertibleConv1x1(4),
                    AffineCoupling(net, adapter=AffineAdapterSigmoid),
                ]
            self.body: nn.Module = ReversibleSequence(blocks)
            self.head = nn.Parameter(torch.zeros(4))
            return
        if body == "wrapper":
            self.body = nn.Sequential(
                *(InvertibleModuleWrapper(coupling(width)) for _ in range(depth))
            )
        else:
            emb = 3 if body == "conditioned" else None
            self.body = ReversibleSequence(
                [coupling(width, emb) for _ in range(depth)],
                keep_blocks=2 if body == "keep" else None,
            )
        if body == "conditioned":
            self.embed = nn.Sequential(nn.Linear(1, 3), nn.Tanh())
        self.head = nn.Linear(width, 1)

    def blocks(self) -> list[nn.Module]:
        return list(self.body)

    def set_saving(self, saving: bool) -> None:
        for m in self.modules():
            if isinstance(m, ReversibleSequence):
                m.memory_saving = saving
            if isinstance(m, InvertibleModuleWrapper):
                m.disable = not saving

    def forward(self, x: Tensor) -> Tensor:
        """The loss: a mean over the batch (so FSDP's average over ranks, of the two halves'
        means, is the whole batch's mean). FSDP's root hooks run around a forward."""
        return self.loss(x)

    def loss(self, x: Tensor) -> Tensor:
        if self.kind == "flow":
            # (the body's forward_with_logdet, also when FSDP1 wraps the body: see the README)
            z, logdet = call_with_logdet(self.body, x)
            z = z + self.head[None, :, None, None]
            nll = 0.5 * z.square().flatten(1).sum(1) - logdet
            return nll.mean()
        if self.kind == "conditioned":
            emb = self.embed(x.mean(dim=(1, 2))[:, None])
            h = self.body(x, emb)
        else:
            h = self.body(x)
        return self.head(h).square().mean()


def inputs(kind: str, tokens: int = 5) -> Tensor:
    g = torch.Generator().manual_seed(7)
    if kind == "flow":
        return torch.randn(BATCH, 4, 4, 4, generator=g, dtype=torch.float64)
    return torch.randn(BATCH, tokens, 8, generator=g, dtype=torch.float64)


def build(body: str, depth: int = DEPTH) -> Model:
    torch.manual_seed(0)
    model = Model(body, depth).double()
    if body == "flow":
        with torch.no_grad():  # ActNorm's data-dependent init, the same on every rank
            model(inputs(body))
    return model


def units(model: Model, unit: str) -> list[nn.Module]:
    if unit == "block":
        return model.blocks()
    if unit == "fg":
        found = []
        for block in model.blocks():
            inner = block._fn if isinstance(block, InvertibleModuleWrapper) else block
            if isinstance(inner, (AdditiveCoupling, AffineCoupling)):
                found += [inner.Fm, inner.Gm]
        return found
    if unit == "sequence":
        return [model.body]
    return []


# -- counting collectives ------------------------------------------------------------------------
_GATHERS = ("all_gather_into_tensor", "all_gather_single", "_all_gather_base", "all_gather")
_SCATTERS = (
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "_reduce_scatter_base",
    "reduce_scatter",
)


@contextmanager
def counting(counts: dict[str, int]) -> Iterator[None]:
    """Count the all-gathers and reduce-scatters that ``torch.distributed`` is asked for."""
    patched: list[tuple[str, Callable[..., Any]]] = []
    for names, key in ((_GATHERS, "all_gather"), (_SCATTERS, "reduce_scatter")):
        for name in names:
            real = getattr(dist, name, None)
            if real is None:
                continue

            def wrapper(
                *args: Any, _real: Callable[..., Any] = real, _key: str = key, **kwargs: Any
            ) -> Any:
                counts[_key] += 1
                return _real(*args, **kwargs)

            setattr(dist, name, wrapper)
            patched.append((name, real))
    try:
        yield
    finally:
        for name, real in patched:
            setattr(dist, name, real)


# -- sharding ----------------------------------------------------------------------------------
def shard(model: Model, fsdp: str, unit: str) -> nn.Module:
    if fsdp == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        for m in units(model, unit):
            fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    def wrap(m: nn.Module) -> nn.Module:
        return FSDP(m, use_orig_params=True, device_id=torch.device("cpu"))

    targets = {id(m) for m in units(model, unit)}
    places = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if id(child) in targets
    ]
    for parent, name, child in places:
        setattr(parent, name, wrap(child))
    return wrap(model)


def full_parameters(model: nn.Module, fsdp: str) -> dict[str, tuple[Tensor, Tensor | None]]:
    """Every parameter by its unsharded name, with its gradient (None: it got none)."""

    def clean(name: str) -> str:
        for token in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
            name = name.replace(token, "")
        return name

    out: dict[str, tuple[Tensor, Tensor | None]] = {}
    if fsdp == "fsdp2":
        for name, p in model.named_parameters():
            grad = None if p.grad is None else p.grad.full_tensor().clone()  # type: ignore[attr-defined]
            out[clean(name)] = (p.full_tensor().detach().clone(), grad)  # type: ignore[attr-defined]
        return out
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, with_grads=True):
        for name, p in model.named_parameters():
            out[clean(name)] = (p.detach().clone(), None if p.grad is None else p.grad.clone())
    return out


def _relative(a: Tensor, b: Tensor) -> float:
    """Largest difference relative to the largest magnitude (0 for two zero tensors)."""
    scale = float(b.abs().max()) if b.numel() else 0.0
    return float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max())


def run_case(fsdp: str, body: str, unit: str, saving: bool, rank: int) -> dict[str, Any]:
    model = build(body)
    reference = copy.deepcopy(model)
    reference.set_saving(False)
    model.set_saving(saving)
    sharded = shard(model, fsdp, unit)
    lr = LR / 100 if body == "flow" else LR  # a flow's NLL has large gradients
    opt = torch.optim.SGD(sharded.parameters(), lr=lr)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=lr)
    x = inputs(body)
    local = x.chunk(WORLD_SIZE)[rank]
    counts = {"all_gather": 0, "reduce_scatter": 0}
    missing: set[str] = set()
    grads: dict[str, tuple[Tensor, Tensor | None]] = {}
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        with counting(counts):
            sharded(local).backward()
        grads = full_parameters(sharded, fsdp)
        missing |= {name for name, (_, g) in grads.items() if g is None}
        opt.step()
        ref_opt.zero_grad(set_to_none=True)
        reference(x).backward()
        ref_grads = {name: p.grad for name, p in reference.named_parameters()}
        ref_opt.step()
    params = full_parameters(sharded, fsdp)
    ref_params = dict(reference.named_parameters())
    param_error = max(_relative(p, ref_params[name]) for name, (p, _) in params.items())
    grad_error = max(
        _relative(g, ref_grads[name])  # type: ignore[arg-type]
        for name, (_, g) in grads.items()
        if g is not None and ref_grads.get(name) is not None
    )
    return {
        "fsdp": fsdp,
        "body": body,
        "unit": unit,
        "saving": saving,
        "param_error": param_error,
        "grad_error": grad_error,
        "missing": sorted(missing),
        "parameters": len(params),
        "all_gather_per_step": counts["all_gather"] / STEPS,
        "reduce_scatter_per_step": counts["reduce_scatter"] / STEPS,
    }


def retained_forward_bytes(body: str, unit: str, depth: int, saving: bool = True) -> int:
    """Bytes a forward pass leaves allocated on this rank (FSDP2; 256 tokens, so that the
    activations, 32 KB per block and rank, dominate the bookkeeping)."""
    model = build(body, depth)
    model.set_saving(saving)
    sharded = shard(model, "fsdp2", unit)
    x = inputs(body, tokens=256).chunk(WORLD_SIZE)[dist.get_rank()]
    sharded(x).backward()  # gradients allocated, as in every later step
    loss, stats = measure_memory(lambda: sharded(x))
    loss.backward()
    return stats.retained_bytes


def worker(
    rank: int, store: str, out: str, cases: list[tuple[str, str, str, bool]], depths: list[int]
) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    results: list[dict[str, Any]] = []
    try:
        for fsdp, body, unit, saving in cases:
            try:
                results.append(run_case(fsdp, body, unit, saving, rank))
            except Exception as exc:  # reported by the test, with the case
                results.append(
                    {
                        "fsdp": fsdp,
                        "body": body,
                        "unit": unit,
                        "saving": saving,
                        "error": f"{type(exc).__name__}: {exc}",
                    }
                )
            gc.collect()  # this case's sharded modules go now, on both ranks alike
        memory = {}
        for body in ("sequence", "wrapper"):
            for saving in (True, False):
                for depth in depths:
                    key = f"{body}/{'saving' if saving else 'plain'}/{depth}"
                    memory[key] = retained_forward_bytes(body, "block", depth, saving)
        if rank == 0:
            Path(out).write_text(json.dumps({"cases": results, "retained": memory}))
        dist.barrier()  # both ranks are done with every collective before either tears down
    finally:
        # whatever the cases left in reference cycles (sharded modules, hooks, meshes) goes
        # before the group, so that no destructor touching the group runs during or after its
        # teardown: a rank once aborted during this matrix on torch 2.13 ("terminate
        # called without an active exception", not reproduced in 5 reruns), and
        # test_sequence_ddp.py saw gloo's teardown deadlock there the same way
        gc.collect()
        dist.destroy_process_group()
