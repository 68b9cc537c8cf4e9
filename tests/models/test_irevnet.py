"""i-RevNet: parameter counts, one invertible chain, the input rebuilt from the features,
exact gradients with memory saving, memory flat in depth, training on real digits."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from invertible_core import (
    AdditiveCoupling,
    InvertibleDownsampling,
    ReversibleSequence,
    is_invertible_module,
    round_to_grid,
)
from invertible_core.memory import measure_memory
from invertible_models import IRevNet, create_model
from invertible_models.irevnet import IRevNetBottleneck, irevnet_block

PARAMETER_COUNTS = {10: 6_392_810, 100: 6_438_980}


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bottleneck_parameters(c: int, preactivate: bool = True, mult: int = 4) -> int:
    """BN (if any), conv3x3 c -> c/4, BN, conv3x3, BN, conv3x3 c/4 -> c: no biases."""
    h = c // mult
    return (2 * c if preactivate else 0) + 9 * c * h + 2 * h + 9 * h * h + 2 * h + 9 * h * c


def small(**options: object) -> IRevNet:
    """Two stages of two couplings on 1 x 8 x 8 images: 16 then 64 channels."""
    config: dict[str, object] = {"stage_blocks": (2, 2), "width": 16, "in_channels": 1}
    config.update(options)
    return IRevNet(**config)  # type: ignore[arg-type]


def calibrate(model: nn.Module, x: torch.Tensor, passes: int = 5) -> None:
    """Train-mode forward passes, so BatchNorm's running statistics fit the data."""
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            model(x)


@pytest.mark.parametrize("num_classes", sorted(PARAMETER_COUNTS))
def test_parameter_count_is_the_formula_of_the_papers_cifar_model(num_classes: int) -> None:
    model = create_model("irevnet", num_classes=num_classes)
    assert n_parameters(model) == PARAMETER_COUNTS[num_classes]
    couplings = 0
    for stage, half in enumerate((16, 64, 256)):
        for i in range(9):
            first = stage == 0 and i == 0  # the network's first F has no BN + ReLU
            couplings += bottleneck_parameters(half, not first) + bottleneck_parameters(half)
    head = 2 * 512 + 512 * num_classes + num_classes
    assert n_parameters(model) == couplings + head


def test_logits_and_features_have_the_papers_shapes() -> None:
    model = create_model("irevnet", stage_blocks=(1, 1, 1))
    x = torch.rand(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    assert model.features(x).shape == (2, 512, 8, 8)  # 3 x 32 x 32 padded to 32 channels
    assert model.num_features == 512


def test_the_invertible_part_is_one_reversible_sequence_of_couplings_and_downsamplings() -> None:
    model = create_model("irevnet")
    assert isinstance(model.blocks, ReversibleSequence)
    kinds = [type(block) for block in model.blocks]
    assert (
        kinds
        == ([AdditiveCoupling] * 9 + [InvertibleDownsampling] + [AdditiveCoupling] * 9)
        + [InvertibleDownsampling]
        + [AdditiveCoupling] * 9
    )
    # nothing else holds parameters but the head after the features
    assert {name for name, _ in model.named_children()} == {"blocks", "head"}
    first = model.blocks[0]
    assert isinstance(first, AdditiveCoupling)
    assert isinstance(first.Fm, IRevNetBottleneck)
    assert not isinstance(first.Fm.layers[0], nn.BatchNorm2d)  # the paper's first block
    assert isinstance(first.Gm.layers[0], nn.BatchNorm2d)


@pytest.mark.parametrize("bits", [16, None], ids=["fixed-point", "float"])
def test_the_chain_is_an_invertible_module(bits: int | None) -> None:
    model = small(fixed_point_bits=bits)
    assert is_invertible_module(model.blocks, (4, 16, 8, 8), atol=1e-4)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_with_fixed_point_the_input_is_rebuilt_bit_for_bit_on_the_grid(train: bool) -> None:
    # dropout draws other masks in the inverse pass: only eval mode can undo it
    model = create_model("irevnet", stage_blocks=(3, 3, 3), dropout=0.0 if train else 0.1)
    x = torch.rand(8, 3, 32, 32)
    calibrate(model, x)
    model.train(train)
    with torch.no_grad():
        rebuilt = model.features_inverse(model.features(x))
    assert torch.equal(rebuilt, round_to_grid(x, 16))
    # the grid is real: the images were moved onto it, by at most half a step
    assert not torch.equal(rebuilt, x)
    assert float((rebuilt - x).abs().max()) <= 2.0**-17


@pytest.mark.parametrize(
    ("padding", "train"),
    [("zeros", False), ("repeat", False), ("repeat", True)],
    ids=["zeros-eval", "repeat-eval", "repeat-train"],
)
def test_without_fixed_point_the_input_is_rebuilt_to_float_rounding(
    padding: str, train: bool
) -> None:
    model = create_model(
        "irevnet", stage_blocks=(3, 3, 3), fixed_point_bits=None, stem_padding=padding
    ).double()
    x = torch.rand(8, 3, 32, 32, dtype=torch.float64)
    calibrate(model, x)
    model.train(train)
    with torch.no_grad():
        rebuilt = model.features_inverse(model.features(x))
    torch.testing.assert_close(rebuilt, x, rtol=0, atol=1e-9)


def test_a_bijective_stem_by_space_to_depth_needs_no_padding() -> None:
    # the paper's ImageNet model: 3 channels to 12 by space-to-depth, nothing padded
    model = IRevNet((2, 2), width=12, stem_downsampling=2, mult=2).double()
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64)
    assert model.stem(x).shape == (4, 12, 8, 8)
    assert model.features(x).shape == (4, 48, 4, 4)
    with torch.no_grad():
        rebuilt = model.features_inverse(model.features(x))
    assert torch.equal(rebuilt, round_to_grid(x, 16))


