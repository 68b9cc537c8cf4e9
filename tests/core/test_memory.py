"""Memory, measured exactly on the CPU: the wrapper keeps memory flat in depth, plain does not.

All numbers come from :func:`invertible_core.measure_memory` (the profiler's allocation and
free events, summed in order), so they are exact and repeatable: the assertions compare
byte counts, not timings.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from conftest import make_conv_coupling, peak_memory, retained_memory
from invertible_core import InvertibleModuleWrapper, MemoryStats, measure_memory

MiB = 2**20
SHAPE = (2, 8, 32, 32)  # one activation: 64 KiB in float32, far above the conv weights
ACTIVATION_BYTES = 2 * 8 * 32 * 32 * 4
RNG_STATE_BYTES = torch.get_rng_state().numel()  # what preserve_rng_state keeps per call


def _chain(depth: int, **wrapper_kwargs) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        *(
            InvertibleModuleWrapper(make_conv_coupling(8, dtype=torch.float32), **wrapper_kwargs)
            for _ in range(depth)
        )
    )


def _input() -> Tensor:
    return torch.randn(*SHAPE, generator=torch.Generator().manual_seed(0)).requires_grad_()


def _training_step_peak(chain: nn.Module) -> int:
    """Peak bytes of one forward + backward, after a warm-up step allocated every ``.grad``."""
    x = _input()

    def step() -> None:
        chain(x).square().sum().backward()

    step()
    return peak_memory(step)


def _retained_after_forward(chain: nn.Module) -> int:
    x = _input()
    output, retained = retained_memory(lambda: chain(x))
    assert output.shape == SHAPE
    return retained


# -- measure_memory itself -------------------------------------------------------------------
def test_measure_memory_counts_a_known_allocation_pattern_exactly() -> None:
    def allocate() -> Tensor:
        first = torch.empty(MiB, dtype=torch.float32)  # 4 MiB
        second = torch.empty(MiB, dtype=torch.float32)  # 4 MiB more: 8 MiB held
        del first  # back to 4 MiB
        return second

    result, stats = measure_memory(allocate)
    assert stats == MemoryStats(peak_bytes=8 * MiB, retained_bytes=4 * MiB, device="cpu")
    assert (stats.peak_mib, stats.retained_mib) == (8.0, 4.0)
    assert result.numel() == MiB


def test_measure_memory_returns_nothing_retained_when_the_result_is_dropped() -> None:
    def allocate_and_free() -> None:
        torch.ones(MiB, dtype=torch.float64).sum()

    result, stats = measure_memory(allocate_and_free)
    assert result is None
    assert stats.peak_bytes >= 8 * MiB
    assert stats.retained_bytes == 0


def test_measure_memory_rejects_an_unsupported_device() -> None:
    with pytest.raises(ValueError, match=r"supports 'cpu' and 'cuda'.*'meta'"):
        measure_memory(lambda: None, device="meta")


# -- the wrapper's memory --------------------------------------------------------------------
def test_plain_autograd_training_memory_grows_with_depth() -> None:
    # Makes the flat-memory tests below discriminating: the same chains without saving grow.
    shallow = _training_step_peak(_chain(2, disable=True))
    deep = _training_step_peak(_chain(8, disable=True))
    assert deep > 2 * shallow


def test_training_memory_is_flat_in_depth() -> None:
    shallow = _training_step_peak(_chain(2, preserve_rng_state=False))
    deep = _training_step_peak(_chain(8, preserve_rng_state=False))
    assert deep <= 1.2 * shallow


def test_training_memory_is_flat_in_depth_with_default_settings() -> None:
    # The default preserve_rng_state=True adds one generator state per Fm/Gm call.
    shallow = _training_step_peak(_chain(2))
    deep = _training_step_peak(_chain(8))
    assert deep <= 1.2 * shallow


def test_wrapped_training_uses_less_memory_than_plain_at_depth_8() -> None:
    wrapped = _training_step_peak(_chain(8))
    plain = _training_step_peak(_chain(8, disable=True))
    assert wrapped < 0.75 * plain


@pytest.mark.parametrize("depth", [2, 8])
def test_after_forward_a_chain_keeps_exactly_one_output(depth: int) -> None:
    retained = _retained_after_forward(_chain(depth, preserve_rng_state=False))
    assert retained == ACTIVATION_BYTES


@pytest.mark.parametrize("depth", [2, 8])
def test_after_forward_preserve_rng_state_adds_only_the_generator_states(depth: int) -> None:
    retained = _retained_after_forward(_chain(depth))
    assert ACTIVATION_BYTES <= retained <= ACTIVATION_BYTES + 2 * depth * RNG_STATE_BYTES


def test_plain_autograd_keeps_activations_for_every_block() -> None:
    retained = _retained_after_forward(_chain(8, disable=True))
    assert retained >= 8 * ACTIVATION_BYTES


def test_keep_input_keeps_every_blocks_input() -> None:
    retained = _retained_after_forward(_chain(8, keep_input=True, preserve_rng_state=False))
    assert retained == 8 * ACTIVATION_BYTES  # seven intermediate inputs and the output


def test_outside_training_the_wrapper_keeps_nothing() -> None:
    chain = _chain(4).eval()
    x = _input()
    with torch.no_grad():
        _, retained = retained_memory(lambda: chain(x))
    assert retained == ACTIVATION_BYTES


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measure_memory_on_cuda_counts_a_known_allocation_pattern_exactly() -> None:
    def allocate() -> Tensor:
        first = torch.empty(MiB, dtype=torch.float32, device="cuda")
        second = torch.empty(MiB, dtype=torch.float32, device="cuda")
        del first
        return second

    _, stats = measure_memory(allocate, device="cuda")
    assert (stats.peak_bytes, stats.retained_bytes) == (8 * MiB, 4 * MiB)
    assert stats.device.startswith("cuda")
