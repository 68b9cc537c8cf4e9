"""ReversibleSequence: whole-chain reversible backprop, checked against plain autograd."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from invertible_core import (
    AdditiveCoupling,
    AffineAdapterNaive,
    AffineCoupling,
    ReversibleSequence,
    measure_memory,
)


def conv_residual(channels: int, dropout: float = 0.0, bn: bool = True) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(channels, channels, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(channels))
    layers.append(nn.ReLU())
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def affine_residual(channels: int) -> nn.Module:
    return AffineAdapterNaive(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.Tanh()))


def make_sequence(
    depth: int = 4,
    channels: int = 4,
    kind: str = "additive",
    dropout: float = 0.0,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    **options: object,
) -> ReversibleSequence:
    torch.manual_seed(seed)
    if kind == "additive":
        blocks: list[nn.Module] = [
            AdditiveCoupling(conv_residual(channels // 2, dropout)) for _ in range(depth)
        ]
    else:
        blocks = [AffineCoupling(affine_residual(channels // 2)) for _ in range(depth)]
    return ReversibleSequence(blocks, **options).to(dtype)  # type: ignore[arg-type]


def plain_copy(seq: ReversibleSequence) -> ReversibleSequence:
    ref = copy.deepcopy(seq)
    ref.memory_saving = False
    return ref


def run_step(
    model: nn.Module, x: torch.Tensor, inverse: bool = False, seed: int = 1
) -> torch.Tensor:
    torch.manual_seed(seed)
    y = model.inverse(x) if inverse else model(x)
    (y.square() * torch.linspace(0.5, 1.5, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y


def assert_same_grads(a: nn.Module, b: nn.Module, rtol: float = 1e-9, atol: float = 1e-10) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=name)


def _assert_matches_plain(seq: ReversibleSequence, x: torch.Tensor) -> None:
    """Outputs and every gradient of ``seq`` with memory saving equal plain autograd's."""
    ref = plain_copy(seq)
    x = x.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(run_step(seq, x), run_step(ref, x_ref), rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    assert_same_grads(seq, ref)


@pytest.mark.parametrize("kind", ["additive", "affine"])
@pytest.mark.parametrize("inverse", [False, True])
def test_gradients_equal_plain_autograd(kind: str, inverse: bool) -> None:
    seq = make_sequence(kind=kind)
    ref = plain_copy(seq)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = run_step(seq, x, inverse)
    y_ref = run_step(ref, x_ref, inverse)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    assert_same_grads(seq, ref, rtol=1e-7 if kind == "affine" else 1e-9)


def test_non_leaf_input_gets_gradient_through_preceding_op() -> None:
    seq = make_sequence()
    ref = plain_copy(seq)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    w_ref = w.detach().clone().requires_grad_(True)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    # a ReLU saves its output for backward: the sequence must not disturb it (MemCNN issue 70)
    run_step(seq, torch.relu(x * w.view(1, 4, 1, 1)))
    run_step(ref, torch.relu(x * w_ref.view(1, 4, 1, 1)))
    torch.testing.assert_close(w.grad, w_ref.grad)
    assert_same_grads(seq, ref)


class ElementwiseResidual(nn.Module):
    """A shape-agnostic residual function with parameters: ``a * tanh(x) + b``."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Parameter(torch.randn(1, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(1, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * torch.tanh(x) + self.b


@pytest.mark.parametrize("split_dim", [0, 1, 2, 3, -1])
def test_split_along_any_dimension(split_dim: int) -> None:
    blocks = [
        AdditiveCoupling(ElementwiseResidual(i), ElementwiseResidual(i + 10), split_dim=split_dim)
        for i in range(3)
    ]
    seq = ReversibleSequence(blocks)
    ref = plain_copy(seq)
    x = torch.randn(4, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    run_step(seq, x)
    run_step(ref, x_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert_same_grads(seq, ref)


def test_batchnorm_statistics_updated_once_per_forward() -> None:
    seq = make_sequence(depth=3)
    ref = plain_copy(seq)
    for step in range(4):
        x = torch.randn(4, 4, 5, 5, dtype=torch.float64) + step
        run_step(seq, x.clone().requires_grad_(True))
        run_step(ref, x.clone().requires_grad_(True))
    for (name, a), b in zip(seq.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    tracked = [b for name, b in seq.named_buffers() if name.endswith("num_batches_tracked")]
    assert tracked and all(int(t) == 4 for t in tracked)


def test_dropout_masks_repeat_in_recompute() -> None:
    seq = make_sequence(dropout=0.5)
    ref = plain_copy(seq)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    run_step(seq, x, seed=7)
    after = torch.get_rng_state()
    run_step(ref, x_ref, seed=7)
    # the recompute restores the caller's random stream: same state as the plain run
    assert torch.equal(after, torch.get_rng_state())
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert_same_grads(seq, ref)


def test_dropout_without_preserved_rng_gives_different_gradients() -> None:
    seq = make_sequence(dropout=0.5, preserve_rng_state=False)
    ref = plain_copy(seq)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    run_step(seq, x, seed=7)
    run_step(ref, x_ref, seed=7)
    assert not torch.allclose(x.grad, x_ref.grad)


def test_per_block_rng_preservation_flags() -> None:
    seq = make_sequence(depth=2, preserve_rng_state=[True, False])
    assert seq.preserve_rng_state == [True, False]
    with pytest.raises(ValueError, match="one per block"):
        make_sequence(depth=2, preserve_rng_state=[True])


def test_autograd_grad_matches_backward_and_leaves_grad_fields_empty() -> None:
    seq = make_sequence()
    ref = plain_copy(seq)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    params = list(seq.parameters())
    (gx, *gp) = torch.autograd.grad(seq(x).square().sum(), [x, *params])
    assert all(p.grad is None for p in params)
    x_ref = x.detach().clone().requires_grad_(True)
    ref(x_ref).square().sum().backward()
    torch.testing.assert_close(gx, x_ref.grad)
    for g, q in zip(gp, ref.parameters()):
        torch.testing.assert_close(g, q.grad)


def test_autograd_grad_for_input_only() -> None:
    seq = make_sequence()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(seq(x).sum(), [x])
    x_ref = x.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(plain_copy(seq)(x_ref).sum(), [x_ref])
    torch.testing.assert_close(gx, g_ref)


def test_several_backward_passes_with_retain_graph() -> None:
    seq = make_sequence(num_bwd_passes=2)
    ref = plain_copy(seq)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    loss = seq(x).square().sum()
    loss.backward(retain_graph=True)
    loss.backward()
    loss_ref = ref(x.detach().requires_grad_(True)).square().sum()
    loss_ref.backward(retain_graph=True)
    loss_ref.backward()
    assert_same_grads(seq, ref)


def test_one_backward_pass_too_many_names_num_bwd_passes() -> None:
    seq = make_sequence()
    loss = seq(torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="num_bwd_passes=2"):
        loss.backward()
    with pytest.raises(ValueError, match="num_bwd_passes"):
        make_sequence(num_bwd_passes=0)


def test_output_modified_in_place_is_an_error() -> None:
    seq = make_sequence()
    y = seq(torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True))
    z = y * 1.0
    y.data.add_(1.0)  # what an in-place op on the output does to its storage
    y.add_(0.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        (z.sum() + y.sum()).backward()


def test_nothing_of_the_engine_outlives_the_backward_pass() -> None:
    """The recompute's saved tensors are released as autograd consumes them, and nothing
    (rebuilt inputs, random states, frames) is left once the backward pass is done."""
    seq = make_sequence(depth=6, channels=8, dtype=torch.float32)
    x = torch.randn(8, 8, 16, 16, requires_grad=True)
    seq(x).sum().backward()  # the parameters' gradients exist from here on
    y, forward = measure_memory(lambda: seq(x))
    _, backward = measure_memory(lambda: y.sum().backward())
    # afterwards only the output itself is left (the caller holds it)
    output = y.numel() * y.element_size()
    assert forward.retained_bytes + backward.retained_bytes <= output + 1024


def test_parameters_only_no_input_grad() -> None:
    seq = make_sequence()
    ref = plain_copy(seq)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    run_step(seq, x)
    run_step(ref, x)
    assert_same_grads(seq, ref)


def test_plain_when_grad_disabled_or_eval(monkeypatch: pytest.MonkeyPatch) -> None:
    seq = make_sequence()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    inverses = 0
    original = AdditiveCoupling.inverse

    def counting(self, y, *args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal inverses
        inverses += 1
        return original(self, y, *args, **kwargs)

    monkeypatch.setattr(AdditiveCoupling, "inverse", counting)
    with torch.no_grad():
        y = seq(x)
    assert y.grad_fn is None
    seq.eval()
    seq(x).sum().backward()  # eval mode: plain autograd, nothing rebuilt
    assert inverses == 0
    seq.train()
    seq(x).sum().backward()  # training: every block rebuilt by its inverse
    assert inverses == len(seq)


def test_memory_saving_switch_keeps_parameters_and_state_dict_keys() -> None:
    seq = make_sequence()
    keys = list(seq.state_dict())
    seq.memory_saving = False
    assert list(seq.state_dict()) == keys
    other = make_sequence(seed=3, memory_saving=False)
    other.load_state_dict(seq.state_dict())
    other.memory_saving = True
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(other(x), seq(x))


def test_inverse_undoes_forward() -> None:
    seq = make_sequence(kind="affine").eval()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(seq.inverse(seq(x)), x)


def test_container_behaviour() -> None:
    blocks = [AdditiveCoupling(nn.Tanh()) for _ in range(3)]
    seq = ReversibleSequence(*blocks)
    assert len(seq) == 3 and seq[1] is blocks[1] and list(seq) == blocks
    assert "memory_saving=True" in repr(seq)


def test_autocast_bf16_runs_recompute_in_same_precision() -> None:
    seq = make_sequence(dtype=torch.float32)
    ref = plain_copy(seq)
    dtypes: list[torch.dtype] = []
    conv = seq[0].Fm[0]
    conv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    x = torch.randn(2, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = seq(x.clone().requires_grad_(True))
        y_ref = ref(x.clone().requires_grad_(True))
    y.float().square().sum().backward()
    y_ref.float().square().sum().backward()
    assert dtypes == [torch.bfloat16, torch.bfloat16]  # forward, then recompute
    for p, q in zip(seq.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=2e-2)


def test_memory_flat_in_depth() -> None:
    def peak(depth: int, saving: bool) -> int:
        seq = make_sequence(depth=depth, channels=8, dtype=torch.float32, memory_saving=saving)
        x = torch.randn(8, 8, 16, 16, requires_grad=True)

        def step() -> None:
            seq(x).square().sum().backward()

        step()
        return measure_memory(step)[1].peak_bytes

    saving_2, saving_16 = peak(2, True), peak(16, True)
    plain_2, plain_16 = peak(2, False), peak(16, False)
    assert plain_16 > 3 * plain_2  # the measurement discriminates: plain grows with depth
    assert saving_16 <= 1.15 * saving_2 + 64 * 1024  # params grow a little; activations do not


def test_activation_memory_retained_after_forward_is_one_output() -> None:
    seq = make_sequence(depth=12, channels=8, dtype=torch.float32)
    x = torch.randn(8, 8, 16, 16, requires_grad=True)
    y, stats = measure_memory(lambda: seq(x))
    # the output itself plus small bookkeeping (random states), not 12 activations
    assert stats.retained_bytes < 2 * y.numel() * y.element_size()


class Huge(nn.Module):
    """``scale * sin(x)``: a large residual swamps the small half it is added to, so float32
    reconstruction loses digits and the error is amplified block after block."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.sin(x)


def _ill_conditioned(depth: int = 3, scale: float = 1e7, **options: object) -> ReversibleSequence:
    blocks = [AdditiveCoupling(Huge(scale)) for _ in range(depth)]
    return ReversibleSequence(blocks, **options)  # type: ignore[arg-type]


def test_drift_check_raises_on_ill_conditioned_block() -> None:
    seq = _ill_conditioned(check_reconstruction="raise", reconstruction_tolerance=1e-4)
    x = torch.randn(4, 6, requires_grad=True)
    with pytest.raises(RuntimeError, match="reconstruction_tolerance"):
        seq(x).sum().backward()


def test_drift_check_warns_and_reports_errors() -> None:
    seq = _ill_conditioned(check_reconstruction="warn")
    x = torch.randn(4, 6, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="anchor_every"):
        seq(x).sum().backward()
    assert len(seq.reconstruction_errors) == 3
    assert max(seq.reconstruction_errors) > 1e-4


def test_drift_check_quiet_on_well_conditioned_chain() -> None:
    seq = make_sequence(check_reconstruction="warn", dtype=torch.float32)
    x = torch.randn(2, 4, 4, 4, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seq(x).sum().backward()
    assert max(seq.reconstruction_errors) < 1e-5


def test_anchors_bound_drift() -> None:
    x = torch.randn(4, 6)

    def grad_error(anchor_every: int) -> float:
        seq = _ill_conditioned(depth=4, scale=100.0, anchor_every=anchor_every)
        xs = x.clone().requires_grad_(True)
        seq(xs).sum().backward()
        ref = _ill_conditioned(depth=4, scale=100.0, memory_saving=False)
        xr = x.clone().requires_grad_(True)
        ref(xr).sum().backward()
        return float((xs.grad - xr.grad).norm() / xr.grad.norm())

    every_block, every_other, never = grad_error(1), grad_error(2), grad_error(0)
    assert every_block < 1e-4 < 1e-2 < never
    assert every_other < never


def test_empty_sequence_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        ReversibleSequence()
    with pytest.raises(ValueError, match="at least one block"):
        ReversibleSequence([])


def test_block_outside_the_contract_is_an_error() -> None:
    with pytest.raises(TypeError, match=r"block 1 \(Linear\) has no inverse\(\) method"):
        ReversibleSequence(AdditiveCoupling(nn.Tanh()), nn.Linear(4, 4))
    with pytest.raises(TypeError, match="not an nn.Module"):
        ReversibleSequence([lambda x: x])  # type: ignore[list-item]


def test_a_bare_function_is_a_clear_error_not_an_iteration_failure() -> None:
    with pytest.raises(TypeError, match="got a function, not an invertible block"):
        ReversibleSequence(lambda x: x)  # type: ignore[arg-type]


def test_mixed_split_dims_are_re_cut_between_blocks() -> None:
    # the chain owns how state passes: it merges and re-splits where the partitions differ
    torch.manual_seed(0)
    seq = ReversibleSequence(
        AdditiveCoupling(nn.Tanh(), split_dim=1),
        AdditiveCoupling(nn.Tanh(), split_dim=2),
        AdditiveCoupling(nn.Tanh(), split_dim=1),
    ).double()
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    _assert_matches_plain(seq, x)


def test_a_block_returning_a_non_tensor_is_an_error() -> None:
    class Broken(AdditiveCoupling):
        def forward(self, x, *args, **kwargs):  # type: ignore[no-untyped-def]
            return (super().forward(x),)

    seq = ReversibleSequence(AdditiveCoupling(nn.Tanh()), Broken(nn.Tanh()))
    with pytest.raises(TypeError, match=r"block 1 \(Broken\) returned a tuple"):
        seq(torch.randn(2, 4, requires_grad=True))
    with pytest.raises(TypeError, match="block 1"), torch.no_grad():
        seq(torch.randn(2, 4))


def test_an_inverse_returning_a_non_tensor_is_an_error() -> None:
    class Broken(AdditiveCoupling):
        def inverse(self, y, *args, **kwargs):  # type: ignore[no-untyped-def]
            return 1.0

    seq = ReversibleSequence(AdditiveCoupling(nn.Tanh()), Broken(nn.Tanh()))
    y = seq(torch.randn(2, 4, requires_grad=True))
    with pytest.raises(TypeError, match=r"Broken.inverse returned a float"):
        y.sum().backward()


def test_non_tensor_input_is_an_error() -> None:
    with pytest.raises(TypeError, match="expects a tensor"):
        make_sequence()([1.0, 2.0])  # type: ignore[arg-type]


def test_invalid_options_are_errors() -> None:
    with pytest.raises(ValueError, match="anchor_every"):
        make_sequence(anchor_every=-1)
    with pytest.raises(ValueError, match="check_reconstruction"):
        make_sequence(check_reconstruction="loud")


class CompiledNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = make_sequence(depth=2, dtype=torch.float32)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(torch.relu(self.stem(x))).mean(dim=(2, 3)))


def test_compile_captures_graphs_of_fm_and_gm_and_the_recompute_runs_them() -> None:
    # torch.compile(model): the sequence's bookkeeping is a graph break, its blocks' Fm and Gm
    # are graphs, and the recompute in backward runs the very graphs the forward pass ran
    graphs: list[tuple[set[str], list[int]]] = []

    def counting_backend(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]):  # type: ignore[no-untyped-def]
        # torch >= 2.5 inlines the modules (a batch_norm call); 2.4 calls them as submodules
        targets = {getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes}
        for n in gm.graph.nodes:
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.BatchNorm2d):
                targets.add("batch_norm")
        runs = [0]
        graphs.append((targets, runs))

        def run(*args):  # type: ignore[no-untyped-def]
            runs[0] += 1
            return gm.forward(*args)

        return run

    torch._dynamo.reset()
    model = torch.compile(CompiledNet(), backend=counting_backend)
    y = model(torch.randn(2, 3, 6, 6))
    before = [runs[0] for _, runs in graphs]
    residual = [i for i, (targets, _) in enumerate(graphs) if "batch_norm" in targets]
    assert residual  # Fm/Gm (conv, batch norm, ReLU) were compiled
    assert sum(before[i] for i in residual) == 4  # 2 blocks x (Fm, Gm) in the forward pass
    y.sum().backward()
    after = [runs[0] for _, runs in graphs]
    assert sum(after[i] for i in residual) == 8  # and once more each in the recompute
    assert not any("batch_norm" in t for t, _ in graphs[len(before) :])  # nothing recompiled


