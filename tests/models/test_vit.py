"""ViTs and RevViTs: equal twins, exact gradients with memory saving, memory flat in depth."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from invertible_core import AdditiveCoupling, ReversibleSequence, is_invertible_module
from invertible_core.memory import measure_memory
from invertible_models import ReversibleVisionTransformer, VisionTransformer, create_model
from invertible_models.transformer import (
    AttentionBranch,
    DropPath,
    MlpBranch,
    TransformerBlock,
    drop_path_rates,
    reversible_transformer_block,
)

TransformerClass = type[VisionTransformer] | type[ReversibleVisionTransformer]
CLASSES = [VisionTransformer, ReversibleVisionTransformer]

# The twins share these counts (checked against each other below, and against the formula
# 12 C^2 + 13 C per block, patch embedding 48 C + C + 64 C, head 2 C + C K + K).
PARAMETER_COUNTS = {
    ("tiny", 10): 5_362_378,
    ("tiny", 100): 5_379_748,
    ("small", 10): 21_341_578,
    ("small", 100): 21_376_228,
}


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def small(cls: TransformerClass, **options: object) -> nn.Module:
    """A transformer small enough for float64 gradient checks: 16x16 images, 4x4 patches."""
    config: dict[str, object] = {"image_size": 16, "patch_size": 4, "num_classes": 5}
    config.update(options)
    return cls(16, 4, 2, **config)  # type: ignore[arg-type]


@pytest.mark.parametrize(("size", "num_classes"), sorted(PARAMETER_COUNTS))
def test_revvit_has_exactly_the_parameters_of_its_vit_twin(size: str, num_classes: int) -> None:
    vit = create_model(f"vit_{size}", num_classes=num_classes)
    revvit = create_model(f"revvit_{size}", num_classes=num_classes)
    assert n_parameters(revvit) == n_parameters(vit) == PARAMETER_COUNTS[size, num_classes]
    width = {"tiny": 192, "small": 384}[size]
    blocks = 12 * (12 * width**2 + 13 * width)
    embedding = 48 * width + width + 64 * width
    head = 2 * width + width * num_classes + num_classes
    assert n_parameters(vit) == blocks + embedding + head


def test_a_reversible_block_holds_one_attention_and_one_mlp_like_a_vit_block() -> None:
    coupling = reversible_transformer_block(32, 4)
    plain = TransformerBlock(32, 4)
    assert isinstance(coupling, AdditiveCoupling) and coupling.split_dim == -1
    assert isinstance(coupling.Fm, AttentionBranch) and isinstance(coupling.Gm, MlpBranch)
    assert [tuple(p.shape) for p in coupling.parameters()] == [
        tuple(p.shape) for p in plain.parameters()
    ]


@pytest.mark.parametrize("name", ["vit_tiny", "revvit_tiny"])
def test_cifar_defaults_give_logits_per_image(name: str) -> None:
    model = create_model(name, num_classes=7, depth=2)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert model.embed.num_tokens == 64  # 32x32 in 4x4 patches


@pytest.mark.parametrize("cls", CLASSES)
def test_sizes_are_arguments(cls: TransformerClass) -> None:
    model = cls(24, 3, 3, 4, image_size=8, patch_size=2, in_channels=1, mlp_ratio=2.0)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 4)
    assert model.embed.num_tokens == 16
    assert model.head.fc.in_features == 24
    first = model.blocks[0]
    mlp = first.mlp if isinstance(first, TransformerBlock) else first.Gm
    assert mlp.mlp.fc1.out_features == 48


@pytest.mark.parametrize("cls", CLASSES)
def test_revvit_stack_is_one_reversible_sequence_and_vit_is_not(cls: TransformerClass) -> None:
    model = small(cls)
    sequences = [m for m in model.modules() if isinstance(m, ReversibleSequence)]
    assert len(sequences) == (1 if cls is ReversibleVisionTransformer else 0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"patch_size": 3}, "patch_size 3 must divide image_size 16"),
        ({"depth": 0}, "depth must be at least 1"),
        ({"num_heads": 3}, "divisible by num_heads 3"),
        ({"drop_path_rate": 1.0}, "drop_path_rate must be a probability"),
        ({"drop_rate": -0.1}, "dropout must be a probability"),
        ({"attn_drop_rate": 1.5}, "attention dropout must be a probability"),
    ],
)
@pytest.mark.parametrize("cls", CLASSES)
def test_bad_configuration_names_the_argument(
    cls: TransformerClass, options: dict[str, object], message: str
) -> None:
    config: dict[str, object] = {"embed_dim": 16, "depth": 2, "num_heads": 2, "image_size": 16}
    config.update(options)
    with pytest.raises(ValueError, match=message):
        cls(**config)  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", CLASSES)
def test_images_of_another_size_are_refused_with_the_fix(cls: TransformerClass) -> None:
    with pytest.raises(ValueError, match="build the model with image_size="):
        small(cls)(torch.randn(1, 3, 32, 32))


def test_drop_path_rates_rise_linearly_to_the_top_block() -> None:
    assert drop_path_rates(0.3, 4) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert drop_path_rates(0.1, 1) == [0.1]
    model = small(ReversibleVisionTransformer, drop_path_rate=0.3)
    assert [block.Fm.drop_path.p for block in model.blocks] == pytest.approx([0, 0.1, 0.2, 0.3])


def test_drop_path_zeroes_whole_samples_and_keeps_the_expectation() -> None:
    drop = DropPath(0.5)
    out = drop(torch.ones(4000, 3, 2))
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert bool((per_sample == per_sample[:, :1]).all())  # a sample is dropped whole
    assert out.mean().item() == pytest.approx(1.0, abs=0.05)
    assert torch.equal(drop.eval()(torch.ones(3, 2)), torch.ones(3, 2))


def test_a_reversible_transformer_block_is_invertible() -> None:
    block = reversible_transformer_block(16, 2, drop=0.1, drop_path=0.2).double().eval()
    assert is_invertible_module(block, (2, 5, 32), test_input_dtype=torch.float64, atol=1e-10)
    model = small(ReversibleVisionTransformer).eval()
    assert is_invertible_module(model.blocks, (2, 16, 32), atol=1e-5)


def _grads_with_and_without_saving(
    model: nn.Module, seed: int = 7
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (4,))
    results = []
    for saving in (False, True):
        model.memory_saving = saving
        model.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(seed)
        nn.functional.cross_entropy(model(x), y).backward()
        assert x.grad is not None
        results.append((flat_grads(model), x.grad.clone()))
    (plain, plain_x), (saving_grads, saving_x) = results
    return plain, saving_grads, plain_x, saving_x


@pytest.mark.parametrize("cls", CLASSES)
def test_gradients_with_saving_equal_plain_autograd_with_dropout_and_drop_path(
    cls: TransformerClass,
) -> None:
    model = small(cls, drop_rate=0.2, attn_drop_rate=0.2, drop_path_rate=0.3).double()
    plain, saving, plain_x, saving_x = _grads_with_and_without_saving(model)
    torch.testing.assert_close(saving, plain, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(saving_x, plain_x, rtol=1e-10, atol=1e-12)
    # the randomness is real: another seed draws other masks and gives other gradients
    other, _, _, _ = _grads_with_and_without_saving(model, seed=8)
    assert not torch.allclose(other, plain, rtol=1e-3, atol=0)


def test_without_replaying_the_random_state_the_recompute_would_be_wrong() -> None:
    # what preserve_rng_state buys: the same model with masks redrawn in the recompute
    model = small(ReversibleVisionTransformer, drop_rate=0.2, drop_path_rate=0.3).double()
    plain, _, _, _ = _grads_with_and_without_saving(model)
    model.blocks.preserve_rng_state = [False] * len(model.blocks)
    _, unreplayed, _, _ = _grads_with_and_without_saving(model)
    assert not torch.allclose(unreplayed, plain, rtol=1e-3, atol=0)


@pytest.mark.parametrize("cls", CLASSES)
def test_memory_saving_is_settable_and_changes_no_state_dict_key(cls: TransformerClass) -> None:
    model = small(cls, memory_saving=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.memory_saving = False
    assert model.memory_saving is False
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    torch.manual_seed(1)
    other = small(cls, memory_saving=False)
    assert list(other.state_dict()) == list(before)
    other.load_state_dict(before)
    if cls is ReversibleVisionTransformer:
        assert model.blocks.memory_saving is False
        model.memory_saving = True
        assert model.blocks.memory_saving is True


@pytest.mark.parametrize("cls", CLASSES)
def test_toggling_memory_saving_keeps_the_outputs_and_lowers_stored_activations(
    cls: TransformerClass,
) -> None:
    model = small(cls)
    x = torch.randn(8, 3, 16, 16)
    model.memory_saving = False
    plain_out, plain = measure_memory(lambda: model(x))
    model.memory_saving = True
    saving_out, saving = measure_memory(lambda: model(x))
    torch.testing.assert_close(saving_out, plain_out, rtol=0, atol=0)
    assert saving.retained_bytes < plain.retained_bytes / 2


@pytest.mark.parametrize("cls", CLASSES)
def test_eval_and_no_grad_leave_the_input_intact(cls: TransformerClass) -> None:
    model = small(cls).eval()
    x = torch.randn(2, 3, 16, 16)
    copy = x.clone()
    with torch.no_grad():
        first = model(x)
    torch.testing.assert_close(x, copy, rtol=0, atol=0)
    torch.testing.assert_close(model(x), first, rtol=0, atol=0)  # eval: no dropout


def _training_peak(build: Callable[[int], nn.Module], depth: int) -> tuple[int, int]:
    """Peak bytes of one training step after a warm-up (gradients already allocated), and
    the bytes of the model's block parameters."""
    torch.manual_seed(0)
    model = build(depth)
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))

    def step() -> None:
        nn.functional.cross_entropy(model(x), y).backward()

    step()
    model.zero_grad(set_to_none=False)
    block_bytes = sum(p.numel() * p.element_size() for p in model.blocks.parameters())
    return measure_memory(step)[1].peak_bytes, block_bytes


