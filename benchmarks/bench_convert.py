"""Bring your own network: what ``make_reversible`` gives an existing model, measured.

Five measurements (``--sections`` picks some):

* ``gradients``: the converted network's gradients with memory saving against plain
  autograd of the same converted network, in float64 (target: relative L2 <= 1e-6), for
  every method on torchvision's resnet18 and resnet50, ``nn.TransformerEncoder`` pre- and
  post-norm, timm's ViT-S and an ``nn.Sequential`` of one's own blocks; momentumnet 0.10's
  conversion of resnet18 beside them (its saving against its own backprop).
* ``distance``: the converted network's output against the original's at conversion
  (relative L2, float64, eval mode), over each method's coefficient, with the float32
  reconstruction error of the reversible runs (how well-conditioned the inverse is there).
  Networks: the digits-pretrained resnet18 of ``parity`` (seed 0; with its test accuracy
  at conversion), resnet50 and ViT-S at their initialisation, and the encoders.
* ``schedule``: the two-stream path from ``alpha = 1, beta = 0.1`` (near the original) to
  ``alpha = 0, beta = 1`` (RevNet couplings), which ``CoefficientSchedule`` walks during
  fine-tuning: distance to the original, float32 reconstruction error and float32
  gradient error (memory saving against plain autograd, train mode) at five points; the
  gradient error and the forward-retained memory also with an anchor (the exact state kept)
  after every coupling, the remedy while the inverse is ill-conditioned.
* ``memory``: forward-retained memory (what a training-mode forward keeps for backward,
  exact: ``invertible_core.measure_memory``'s allocation events) and the step time
  relative to the original, for torchvision's resnet50 with ``layer3`` at 6 (resnet50), 12
  and 24 blocks, and timm's ViT-S at depth 6, 12 and 24: the original, the original with
  ``torch.utils.checkpoint`` per block (timm's own ``set_grad_checkpointing`` for the ViT),
  each conversion, and momentumnet 0.10's ``transform_to_momentumnet`` of the same network
  (``use_backprop=False``, its memory-saving mode; ``gamma`` 0.9 as ours).
* ``parity``: fine-tuning on real data offline. scikit-learn's handwritten digits (1,437
  training and 360 test scans), upsampled from 8x8 to 32x32 (bilinear) and repeated to 3
  channels for torchvision's resnet18. Per seed: resnet18 is first trained plain for a
  while (the "pretrained" start), then fine-tuned from those same weights as the original,
  as ``make_reversible(..., "momentum")``, as ``make_reversible(..., "two_stream")`` (its
  coefficients fixed at the start) and as the same with ``CoefficientSchedule(alpha=(1, 0),
  beta=(0.1, 1))`` over the fine-tuning, memory saving on. Parity holds when a conversion's mean test accuracy is within the seeds'
  spread of the original's: ``|mean - mean_original| <= max(range, range_original)``.

Times are the process's CPU time (``--clock``), interleaved with the original's: the
machine is shared, so they are provisional; memory is exact and does not depend on load.

    OMP_NUM_THREADS=1 python benchmarks/bench_convert.py        # about half an hour
    python benchmarks/bench_convert.py --quick                  # seconds: a smoke test

Prints tables and writes JSON (default ``benchmarks/results/convert.json``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import json
import math
import platform
import statistics
import sys
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import invertible_core
import invertible_models
from invertible_core import (
    TrainingStep,
    measure_memory,
    measure_step_memory,
    median_step_seconds,
)
from invertible_models import CoefficientSchedule, make_reversible

METHODS = ("momentum", "two_stream")
#: the conversions the gradient and memory sections measure: label -> (method, options).
#: two_stream near the original (its defaults: alpha 1, beta 0.1, an anchor after every
#: coupling) and at the schedule's end (alpha 0, beta 1, where anchors can go)
CONVERSIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "momentum": ("momentum", {}),
    "two_stream": ("two_stream", {}),
    "two_stream alpha 0, no anchors": (
        "two_stream",
        {"alpha": 0.0, "beta": 1.0, "anchor_every": 0},
    ),
}
SECTIONS = ("gradients", "distance", "schedule", "memory", "parity")
#: the coefficient grid of the distance section, per method
GRID = {
    "momentum": ("gamma", (0.9, 0.5, 0.1, 1e-2, 1e-4)),
    "two_stream": ("beta", (0.5, 0.1, 1e-2, 1e-3, 1e-4)),
}
#: the fine-tuned variants of the parity section: name -> (method, scheduled) or None (plain)
PARITY_VARIANTS: dict[str, tuple[str, bool] | None] = {
    "original": None,
    "momentum": ("momentum", False),
    "two_stream": ("two_stream", False),
    "two_stream + schedule": ("two_stream", True),
}
#: the schedule of the two-stream fine-tuning: (start, end) per coefficient
SCHEDULE = {"alpha": (1.0, 0.0), "beta": (0.1, 1.0)}


def relative_l2(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def torchvision_models() -> Any:
    import torchvision

    return torchvision.models


def timm_vit(
    depth: int, image_size: int, patch: int, classes: int = 10, quick: bool = False
) -> nn.Module:
    """timm's ViT-S shape (width 384, 6 heads, MLP 4x) at ``depth`` and ``image_size``
    (width 64 and 4 heads with ``quick``)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=image_size,
        patch_size=patch,
        embed_dim=64 if quick else 384,
        depth=depth,
        num_heads=4 if quick else 6,
        num_classes=classes,
    )