def test_fullgraph_compiles_plain_autograd_and_refuses_memory_saving_with_a_clear_error() -> None:
    torch._dynamo.reset()
    net = CompiledNet()
    net.body.memory_saving = False
    x = torch.randn(2, 3, 6, 6)
    compiled = torch.compile(net, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), net(x))  # one graph: plain autograd
    torch._dynamo.reset()
    net.body.memory_saving = True
    # torch >= 2.5 gives dynamo our reason; 2.4 names the function (_memory_saving_entry)
    with pytest.raises(Exception, match="memory.saving"):
        torch.compile(net, fullgraph=True, backend="eager")(x)


def test_compile_trains_and_matches_eager() -> None:
    Net = CompiledNet
    torch.manual_seed(0)
    eager = Net()
    compiled_net = copy.deepcopy(eager)
    compiled = torch.compile(compiled_net)
    x = torch.randn(4, 3, 6, 6)
    target = torch.tensor([0, 1, 2, 0])
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(compiled_net.parameters(), lr=0.1)
    for _ in range(2):
        for model, opt in ((eager, opt_e), (compiled, opt_c)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), target).backward()
            opt.step()
    for p, q in zip(eager.parameters(), compiled_net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "norm",
    [nn.BatchNorm2d, nn.SyncBatchNorm, lambda c: nn.InstanceNorm2d(c, track_running_stats=True)],
    ids=["batchnorm", "syncbatchnorm", "instancenorm"],
)
def test_every_norm_layer_counts_each_batch_once(norm) -> None:  # type: ignore[no-untyped-def]
    """SyncBatchNorm (without a process group it normalises like BatchNorm) asserts that its
    counter exists while it tracks statistics; the recompute must satisfy every norm layer."""
    torch.manual_seed(0)
    blocks = [
        AdditiveCoupling(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), norm(2), nn.ReLU()))
        for _ in range(2)
    ]
    seq = ReversibleSequence(blocks).double()
    ref = plain_copy(seq)
    for _ in range(3):
        x = torch.randn(4, 4, 5, 5, dtype=torch.float64)
        run_step(seq, x.clone().requires_grad_(True))
        run_step(ref, x.clone().requires_grad_(True))
    for (name, a), b in zip(seq.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert_same_grads(seq, ref)
