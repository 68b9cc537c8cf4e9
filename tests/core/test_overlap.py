"""``ReversibleSequence(overlap=...)``: deprecated in core 3, accepted with a warning and ignored.

The overlapped recompute (PaReprop) never measured faster, and the engine now recomputes a
block where autograd asks for its saved tensors, which is what lets FSDP and hooks see the
recompute; the option is refused loudly rather than silently.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import assert_grads_close, leaf_copy, plain_copy
from invertible_core import AdditiveCoupling, ReversibleSequence


def test_overlap_warns_that_it_is_ignored_and_gradients_stay_exact() -> None:
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match="overlap.*ignored"):
        seq = ReversibleSequence(
            [AdditiveCoupling(nn.Sequential(nn.Linear(2, 2), nn.Tanh())) for _ in range(3)],
            overlap=True,
        ).double()
    ref = plain_copy(seq)
    x = torch.randn(4, 4, dtype=torch.float64)
    xs, xr = leaf_copy(x), leaf_copy(x)
    seq(xs).square().sum().backward()
    ref(xr).square().sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad)
    assert_grads_close(seq, ref)