def resnet_with_layer3(blocks: tuple[int, int, int, int], classes: int = 10) -> nn.Module:
    """torchvision's bottleneck ResNet with these blocks per stage ((3, 4, 6, 3): resnet50)."""
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, list(blocks), num_classes=classes)


def encoder(norm_first: bool, layers: int, width: int = 64) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        width, 4, 2 * width, dropout=0.1, batch_first=True, norm_first=norm_first
    )
    return nn.TransformerEncoder(
        layer, layers, norm=nn.LayerNorm(width), enable_nested_tensor=False
    )


class OwnBlock(nn.Module):
    """A residual block of one's own, ``x + net(x)``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


def momentumnet() -> tuple[Any, str | None]:
    """momentumnet's module and version, or (None, why not)."""
    try:
        module = importlib.import_module("momentumnet")
        return module, metadata.version("momentumnet")
    except Exception as exc:  # not installed, or a dependency of it missing
        return None, f"{type(exc).__name__}: {exc} (pip install --no-deps momentumnet==0.10)"


# -- gradients ------------------------------------------------------------------------------
#: a network to convert and how to call it on fixed inputs in a dtype
Case = tuple[str, nn.Module, Callable[[nn.Module, torch.dtype], Tensor]]


def _grads(model: nn.Module, run: Callable[[], Tensor], saving: bool) -> Tensor:
    """Every parameter's gradient of ``run()`` (summed with fixed random weights), with
    memory saving on or off, dropout drawing the same masks both times."""
    if hasattr(model, "memory_saving"):
        model.memory_saving = saving
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        out = run()
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype)
        (out * weights).sum().backward()
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]
    )


def gradient_cases(quick: bool) -> Iterator[Case]:
    tv = torchvision_models()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    yield "resnet18", tv.resnet18(num_classes=10), lambda m, dt: m(images.to(dt))
    if not quick:
        yield "resnet50", tv.resnet50(num_classes=10), lambda m, dt: m(images.to(dt))
    tokens = torch.randn(2, 12, 64, dtype=torch.float64)
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[0, -3:] = True
    for norm_first in (True, False):
        yield (
            f"encoder {'pre' if norm_first else 'post'}-norm",
            encoder(norm_first, 2 if quick else 6),
            lambda m, dt: m(tokens.to(dt), src_key_padding_mask=pad),
        )
    yield "ViT-S", timm_vit(2 if quick else 12, 32, 8, quick=quick), lambda m, dt: m(images.to(dt))
    own = nn.Sequential(*[OwnBlock(64) for _ in range(3 if quick else 8)])
    yield "nn.Sequential, x + net(x)", own, lambda m, dt: m(tokens.to(dt))


