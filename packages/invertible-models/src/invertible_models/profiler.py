"""``invertible-profile``: what a model costs to train, in memory and in time.

For each model named on the command line it prints one row: whether memory saving is on,
the parameter count and size, the model state (parameters, buffers, gradients, momentum),
the step peak (the most one training step allocates beyond the state and the batch: its
activations and temporaries), the activations (what a training-mode forward pass keeps for
backward) and the median step time. The step is the zoo's
(:func:`invertible_models.step.training_step`: forward, loss, backward, SGD step), and the
quantities are those of :mod:`invertible_core.planner.step`, one name each. Then, for every
row with saving on, what it saves against the first row with saving off, and what that
costs in time::

    invertible-profile revnet110 resnet110              # a RevNet saving, the ResNet plain
    invertible-profile resnet110 --memory-saving both   # a ResNet checkpointed, and plain
    invertible-profile revnet164 --budget 6GiB [--fit-batch] [--device cuda]

Each model trains as the zoo builds it unless told otherwise: reversible networks save
memory, plain ones (ResNets, ViTs) do not (``--memory-saving on|off|both`` overrides). With
``--budget`` it plans each model's step for that memory budget instead
(:mod:`invertible_models.memory_budget`).

Memory is exact: on the CPU the sum of the PyTorch profiler's allocation events, on CUDA
``torch.cuda.max_memory_allocated`` (:func:`invertible_core.measure_step_memory`). Memory
and time are measured in separate runs, because the CPU profiler slows the work it records,
and every measured step starts from one state of the model (the measurements rewind), so a
model that training would carry off to NaN is measured where it is. The step times of the
models named are taken in interleaved rounds (A, B, A, B...), so that their ratios hold on
a loaded machine. A step whose loss is not finite is never timed: the profiler says so and
records nothing for that model.
``--plot FILE`` draws memory against depth per model family and saving mode (needs
matplotlib: ``pip install invertible-models[plot]``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch

from invertible_core import (
    NonFiniteLossError,
    TrainingStep,
    measure_step_memory,
    median_step_seconds,
    parse_bytes,
)
from invertible_models.memory_budget import BudgetRequest, run_budget
from invertible_models.registry import list_models
from invertible_models.step import build_model, training_step

__all__ = [
    "Comparison",
    "ModelProfile",
    "compare",
    "format_comparisons",
    "format_table",
    "interleaved_seconds",
    "main",
    "model_step",
    "plot_profiles",
    "profile_model",
    "profile_step",
]

MIB = 2**20

#: ``--memory-saving``: each model's default, on, off, or both (two rows per model)
SavingChoice = Literal["model", "on", "off", "both"]


@dataclass(frozen=True)
class ModelProfile:
    """The measured cost of training one model on one batch size.

    Attributes:
        name: registered model name.
        label: the row's label (the name, unless given).
        memory_saving: whether the model saved memory (``None``: it has no switch).
        parameters: number of parameters.
        parameter_mib: their size in MiB.
        state_mib: the step's ``state_bytes`` in MiB: parameters, buffers, gradients and
            the optimizer's momentum, what training holds whatever the batch.
        step_peak_mib: the step's ``step_peak_bytes`` in MiB: the most it allocates beyond
            the state and the batch (activations and temporaries of forward, backward and
            the optimizer step).
        activation_mib: the ``activation_bytes`` in MiB: what a training-mode forward pass
            keeps alive for backward.
        step_seconds: median wall time of a training step (NaN: not timed).
        batch_size, image_size, device: the conditions of the measurement.
        options: the keyword options the model was built with.
    """

    name: str
    label: str
    memory_saving: bool | None
    parameters: int
    parameter_mib: float
    state_mib: float
    step_peak_mib: float
    activation_mib: float
    step_seconds: float
    batch_size: int
    image_size: int
    device: str
    options: dict[str, Any]


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
        steps: timed steps; the median is reported. 0 skips timing (NaN).
        label: row label; defaults to ``name``.
        seed: seed for the weights and the batch, for repeatable runs.
        **options: passed to :func:`~invertible_models.create_model` (``memory_saving``,
            ``checkpoint_transitions``, ``depth``...).

    Raises:
        NonFiniteLossError: a step's loss was not finite (nothing measured).
    """
    if steps < 0:
        raise ValueError(f"steps must be at least 0, got {steps}")
    step = model_step(
        name,
        batch_size=batch_size,
        image_size=image_size,
        num_classes=num_classes,
        device=device,
        seed=seed,
        **options,
    )
    return profile_step(step, name=name, label=label, steps=steps, options=options)


def model_step(
    name: str,
    *,
    batch_size: int = 32,
    image_size: int = 32,
    num_classes: int = 10,
    device: str = "cpu",
    seed: int = 0,
    **options: Any,
) -> TrainingStep:
    """The zoo's training step of model ``name`` (built with ``options``, weights and batch
    from ``seed``), as :func:`profile_model` measures it."""
    torch.manual_seed(seed)
    return training_step(
        build_model(name, image_size=image_size, num_classes=num_classes, **options),
        batch_size=batch_size,
        image_size=image_size,
        num_classes=num_classes,
        device=device,
    )


