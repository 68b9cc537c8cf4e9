"""``fit_memory_budget``: the fastest step within a memory budget, its plan, its errors.

The network of these tests has both kinds of switch: two reversible sequences (keep or
rebuild each block) and two checkpointable modules (checkpoint or store), so every part of
the planner is exercised. Memory is exact on the CPU (profiler allocation events), so the
assertions on peaks compare byte counts.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from conftest import leaf_copy
from invertible_core import (
    AdditiveCoupling,
    AffineAdapterNaive,
    AffineCoupling,
    Checkpointable,
    MemoryBudgetError,
    MemoryPlan,
    MemoryProfile,
    MemorySwitches,
    NonFiniteLossError,
    PlanMismatchError,
    ReversibleSequence,
    TrainingStep,
    fit_memory_budget,
    format_bytes,
    is_checkpointable,
    mark_phase,
    measure_memory_phases,
    measure_minimum_peak,
    parse_bytes,
)

MiB = 2**20


class CheckpointedConv(nn.Module):
    """conv3x3 + tanh with the ``checkpointed`` switch (torch.utils.checkpoint when on)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.checkpointed = False

    def _compute(self, x: Tensor) -> Tensor:
        return torch.tanh(self.conv(torch.tanh(x)))

    def forward(self, x: Tensor) -> Tensor:
        if self.checkpointed and self.training and torch.is_grad_enabled():
            out = checkpoint(self._compute, x, use_reentrant=False)
            assert isinstance(out, Tensor)
            return out
        return self._compute(x)


def coupling(channels: int) -> AdditiveCoupling:
    half = channels // 2
    return AdditiveCoupling(
        nn.Sequential(nn.Conv2d(half, half, 3, padding=1), nn.Tanh()),
        nn.Sequential(nn.Conv2d(half, half, 3, padding=1), nn.Tanh()),
    )


class Net(nn.Module):
    """stem (checkpointable), a sequence of 4, a checkpointable middle, a sequence of 3."""

    def __init__(self, channels: int = 4, first: int = 4, second: int = 3) -> None:
        super().__init__()
        self.stem = CheckpointedConv(channels)
        self.body = ReversibleSequence([coupling(channels) for _ in range(first)])
        self.middle = CheckpointedConv(channels)
        self.top = ReversibleSequence([coupling(channels) for _ in range(second)])

    def forward(self, x: Tensor) -> Tensor:
        return self.top(self.middle(self.body(self.stem(x))))


def net(dtype: torch.dtype = torch.float32, *, first: int = 4, second: int = 3) -> Net:
    torch.manual_seed(0)
    return Net(first=first, second=second).to(dtype)


