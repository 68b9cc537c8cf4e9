"""InvertibleModuleWrapper: gradients equal to plain autograd, state updated once, inputs intact.

Every gradient is compared with plain autograd on an unwrapped deep copy (``plain_copy``:
``disable=True``), in float64, so any difference beyond rounding is a bug.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from conftest import (
    ElementwiseAffine,
    TwoWayCoupling,
    assert_buffers_equal,
    assert_grads_close,
    conv_function,
    leaf_copy,
    make_conv_coupling,
    plain_copy,
)
from invertible_core import AdditiveCoupling, Coupling, InvertibleModuleWrapper, ReversibleBlock

F64 = torch.float64


def _x(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> Tensor:
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _loss(y: Tensor) -> Tensor:
    # Not linear in y, so gradients depend on the values that backward rebuilds.
    return (y * y.detach().sin()).square().sum()


def _chain(n: int, channels: int = 4, **wrapper_kwargs) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        *(InvertibleModuleWrapper(make_conv_coupling(channels), **wrapper_kwargs) for _ in range(n))
    )


def _count_calls(module: nn.Module) -> list[int]:
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    module.register_forward_hook(hook)
    return calls


def _compare_with_plain(
    wrapped: nn.Module,
    run: Callable[[nn.Module, Tensor], Tensor],
    x: Tensor,
    rtol: float = 1e-10,
    atol: float = 1e-12,
) -> None:
    """``run(model, leaf)`` on ``wrapped`` and on its plain copy: same output, same grads."""
    plain = plain_copy(wrapped)
    x_wrapped, x_plain = leaf_copy(x), leaf_copy(x)
    y_wrapped = run(wrapped, x_wrapped)
    y_plain = run(plain, x_plain)
    torch.testing.assert_close(y_wrapped, y_plain, rtol=rtol, atol=atol)
    _loss(y_wrapped).backward()
    _loss(y_plain).backward()
    torch.testing.assert_close(x_wrapped.grad, x_plain.grad, rtol=rtol, atol=atol)
    assert_grads_close(wrapped, plain, rtol=rtol, atol=atol)


# -- gradients equal plain autograd ----------------------------------------------------------
@pytest.mark.parametrize("coupling", ["additive", "affine"])
@pytest.mark.parametrize("keep_input", [False, True])
def test_grads_match_plain_autograd_for_a_leaf_input(coupling: str, keep_input: bool) -> None:
    torch.manual_seed(0)
    wrapped = InvertibleModuleWrapper(make_conv_coupling(4, coupling), keep_input=keep_input)
    _compare_with_plain(wrapped, lambda m, x: m(x), _x(2, 4, 5, 5))


def test_leaf_input_receives_its_gradient_once_not_twice() -> None:
    # MemCNN assigned .grad by hand and let autograd accumulate too: twice the gradient.
    wrapped = InvertibleModuleWrapper(AdditiveCoupling(nn.Identity()))
    x = leaf_copy(_x(2, 4))
    wrapped(x).sum().backward()
    # y1 = x1 + x2, y2 = x1 + 2 x2: d sum / d x1 = 2, d sum / d x2 = 3
    torch.testing.assert_close(x.grad, torch.tensor([[2.0, 2.0, 3.0, 3.0]] * 2, dtype=F64))


@pytest.mark.parametrize("keep_input", [False, True])
def test_grads_match_plain_autograd_for_a_non_leaf_input(keep_input: bool) -> None:
    torch.manual_seed(0)
    wrapped = InvertibleModuleWrapper(make_conv_coupling(4), keep_input=keep_input)
    _compare_with_plain(wrapped, lambda m, x: m(x * 1.5 + 0.25), _x(2, 4, 5, 5))


@pytest.mark.parametrize("split_dim", [0, 2, 3, -1])
def test_grads_match_plain_autograd_for_split_dim(split_dim: int) -> None:
    torch.manual_seed(0)
    wrapped = InvertibleModuleWrapper(make_conv_coupling(4, split_dim=split_dim))
    _compare_with_plain(wrapped, lambda m, x: m(x), _x(4, 4, 4, 4))


@pytest.mark.parametrize("coupling", ["additive", "affine"])
@pytest.mark.parametrize("keep_input_inverse", [False, True])
def test_grads_match_plain_autograd_in_the_inverse_direction(
    coupling: str, keep_input_inverse: bool
) -> None:
    torch.manual_seed(0)
    wrapped = InvertibleModuleWrapper(
        make_conv_coupling(4, coupling), keep_input_inverse=keep_input_inverse
    )
    _compare_with_plain(wrapped, lambda m, x: m.inverse(x), _x(2, 4, 5, 5))


def test_disable_gives_plain_autograd_without_a_recompute() -> None:
    torch.manual_seed(0)
    block = make_conv_coupling(4)
    reference = plain_copy(block)  # before the hook: deep copies take hooks along
    fm_calls = _count_calls(block.Fm)
    wrapped = InvertibleModuleWrapper(block, disable=True)
    x, x_ref = leaf_copy(_x(2, 4, 5, 5)), leaf_copy(_x(2, 4, 5, 5))
    _loss(wrapped(x)).backward()
    _loss(reference(x_ref)).backward()
    assert fm_calls == [1]
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    assert_grads_close(wrapped, reference, rtol=0, atol=0)


@pytest.mark.parametrize("keep_input", [False, True])
def test_grads_match_plain_autograd_with_two_inputs_and_two_outputs(keep_input: bool) -> None:
    torch.manual_seed(0)
    wrapped = InvertibleModuleWrapper(TwoWayCoupling(3).double(), keep_input=keep_input)
    plain = plain_copy(wrapped)
    a, b = _x(4, 3, seed=1), _x(4, 3, seed=2)
    leaves = [leaf_copy(a), leaf_copy(b)]
    leaves_plain = [leaf_copy(a), leaf_copy(b)]
    c, d = wrapped(leaves[0] * 2, leaves[1])
    c_ref, d_ref = plain(leaves_plain[0] * 2, leaves_plain[1])
    torch.testing.assert_close((c, d), (c_ref, d_ref))
    (_loss(c) + 3 * d.sum()).backward()
    (_loss(c_ref) + 3 * d_ref.sum()).backward()
    for leaf, leaf_plain in zip(leaves, leaves_plain):
        torch.testing.assert_close(leaf.grad, leaf_plain.grad)
    assert_grads_close(wrapped, plain)


def test_grads_match_plain_autograd_when_only_one_of_two_outputs_reaches_the_loss() -> None:
    torch.manual_seed(0)
    wrapped = InvertibleModuleWrapper(TwoWayCoupling(3).double())
    plain = plain_copy(wrapped)
    a, b = leaf_copy(_x(4, 3, seed=1)), leaf_copy(_x(4, 3, seed=2))
    a_ref, b_ref = leaf_copy(a), leaf_copy(b)
    _loss(wrapped(a, b)[1]).backward()
    _loss(plain(a_ref, b_ref)[1]).backward()
    torch.testing.assert_close((a.grad, b.grad), (a_ref.grad, b_ref.grad))
    assert_grads_close(wrapped, plain)


def test_an_input_that_needs_no_grad_gets_none_among_two_inputs() -> None:
    torch.manual_seed(0)
    wrapped = InvertibleModuleWrapper(TwoWayCoupling(3).double())
    plain = plain_copy(wrapped)
    a, b = leaf_copy(_x(4, 3, seed=1)), _x(4, 3, seed=2)
    a_ref = leaf_copy(a)
    _loss(torch.cat(wrapped(a, b))).backward()
    _loss(torch.cat(plain(a_ref, b))).backward()
    torch.testing.assert_close(a.grad, a_ref.grad)
    assert b.grad is None
    assert_grads_close(wrapped, plain)


class _TwoWayWithBatchNorm(TwoWayCoupling):
    def __init__(self, features: int) -> None:
        super().__init__(features)
        self.f = nn.Sequential(nn.Linear(features, features), nn.BatchNorm1d(features))


def test_batchnorm_in_a_generic_module_is_updated_once_per_forward() -> None:
    torch.manual_seed(0)
    wrapped = InvertibleModuleWrapper(_TwoWayWithBatchNorm(3).double())
    plain = plain_copy(wrapped)
    for step in range(3):
        a, b = _x(4, 3, seed=step), _x(4, 3, seed=10 + step)
        _loss(torch.cat(wrapped(leaf_copy(a), leaf_copy(b)))).backward()
        _loss(torch.cat(plain(leaf_copy(a), leaf_copy(b)))).backward()
    assert_buffers_equal(wrapped, plain)
    assert int(wrapped._fn.f[1].num_batches_tracked) == 3
    assert_grads_close(wrapped, plain)


def test_grads_match_plain_autograd_for_a_generic_invertible_module_in_both_directions() -> None:
    torch.manual_seed(0)
    wrapped = InvertibleModuleWrapper(ElementwiseAffine((4, 3)).double())
    _compare_with_plain(wrapped, lambda m, x: m(x), _x(4, 3))
    wrapped.zero_grad()
    _compare_with_plain(wrapped, lambda m, x: m.inverse(x), _x(4, 3))


def test_a_generic_invertible_module_is_rebuilt_by_inverse_then_re_forward() -> None:
    module = ElementwiseAffine((4, 3)).double()
    wrapped = InvertibleModuleWrapper(module)
    _loss(wrapped(leaf_copy(_x(4, 3)))).backward()
    assert module.calls == {"forward": 2, "inverse": 1}


@pytest.mark.parametrize("coupling", ["additive", "affine"])
def test_a_coupling_recomputes_fm_and_gm_once_each_in_backward(coupling: str) -> None:
    # The RevNet step: one call of Gm(y1) and one of Fm(x2) serve both rebuild and gradient.
    torch.manual_seed(0)
    block = make_conv_coupling(4, coupling)
    fm_calls, gm_calls = _count_calls(block.Fm), _count_calls(block.Gm)
    wrapped = InvertibleModuleWrapper(block)
    y = wrapped(leaf_copy(_x(2, 4, 5, 5)))
    assert (fm_calls, gm_calls) == ([1], [1])
    _loss(y).backward()
    assert (fm_calls, gm_calls) == ([2], [2])


def test_params_that_do_not_require_grad_get_none_and_the_input_its_gradient() -> None:
    torch.manual_seed(0)
    wrapped = InvertibleModuleWrapper(make_conv_coupling(4))
    wrapped.requires_grad_(False)
    _compare_with_plain(wrapped, lambda m, x: m(x), _x(2, 4, 5, 5))
    assert all(p.grad is None for p in wrapped.parameters())


def test_an_input_that_does_not_require_grad_still_trains_the_parameters() -> None:
    torch.manual_seed(0)
    wrapped = InvertibleModuleWrapper(make_conv_coupling(4))
    plain = plain_copy(wrapped)
    x = _x(2, 4, 5, 5)
    _loss(wrapped(x)).backward()
    _loss(plain(x)).backward()
    assert_grads_close(wrapped, plain)
    assert x.grad is None


# -- chains of wrapped blocks ----------------------------------------------------------------
@pytest.mark.parametrize("keep_input", [False, True])
def test_chain_fed_by_a_relu_neither_crashes_nor_gives_wrong_grads(keep_input: bool) -> None:
    # MemCNN issue 70: the ReLU saved its output for backward; freeing it crashed backward.
    chain = _chain(4, keep_input=keep_input)
    _compare_with_plain(chain, lambda m, x: m(torch.relu(x)), _x(2, 4, 5, 5))


def test_chain_in_the_inverse_direction_matches_plain_autograd() -> None:
    chain = _chain(3)

    def run(model: nn.Module, x: Tensor) -> Tensor:
        for block in reversed(model):
            x = block.inverse(x)
        return x

    _compare_with_plain(chain, run, _x(2, 4, 5, 5))


def test_chain_mixing_keep_input_on_and_off_matches_plain_autograd() -> None:
    torch.manual_seed(0)
    chain = nn.Sequential(
        *(
            InvertibleModuleWrapper(make_conv_coupling(4), keep_input=keep)
            for keep in (False, True, False, False, True)
        )
    )
    _compare_with_plain(chain, lambda m, x: m(x), _x(2, 4, 5, 5))


def test_the_same_wrapped_block_applied_twice_matches_plain_autograd() -> None:
    torch.manual_seed(0)
    wrapped = InvertibleModuleWrapper(make_conv_coupling(4))
    _compare_with_plain(wrapped, lambda m, x: m(m(x)), _x(2, 4, 5, 5))


def test_an_intermediate_output_also_used_by_the_loss_gets_correct_grads() -> None:
    chain = _chain(3)

    def run(model: nn.Module, x: Tensor) -> Tensor:
        h = model[0](x)
        return model[2](model[1](h)) + h.sin()

    _compare_with_plain(chain, run, _x(2, 4, 5, 5))


def test_output_feeding_a_wrapped_block_that_misses_the_loss_still_gets_plain_gradients() -> None:
    # Block 1 handed its output to block 2 to rebuild, and block 2's backward never runs:
    # block 2 rebuilds it anyway, from its own kept output, when block 1 asks.
    torch.manual_seed(0)
    first, second = (InvertibleModuleWrapper(make_conv_coupling(4)) for _ in range(2))
    plain_first = plain_copy(first)
    x, x_ref = leaf_copy(_x(2, 4, 5, 5)), leaf_copy(_x(2, 4, 5, 5))
    h = first(x)
    second(h)
    _loss(h).backward()
    _loss(plain_first(x_ref)).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert_grads_close(first, plain_first)


def test_output_feeding_a_keep_input_block_that_misses_the_loss_works() -> None:
    torch.manual_seed(0)
    first = InvertibleModuleWrapper(make_conv_coupling(4))
    second = InvertibleModuleWrapper(make_conv_coupling(4), keep_input=True)
    plain_first = plain_copy(first)
    x, x_ref = leaf_copy(_x(2, 4, 5, 5)), leaf_copy(_x(2, 4, 5, 5))
    h = first(x)
    second(h)
    _loss(h).backward()
    _loss(plain_first(x_ref)).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert_grads_close(first, plain_first)


# -- state: BatchNorm, random numbers, autocast ----------------------------------------------
def test_batchnorm_statistics_equal_the_plain_run_after_several_steps() -> None:
    torch.manual_seed(0)
    chain = nn.Sequential(
        *(InvertibleModuleWrapper(make_conv_coupling(4, batchnorm=True)) for _ in range(2))
    )
    plain = plain_copy(chain)
    steps = 3
    for step in range(steps):
        x = _x(4, 4, 5, 5, seed=step)
        _loss(chain(leaf_copy(x))).backward()
        _loss(plain(leaf_copy(x))).backward()
    assert_buffers_equal(chain, plain)
    counts = [int(b) for name, b in chain.named_buffers() if name.endswith("num_batches_tracked")]
    assert counts == [steps] * 4  # Fm and Gm of two blocks, once per forward
    assert_grads_close(chain, plain)


def test_instance_norm_running_statistics_equal_the_plain_run() -> None:
    # InstanceNorm(track_running_stats=True) keeps running statistics like BatchNorm does;
    # the recompute must not update them a second time either.
    torch.manual_seed(0)
    fm = nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1), nn.InstanceNorm2d(2, affine=True, track_running_stats=True)
    )
    wrapped = InvertibleModuleWrapper(AdditiveCoupling(fm).double())
    plain = plain_copy(wrapped)
    for step in range(2):
        x = _x(2, 4, 5, 5, seed=step)
        _loss(wrapped(leaf_copy(x))).backward()
        _loss(plain(leaf_copy(x))).backward()
    assert_grads_close(wrapped, plain)
    for (name, a), (_, b) in zip(wrapped.named_buffers(), plain.named_buffers()):
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"{n}: {m}")


def _dropout_chain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        *(InvertibleModuleWrapper(make_conv_coupling(4, dropout=0.5)) for _ in range(2))
    )


@pytest.mark.parametrize("keep_input", [False, True])
def test_dropout_with_preserve_rng_state_gives_the_plain_run_grads(keep_input: bool) -> None:
    chain = _dropout_chain()
    for block in chain:
        block.keep_input = keep_input
    assert all(block.preserve_rng_state for block in chain)  # the default
    plain = plain_copy(chain)
    x = _x(2, 4, 5, 5)
    torch.manual_seed(123)
    _loss(chain(x.requires_grad_())).backward()
    torch.manual_seed(123)
    x_plain = leaf_copy(x)
    _loss(plain(x_plain)).backward()
    torch.testing.assert_close(x.grad, x_plain.grad)
    assert_grads_close(chain, plain)


def test_recompute_leaves_the_callers_random_stream_as_the_plain_run_does() -> None:
    chain = _dropout_chain()
    plain = plain_copy(chain)
    x = _x(2, 4, 5, 5)
    torch.manual_seed(7)
    _loss(chain(leaf_copy(x))).backward()
    after_wrapped = torch.get_rng_state()
    torch.manual_seed(7)
    _loss(plain(leaf_copy(x))).backward()
    after_plain = torch.get_rng_state()
    assert torch.equal(after_wrapped, after_plain)


def test_without_preserve_rng_state_dropout_masks_differ_in_the_recompute() -> None:
    chain = _dropout_chain()
    for block in chain:
        block.preserve_rng_state = False
    plain = plain_copy(chain)
    x = _x(2, 4, 5, 5)
    torch.manual_seed(123)
    x_wrapped = leaf_copy(x)
    _loss(chain(x_wrapped)).backward()
    torch.manual_seed(123)
    x_plain = leaf_copy(x)
    _loss(plain(x_plain)).backward()
    assert not torch.allclose(x_wrapped.grad, x_plain.grad)


def test_under_autocast_the_block_and_its_recompute_run_in_bfloat16() -> None:
    torch.manual_seed(0)
    block = make_conv_coupling(4, dtype=torch.float32)
    plain = plain_copy(block)  # before the hook: deep copies take hooks along
    wrapped = InvertibleModuleWrapper(block)
    dtypes: list[torch.dtype] = []
    block.Fm[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    x, x_plain = (
        leaf_copy(_x(2, 4, 6, 6, dtype=torch.float32)),
        leaf_copy(_x(2, 4, 6, 6, dtype=torch.float32)),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = wrapped(x)
        y_plain = plain(x_plain)
    assert dtypes == [torch.bfloat16]
    # backward outside the autocast region: the recompute must re-enter the forward's state
    _loss(y.float()).backward()
    _loss(y_plain.float()).backward()
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    torch.testing.assert_close(x.grad, x_plain.grad, rtol=2e-2, atol=2e-2)
    assert_grads_close(wrapped, plain, rtol=2e-2, atol=2e-2)


def test_a_forward_without_autocast_recomputes_without_it_even_if_backward_runs_under_it() -> None:
    torch.manual_seed(0)
    block = make_conv_coupling(4, dtype=torch.float32)
    wrapped = InvertibleModuleWrapper(block)
    dtypes: list[torch.dtype] = []
    block.Fm[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    y = wrapped(leaf_copy(_x(2, 4, 6, 6, dtype=torch.float32)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _loss(y).backward()
    assert dtypes == [torch.float32, torch.float32]


# -- the caller's tensors --------------------------------------------------------------------
def _snapshot(x: Tensor) -> tuple[Tensor, int, int]:
    return x.detach().clone(), x.untyped_storage().nbytes(), x.data_ptr()


def _assert_intact(x: Tensor, snapshot: tuple[Tensor, int, int]) -> None:
    values, nbytes, data_ptr = snapshot
    assert x.untyped_storage().nbytes() == nbytes
    assert x.data_ptr() == data_ptr
    assert torch.equal(x, values)


@pytest.mark.parametrize("keep_input", [False, True])
def test_input_intact_under_no_grad(keep_input: bool) -> None:
    wrapped = InvertibleModuleWrapper(make_conv_coupling(4), keep_input=keep_input)
    x = _x(2, 4, 5, 5)
    before = _snapshot(x)
    with torch.no_grad():
        y = wrapped(x)
    _assert_intact(x, before)
    assert y.grad_fn is None


@pytest.mark.parametrize("keep_input", [False, True])
def test_input_intact_in_eval_mode(keep_input: bool) -> None:
    wrapped = InvertibleModuleWrapper(make_conv_coupling(4), keep_input=keep_input).eval()
    x = leaf_copy(_x(2, 4, 5, 5))
    before = _snapshot(x)
    wrapped(x).sum().backward()
    _assert_intact(x, before)


def test_input_intact_when_nothing_requires_grad() -> None:
    wrapped = InvertibleModuleWrapper(make_conv_coupling(4)).requires_grad_(False)
    x = _x(2, 4, 5, 5)
    before = _snapshot(x)
    y = wrapped(x)
    _assert_intact(x, before)
    assert not y.requires_grad


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_input_intact_in_training_before_and_after_backward(direction: str) -> None:
    wrapped = InvertibleModuleWrapper(make_conv_coupling(4))
    x = leaf_copy(_x(2, 4, 5, 5))
    before = _snapshot(x)
    y = getattr(wrapped, direction)(x)
    _assert_intact(x, before)
    _loss(y).backward()
    _assert_intact(x, before)


def test_eval_mode_output_equals_the_modules_output() -> None:
    torch.manual_seed(0)
    block = make_conv_coupling(4)
    wrapped = InvertibleModuleWrapper(block).eval()
    x = _x(2, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), block(x), rtol=0, atol=0)
        torch.testing.assert_close(wrapped.inverse(x), block.inverse(x), rtol=0, atol=0)


# -- autograd entry points and passes --------------------------------------------------------
def test_autograd_grad_returns_the_plain_grads_and_leaves_dot_grad_alone() -> None:
    torch.manual_seed(0)
    wrapped = InvertibleModuleWrapper(make_conv_coupling(4))
    plain = plain_copy(wrapped)
    x, x_plain = leaf_copy(_x(2, 4, 5, 5)), leaf_copy(_x(2, 4, 5, 5))
    grads = torch.autograd.grad(_loss(wrapped(x)), [x, *wrapped.parameters()])
    grads_plain = torch.autograd.grad(_loss(plain(x_plain)), [x_plain, *plain.parameters()])
    torch.testing.assert_close(grads, grads_plain)
    assert x.grad is None
    assert all(p.grad is None for p in wrapped.parameters())


def test_autograd_grad_for_the_input_only_works() -> None:
    torch.manual_seed(0)
    chain = _chain(2)
    plain = plain_copy(chain)
    x, x_plain = leaf_copy(_x(2, 4, 5, 5)), leaf_copy(_x(2, 4, 5, 5))
    (gx,) = torch.autograd.grad(_loss(chain(x)), [x])
    (gx_plain,) = torch.autograd.grad(_loss(plain(x_plain)), [x_plain])
    torch.testing.assert_close(gx, gx_plain)
    assert all(p.grad is None for p in chain.parameters())


def test_two_backward_passes_with_num_bwd_passes_2_accumulate_plain_grads() -> None:
    chain = _chain(2, num_bwd_passes=2)
    plain = plain_copy(chain)
    x, x_plain = leaf_copy(_x(2, 4, 5, 5)), leaf_copy(_x(2, 4, 5, 5))
    loss, loss_plain = _loss(chain(x)), _loss(plain(x_plain))
    for _ in range(2):
        loss.backward(retain_graph=True)
        loss_plain.backward(retain_graph=True)
    torch.testing.assert_close(x.grad, x_plain.grad)
    assert_grads_close(chain, plain)


def test_one_backward_pass_too_many_raises_naming_num_bwd_passes() -> None:
    wrapped = InvertibleModuleWrapper(make_conv_coupling(4), num_bwd_passes=2)
    loss = _loss(wrapped(leaf_copy(_x(2, 4, 5, 5))))
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"num_bwd_passes=2.*num_bwd_passes=3"):
        loss.backward(retain_graph=True)


@pytest.mark.parametrize("keep_input", [False, True])
def test_second_backward_with_the_default_num_bwd_passes_raises(keep_input: bool) -> None:
    wrapped = InvertibleModuleWrapper(make_conv_coupling(4), keep_input=keep_input)
    assert wrapped.num_bwd_passes == 1
    loss = _loss(wrapped(leaf_copy(_x(2, 4, 5, 5))))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="num_bwd_passes"):
        loss.backward()


def test_double_backward_raises_instead_of_giving_wrong_second_derivatives() -> None:
    # Documented: the backward pass is not itself differentiable.
    wrapped = InvertibleModuleWrapper(
        AdditiveCoupling(nn.Sequential(nn.Linear(2, 2), nn.Tanh())).double()
    )
    x = leaf_copy(_x(3, 4))
    (grad,) = torch.autograd.grad(_loss(wrapped(x)), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward.*disable=True"):
        grad.sum().backward()


def test_modifying_the_output_in_place_before_backward_raises_a_clear_error() -> None:
    wrapped = InvertibleModuleWrapper(make_conv_coupling(4))
    y = wrapped(leaf_copy(_x(2, 4, 5, 5)))
    y.mul_(2)
    with pytest.raises(RuntimeError, match=r"modified in place.*keep_input=True"):
        y.sum().backward()


def test_modifying_the_output_in_place_with_keep_input_gives_plain_grads() -> None:
    torch.manual_seed(0)
    wrapped = InvertibleModuleWrapper(make_conv_coupling(4), keep_input=True)
    _compare_with_plain(wrapped, lambda m, x: m(x).mul_(2), _x(2, 4, 5, 5))


# -- the wrapper's own contract --------------------------------------------------------------
def test_one_output_comes_back_as_a_bare_tensor_and_two_as_a_tuple() -> None:
    single = InvertibleModuleWrapper(make_conv_coupling(4))
    double = InvertibleModuleWrapper(TwoWayCoupling(3).double())
    assert isinstance(single(leaf_copy(_x(2, 4, 5, 5))), Tensor)
    out = double(leaf_copy(_x(2, 3)), _x(2, 3))
    assert isinstance(out, tuple) and len(out) == 2


def test_signatures_match_memcnn() -> None:
    wrapper = inspect.signature(InvertibleModuleWrapper.__init__)
    assert list(wrapper.parameters)[1:] == [
        "fn",
        "keep_input",
        "keep_input_inverse",
        "num_bwd_passes",
        "disable",
        "preserve_rng_state",
    ]
    block = inspect.signature(ReversibleBlock.__init__)
    assert list(block.parameters)[1:] == [
        "Fm",
        "Gm",
        "coupling",
        "keep_input",
        "keep_input_inverse",
        "implementation_fwd",
        "implementation_bwd",
        "adapter",
    ]


def test_positional_arguments_mean_what_they_meant_in_memcnn() -> None:
    wrapped = InvertibleModuleWrapper(make_conv_coupling(4), True, True, 3, True, False)
    assert (wrapped.keep_input, wrapped.keep_input_inverse) == (True, True)
    assert (wrapped.num_bwd_passes, wrapped.disable, wrapped.preserve_rng_state) == (3, True, False)


def test_defaults_match_memcnn_except_preserve_rng_state() -> None:
    wrapped = InvertibleModuleWrapper(make_conv_coupling(4))
    assert (wrapped.keep_input, wrapped.keep_input_inverse) == (False, False)
    assert (wrapped.num_bwd_passes, wrapped.disable) == (1, False)
    assert wrapped.preserve_rng_state is True


def test_fm_conv_keeps_its_parameters_visible_through_the_wrapper() -> None:
    block = make_conv_coupling(4)
    wrapped = InvertibleModuleWrapper(block)
    assert [id(p) for p in wrapped.parameters()] == [id(p) for p in block.parameters()]


def test_fn_without_inverse_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match=r"no inverse\(\) method"):
        InvertibleModuleWrapper(conv_function(2))


def test_fn_not_a_module_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match=r"fn must be an nn.Module"):
        InvertibleModuleWrapper(lambda x: x)  # type: ignore[arg-type]


@pytest.mark.parametrize("passes", [0, -1, 1.5])
def test_num_bwd_passes_below_one_is_a_clear_error(passes) -> None:
    with pytest.raises(ValueError, match="num_bwd_passes must be an int >= 1"):
        InvertibleModuleWrapper(make_conv_coupling(4), num_bwd_passes=passes)


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_non_tensor_input_to_the_wrapper_is_a_clear_error(direction: str) -> None:
    wrapped = InvertibleModuleWrapper(make_conv_coupling(4))
    with pytest.raises(
        TypeError, match=f"{direction}\\(\\) takes tensors only as positional arguments; argument 1"
    ):
        getattr(wrapped, direction)(_x(2, 4, 5, 5), [1.0])


def test_calling_the_wrapper_without_inputs_is_a_clear_error() -> None:
    wrapped = InvertibleModuleWrapper(make_conv_coupling(4))
    with pytest.raises(TypeError, match="at least one tensor"):
        wrapped()


class _ReturnsNumber(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> tuple[Tensor, float]:
        return x * self.w, 1.0

    def inverse(self, y: Tensor) -> Tensor:
        return y / self.w


@pytest.mark.parametrize("training", [False, True])
def test_fn_returning_a_non_tensor_is_a_clear_error(training: bool) -> None:
    wrapped = InvertibleModuleWrapper(_ReturnsNumber()).train(training)
    with pytest.raises(TypeError, match="returned a float at position 1"):
        wrapped(_x(2, 3))


# -- any coupling law, any device ------------------------------------------------------------
class MultiplicativeCoupling(Coupling):
    """A coupling law defined by ``_couple``/``_decouple`` only: ``y = x * exp(h)``.

    Its gradients come from the base class's autograd-derived law backward.
    """

    def _couple(self, x: Tensor, h) -> Tensor:
        return x * torch.exp(h)

    def _decouple(self, y: Tensor, h) -> Tensor:
        return y * torch.exp(-h)


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_a_new_coupling_law_gets_plain_grads_from_the_default_law_backward(direction: str) -> None:
    torch.manual_seed(0)
    fm = conv_function(2)
    with torch.no_grad():
        fm[0].weight.mul_(0.1)
    wrapped = InvertibleModuleWrapper(MultiplicativeCoupling(fm).double())
    _compare_with_plain(wrapped, lambda m, x: getattr(m, direction)(x), _x(2, 4, 5, 5))


class _LearnedConstant(nn.Module):
    """Ignores its input: the coupling's condition gets no gradient through it."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.randn(shape, dtype=F64))

    def forward(self, x: Tensor) -> Tensor:
        return self.value.expand_as(x)