def interleaved_seconds(steps: Sequence[TrainingStep], repeats: int) -> list[float | None]:
    """Median step time of each step, timed in interleaved rounds so that their ratios hold
    on a loaded machine; ``None`` for a step whose loss is not finite (then the others are
    timed one by one)."""
    try:
        return list(median_step_seconds(steps, repeats))
    except NonFiniteLossError:
        times: list[float | None] = []
        for step in steps:
            try:
                times.append(median_step_seconds([step], repeats)[0])
            except NonFiniteLossError:
                times.append(None)
        return times


def profile_step(
    step: TrainingStep,
    *,
    name: str,
    label: str | None = None,
    steps: int = 3,
    options: dict[str, Any] | None = None,
) -> ModelProfile:
    """Measure a prepared training step: parameters, memory, step time.

    The measurement of :func:`profile_model`, for a step made otherwise (another loss, real
    data). The batch size and image size are read from the step's first input.
    """
    if steps < 0:
        raise ValueError(f"steps must be at least 0, got {steps}")
    memory = measure_step_memory(step)
    seconds = median_step_seconds([step], steps)[0] if steps else float("nan")
    model = step.module
    parameters = sum(p.numel() for p in model.parameters())
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    saving = getattr(model, "memory_saving", None)
    images = step.inputs[0]
    return ModelProfile(
        name=name,
        label=label or name,
        memory_saving=saving if isinstance(saving, bool) else None,
        parameters=parameters,
        parameter_mib=parameter_bytes / MIB,
        state_mib=memory.state_bytes / MIB,
        step_peak_mib=memory.step_peak_bytes / MIB,
        activation_mib=memory.activation_bytes / MIB,
        step_seconds=seconds,
        batch_size=images.shape[0],
        image_size=images.shape[-1],
        device=str(step.device),
        options=dict(options or {}),
    )


def _saving(profile: ModelProfile) -> str:
    return {True: "on", False: "off", None: "-"}[profile.memory_saving]