def batch(dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(4, 4, 12, 12, generator=torch.Generator().manual_seed(1), dtype=dtype)


def square(out: Tensor) -> Tensor:
    return out.square().mean()


@pytest.fixture(scope="module")
def profile() -> MemoryProfile:
    return MemoryProfile.measure(net(), batch(), loss_fn=square, repeats=1)


def plain_reference(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model)
    switches = MemorySwitches(ref)
    switches.set(switches.uniform(recompute=False))
    return ref


def gradients(model: nn.Module, x: Tensor) -> list[Tensor]:
    model.zero_grad(set_to_none=True)
    leaf = leaf_copy(x)
    square(model(leaf)).backward()
    assert leaf.grad is not None
    return [leaf.grad, *(p.grad for p in model.parameters() if p.grad is not None)]


# -- sizes -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("6GiB", 6 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5GB", 1_500_000_000),
        (" 2 KiB ", 2048),
        ("100", 100),
        ("100B", 100),
        ("1e3 kB", 10**6),
        ("3tib", 3 * 2**40),
        (4096, 4096),
    ],
)
def test_sizes_are_read_in_binary_and_decimal_units(text: Any, size: int) -> None:
    assert parse_bytes(text) == size


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("6G", "'G' is ambiguous: write GiB"),
        ("six GiB", "is not a size"),
        ("6 GiBs", "is not a size"),
        ("0MiB", "must be a positive size"),
        ("-1GiB", "is not a size"),
        (0, "must be a positive size"),
        (True, "must be a number of bytes"),
        (1.5, "must be a number of bytes"),
    ],
)
def test_a_bad_size_is_a_clear_error(value: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_bytes(value)


def test_sizes_are_written_for_people() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(6 * 2**30) == "6.00 GiB"


# -- the protocol and the switches -----------------------------------------------------
def test_a_module_with_a_bool_checkpointed_switch_is_checkpointable() -> None:
    assert is_checkpointable(CheckpointedConv(2))
    assert isinstance(CheckpointedConv(2), Checkpointable)
    assert not is_checkpointable(nn.Conv2d(2, 2, 1))
    odd = nn.Linear(2, 2)
    odd.checkpointed = "yes"  # type: ignore[assignment]
    assert not is_checkpointable(odd)


def test_the_switches_of_a_network_are_found_by_module_path() -> None:
    switches = MemorySwitches(net())
    assert list(switches.sequences) == ["body", "top"]
    assert list(switches.checkpointables) == ["stem", "middle"]


# -- measuring phases ---------------------------------------------------------------------
def test_measure_memory_phases_gives_the_peak_of_each_phase_exactly() -> None:
    def work() -> None:
        a = torch.empty(MiB, dtype=torch.uint8)  # phase 0: 1 MiB
        mark_phase()
        b = torch.empty(3 * MiB, dtype=torch.uint8)  # phase 1: 4 MiB
        del a, b
        mark_phase()
        c = torch.empty(2 * MiB, dtype=torch.uint8)  # phase 2: 2 MiB
        del c

    _, stats, peaks = measure_memory_phases(work)
    assert peaks == [MiB, 4 * MiB, 2 * MiB]
    assert stats.peak_bytes == 4 * MiB and stats.retained_bytes == 0
    mark_phase()  # outside a measurement: nothing happens
    with pytest.raises(ValueError, match="supports 'cpu' and 'cuda' devices"):
        measure_memory_phases(work, "meta")


# -- the planner's choices --------------------------------------------------------------
def test_more_budget_never_gives_a_slower_predicted_plan(profile: MemoryProfile) -> None:
    lo, hi = profile.minimum_peak_bytes, profile.plain_peak_bytes
    budgets = [lo + (hi - lo) * i // 24 for i in range(25)]
    plans = [profile.plan(b) for b in budgets]
    times = [p.predicted_step_seconds for p in plans]
    assert all(later <= earlier for earlier, later in itertools.pairwise(times))
    stored = [sum(u.stores for u in p.units) for p in plans]
    assert stored == sorted(stored) and stored[0] < stored[-1]
    assert all(p.predicted_peak_bytes <= b for p, b in zip(plans, budgets))


def test_the_frontier_stores_one_switch_more_at_each_point(profile: MemoryProfile) -> None:
    points = profile.frontier()
    assert len(points) == len(profile.units) + 1 == 4 + 3 + 2 + 1
    for before, after in itertools.pairwise(points):
        assert before.stored < after.stored and len(after.stored) == len(before.stored) + 1
        assert after.predicted_peak_bytes >= before.predicted_peak_bytes
        assert after.predicted_step_seconds <= before.predicted_step_seconds


def test_at_plain_autograds_peak_everything_is_stored(profile: MemoryProfile) -> None:
    plan = profile.plan(profile.plain_peak_bytes)
    assert plan.keep == {"body": (0, 1, 2, 3), "top": (0, 1, 2)}
    assert plan.checkpointed == {"stem": False, "middle": False}
    assert plan.predicted_peak_bytes == plan.plain_peak_bytes


def test_at_the_minimum_only_what_costs_no_peak_is_stored(profile: MemoryProfile) -> None:
    first = profile.frontier()[0]
    assert first.stored == frozenset()  # the frontier starts with everything recomputed
    assert first.predicted_peak_bytes == profile.minimum_peak_bytes < profile.plain_peak_bytes
    plan = fit_memory_budget(
        profile.module, budget=profile.minimum_peak_bytes, profile=profile, repeats=1
    )
    assert plan.measured_peak_bytes is not None
    assert plan.measured_peak_bytes <= profile.minimum_peak_bytes
    # what it stores there (blocks whose activations are freed before the peak) is free
    for i, unit in enumerate(profile.units):
        if plan.units[i].stores:
            assert profile.predict_peak(frozenset({i})) == profile.minimum_peak_bytes, unit.name
    everything_recomputed = profile.plan_of(frozenset(), profile.minimum_peak_bytes)
    assert everything_recomputed.keep == {"body": (), "top": ()}
    assert everything_recomputed.checkpointed == {"stem": True, "middle": True}


def test_blocks_that_cost_the_same_are_kept_from_the_end(profile: MemoryProfile) -> None:
    # the blocks of a sequence are twins: the backward pass needs the last ones first
    for point in profile.frontier():
        for name, length in (("body", 4), ("top", 3)):
            kept = sorted(
                u.index
                for i, u in enumerate(profile.units)
                if i in point.stored and u.owner == name
            )  # type: ignore[type-var]
            assert kept == list(range(length - len(kept), length)), (name, kept)


def test_the_optimizers_state_and_step_are_measured_with_the_rest() -> None:
    """With the caller's optimizer the planner measures its step and its state (allocated
    by the first step) instead of taking an estimate in ``reserved_bytes``."""
    parameter_bytes = sum(p.numel() * p.element_size() for p in net().parameters())
    one, two = net(), net()
    plain_sgd = measure_minimum_peak(
        one, batch(), loss_fn=square, optimizer=torch.optim.SGD(one.parameters(), lr=0.1)
    )
    momentum = measure_minimum_peak(
        two,
        batch(),
        loss_fn=square,
        optimizer=torch.optim.SGD(two.parameters(), lr=0.1, momentum=0.9),
    )
    assert momentum - plain_sgd == parameter_bytes  # the momentum buffers, to the byte


def test_a_training_step_is_planned_as_it_is_and_left_as_it_was() -> None:
    model = net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    step = TrainingStep(model, batch(), loss_fn=square, optimizer=optimizer)
    params = [p.detach().clone() for p in model.parameters()]
    plan = fit_memory_budget(step, budget="1GiB", repeats=1)
    assert plan.measured_peak_bytes is not None
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert not optimizer.state and step.calls == 0  # the optimizer is as it was: unstepped
    with pytest.raises(ValueError, match="a TrainingStep has its own loss_fn, optimizer"):
        fit_memory_budget(step, budget="1GiB", loss_fn=square, optimizer=optimizer)


def test_planning_a_step_whose_loss_is_not_finite_stops_with_the_reason() -> None:
    nan = lambda out: out.sum() * torch.tensor(float("nan"))  # noqa: E731
    with pytest.raises(NonFiniteLossError, match="loss of training step 1 is nan"):
        fit_memory_budget(net(), batch(), budget="1GiB", loss_fn=nan)


def test_the_minimum_measured_alone_is_the_profiles() -> None:
    model = net()
    alone = measure_minimum_peak(model, batch(), loss_fn=square)
    profile = MemoryProfile.measure(model, batch(), loss_fn=square, repeats=1)
    assert alone == profile.minimum_peak_bytes


# -- fitting: measured, exact, gradients of plain autograd ---------------------------------
@pytest.mark.parametrize("share", [0.0, 0.3, 0.7, 1.0])
def test_the_measured_peak_is_within_the_budget(profile: MemoryProfile, share: float) -> None:
    lo, hi = profile.minimum_peak_bytes, profile.plain_peak_bytes
    budget = int(lo + share * (hi - lo))
    plan = fit_memory_budget(profile.module, budget=budget, profile=profile, repeats=1)
    assert plan.measured_peak_bytes is not None
    assert plan.measured_peak_bytes <= budget
    assert plan.fits
    assert plan.measured_step_seconds is not None and plan.measured_step_seconds > 0


def test_a_prediction_that_falls_short_is_refined_until_the_step_fits() -> None:
    model = net()
    profile = MemoryProfile.measure(model, batch(), loss_fn=square, repeats=1)
    profile._scale *= 0.4  # a model that promises far less memory than the step takes
    profile._frontier = None
    lo, hi = profile.minimum_peak_bytes, profile.plain_peak_bytes
    budget = (lo + hi) // 2
    plan = fit_memory_budget(model, budget=budget, profile=profile, repeats=1)
    assert plan.refinements >= 1
    assert plan.measured_peak_bytes is not None and plan.measured_peak_bytes <= budget


def test_when_refinements_run_out_the_measured_minimum_is_taken() -> None:
    model = net()
    profile = MemoryProfile.measure(model, batch(), loss_fn=square, repeats=1)
    profile._scale *= 0.2
    profile._frontier = None
    lo, hi = profile.minimum_peak_bytes, profile.plain_peak_bytes
    plan = fit_memory_budget(
        model, budget=(lo + hi) // 2, profile=profile, max_refinements=0, repeats=1
    )
    assert not any(u.stores for u in plan.units)
    assert plan.measured_peak_bytes == profile.minimum_peak_bytes


def test_a_prediction_alone_is_applied_without_a_measured_step(profile: MemoryProfile) -> None:
    lo, hi = profile.minimum_peak_bytes, profile.plain_peak_bytes
    plan = fit_memory_budget(profile.module, budget=(lo + hi) // 2, profile=profile, measure=False)
    assert plan.measured_peak_bytes is None and plan.measured_step_seconds is None
    assert plan.predicted_peak_bytes <= plan.budget_bytes
    assert "measured -" in str(plan)
    assert MemoryPlan.from_json(plan.to_json()) == plan


def test_gradients_equal_plain_autograd_at_every_plan_of_the_frontier() -> None:
    model = net(torch.float64)
    x = batch(torch.float64)
    profile = MemoryProfile.measure(model, x, loss_fn=square, repeats=1)
    expected = gradients(plain_reference(model), x)
    for point in profile.frontier():
        profile.plan_of(point.stored, profile.plain_peak_bytes).apply(model)
        got = gradients(model, x)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_planning_leaves_the_module_as_it_was_but_for_its_switches() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        CheckpointedConv(4),
        nn.BatchNorm2d(4),
        nn.Dropout(0.2),
        ReversibleSequence([coupling(4) for _ in range(3)]),
    )
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.detach().clone() for b in model.buffers()]
    model.eval()
    rng = torch.get_rng_state()
    x = batch()
    plan = fit_memory_budget(model, x, budget=10 * MiB, repeats=1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), buffers))
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert model[3].keep_blocks == plan.keep["3"]
    assert model[0].checkpointed == plan.checkpointed["0"]