def test_an_fm_that_ignores_its_input_gets_plain_grads() -> None:
    torch.manual_seed(0)
    wrapped = InvertibleModuleWrapper(AdditiveCoupling(_LearnedConstant((2, 5))))
    _compare_with_plain(wrapped, lambda m, x: m(x), _x(3, 4, 5))


def test_an_unsupported_device_with_preserve_rng_state_raises_naming_the_option() -> None:
    wrapped = InvertibleModuleWrapper(AdditiveCoupling(nn.Linear(2, 2, device="meta")))
    x = torch.empty(3, 4, device="meta", requires_grad=True)
    with pytest.raises(NotImplementedError, match="preserve_rng_state=False"):
        wrapped(x)


def test_an_unsupported_device_without_preserve_rng_state_trains() -> None:
    # The meta device computes shapes only: what tracing and memory planners use.
    wrapped = InvertibleModuleWrapper(
        AdditiveCoupling(nn.Linear(2, 2, device="meta")), preserve_rng_state=False
    )
    x = torch.empty(3, 4, device="meta", requires_grad=True)
    wrapped(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


# -- CUDA (skipped without a GPU) ------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
def test_cuda_dropout_with_preserve_rng_state_gives_the_plain_run_grads() -> None:
    torch.manual_seed(0)
    chain = nn.Sequential(
        *(InvertibleModuleWrapper(make_conv_coupling(4, dropout=0.5)) for _ in range(2))
    ).cuda()
    plain = plain_copy(chain)
    x = _x(2, 4, 5, 5).cuda()
    x_wrapped, x_plain = leaf_copy(x), leaf_copy(x)
    torch.manual_seed(5)
    _loss(chain(x_wrapped)).backward()
    after_wrapped = torch.cuda.get_rng_state()
    torch.manual_seed(5)
    _loss(plain(x_plain)).backward()
    assert torch.equal(torch.cuda.get_rng_state(), after_wrapped)
    torch.testing.assert_close(x_wrapped.grad, x_plain.grad)
    assert_grads_close(chain, plain, rtol=1e-8, atol=1e-10)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_runs_the_block_and_its_recompute_in_the_autocast_dtype(
    dtype: torch.dtype,
) -> None:
    torch.manual_seed(0)
    block = make_conv_coupling(4, dtype=torch.float32).cuda()
    plain = plain_copy(block)  # before the hook: deep copies take hooks along
    wrapped = InvertibleModuleWrapper(block)
    dtypes: list[torch.dtype] = []
    block.Fm[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    x = _x(2, 4, 6, 6, dtype=torch.float32).cuda()
    x_wrapped, x_plain = leaf_copy(x), leaf_copy(x)
    with torch.autocast("cuda", dtype=dtype):
        y = wrapped(x_wrapped)
        y_plain = plain(x_plain)
    _loss(y.float()).backward()
    _loss(y_plain.float()).backward()
    assert dtypes == [dtype, dtype]
    torch.testing.assert_close(x_wrapped.grad, x_plain.grad, rtol=2e-2, atol=2e-2)
    assert_grads_close(wrapped, plain, rtol=2e-2, atol=2e-2)
