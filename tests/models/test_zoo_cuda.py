"""The zoo on a GPU: memory against MemCNN's claim, and saving changing no gradient (CUDA only).

Run by the GPU suite (``benchmarks/gpu/run.sh``, stage "tests") and skipped without CUDA.
Named apart from ``tests/core/test_cuda.py`` because both folders are rootdir-relative
imports (no ``__init__.py``), where two test modules may not share a name.

Memory comes from the CUDA allocator (``torch.cuda.max_memory_allocated``, through the
profiler); gradients are compared with the same network's ``memory_saving=False`` twin, in
float32 with TF32 off and deterministic cuDNN kernels where the claim is exactness.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from invertible_models import create_model
from invertible_models.profiler import ModelProfile, profile_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def flat_grads(model: nn.Module) -> torch.Tensor:
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads), "a parameter got no gradient"
    return torch.cat([g.reshape(-1) for g in grads])  # type: ignore[union-attr]


def _twins(name: str, **options: Any) -> tuple[nn.Module, nn.Module]:
    """The network with memory saving on and its plain twin, same weights, on the GPU."""
    torch.manual_seed(0)
    saving = create_model(name, memory_saving=True, **options).cuda()
    plain = create_model(name, memory_saving=False, **options).cuda()
    plain.load_state_dict(saving.state_dict())
    return saving, plain


def _batch(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(size, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (size,), generator=generator)
    return images.cuda(), labels.cuda()


def _step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    model.train().zero_grad(set_to_none=True)
    F.cross_entropy(model(images), labels).backward()
    return flat_grads(model)


# -- memory ----------------------------------------------------------------------------------
def _profile(name: str, **options: Any) -> ModelProfile:
    return profile_model(name, batch_size=32, device="cuda", steps=0, **options)


def test_revnet164_trains_in_a_fraction_of_resnet164s_cuda_memory() -> None:
    # MemCNN: 17.6% of the activation memory. Measured on the CPU at batch 8: a step's peak
    # 13% of ResNet-164's, what the forward keeps for backward 4.6%. The peak's bound leaves
    # room for cuDNN's workspace (the same few MiB in both, absent on the CPU); what the
    # forward keeps is free of it.
    # saving off named for the ResNet: the zoo may come to map memory_saving to checkpointing
    revnet, resnet = _profile("revnet164"), _profile("resnet164", memory_saving=False)
    assert revnet.activation_mib < 0.15 * resnet.activation_mib
    assert revnet.step_peak_mib < 0.3 * resnet.step_peak_mib


def test_revnet_cuda_memory_is_flat_in_depth_and_plain_memory_is_not() -> None:
    revnet38, revnet110 = _profile("revnet38"), _profile("revnet110")
    assert revnet110.activation_mib <= 1.25 * revnet38.activation_mib
    assert _profile("revnet110", memory_saving=False).activation_mib > 3 * revnet110.activation_mib


# -- gradients -------------------------------------------------------------------------------
def test_memory_saving_changes_no_gradient_of_revnet38_on_cuda(fp32_exact: None) -> None:
    saving, plain = _twins("revnet38")
    images, labels = _batch()
    assert relative_l2(_step(saving, images, labels), _step(plain, images, labels)) <= 1e-5


def _bf16_grads(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    model.train().zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(images), labels)
    loss.backward()
    return flat_grads(model)


def test_revnet38_under_bf16_autocast_costs_no_more_accuracy_than_bf16_itself() -> None:
    # Under autocast the stem's output is bf16, so the couplings add and subtract in bf16
    # and the rebuilt activations carry bf16 rounding (the fixed-point grid is off in half
    # precision): saving cannot give plain's bf16 gradients to float32 accuracy. What it
    # must do is stay within what bf16 costs anyway, measured against float32 on the same
    # batch (on the CPU: saving 13% from plain bf16, plain bf16 30% from float32); a broken
    # recompute (wrong precision, masks, statistics) is off by far more.
    saving, plain = _twins("revnet38")
    images, labels = _batch()
    bf16_saving = _bf16_grads(saving, images, labels)
    bf16_plain = _bf16_grads(plain, images, labels)
    fp32_plain = _step(plain, images, labels)
    assert torch.isfinite(bf16_saving).all()
    assert relative_l2(bf16_saving, bf16_plain) <= relative_l2(bf16_plain, fp32_plain)


def test_channels_last_revnet38_gives_the_gradients_of_its_plain_twin(
    fp32_exact: None,
) -> None:
    saving, plain = _twins("revnet38")
    contiguous = copy.deepcopy(plain)
    saving.to(memory_format=torch.channels_last)
    plain.to(memory_format=torch.channels_last)
    images, labels = _batch()
    last = images.contiguous(memory_format=torch.channels_last)
    saving_grads, plain_grads = _step(saving, last, labels), _step(plain, last, labels)
    assert relative_l2(saving_grads, plain_grads) <= 1e-4  # what reversibility promises
    # and the layout computes the same function (kernels differ: summation order only)
    assert relative_l2(plain_grads, _step(contiguous, images, labels)) <= 5e-2


# -- the stock SyncBatchNorm (what --sync-bn uses on GPUs), in a one-process NCCL group ------
@pytest.mark.distributed
def test_revnet38_with_sync_batchnorm_counts_each_batch_once_and_keeps_its_gradients(
    nccl_group: None, fp32_exact: None
) -> None:
    saving, plain = (nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in _twins("revnet38"))
    images, labels = _batch()
    assert relative_l2(_step(saving, images, labels), _step(plain, images, labels)) <= 1e-5
    norms = [m for m in saving.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert norms and all(int(m.num_batches_tracked) == 1 for m in norms)  # type: ignore[arg-type]
    for (name, a), (_, b) in zip(saving.named_buffers(), plain.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