def _transformer(cls: TransformerClass, saving: bool) -> Callable[[int], nn.Module]:
    return lambda depth: cls(16, depth, 2, image_size=16, patch_size=2, memory_saving=saving)


def test_revvit_training_memory_is_flat_in_depth() -> None:
    build = _transformer(ReversibleVisionTransformer, True)
    (shallow, _), (deep, _) = (_training_peak(build, d) for d in (4, 12))
    assert deep <= 1.1 * shallow
    # Nothing grows with depth, not even the extra blocks' parameter gradients: the chain has
    # one autograd node per block, so each block's gradients reach the allocated ``.grad``
    # as soon as the block is done (measured: equal to the byte at depth 4, 12 and 24; the
    # slack is for allocator details of other torch releases).
    assert deep - shallow <= 16 * 1024


@pytest.mark.parametrize("saving", [False, True], ids=["plain", "checkpointed"])
def test_vit_training_memory_grows_with_depth(saving: bool) -> None:
    (shallow, _), (deep, _) = (
        _training_peak(_transformer(VisionTransformer, saving), d) for d in (4, 12)
    )
    assert deep >= (1.25 if saving else 2.0) * shallow
    (rev_deep, _) = _training_peak(_transformer(ReversibleVisionTransformer, True), 12)
    assert rev_deep < deep


STEPS = 20


@pytest.mark.parametrize("cls", CLASSES)
def test_a_few_adamw_steps_lower_the_loss_with_memory_saving_on(cls: TransformerClass) -> None:
    torch.manual_seed(0)
    model = cls(
        32, 2, 2, 4, image_size=8, patch_size=2, in_channels=1, drop_path_rate=0.1,
        memory_saving=True,
    )  # fmt: skip
    assert model.memory_saving
    # a learnable task: each class is a fixed random pattern, seen through noise
    generator = torch.Generator().manual_seed(0)
    patterns = torch.randn(4, 1, 8, 8, generator=generator)
    y = torch.randint(0, 4, (64,), generator=generator)
    x = patterns[y] + 0.5 * torch.randn(64, 1, 8, 8, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