def test_a_sequence_run_through_forward_with_logdet_is_planned_too() -> None:
    class Flow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.flow = ReversibleSequence(
                [AffineCoupling(nn.Linear(3, 3), adapter=AffineAdapterNaive) for _ in range(4)]
            )

        def forward(self, x: Tensor) -> Tensor:
            z, logdet = self.flow.forward_with_logdet(x)
            return 0.5 * z.square().sum(1) - logdet

    torch.manual_seed(0)
    model = Flow().double()
    for p in model.parameters():
        nn.init.normal_(p, std=0.1)
    x = torch.randn(8, 6, dtype=torch.float64)
    nll = lambda out: out.mean()  # noqa: E731
    profile = MemoryProfile.measure(model, x, loss_fn=nll, repeats=1)
    assert [u.name for u in profile.units] == [f"flow[{i}]" for i in range(4)]
    assert all(u.stored_bytes > 0 for u in profile.units)
    reference = copy.deepcopy(model)
    reference.flow.memory_saving = False
    for point in profile.frontier():
        profile.plan_of(point.stored, profile.plain_peak_bytes).apply(model)
        for m in (model, reference):
            m.zero_grad()
            nll(m(x)).backward()
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad)


# -- errors ---------------------------------------------------------------------------------
def test_a_budget_below_the_minimum_names_the_minimum(profile: MemoryProfile) -> None:
    budget = profile.minimum_peak_bytes - 1
    with pytest.raises(MemoryBudgetError, match="below the minimum of this step") as info:
        fit_memory_budget(profile.module, budget=budget, profile=profile)
    assert info.value.minimum_bytes == profile.minimum_peak_bytes
    assert format_bytes(profile.minimum_peak_bytes) in str(info.value)
    assert f"{profile.minimum_peak_bytes:,} bytes" in str(info.value)


