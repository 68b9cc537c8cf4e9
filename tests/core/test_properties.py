"""Properties over random shapes, split dims and dtypes (Hypothesis).

The budget comes from the active Hypothesis profile (``ci`` in tox, see tests/conftest.py);
every example is a tiny tensor, so a run stays within seconds.
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import assert_grads_close, leaf_copy, make_conv_coupling, plain_copy
from invertible_core import InvertibleModuleWrapper

SPLIT_DIMS = [0, 1, 2, 3, -1, -2, -3, -4]
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}


@st.composite
def nchw_case(draw: st.DrawFn) -> tuple[tuple[int, ...], int, int]:
    """(shape, split_dim, seed): a small NCHW shape whose split dim has an even size."""
    split_dim = draw(st.sampled_from(SPLIT_DIMS))
    shape = [draw(st.integers(1, 3)) for _ in range(4)]
    shape[split_dim] = draw(st.sampled_from([2, 4]))
    return tuple(shape), split_dim, draw(st.integers(0, 2**16))


@given(
    case=nchw_case(),
    coupling=st.sampled_from(["additive", "affine"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_inverse_of_forward_is_the_identity(case, coupling: str, dtype: torch.dtype) -> None:
    shape, split_dim, seed = case
    torch.manual_seed(seed)
    block = make_conv_coupling(shape[1], coupling, split_dim=split_dim, dtype=dtype)
    x = torch.randn(shape, dtype=dtype)
    tol = TOLERANCE[dtype]
    with torch.no_grad():
        y = block(x)
        assert y.shape == x.shape and y.dtype == dtype
        torch.testing.assert_close(block.inverse(y), x, rtol=tol, atol=tol)
        torch.testing.assert_close(block(block.inverse(x)), x, rtol=tol, atol=tol)


@given(
    case=nchw_case(),
    coupling=st.sampled_from(["additive", "affine"]),
    depth=st.integers(1, 2),
    keep_input=st.booleans(),
    inverse=st.booleans(),
)
def test_wrapper_gradients_equal_plain_autograd(
    case, coupling: str, depth: int, keep_input: bool, inverse: bool
) -> None:
    shape, split_dim, seed = case
    torch.manual_seed(seed)
    chain = torch.nn.ModuleList(
        InvertibleModuleWrapper(
            make_conv_coupling(shape[1], coupling, split_dim=split_dim),
            keep_input=keep_input,
            keep_input_inverse=keep_input,
        )
        for _ in range(depth)
    )
    plain = plain_copy(chain)
    x = torch.randn(shape, dtype=torch.float64)
    weight = torch.randn(shape, dtype=torch.float64)

    def loss(model: torch.nn.ModuleList, leaf: torch.Tensor) -> torch.Tensor:
        h = leaf * 1.0  # a non-leaf input, as inside a network
        for block in model:
            h = block.inverse(h) if inverse else block(h)
        return (h * weight).sum() + h.square().sum()

    x_wrapped, x_plain = leaf_copy(x), leaf_copy(x)
    loss(chain, x_wrapped).backward()
    loss(plain, x_plain).backward()
    torch.testing.assert_close(x_wrapped.grad, x_plain.grad, rtol=1e-9, atol=1e-10)
    assert_grads_close(chain, plain, rtol=1e-9, atol=1e-10)
