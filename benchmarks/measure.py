"""How bench_core measures: exact peak memory, interleaved timing, gradient error.

- The step: the project's one training step (:class:`invertible_core.TrainingStep`: forward,
  loss, backward, SGD step) of a chain's loss on a fresh leaf copy of the batch
  (:func:`chain_step`).
- Memory: :func:`invertible_core.measure_step_memory` (its ``step_peak_bytes``) after a
  warm-up step (allocator, BatchNorm, ActNorm's initialisation). Exact to the byte on the
  CPU (profiler allocation events) and on CUDA (the allocator's peak counter), because the
  measured step frees nothing that existed before it. Two ways: gradients freed before each
  step (``zero_grad()``'s default: the peak counts the parameter gradients the step
  creates, which grow with depth for every method), and gradients kept allocated and zeroed
  in place (the peak beyond the model state: what the step adds to parameters and
  gradients; a method that holds a second copy of some gradients at once shows it here).
- Time: round robin. Every method runs one step in turn, ``repeats`` rounds after
  ``warmup`` rounds, and each method's median is taken: load on a shared machine falls on
  all methods alike, so their ratios hold where their absolute times do not.
- Gradient error: the relative L2 distance between a method's gradients and plain
  autograd's, over the input's gradient and every parameter's, concatenated.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from invertible_core import TrainingStep, measure_step_memory


class FreshInput(nn.Module):
    """``loss(fresh(x))``: a chain's loss of a new leaf copy of its input at every call.

    The copy requires grad, as the output of a stem would: RevTorch, revlib and reformer
    backpropagate only from an input that requires grad (their autograd functions do not
    take the parameters), and MemCNN's wrapper frees and refills its input's storage. Made
    inside the step, the copy and its gradient count in every method's peak alike, and the
    step frees nothing allocated before it (a free of memory allocated outside a profiling
    session is invisible to the profiler, or booked with the wrong size).
    """

    def __init__(self, loss: Callable[[Tensor], Tensor], params: Iterable[nn.Parameter]):
        super().__init__()
        self.loss = loss
        self.chain_parameters = nn.ParameterList(params)  # the chain's own, not copies

    def forward(self, x: Tensor) -> Tensor:
        return self.loss(fresh(x))


def chain_step(
    loss: Callable[[Tensor], Tensor],
    params: Iterable[nn.Parameter],
    x: Tensor,
    keep_grads: bool = False,
) -> TrainingStep:
    """The training step of ``loss`` on ``x`` (a fresh copy each step), SGD at 1e-3 on
    ``params``. ``keep_grads=False`` frees the gradients before each step (``zero_grad()``'s
    default), so a step's peak includes the gradients it creates; ``True`` zeroes them in
    place, so that after the first step they are part of the held state, as in a loop that
    accumulates gradients, and a step's peak counts only what it adds on top of them."""
    module = FreshInput(loss, params)
    return TrainingStep(
        module,
        x,
        loss_fn=lambda out: out,  # the module returns the loss
        optimizer=torch.optim.SGD(module.parameters(), lr=1e-3),
        set_to_none=not keep_grads,
    )


def square_loss(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """The loss every chain is trained with here: the mean square of its output."""
    return lambda x: model(x).square().mean()


def fresh(x: Tensor) -> Tensor:
    """A new leaf copy of ``x`` that requires grad: the input of one step."""
    return x.detach().clone().requires_grad_(True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def peak_mib(step: TrainingStep) -> float:
    """The ``step_peak_bytes`` of one step after one warm-up step, in MiB: beyond what the
    step holds before it (parameters, with ``keep_grads`` their gradients)."""
    return measure_step_memory(step, warmup=1).step_peak_bytes / 2**20


def round_robin(
    steps: Mapping[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> tuple[dict[str, float], dict[str, str]]:
    """Median seconds per step of each method, timed in turns; and the methods that raised
    (name -> error), which leave the rotation."""
    samples: dict[str, list[float]] = {name: [] for name in steps}
    failed: dict[str, str] = {}
    for round_ in range(warmup + repeats):
        for name, step in steps.items():
            if name in failed:
                continue
            try:
                seconds = timed(step, device)
            except Exception as exc:  # a peer failing late: reported, not fatal
                failed[name] = describe(exc)
                continue
            if round_ >= warmup:
                samples[name].append(seconds)
    medians = {n: statistics.median(s) for n, s in samples.items() if s and n not in failed}
    return medians, failed


def gradients(
    loss: Callable[[Tensor], Tensor], x: Tensor, params: Sequence[nn.Parameter]
) -> list[Tensor]:
    """The gradient of ``loss(x)`` with respect to ``x`` (a fresh leaf copy) and ``params``,
    accumulated through ``.grad`` as a training step does (so a method that writes its
    gradients there itself is measured as it behaves)."""
    for p in params:
        p.grad = None
    leaf = fresh(x)
    loss(leaf).backward()
    grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)]
    grads += [
        p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params
    ]
    for p in params:
        p.grad = None
    return grads


def relative_error(grads: Sequence[Tensor], reference: Sequence[Tensor]) -> float:
    """``||g - g_ref|| / ||g_ref||`` over all the tensors concatenated (float64 sums)."""
    diff = sum(float((g.double() - r.double()).square().sum()) for g, r in zip(grads, reference))
    norm = sum(float(r.double().square().sum()) for r in reference)
    return (diff / norm) ** 0.5 if norm > 0 else float(diff > 0)


def describe(exc: BaseException) -> str:
    """One line: the exception's type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