def test_a_bad_budget_string_is_refused_before_measuring() -> None:
    with pytest.raises(ValueError, match="'G' is ambiguous"):
        fit_memory_budget(net(), batch(), budget="6G")


def test_a_module_without_switches_has_nothing_to_plan() -> None:
    with pytest.raises(ValueError, match="nothing to plan"):
        fit_memory_budget(nn.Linear(3, 3), torch.randn(2, 3), budget="1MiB")


def test_a_loss_that_is_not_a_scalar_is_refused() -> None:
    with pytest.raises(TypeError, match="must return a scalar tensor"):
        fit_memory_budget(net(), batch(), budget="1GiB", loss_fn=lambda out: out)


def test_the_default_loss_needs_an_output_that_requires_grad() -> None:
    model = net()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to backpropagate"):
        fit_memory_budget(model, batch(), budget="1GiB")


def test_a_profile_of_another_module_is_refused(profile: MemoryProfile) -> None:
    with pytest.raises(ValueError, match="measured on another module"):
        fit_memory_budget(net(), budget="1GiB", profile=profile)


@pytest.mark.parametrize(
    ("other", "match"),
    [
        (dict(first=5), "sequence 'body' has 5 blocks, the plan 4"),
        (dict(second=2), "sequence 'top' has 2 blocks, the plan 3"),
    ],
)
def test_a_plan_applied_to_another_network_is_a_clear_error(
    profile: MemoryProfile, other: dict[str, int], match: str
) -> None:
    plan = profile.plan(profile.plain_peak_bytes)
    target = net(**other)  # type: ignore[arg-type]
    before = [seq.keep_blocks for seq in MemorySwitches(target).sequences.values()]
    with pytest.raises(PlanMismatchError, match=match):
        plan.apply(target)
    assert [seq.keep_blocks for seq in MemorySwitches(target).sequences.values()] == before


