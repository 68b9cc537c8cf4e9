"""invertible-core on a GPU: the CUDA paths of ReversibleSequence (every test skips without one).

These run where the GPU suite runs them (``benchmarks/gpu/run.sh``, stage "tests"): rarely,
once per lent GPU session, on whatever torch that machine has. So each test checks one
behaviour, uses only APIs torch 2.4 already had, and compares with plain autograd
(``plain_copy``: the same modules with memory saving off) at tolerances set by the precision
involved: float64 where the path allows it, float32 with TF32 off where cuDNN decides the
kernels, and relative L2 errors for fp16/bf16.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from conftest import assert_buffers_equal, leaf_copy, make_conv_coupling, plain_copy
from invertible_core import AdditiveCoupling, ReversibleSequence, measure_memory

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

F64 = torch.float64
MiB = 2**20


def _x(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> Tensor:
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed)).cuda()


def _loss(y: Tensor) -> Tensor:
    # not linear in y, so the gradients depend on the activations that backward rebuilds
    return (y * y.detach().sin()).square().mean()


def _sequence(
    depth: int,
    channels: int = 4,
    dtype: torch.dtype = F64,
    memory_saving: bool = True,
    **block_options: Any,
) -> ReversibleSequence:
    """A ReversibleSequence of ``depth`` conv couplings on the GPU (``make_conv_coupling``)."""
    torch.manual_seed(0)
    blocks = [make_conv_coupling(channels, dtype=dtype, **block_options) for _ in range(depth)]
    return ReversibleSequence(*blocks, memory_saving=memory_saving).cuda()


def _relative_error(a: Tensor, b: Tensor) -> float:
    den = float(b.double().norm())
    return float((a.double() - b.double()).norm()) / max(den, 1e-30)


def _assert_grads_relatively_close(a: nn.Module, b: nn.Module, tolerance: float) -> None:
    """Every parameter gradient of ``a`` within ``tolerance`` (relative L2) of ``b``'s twin.

    A gradient that is (nearly) zero in exact arithmetic, such as a conv bias followed by
    BatchNorm, is rounding noise; each error is therefore taken relative to the larger of
    the gradient's own norm and a hundredth of the largest gradient norm of the model.
    """
    pairs = list(zip(a.named_parameters(), b.named_parameters()))
    for (name, pa), (_, pb) in pairs:
        assert pa.grad is not None and pb.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(pa.grad).all(), f"non-finite gradient for {name}"
    floor = 1e-2 * max(float(pb.grad.double().norm()) for _, (_, pb) in pairs)  # type: ignore[union-attr]
    for (name, pa), (_, pb) in pairs:
        assert pa.grad is not None and pb.grad is not None
        scale = max(float(pb.grad.double().norm()), floor, 1e-30)
        error = float((pa.grad.double() - pb.grad.double()).norm()) / scale
        assert error <= tolerance, f"gradient of {name}: relative error {error:.3g}"


# -- random numbers --------------------------------------------------------------------------
def test_dropout_in_a_sequence_draws_the_same_cuda_masks_in_the_recompute() -> None:
    sequence = _sequence(3, dropout=0.5)
    plain = plain_copy(sequence)
    x = _x(2, 4, 6, 6)
    x_saving, x_plain = leaf_copy(x), leaf_copy(x)
    torch.manual_seed(5)
    _loss(sequence(x_saving)).backward()
    after_saving = torch.cuda.get_rng_state()
    torch.manual_seed(5)
    _loss(plain(x_plain)).backward()
    assert torch.equal(torch.cuda.get_rng_state(), after_saving)  # the caller's stream as plain
    torch.testing.assert_close(x_saving.grad, x_plain.grad, rtol=1e-8, atol=1e-10)
    for (name, a), (_, b) in zip(sequence.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-10, msg=name)
    # the masks matter: another seed gives other gradients, so the equality above is earned
    x_other = leaf_copy(x)
    torch.manual_seed(6)
    _loss(sequence(x_other)).backward()
    assert not torch.allclose(x_other.grad, x_saving.grad)


# -- mixed precision -------------------------------------------------------------------------
def _record_dtypes(sequence: ReversibleSequence) -> list[torch.dtype]:
    dtypes: list[torch.dtype] = []
    first = sequence[0]
    assert isinstance(first, AdditiveCoupling)
    conv = next(m for m in first.Fm.modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    return dtypes


def test_fp16_autocast_with_a_grad_scaler_gives_finite_plain_gradients() -> None:
    sequence = _sequence(4, channels=8, dtype=torch.float32)
    plain = plain_copy(sequence)
    dtypes = _record_dtypes(sequence)  # after the copy: deep copies take hooks along
    x = _x(4, 8, 8, 8, dtype=torch.float32)
    input_grads = []
    for model in (sequence, plain):
        leaf = leaf_copy(x)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
        with torch.autocast("cuda", dtype=torch.float16):
            y = model(leaf)
        scaler.scale(_loss(y.float())).backward()
        scaler.unscale_(optimizer)  # the parameters' gradients, unscaled in place
        assert leaf.grad is not None
        input_grads.append(leaf.grad / scaler.get_scale())
    assert set(dtypes) == {torch.float16} and len(dtypes) >= 2  # forward and recompute
    assert torch.isfinite(input_grads[0]).all()
    assert _relative_error(input_grads[0], input_grads[1]) <= 2e-2
    _assert_grads_relatively_close(sequence, plain, 2e-2)


def test_bf16_autocast_runs_the_recompute_in_bf16_and_gives_plain_gradients() -> None:
    sequence = _sequence(4, channels=8, dtype=torch.float32)
    plain = plain_copy(sequence)
    dtypes = _record_dtypes(sequence)
    x = _x(4, 8, 8, 8, dtype=torch.float32)
    x_saving, x_plain = leaf_copy(x), leaf_copy(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_saving = sequence(x_saving)
        y_plain = plain(x_plain)
    _loss(y_saving.float()).backward()
    _loss(y_plain.float()).backward()
    assert set(dtypes) == {torch.bfloat16} and len(dtypes) >= 2
    assert _relative_error(x_saving.grad, x_plain.grad) <= 3e-2
    _assert_grads_relatively_close(sequence, plain, 3e-2)


# -- memory, exactly, from the CUDA allocator ------------------------------------------------
SHAPE = (8, 16, 64, 64)  # one activation: 2 MiB in float32, a half 1 MiB


def _step_peak(depth: int, memory_saving: bool) -> int:
    """Peak CUDA bytes of forward + backward, after a warm-up step allocated every grad."""
    sequence = _sequence(depth, channels=16, dtype=torch.float32, memory_saving=memory_saving)
    x = torch.randn(*SHAPE, device="cuda", requires_grad=True)

    def step() -> None:
        sequence(x).square().sum().backward()

    step()
    _, stats = measure_memory(step, device="cuda")
    assert stats.device.startswith("cuda")
    return stats.peak_bytes


def test_cuda_training_memory_is_flat_in_depth_and_plain_memory_grows() -> None:
    # Differences between depths, not ratios: cuDNN's workspace is the same at both depths
    # and would blur a ratio, but cancels from a difference.
    saving = {depth: _step_peak(depth, memory_saving=True) for depth in (2, 8)}
    plain = {depth: _step_peak(depth, memory_saving=False) for depth in (2, 8)}
    plain_growth = plain[8] - plain[2]
    assert plain_growth >= 6 * MiB, "plain autograd keeps at least a half activation per block"
    assert saving[8] - saving[2] <= MiB // 2, f"saving grew by {saving[8] - saving[2]} bytes"
    assert saving[8] < plain[8] - plain_growth // 2


# -- the stock SyncBatchNorm, in a process group of one (NCCL: the nccl_group fixture) -------
class AlwaysSynchronisingBatchNorm(nn.SyncBatchNorm):
    """The stock SyncBatchNorm, made to take its synchronising path in a group of one.

    The stock layer falls back to plain batch norm when the group has one process; a real
    multi-GPU job runs the collectives (statistics gathered in forward, gradients reduced in
    backward), and the recompute must run them too. This calls the layer's own autograd
    function (``torch.nn.modules._functions.SyncBatchNorm``, whose signature has been the
    same since torch 1.9) as the stock layer does when the group is larger.
    """

    def forward(self, input: Tensor) -> Tensor:
        from torch.nn.modules._functions import SyncBatchNorm as sync_batch_norm

        if not self.training:
            return super().forward(input)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)  # type: ignore[union-attr,operator]
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        group = self.process_group or dist.group.WORLD
        return sync_batch_norm.apply(  # type: ignore[no-any-return]
            input, self.weight, self.bias, running_mean, running_var,
            self.eps, self.momentum, group, dist.get_world_size(group),
        )  # fmt: skip


def _sync_bn_sequence(norm: type[nn.SyncBatchNorm]) -> nn.Module:
    torch.manual_seed(0)

    def residual() -> nn.Module:
        return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), norm(4), nn.ReLU())

    blocks = [AdditiveCoupling(Fm=residual(), Gm=residual()) for _ in range(3)]
    return ReversibleSequence(*blocks).to(device="cuda", dtype=F64)


@pytest.mark.distributed
@pytest.mark.parametrize("norm", [nn.SyncBatchNorm, AlwaysSynchronisingBatchNorm])
def test_sync_batchnorm_in_a_sequence_counts_each_batch_once_and_gives_plain_grads(
    nccl_group: None, norm: type[nn.SyncBatchNorm]
) -> None:
    sequence = _sync_bn_sequence(norm)
    plain = plain_copy(sequence)
    x = _x(4, 8, 6, 6)
    x_saving, x_plain = leaf_copy(x), leaf_copy(x)
    _loss(sequence(x_saving)).backward()
    _loss(plain(x_plain)).backward()
    counts = [int(m.num_batches_tracked) for m in sequence.modules() if isinstance(m, norm)]  # type: ignore[arg-type]
    assert counts == [1] * 6  # the recompute normalised with batch statistics, counted nothing
    assert_buffers_equal(sequence, plain)
    torch.testing.assert_close(x_saving.grad, x_plain.grad, rtol=1e-8, atol=1e-10)
    for (name, a), (_, b) in zip(sequence.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-10, msg=name)


# -- memory layout ---------------------------------------------------------------------------
def test_channels_last_inputs_give_the_gradients_of_plain_autograd(fp32_exact: None) -> None:
    sequence = _sequence(3, channels=8, dtype=torch.float32, batchnorm=True)
    contiguous = plain_copy(sequence)
    sequence.to(memory_format=torch.channels_last)
    plain = plain_copy(sequence)
    x = _x(4, 8, 8, 8, dtype=torch.float32)
    x_last = leaf_copy(x.contiguous(memory_format=torch.channels_last))
    x_plain = leaf_copy(x_last)
    x_contiguous = leaf_copy(x)
    assert x_last.is_contiguous(memory_format=torch.channels_last)
    for model, leaf in ((sequence, x_last), (plain, x_plain), (contiguous, x_contiguous)):
        _loss(model(leaf)).backward()
    assert _relative_error(x_last.grad, x_plain.grad) <= 1e-4
    _assert_grads_relatively_close(sequence, plain, 1e-4)
    # the layout computes the same function (other kernels: only the summation order differs)
    assert _relative_error(x_plain.grad, x_contiguous.grad) <= 1e-2
    _assert_grads_relatively_close(plain, contiguous, 1e-2)