def _grads(model: IRevNet, saving: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    y = torch.arange(4) % 3
    model.memory_saving = saving
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)  # the same dropout masks in both modes
    nn.functional.cross_entropy(model(x), y).backward()
    assert x.grad is not None
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    return grads, x.grad


@pytest.mark.parametrize(
    ("bits", "padding"),
    [(16, "zeros"), (16, "repeat"), (None, "repeat")],
    ids=["fixed-point", "fixed-point-repeat", "float-repeat"],
)
def test_gradients_with_saving_equal_plain_autograd(bits: int | None, padding: str) -> None:
    torch.manual_seed(0)
    model = small(num_classes=3, dropout=0.2, fixed_point_bits=bits, stem_padding=padding)
    model = model.double()
    torch.manual_seed(1)
    plain, plain_x = _grads(model, saving=False)
    torch.manual_seed(1)
    saving, saving_x = _grads(model, saving=True)
    assert plain.numel() == n_parameters(model)
    torch.testing.assert_close(saving, plain, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(saving_x, plain_x, rtol=1e-10, atol=1e-12)


def test_memory_saving_is_a_property_that_changes_no_state_dict_key() -> None:
    model = small()
    keys = list(model.state_dict())
    model.memory_saving = False
    assert model.memory_saving is False and model.blocks.memory_saving is False
    assert list(model.state_dict()) == keys
    assert create_model("irevnet", memory_saving=False).memory_saving is False


def _training_peak(build: Callable[[int], nn.Module], blocks: int) -> tuple[int, int]:
    torch.manual_seed(0)
    model = build(blocks)
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))

    def step() -> None:
        nn.functional.cross_entropy(model(x), y).backward()

    step()
    model.zero_grad(set_to_none=False)
    chain_bytes = sum(p.numel() * p.element_size() for p in model.blocks.parameters())
    return measure_memory(step)[1].peak_bytes, chain_bytes


def _irevnet(saving: bool) -> Callable[[int], nn.Module]:
    return lambda n: IRevNet((n, n), width=16, in_channels=1, memory_saving=saving)


def test_training_memory_is_flat_in_depth_with_saving_and_grows_without() -> None:
    (shallow, shallow_params), (deep, deep_params) = (
        _training_peak(_irevnet(True), n) for n in (1, 6)
    )
    # what may grow is the added couplings' parameter gradients, never their activations
    assert deep - shallow <= deep_params - shallow_params + 16 * 1024
    (plain_shallow, _), (plain_deep, _) = (_training_peak(_irevnet(False), n) for n in (1, 6))
    assert plain_deep >= 3 * plain_shallow
    assert deep < 0.5 * plain_deep


def test_float_couplings_after_zero_padding_are_reported_as_drifting() -> None:
    # The trap the README describes: a padded half is exactly zero in the forward pass but
    # rebuilt only up to rounding, and BatchNorm's batch statistics blow that noise up, so
    # the memory-saving gradients go wrong; the core's drift check says so.
    torch.manual_seed(0)
    model = small(num_classes=3, fixed_point_bits=None).double()
    with pytest.warns(RuntimeWarning, match="rebuilt with relative error"):
        _grads(model, saving=True)


def test_wrong_images_and_configurations_name_the_fix() -> None:
    model = small()
    with pytest.raises(ValueError, match="in_channels="):
        model(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.rand(2, 1, 9, 9))
    with pytest.raises(ValueError, match="features of shape"):
        model.features_inverse(torch.rand(2, 16, 4, 4))
    with pytest.raises(ValueError, match="raise width to at least 12"):
        IRevNet((1,), width=8, stem_downsampling=2)
    with pytest.raises(ValueError, match="stem_padding"):
        IRevNet((1,), stem_padding="mirror")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stage_blocks"):
        IRevNet(())
    with pytest.raises(ValueError, match="mult"):
        IRevNet((1,), width=12)  # halves of 6 channels, bottleneck reduction 4
    with pytest.raises(ValueError, match="stem_downsampling"):
        IRevNet((1,), stem_downsampling=0)
    with pytest.raises(ValueError, match="dropout"):
        IRevNet((1,), dropout=1.0)
    with pytest.raises(ValueError, match="splits its channels in two"):
        irevnet_block(15)


def test_a_few_steps_on_the_digits_lower_the_loss() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images[:256], dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target[:256])
    torch.manual_seed(0)
    model = IRevNet((2, 2), width=16, in_channels=1)
    assert model.memory_saving
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(30):
        batch = slice(64 * (step % 4), 64 * (step % 4 + 1))
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4