def test_a_plan_names_the_switches_a_network_lacks_or_has_beyond_it(
    profile: MemoryProfile,
) -> None:
    plan = profile.plan(profile.plain_peak_bytes)
    stripped = net()
    stripped.middle = nn.Identity()  # type: ignore[assignment]
    with pytest.raises(PlanMismatchError, match="no checkpointable module 'middle'"):
        plan.apply(stripped)
    extended = net()
    extended.extra = CheckpointedConv(4)
    with pytest.raises(PlanMismatchError, match="module 'extra' is not in the plan"):
        plan.apply(extended)


# -- the plan as data ---------------------------------------------------------------------
def test_a_plan_goes_through_json_and_back_unchanged(profile: MemoryProfile) -> None:
    lo, hi = profile.minimum_peak_bytes, profile.plain_peak_bytes
    plan = fit_memory_budget(profile.module, budget=(lo + hi) // 2, profile=profile, repeats=1)
    text = plan.to_json()
    assert json.loads(text)["format"] == "invertible-memory-plan"
    again = MemoryPlan.from_json(text)
    assert again == plan
    predicted_only = profile.plan(hi)
    assert MemoryPlan.from_json(predicted_only.to_json()).keep == predicted_only.keep


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{", "a memory plan is JSON"),
        ('{"format": "something"}', "not a memory plan"),
        ('{"format": "invertible-memory-plan", "version": 99}', "version 99 is not supported"),
        ('{"format": "invertible-memory-plan", "version": 1}', "malformed memory plan"),
    ],
)
def test_what_is_not_a_plan_is_refused_with_the_reason(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MemoryPlan.from_json(text)


def test_a_plan_is_applied_again_without_measuring(profile: MemoryProfile) -> None:
    lo, hi = profile.minimum_peak_bytes, profile.plain_peak_bytes
    plan = profile.plan((lo + hi) // 2)
    fresh = net()
    calls = []
    fresh.register_forward_pre_hook(lambda *args: calls.append(1))
    MemoryPlan.from_json(plan.to_json()).apply(fresh)
    assert not calls  # no step ran
    state = MemorySwitches(fresh).state()
    assert state.keep == dict(plan.keep) and state.checkpointed == dict(plan.checkpointed)
    assert all(state.saving.values())


def test_a_printed_plan_is_a_table_of_switches_and_figures(profile: MemoryProfile) -> None:
    lo, hi = profile.minimum_peak_bytes, profile.plain_peak_bytes
    plan = fit_memory_budget(profile.module, budget=(lo + hi) // 2, profile=profile, repeats=1)
    text = str(plan)
    assert text.startswith(f"memory plan: budget {format_bytes(plan.budget_bytes)} on cpu")
    assert "switch" in text and "choice" in text and "stored" in text
    assert "stem" in text and "middle" in text
    assert "body[" in text and "top[" in text  # runs of blocks with one choice, grouped
    assert f"measured {format_bytes(plan.measured_peak_bytes or 0)}" in text
    stored = sum(u.stores for u in plan.units)
    assert f"stores {stored} of {len(plan.units)} switches" in text
    assert not math.isnan(plan.predicted_step_seconds)


# -- CUDA (skipped without a GPU) -------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_phases_on_cuda_are_the_allocators_peaks() -> None:
    device = torch.device("cuda")

    def work() -> None:
        a = torch.empty(MiB, dtype=torch.uint8, device=device)
        mark_phase()
        b = torch.empty(3 * MiB, dtype=torch.uint8, device=device)
        del a, b
        mark_phase()
        c = torch.empty(2 * MiB, dtype=torch.uint8, device=device)
        del c

    _, stats, peaks = measure_memory_phases(work, device)
    assert peaks == [MiB, 4 * MiB, 2 * MiB]
    assert stats.peak_bytes == 4 * MiB


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_plan_on_cuda_fits_its_budget_with_plain_gradients() -> None:
    model = net(torch.float64).cuda()
    x = batch(torch.float64).cuda()
    expected = gradients(plain_reference(model), x)
    profile = MemoryProfile.measure(model, x, loss_fn=square, repeats=1)
    assert profile.device.type == "cuda"
    lo, hi = profile.minimum_peak_bytes, profile.plain_peak_bytes
    for budget in (lo, (lo + hi) // 2, hi):
        plan = fit_memory_budget(model, budget=budget, profile=profile, repeats=1)
        assert plan.measured_peak_bytes is not None and plan.measured_peak_bytes <= budget
        for g, e in zip(gradients(model, x), expected):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)