def bench_gradients(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, original, call in gradient_cases(args.quick):
        original.double()
        for label, (method, options) in CONVERSIONS.items():
            residual = {"residual": "x + net(x)"} if name.startswith("nn.Sequential") else {}
            converted = make_reversible(original, method, **residual, **options).train()
            plain = _grads(converted, lambda: call(converted, torch.float64), saving=False)
            saved = _grads(converted, lambda: call(converted, torch.float64), saving=True)
            rows.append({"network": name, "method": label, "error": relative_l2(saved, plain)})
    module, version = momentumnet()
    if module is None:
        rows.append(
            {"network": "resnet18", "method": "momentumnet", "error": None, "note": version}
        )
        return rows
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    base = torchvision_models().resnet18(num_classes=10).double()
    grads = []
    for use_backprop in (True, False):  # its plain backprop, then its memory saving
        net = module.transform_to_momentumnet(
            copy.deepcopy(base), gamma=0.9, use_backprop=use_backprop
        )
        grads.append(_grads(net.train(), lambda: net(images), saving=False))
    rows.append(
        {
            "network": "resnet18",
            "method": f"momentumnet {version}",
            "error": relative_l2(grads[1], grads[0]),
        }
    )
    return rows


# -- distance at conversion, conditioning ------------------------------------------------------
def reconstruction_error(
    converted: nn.Module, call: Callable[[nn.Module, torch.dtype], Tensor]
) -> float:
    """The largest float32 relative error of a reversible run of ``converted`` rebuilding
    its input from its output (a float32 twin, eval mode), on the inputs the runs get."""
    twin = copy.deepcopy(converted).float().eval()
    inputs: list[Tensor] = []
    hooks = [
        run.register_forward_pre_hook(lambda mod, a: inputs.append(a[0])) for run in twin.runs()
    ]
    try:
        with torch.no_grad():
            call(twin, torch.float32)
    finally:
        for hook in hooks:
            hook.remove()
    worst = 0.0
    for run, x in zip(twin.runs(), inputs):
        state = run.method.lift(x)
        with torch.no_grad():
            error = relative_l2(run.blocks.inverse(run.blocks(state)), state)
            worst = error if not math.isfinite(error) else max(worst, error)
            if not math.isfinite(worst):
                break  # overflowed: nan or inf is the answer
    return worst


def distance_row(
    name: str,
    case: tuple[nn.Module, Callable[[nn.Module, torch.dtype], Tensor]],
    method: str,
    options: dict[str, float],
    accuracy: Callable[[nn.Module], float] | None = None,
) -> dict[str, Any]:
    original, call = case
    converted = make_reversible(original, method, **options).eval()
    original.eval()
    with torch.no_grad():
        distance = relative_l2(call(converted, torch.float64), call(original, torch.float64))
    row: dict[str, Any] = {"network": name, "method": method, **options, "distance": distance}
    row["reconstruction_f32"] = reconstruction_error(converted, call)
    if accuracy is not None:
        row["accuracy"] = accuracy(converted)
    return row


def distance_cases(args: argparse.Namespace, pretrained: dict[str, Any] | None) -> Iterator[Case]:
    if pretrained is not None:
        test = pretrained["data"]["test_x"][:256].double()
        yield "resnet18 (digits)", pretrained["model"], lambda m, dt: m(test.to(dt))
    tv = torchvision_models()
    if not args.quick:
        images = torch.randn(4, 3, 64, 64, dtype=torch.float64)
        yield "resnet50 (init)", tv.resnet50(num_classes=10), lambda m, dt: m(images.to(dt))
    small = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    yield (
        "ViT-S (init)",
        timm_vit(2 if args.quick else 12, 32, 8, quick=args.quick),
        lambda m, dt: m(small.to(dt)),
    )
    tokens = torch.randn(4, 12, 64, dtype=torch.float64)
    for norm_first in (True, False):
        yield (
            f"encoder {'pre' if norm_first else 'post'}-norm (init)",
            encoder(norm_first, 2 if args.quick else 6),
            lambda m, dt: m(tokens.to(dt)),
        )


def bench_distance(
    args: argparse.Namespace, pretrained: dict[str, Any] | None
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, original, call in distance_cases(args, pretrained):
        original.double()
        accuracy = None
        if pretrained is not None and original is pretrained["model"]:
            data = pretrained["data"]
            accuracy = lambda m: test_accuracy(m, data, torch.float64)  # noqa: E731
        for method, (key, values) in GRID.items():
            for value in values[:2] if args.quick else values:
                rows.append(distance_row(name, (original, call), method, {key: value}, accuracy))
        original.float()
    return rows


# -- the schedule's path --------------------------------------------------------------------
def schedule_path(
    name: str, original: nn.Module, call: Callable[[nn.Module, torch.dtype], Tensor], points: int
) -> list[dict[str, Any]]:
    """Distance, float32 reconstruction and float32 gradient error at ``points`` points of
    the two-stream schedule; the gradient error and the forward-retained memory also with
    an anchor after every coupling (``anchor_every=1``)."""
    rows = []
    original.double()
    converted = make_reversible(original, "two_stream")
    schedule = CoefficientSchedule(converted, steps=points - 1, **SCHEDULE)
    for point in range(points):
        converted.eval(), original.eval()
        with torch.no_grad():
            distance = relative_l2(call(converted, torch.float64), call(original, torch.float64))
        row: dict[str, Any] = {
            "network": name,
            "point": point,
            **converted.coefficients.as_dict(),
            "distance": distance,
            "reconstruction_f32": reconstruction_error(converted, call),
        }
        for anchors, suffix in ((0, ""), (1, "_anchored")):
            twin = copy.deepcopy(converted).float().train()
            for run in twin.runs():
                run.blocks.anchor_every = anchors
            plain = _grads(twin, lambda: call(twin, torch.float32), saving=False)
            saved = _grads(twin, lambda: call(twin, torch.float32), saving=True)
            row[f"gradient_error_f32{suffix}"] = relative_l2(saved, plain)
            _, stats = measure_memory(lambda: call(twin, torch.float32))
            row[f"retained_mib{suffix}"] = stats.retained_bytes / 2**20
        rows.append(row)
        if point < points - 1:
            schedule.step()
    original.float()
    return rows


def bench_schedule(
    args: argparse.Namespace, pretrained: dict[str, Any] | None
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    points = 3 if args.quick else 5
    if pretrained is not None:
        test = pretrained["data"]["test_x"][:64].double()
        rows += schedule_path(
            "resnet18 (digits)", pretrained["model"], lambda m, dt: m(test.to(dt)), points
        )
    images = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    vit = timm_vit(2 if args.quick else 12, 32, 8, quick=args.quick)
    rows += schedule_path("ViT-S (init)", vit, lambda m, dt: m(images.to(dt)), points)
    return rows


# -- memory and time ------------------------------------------------------------------------
class CheckpointedBlock(nn.Module):
    """A block recomputed in backward with ``torch.utils.checkpoint`` (the usual way)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled():
            out = checkpoint(self.block, x, use_reentrant=False)
            assert isinstance(out, Tensor)
            return out
        return self.block(x)  # type: ignore[no-any-return]


def checkpointed_resnet(model: nn.Module) -> nn.Module:
    twin = copy.copy(model)
    twin._modules = dict(model._modules)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        twin._modules[name] = nn.Sequential(
            *[CheckpointedBlock(b) for b in model.get_submodule(name)]
        )
    return twin


def memory_variants(kind: str, depth: int, args: argparse.Namespace) -> dict[str, nn.Module | str]:
    """The networks of one memory row group: name -> network, or why it is missing."""
    if kind == "resnet":
        blocks = (1, 2, depth, 1) if args.quick else (3, 4, depth, 3)
        original = resnet_with_layer3(blocks, classes=10)
        baseline = checkpointed_resnet(original)
    else:
        original = timm_vit(depth, args.vit_image_size, 16, classes=10, quick=args.quick)
        baseline = copy.deepcopy(original)
        baseline.set_grad_checkpointing(True)
    variants: dict[str, nn.Module | str] = {
        "original": original,
        "original + checkpoint per block": baseline,
    }
    for label, (method, options) in CONVERSIONS.items():
        variants[f"make_reversible {label}"] = make_reversible(original, method, **options)
    module, version = momentumnet()
    label = "momentumnet transform_to_momentumnet"
    if module is None:
        variants[label] = f"not run: {version}"
    else:
        try:
            if kind == "resnet":
                variants[label] = module.transform_to_momentumnet(
                    copy.deepcopy(original), gamma=0.9, use_backprop=False
                )
            else:
                variants[label] = module.transform_to_momentumnet(
                    copy.deepcopy(original),
                    sub_layers=["blocks"],
                    gamma=0.9,
                    use_backprop=False,
                    keep_first_layer=False,
                    is_residual=False,
                )
        except Exception as exc:
            variants[label] = f"failed: {type(exc).__name__}: {exc}"
    return variants


def bench_memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows per network, depth and variant: retained and peak MiB, step time and its ratio
    to the original's (the variants of one depth timed in turns)."""
    rows: list[dict[str, Any]] = []
    depths = {
        "resnet": (2, 3) if args.quick else (6, 12, 24),  # layer3's blocks (resnet50: 6)
        "vit": (1, 2) if args.quick else (6, 12, 24),
    }
    for kind in ("resnet", "vit"):
        size = args.image_size if kind == "resnet" else args.vit_image_size
        network = "resnet50" if kind == "resnet" else "ViT-S"
        for depth in depths[kind]:
            variants = memory_variants(kind, depth, args)
            images = torch.randn(args.batch_size, 3, size, size)
            labels = torch.randint(0, 10, (args.batch_size,))
            steps: dict[str, TrainingStep] = {}
            group: list[dict[str, Any]] = []
            for name, net in variants.items():
                row: dict[str, Any] = {"network": network, "depth": depth, "variant": name}
                group.append(row)
                if isinstance(net, str):
                    row["note"] = net
                    continue
                net.train()
                optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
                step = TrainingStep(
                    net, images, loss_fn=F.cross_entropy, targets=labels, optimizer=optimizer
                )
                try:
                    memory = measure_step_memory(step, warmup=1)
                except Exception as exc:  # a peer failing: reported, not fatal
                    row["note"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
                    continue
                row["retained_mib"] = memory.activation_bytes / 2**20
                row["peak_mib"] = memory.step_peak_bytes / 2**20
                steps[name] = step
            seconds = dict(
                zip(steps, median_step_seconds(list(steps.values()), args.repeats, args.clock))
            )
            for row in group:
                if row["variant"] in seconds:
                    row["step_s"] = seconds[row["variant"]]
                    row["time_ratio"] = seconds[row["variant"]] / seconds["original"]
            rows += group
            print(f"  memory: {network} depth {depth} done", flush=True)
    return rows


# -- fine-tuning parity ---------------------------------------------------------------------
def digits(image_size: int) -> dict[str, Tensor]:
    """scikit-learn's digits (the harness's fixed split), upsampled and normalised."""
    from invertible_train.data import digits_images

    train, test = digits_images()
    out: dict[str, Tensor] = {}
    mean = std = None
    for split, data in (("train", train), ("test", test)):
        x = data.images.float() / 255.0
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        if mean is None:
            mean, std = x.mean(), x.std()
        out[f"{split}_x"] = ((x - mean) / std).repeat(1, 3, 1, 1)
        out[f"{split}_y"] = data.labels
    return out


def fit(
    model: nn.Module,
    data: dict[str, Tensor],
    steps: int,
    lr: float,
    seed: int,
    batch: int,
    on_step: Callable[[], None] | None = None,
) -> None:
    """SGD (momentum 0.9, weight decay 5e-4) on shuffled batches of the training scans."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(seed)
    n = data["train_x"].shape[0]
    order = torch.randperm(n, generator=generator)
    at = 0
    model.train()
    for _ in range(steps):
        if at + batch > n:
            order, at = torch.randperm(n, generator=generator), 0
        idx = order[at : at + batch]
        at += batch
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(data["train_x"][idx]), data["train_y"][idx]).backward()
        optimizer.step()
        if on_step is not None:
            on_step()


def test_accuracy(
    model: nn.Module, data: dict[str, Tensor], dtype: torch.dtype = torch.float32
) -> float:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x.to(dtype)) for x in data["test_x"].split(256)])
    return float((logits.argmax(1) == data["test_y"]).float().mean())


def spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "range": max(values) - min(values),
    }


def pretrain(args: argparse.Namespace, data: dict[str, Tensor], seed: int) -> nn.Module:
    """resnet18 trained plain on the digits from ``seed``'s initialisation: the
    "pretrained" start of the fine-tuning."""
    torch.manual_seed(seed)
    model = torchvision_models().resnet18(num_classes=10)
    fit(model, data, args.pretrain_steps, 0.05, seed, args.train_batch)
    return model


def bench_parity(
    args: argparse.Namespace, data: dict[str, Tensor]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    tv = torchvision_models()
    runs: list[dict[str, Any]] = []
    first: dict[str, Any] | None = None
    for seed in range(args.seeds):
        pretrained = pretrain(args, data, seed)
        start = copy.deepcopy(pretrained.state_dict())
        pre_accuracy = test_accuracy(pretrained, data)
        if first is None:
            first = {"model": copy.deepcopy(pretrained), "data": data}
        for variant, conversion in PARITY_VARIANTS.items():
            net = tv.resnet18(num_classes=10)
            net.load_state_dict(start)
            on_step = None
            if conversion is not None:
                method, scheduled = conversion
                net = make_reversible(net, method)
                if scheduled:
                    on_step = CoefficientSchedule(net, steps=args.finetune_steps, **SCHEDULE).step
            at_conversion = test_accuracy(net, data)
            fit(net, data, args.finetune_steps, 0.01, 1000 + seed, args.train_batch, on_step)
            runs.append(
                {
                    "seed": seed,
                    "variant": variant,
                    "pretrained_accuracy": pre_accuracy,
                    "accuracy_at_conversion": at_conversion,
                    "accuracy": test_accuracy(net, data),
                }
            )
            print(
                f"  seed {seed} {variant:>21}: at conversion {at_conversion:.4f}, after fine-tuning {runs[-1]['accuracy']:.4f}",
                flush=True,
            )
    summary: dict[str, Any] = {}
    for variant in PARITY_VARIANTS:
        summary[variant] = spread([r["accuracy"] for r in runs if r["variant"] == variant])
        summary[variant]["at_conversion"] = spread(
            [r["accuracy_at_conversion"] for r in runs if r["variant"] == variant]
        )
    for variant in list(PARITY_VARIANTS)[1:]:
        gap = abs(summary[variant]["mean"] - summary["original"]["mean"])
        allowed = max(summary[variant]["range"], summary["original"]["range"])
        summary[variant]["parity"] = {"gap": gap, "allowed": allowed, "met": gap <= allowed}
    return {"runs": runs, "summary": summary}, first


# -- printing -----------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def print_tables(result: dict[str, Any]) -> None:
    if "gradients" in result:
        print(
            "\nGradients with memory saving against plain autograd (float64, relative L2; target <= 1e-6)"
        )
        print("| network | method | error |\n|---|---|---|")
        for r in result["gradients"]:
            print(
                f"| {r['network']} | {r['method']} | {_fmt(r['error'], '.2e')}{' ' + r['note'] if r.get('note') else ''} |"
            )
    if "distance" in result:
        print(
            "\nOutput at conversion against the original (relative L2, float64, eval) and the float32 reconstruction error of the runs"
        )
        print(
            "| network | method | coefficient | distance | reconstruction f32 | test accuracy |\n|---|---|---|---|---|---|"
        )
        for r in result["distance"]:
            coef = f"gamma={r['gamma']:g}" if "gamma" in r else f"beta={r['beta']:g}"
            print(
                f"| {r['network']} | {r['method']} | {coef} | {_fmt(r['distance'], '.2e')} | {_fmt(r['reconstruction_f32'], '.2e')} | {_fmt(r.get('accuracy'), '.4f')} |"
            )
    if "schedule" in result:
        print(
            "\nThe two-stream schedule's path (alpha 1 -> 0, beta 0.1 -> 1): distance to the "
            "original, float32 reconstruction and gradient errors, forward-retained memory; "
            "without anchors and with one after every coupling"
        )
        print(
            "| network | alpha | beta | distance | reconstruction f32 | gradient error f32 | "
            "retained MiB | anchored: gradient error f32 | retained MiB |\n"
            "|---|---|---|---|---|---|---|---|---|"
        )
        for r in result["schedule"]:
            print(
                f"| {r['network']} | {r['alpha']:.2f} | {r['beta']:.3f} | "
                f"{_fmt(r['distance'], '.2e')} | {_fmt(r['reconstruction_f32'], '.2e')} | "
                f"{_fmt(r['gradient_error_f32'], '.2e')} | {r['retained_mib']:.2f} | "
                f"{_fmt(r['gradient_error_f32_anchored'], '.2e')} | {r['retained_mib_anchored']:.2f} |"
            )
    if "memory" in result:
        print(
            "\nForward-retained memory (MiB, exact) and step time relative to the original (CPU, "
            "provisional); depth: blocks of the ResNet's layer3 (6 in resnet50), of the ViT"
        )
        print(
            "| network | depth | variant | retained MiB | step peak MiB | step time ratio |\n|---|---|---|---|---|---|"
        )
        for r in result["memory"]:
            if "note" in r:
                print(f"| {r['network']} | {r['depth']} | {r['variant']} | {r['note']} | | |")
                continue
            print(
                f"| {r['network']} | {r['depth']} | {r['variant']} | {r['retained_mib']:.1f} | {r['peak_mib']:.1f} | {_fmt(r.get('time_ratio'), '.2f')} |"
            )
    if "parity" in result:
        print("\nFine-tuning parity on digits (resnet18, test accuracy over seeds)")
        print(
            "| variant | at conversion (mean) | after fine-tuning: mean | std | min | max | parity |\n|---|---|---|---|---|---|---|"
        )
        for variant, s in result["parity"]["summary"].items():
            parity = s.get("parity")
            verdict = (
                ""
                if parity is None
                else f"{'yes' if parity['met'] else 'no'} (gap {parity['gap']:.4f} <= {parity['allowed']:.4f}?)"
            )
            print(
                f"| {variant} | {s['at_conversion']['mean']:.4f} | {s['mean']:.4f} | {s['std']:.4f} | {s['min']:.4f} | {s['max']:.4f} | {verdict} |"
            )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, a few steps")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--seeds", type=int, default=None, help="parity seeds (default 3; quick 2)")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="default 150 (quick 2)")
    parser.add_argument("--finetune-steps", type=int, default=None, help="default 100 (quick 2)")
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument(
        "--batch-size", type=int, default=None, help="memory rows (default 8; quick 2)"
    )
    parser.add_argument(
        "--image-size", type=int, default=None, help="ResNet memory rows (default 64)"
    )
    parser.add_argument(
        "--vit-image-size", type=int, default=None, help="ViT memory rows (default 96; quick 32)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed steps (default 5; quick 1)"
    )
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/convert.json"))
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the sections of an existing --json file that this run does not measure "
        "(each section records the run that measured it)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.seeds = args.seeds or (2 if quick else 3)
    args.pretrain_steps = args.pretrain_steps or (2 if quick else 150)
    args.finetune_steps = args.finetune_steps or (2 if quick else 100)
    args.batch_size = args.batch_size or (2 if quick else 8)
    args.image_size = args.image_size or 64
    args.vit_image_size = args.vit_image_size or (32 if quick else 96)
    args.repeats = args.repeats or (1 if quick else 5)
    if quick:
        args.train_batch = min(args.train_batch, 16)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {}
    pretrained = None
    if {"parity", "distance", "schedule"} & set(args.sections):
        data = digits(32)
        if args.quick:  # a smoke test: a few scans of each split
            data = {key: value[:64] for key, value in data.items()}
        if "parity" in args.sections:
            print("parity: pretraining and fine-tuning resnet18 on digits", flush=True)
            result["parity"], pretrained = bench_parity(args, data)
        else:  # a pretrained start for the distance and schedule sections
            pretrained = {"model": pretrain(args, data, seed=0), "data": data}
    if "gradients" in args.sections:
        result["gradients"] = bench_gradients(args)
    if "distance" in args.sections:
        result["distance"] = bench_distance(args, pretrained)
    if "schedule" in args.sections:
        result["schedule"] = bench_schedule(args, pretrained)
    if "memory" in args.sections:
        result["memory"] = bench_memory(args)
    print_tables(result)
    _, momentumnet_version = momentumnet()
    config = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"
    }
    config["date"] = datetime.date.today().isoformat()
    measured_by = {section: config for section in result}
    if args.merge and args.json.is_file():
        earlier = json.loads(args.json.read_text())
        for section in SECTIONS:
            if section in earlier and section not in result:
                result[section] = earlier[section]
                measured_by[section] = earlier.get("measured_by", {}).get(
                    section, earlier["config"]
                )
    payload = {
        "benchmark": "convert",
        "config": config,
        "measured_by": measured_by,
        "environment": {
            "torch": torch.__version__,
            "invertible_core": invertible_core.__version__,
            "invertible_models": invertible_models.__version__,
            "momentumnet": momentumnet_version,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "python": sys.version.split()[0],
        },
        **result,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_name(args.json.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(args.json)  # never a half-written result file
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