def format_table(profiles: Sequence[ModelProfile]) -> str:
    """A fixed-width table of the profiles, one row per model and saving mode."""
    header = (
        f"{'model':<22} {'saving':>6} {'params':>10} {'param MiB':>9} {'state MiB':>9} "
        f"{'step peak MiB':>13} {'activ. MiB':>10} {'step s':>7}"
    )
    lines = [header, "-" * len(header)]
    for p in profiles:
        lines.append(
            f"{p.label:<22} {_saving(p):>6} {p.parameters:>10,} {p.parameter_mib:>9.2f} "
            f"{p.state_mib:>9.2f} {p.step_peak_mib:>13.1f} {p.activation_mib:>10.1f} "
            f"{p.step_seconds:>7.3f}"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Comparison:
    """A row with saving on against the reference (the first row with saving off).

    Attributes:
        label, reference: the two rows' labels.
        step_peak_ratio: step peak over the reference's.
        step_peak_saved_mib: the reference's step peak minus this one's.
        activation_ratio: activations over the reference's.
        time_ratio: step time over the reference's (NaN when either is untimed).
        extra_seconds: step time minus the reference's.
    """

    label: str
    reference: str
    step_peak_ratio: float
    step_peak_saved_mib: float
    activation_ratio: float
    time_ratio: float
    extra_seconds: float


def compare(profiles: Sequence[ModelProfile]) -> list[Comparison]:
    """Every row with saving on against the first row with saving off (none without one)."""
    reference = next((p for p in profiles if p.memory_saving is False), None)
    if reference is None:
        return []

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else float("nan")

    return [
        Comparison(
            label=p.label,
            reference=reference.label,
            step_peak_ratio=ratio(p.step_peak_mib, reference.step_peak_mib),
            step_peak_saved_mib=reference.step_peak_mib - p.step_peak_mib,
            activation_ratio=ratio(p.activation_mib, reference.activation_mib),
            time_ratio=ratio(p.step_seconds, reference.step_seconds),
            extra_seconds=p.step_seconds - reference.step_seconds,
        )
        for p in profiles
        if p.memory_saving is True
    ]


def format_comparisons(comparisons: Sequence[Comparison]) -> str:
    """One line per comparison: the memory saved and what it costs in time."""
    lines = []
    for c in comparisons:
        lines.append(
            f"{c.label} (saving on) against {c.reference} (saving off): step peak "
            f"{c.step_peak_ratio:.3f}x (saves {c.step_peak_saved_mib:.1f} MiB), activations "
            f"{c.activation_ratio:.3f}x, for {c.time_ratio:.2f}x the step time "
            f"({1e3 * c.extra_seconds:+.0f} ms)"
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
    """Draw the step peak and the activations against depth, one line per family and
    saving mode (``revnet, saving on``).

    Raises:
        RuntimeError: matplotlib is not installed (install the ``plot`` extra).
    """
    plt = _pyplot()
    lines: dict[str, list[tuple[int, ModelProfile]]] = {}
    for p in profiles:
        family, depth = _family_and_depth(p.name)
        if depth is not None:
            lines.setdefault(f"{family}, saving {_saving(p)}", []).append((depth, p))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for line, points in sorted(lines.items()):
        points.sort(key=lambda point: point[0])
        depths = [d for d, _ in points]
        axes[0].plot(depths, [p.step_peak_mib for _, p in points], marker="o", label=line)
        axes[1].plot(depths, [p.activation_mib for _, p in points], marker="o", label=line)
    for ax, title in zip(axes, ("step peak of a training step", "stored activations")):
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
        description="Parameters, training memory (step peak, activations) and step time of "
        "models from the invertible-models zoo, with and without memory saving.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "models", nargs="*", metavar="MODEL", help="model names (--list shows them)"
    )
    parser.add_argument("--list", action="store_true", help="print the model names and exit")
    parser.add_argument(
        "--batch-size", type=_at_least(1), default=32, help="images per step (default: %(default)s)"
    )
    parser.add_argument(
        "--image-size", type=_at_least(1), default=32, help="image side (default: %(default)s)"
    )
    parser.add_argument(
        "--num-classes", type=_at_least(1), default=10, help="classes (default: %(default)s)"
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="device (default: %(default)s)"
    )
    parser.add_argument(
        "--steps",
        type=_at_least(1),
        default=None,
        help="timed steps, the median reported (when not given: 3, and 1 when fitting the batch)",
    )
    parser.add_argument(
        "--memory-saving",
        choices=("model", "on", "off", "both"),
        default="model",
        help="'model': as the zoo builds each model (reversible networks save memory, plain "
        "ones train plainly); 'on' or 'off' for every model; 'both': a row with and one "
        "without for each",
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
        help="batch sizes measured at most when fitting the batch",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--plot", metavar="FILE", help="draw memory against depth (matplotlib)")
    return parser


def _savings(choice: SavingChoice) -> list[bool | None]:
    """The ``memory_saving`` values each model is built with (``None``: its default)."""
    values: dict[str, list[bool | None]] = {
        "model": [None],
        "on": [True],
        "off": [False],
        "both": [True, False],
    }
    return values[choice]


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
        if args.memory_saving == "both":
            parser.error("--budget plans one model at a time: --memory-saving both is for profiles")
        return run_budget(
            BudgetRequest(
                models=tuple(args.models),
                budget_bytes=args.budget,
                batch_size=args.batch_size,
                image_size=args.image_size,
                num_classes=args.num_classes,
                device=args.device,
                fit_batch=args.fit_batch,
                max_tries=args.max_tries,
                steps=args.steps,
                memory_saving=_savings(args.memory_saving)[0],
                json_path=args.json,
            )
        )
    # memory one model at a time (under the CPU profiler), then time all of them in
    # interleaved rounds, so that the ratios of the comparisons hold on a loaded machine
    measured: list[tuple[ModelProfile, TrainingStep]] = []
    failed: list[dict[str, str]] = []
    for name in args.models:
        for saving in _savings(args.memory_saving):
            options: dict[str, Any] = {} if saving is None else {"memory_saving": saving}
            step = model_step(
                name,
                batch_size=args.batch_size,
                image_size=args.image_size,
                num_classes=args.num_classes,
                device=args.device,
                **options,
            )
            try:
                profile = profile_step(step, name=name, steps=0, options=options)
            except NonFiniteLossError as exc:
                print(f"invertible-profile: {name}: {exc}; nothing recorded", file=sys.stderr)
                failed.append({"model": name, "error": str(exc)})
                continue
            measured.append((profile, step))
    repeats = args.steps if args.steps is not None else 3
    times = interleaved_seconds([step for _, step in measured], repeats)
    profiles: list[ModelProfile] = []
    for (profile, _), seconds in zip(measured, times):
        if seconds is None:
            error = "a timed step's loss was not finite"
            print(f"invertible-profile: {profile.name}: {error}; nothing recorded", file=sys.stderr)
            failed.append({"model": profile.name, "error": error})
        else:
            profiles.append(replace(profile, step_seconds=seconds))
    del measured
    print(
        f"batch {args.batch_size}, {args.image_size}x{args.image_size} images, "
        f"{args.num_classes} classes, device {args.device}, torch {torch.__version__}"
    )
    comparisons = compare(profiles)
    if profiles:
        print(format_table(profiles))
    if comparisons:
        print()
        print(format_comparisons(comparisons))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "torch": torch.__version__,
                    "device": args.device,
                    "profiles": [asdict(p) for p in profiles],
                    "comparisons": [asdict(c) for c in comparisons],
                    "failed": failed,
                },
                f,
                indent=2,
            )
    if args.plot and profiles:
        plot_profiles(profiles, args.plot)
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
