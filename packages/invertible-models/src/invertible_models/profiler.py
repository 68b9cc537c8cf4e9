"""``invertible-profile``: what a model costs to train, in memory and in time.

For each model named on the command line it prints the parameter count, the parameters'
size, the peak memory of one training step (forward, cross-entropy, backward, SGD step)
beyond the model state (parameters, gradients, momentum), the activation memory a forward
pass leaves stored for backward, and the median step time:

    invertible-profile resnet110 revnet110 --batch-size 32 --json profile.json
    invertible-profile revnet164 --budget 6GiB [--fit-batch] [--device cuda]

With ``--budget`` it plans each model's step for that memory budget instead
(:mod:`invertible_models.memory_budget`): which reversible blocks keep their activations and
which non-reversible blocks are checkpointed, the fastest step that fits; ``--fit-batch``
also finds the largest batch whose leanest step fits.

Memory is exact: on the CPU it is the sum of the PyTorch profiler's allocation events, on
CUDA ``torch.cuda.max_memory_allocated`` (both through
:func:`invertible_core.memory.measure_memory`). Memory and time are measured in separate
runs, because the CPU profiler slows the work it records. ``--plot FILE`` draws memory
against depth per model family (needs matplotlib: ``pip install invertible-models[plot]``).

The same functions drive ``benchmarks/bench_models.py``, and :func:`measure_step_memory`
is the one memory measurement of the project: ``invertible-train`` (``summary.json``) and
``invertible-demo`` measure their models' training steps with it, on their own batches and
losses, so every figure means the same thing wherever it is printed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from invertible_core.memory import measure_memory
from invertible_core.memory_plan import parse_bytes
from invertible_models.memory_budget import run_budget
from invertible_models.registry import create_model, list_models

__all__ = [
    "ModelProfile",
    "StepMemory",
    "TrainingStep",
    "build_model",
    "format_table",
    "is_density_model",
    "is_segmentation_model",
    "main",
    "measure_step_memory",
    "median_step_seconds",
    "negative_log_likelihood",
    "plot_profiles",
    "profile_model",
    "profile_step",
]

MIB = 2**20

Clock = Literal["wall", "cpu"]


@dataclass(frozen=True)
class ModelProfile:
    """The measured cost of training one model on one batch size.

    Attributes:
        name: registered model name.
        label: name plus the options that distinguish this run (e.g. ``nosave``).
        parameters: number of parameters.
        parameter_mib: their size in MiB.
        state_mib: parameters, gradients and optimizer buffers, in MiB: what training holds
            whatever the activations.
        peak_step_mib: peak memory of one training step beyond that state (activations and
            temporaries of forward, backward and the optimizer step).
        activation_mib: memory a training-mode forward pass keeps alive for backward.
        step_seconds: median wall time of a training step.
        batch_size, image_size, device: the conditions of the measurement.
        options: the keyword options the model was built with.
    """

    name: str
    label: str
    parameters: int
    parameter_mib: float
    state_mib: float
    peak_step_mib: float
    activation_mib: float
    step_seconds: float
    batch_size: int
    image_size: int
    device: str
    options: dict[str, Any]


class TrainingStep:
    """One SGD training step of a model on a fixed batch, callable repeatedly.

    The step is forward, loss, backward, SGD (momentum 0.9). Gradients are zeroed in place,
    not freed, so that after the first call the model state (parameters, gradients,
    momentum buffers) stays allocated between steps, as in a training loop, and a step's
    peak memory counts only what the step itself adds: activations and temporaries. That
    state is reported separately (:attr:`state_bytes`).

    By default the batch is synthetic (``batch_size`` random ``3 x image_size x image_size``
    images, random labels) and the loss is cross-entropy. A density model (one with
    ``log_prob``, such as ``glow``, whose forward is its per-sample log-likelihood) gets
    images in ``[0, 1]`` with the model's ``in_channels`` and the mean negative
    log-likelihood per dimension as its loss. A segmentation model (one with
    ``spatial_dims``, such as ``iunet`` and ``unet``) gets ``batch_size`` random inputs of
    its ``in_channels`` with ``spatial_dims`` axes of ``image_size`` (volumes for 3D), a random
    class per position, and cross-entropy over the positions. A caller with a batch and a loss of its own
    (a training harness) passes ``images``, ``labels`` and ``loss(output, labels)``;
    ``amp_dtype`` runs the forward under ``torch.autocast``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        batch_size: int = 32,
        image_size: int = 32,
        num_classes: int = 10,
        device: str | torch.device = "cpu",
        images: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        amp_dtype: torch.dtype | None = None,
    ) -> None:
        self.device = torch.device(device) if images is None else images.device
        self.model = model.to(self.device).train()
        density = is_density_model(model)
        # the step's cost does not depend on the learning rate, but a flow stepped at 0.01
        # on one batch diverges within a few steps (Glow to NaN, K=32), and NaN arithmetic
        # is not what training costs; 1e-3 stays finite
        lr = 1e-3 if density else 0.01
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9)
        segmentation = is_segmentation_model(model)
        if images is None:
            channels = int(getattr(model, "in_channels", 3)) if density or segmentation else 3
            axes = int(getattr(model, "spatial_dims", 2))
            shape = (batch_size, channels, *([image_size] * axes))
            images = (
                torch.rand(shape, device=self.device)
                if density
                else torch.randn(shape, device=self.device)
            )
        if labels is None:
            # a segmentation model: one class per position, from its own number of classes
            classes = int(getattr(model, "num_classes", num_classes))
            positions = tuple(images.shape[2:]) if segmentation else ()
            labels = torch.randint(
                0,
                classes if segmentation else num_classes,
                (images.shape[0], *positions),
                device=self.device,
            )
        self.images = images
        self.labels = labels
        dims = images[0].numel()
        default: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = (
            (lambda log_prob, labels: negative_log_likelihood(log_prob, labels) / dims)
            if density
            else nn.CrossEntropyLoss()
        )
        self.loss_fn = loss if loss is not None else default
        self.amp_dtype = amp_dtype

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=False)
        with self._autocast():
            loss = self.loss_fn(self.model(self.images), self.labels)
        loss.backward()
        self.optimizer.step()

    def forward(self) -> torch.Tensor:
        """The training-mode forward pass alone (its result holds what backward needs)."""
        with self._autocast():
            return self.model(self.images)  # type: ignore[no-any-return]

    def _autocast(self) -> torch.autocast:
        return torch.autocast(
            self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        )

    @property
    def state_bytes(self) -> int:
        """Bytes of parameters, gradients and optimizer buffers (after one step)."""
        tensors: list[torch.Tensor] = list(self.model.parameters())
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        for state in self.optimizer.state.values():
            tensors += [t for t in state.values() if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def seconds(self, clock: Clock = "wall") -> float:
        """Time of one step (synchronised on CUDA).

        ``clock="wall"`` is elapsed time; ``"cpu"`` is the CPU time this process used
        (all its threads), which other processes on a shared machine barely disturb.
        """
        timer = time.process_time if clock == "cpu" else time.perf_counter
        _synchronize(self.device)
        start = timer()
        self()
        _synchronize(self.device)
        return timer() - start


@dataclass(frozen=True)
class StepMemory:
    """What one steady-state training step of a model costs in memory, in bytes.

    Attributes:
        activation_bytes: what a training-mode forward pass keeps alive for backward (what
            memory saving reduces).
        step_peak_bytes: the peak of a whole step (forward, loss, backward, optimizer step)
            beyond the model state.
        state_bytes: the model state: parameters, gradients and momentum buffers.
    """

    activation_bytes: int
    step_peak_bytes: int
    state_bytes: int


def measure_step_memory(step: TrainingStep, warmup: int = 2) -> StepMemory:
    """Measure a training step with :func:`invertible_core.memory.measure_memory`.

    ``warmup`` steps run first, so that gradients and momentum buffers exist and the
    measured step is a steady-state one (lazily created kernels settle too). Exact on the
    CPU (the profiler's allocation events), ``max_memory_allocated`` on CUDA. The steps
    update the step's model: measure a copy when the model must stay as it was.
    """
    for _ in range(warmup):
        step()
    _, step_stats = measure_memory(step, device=step.device)
    output, forward_stats = measure_memory(step.forward, device=step.device)
    del output
    return StepMemory(
        activation_bytes=forward_stats.retained_bytes,
        step_peak_bytes=step_stats.peak_bytes,
        state_bytes=step.state_bytes,
    )


def is_density_model(model: nn.Module) -> bool:
    """Whether ``model`` is a density model (it has ``log_prob``; its forward is that)."""
    return callable(getattr(model, "log_prob", None))


def is_segmentation_model(model: nn.Module) -> bool:
    """Whether ``model`` is a segmentation model: it declares ``spatial_dims`` (2 or 3) and
    returns class logits per position, ``(batch, num_classes, *spatial)``."""
    return isinstance(getattr(model, "spatial_dims", None), int)


def negative_log_likelihood(log_prob: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss of a density model's step: the batch's mean negative log-likelihood (nats);
    ``labels`` are ignored."""
    del labels
    return -log_prob.mean()


def build_model(
    name: str, *, image_size: int = 32, num_classes: int = 10, **options: Any
) -> nn.Module:
    """``create_model(name, ...)`` for ``image_size`` images: a model whose class takes an
    ``image_size`` (the transformers, Glow) is built for that size."""
    model = create_model(name, num_classes=num_classes, **options)
    parameter = inspect.signature(type(model).__init__).parameters.get("image_size")
    if parameter is not None and "image_size" not in options and parameter.default != image_size:
        model = create_model(name, num_classes=num_classes, image_size=image_size, **options)
    return model


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_step_seconds(
    steps: Sequence[TrainingStep], repeats: int, clock: Clock = "wall"
) -> list[float]:
    """Median step time of each of ``steps``, timed in interleaved rounds.

    Interleaving (A, B, A, B, ...) exposes every configuration to the same background load,
    so their ratios stay meaningful on a shared machine even when absolute times wander.
    """
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for record, step in zip(times, steps):
            record.append(step.seconds(clock))
    return [statistics.median(record) for record in times]


def profile_model(
    name: str,
    *,
    batch_size: int = 32,
    image_size: int = 32,
    num_classes: int = 10,
    device: str = "cpu",
    steps: int = 3,
    label: str | None = None,
    seed: int = 0,
    **options: Any,
) -> ModelProfile:
    """Build ``name`` and measure one batch size: parameters, memory, step time.

    Args:
        name: registered model name.
        batch_size, image_size, num_classes: the synthetic batch (random images, labels).
        device: ``"cpu"`` or ``"cuda"``.
        steps: timed steps; the median is reported (two untimed warm-up steps first).
            0 skips timing (``step_seconds`` is then NaN).
        label: row label; defaults to ``name``.
        seed: seed for the weights and the batch, for repeatable runs.
        **options: passed to :func:`create_model` (``memory_saving``,
            ``checkpoint_transitions``, ``anchor_every``, ``depth``...).
    """
    if steps < 0:
        raise ValueError(f"steps must be at least 0, got {steps}")
    torch.manual_seed(seed)
    step = TrainingStep(
        build_model(name, image_size=image_size, num_classes=num_classes, **options),
        batch_size=batch_size,
        image_size=image_size,
        num_classes=num_classes,
        device=device,
    )
    return profile_step(step, name=name, label=label, steps=steps, options=options)


def profile_step(
    step: TrainingStep,
    *,
    name: str,
    label: str | None = None,
    steps: int = 3,
    options: dict[str, Any] | None = None,
) -> ModelProfile:
    """Measure a prepared training step: parameters, memory, step time.

    The measurement of :func:`profile_model`, for a step built by hand (another loss, real
    data: a subclass of :class:`TrainingStep` that overrides ``__call__`` and ``forward``).
    The batch size and image size are read from ``step.images``.
    """
    if steps < 0:
        raise ValueError(f"steps must be at least 0, got {steps}")
    memory = measure_step_memory(step)
    seconds = median_step_seconds([step], steps)[0] if steps else float("nan")
    parameters = sum(p.numel() for p in step.model.parameters())
    parameter_bytes = sum(p.numel() * p.element_size() for p in step.model.parameters())
    return ModelProfile(
        name=name,
        label=label or name,
        parameters=parameters,
        parameter_mib=parameter_bytes / MIB,
        state_mib=memory.state_bytes / MIB,
        peak_step_mib=memory.step_peak_bytes / MIB,
        activation_mib=memory.activation_bytes / MIB,
        step_seconds=seconds,
        batch_size=step.images.shape[0],
        image_size=step.images.shape[-1],
        device=str(step.device),
        options=dict(options or {}),
    )


def format_table(profiles: Sequence[ModelProfile]) -> str:
    """A fixed-width table of the profiles, one row per model."""
    header = (
        f"{'model':<22} {'params':>10} {'param MiB':>9} {'state MiB':>9} {'peak MiB':>9} "
        f"{'activ. MiB':>10} {'step s':>7}"
    )
    lines = [header, "-" * len(header)]
    for p in profiles:
        lines.append(
            f"{p.label:<22} {p.parameters:>10,} {p.parameter_mib:>9.2f} {p.state_mib:>9.2f} "
            f"{p.peak_step_mib:>9.1f} {p.activation_mib:>10.1f} {p.step_seconds:>7.3f}"
        )
    return "\n".join(lines)


def _family_and_depth(name: str) -> tuple[str, int | None]:
    match = re.fullmatch(r"(.*?)(\d+)", name)
    if match is None:
        return name, None
    return match.group(1), int(match.group(2))


def _pyplot() -> Any:
    """matplotlib's pyplot on a file-only backend; RuntimeError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError(
            "--plot needs matplotlib: pip install 'invertible-models[plot]'"
        ) from exc
    return plt


def plot_profiles(profiles: Sequence[ModelProfile], path: str) -> None:
    """Draw peak step memory and stored activations against depth, one line per family.

    Raises:
        RuntimeError: matplotlib is not installed (install the ``plot`` extra).
    """
    plt = _pyplot()
    families: dict[str, list[tuple[int, ModelProfile]]] = {}
    for p in profiles:
        family, depth = _family_and_depth(p.label)
        if depth is not None:
            families.setdefault(family, []).append((depth, p))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for family, points in sorted(families.items()):
        points.sort(key=lambda point: point[0])
        depths = [d for d, _ in points]
        axes[0].plot(depths, [p.peak_step_mib for _, p in points], marker="o", label=family)
        axes[1].plot(depths, [p.activation_mib for _, p in points], marker="o", label=family)
    for ax, title in zip(axes, ("peak memory of a training step", "stored activations")):
        ax.set_xlabel("depth (layers)")
        ax.set_ylabel("MiB")
        ax.set_title(title)
        ax.legend()
    batch = profiles[0].batch_size if profiles else 0
    fig.suptitle(f"memory against depth (batch {batch})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than ``minimum`` (else a usage error, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _size(text: str) -> int:
    """An argparse type: a memory size such as ``6GiB`` (else a usage error, exit 2)."""
    try:
        return parse_bytes(text, "--budget")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``invertible-profile``."""
    parser = argparse.ArgumentParser(
        prog="invertible-profile",
        description="Parameters, peak training memory, stored activations and step time "
        "of models from the invertible-models zoo.",
    )
    parser.add_argument(
        "models", nargs="*", metavar="MODEL", help="model names (--list shows them)"
    )
    parser.add_argument("--list", action="store_true", help="print the model names and exit")
    parser.add_argument("--batch-size", type=_at_least(1), default=32, help="images per step")
    parser.add_argument("--image-size", type=_at_least(1), default=32, help="image side")
    parser.add_argument("--num-classes", type=_at_least(1), default=10, help="classes")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device")
    parser.add_argument(
        "--steps",
        type=_at_least(1),
        default=None,
        help="timed steps (median reported; default 3, and 1 when fitting the batch)",
    )
    parser.add_argument(
        "--no-memory-saving",
        action="store_true",
        help="build the models with memory saving off (plain autograd: no reversible "
        "recompute, no checkpointing)",
    )
    parser.add_argument(
        "--budget",
        type=_size,
        metavar="SIZE",
        help="plan each model's training step for this memory budget (e.g. 6GiB, 512MiB, "
        "1.5GB: parameters, gradients, momentum, batch and activations): print the plan, its "
        "measured peak and step time",
    )
    parser.add_argument(
        "--fit-batch",
        action="store_true",
        help="with --budget: find the largest batch size whose leanest step (everything "
        "rebuilt or checkpointed) fits, starting from --batch-size, and plan it",
    )
    parser.add_argument(
        "--max-tries",
        type=_at_least(1),
        default=12,
        help="batch sizes measured at most when fitting the batch (default 12)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--plot", metavar="FILE", help="draw memory against depth (matplotlib)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``invertible-profile``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    known = list_models()
    if args.list:
        print("\n".join(known))
        return 0
    if not args.models:
        parser.error("name at least one MODEL (invertible-profile --list shows them)")
    unknown = [m for m in args.models if m not in known]
    if unknown:
        print(
            f"invertible-profile: unknown model(s) {', '.join(unknown)}; "
            f"known models: {', '.join(known)}",
            file=sys.stderr,
        )
        return 2
    if args.plot:
        # Fail before minutes of profiling, not after.
        try:
            _pyplot()
        except RuntimeError as exc:
            print(f"invertible-profile: {exc}", file=sys.stderr)
            return 1
    if args.device == "cuda" and not torch.cuda.is_available():
        print("invertible-profile: --device cuda, but CUDA is not available", file=sys.stderr)
        return 2
    if args.fit_batch and args.budget is None:
        parser.error("--fit-batch needs --budget SIZE (the memory the batch must fit)")
    if args.budget is not None:
        if args.plot:
            parser.error("--plot draws profiles; it does not combine with --budget")
        return run_budget(args, args.models, build_model, TrainingStep)
    profiles = [
        profile_model(
            name,
            batch_size=args.batch_size,
            image_size=args.image_size,
            num_classes=args.num_classes,
            device=args.device,
            steps=args.steps if args.steps is not None else 3,
            memory_saving=not args.no_memory_saving,
        )
        for name in args.models
    ]
    print(
        f"batch {args.batch_size}, {args.image_size}x{args.image_size} images, "
        f"{args.num_classes} classes, device {args.device}, torch {torch.__version__}"
    )
    print(format_table(profiles))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "torch": torch.__version__,
                    "device": args.device,
                    "profiles": [asdict(p) for p in profiles],
                },
                f,
                indent=2,
            )
    if args.plot:
        plot_profiles(profiles, args.plot)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
