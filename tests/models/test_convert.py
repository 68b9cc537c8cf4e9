"""make_reversible: an existing residual network made reversible, with its own parameters.

The architectures here need torch only (nn.TransformerEncoder, stacks of one's own residual
blocks); torchvision's ResNets and timm's ViTs are tested in ``with_torchvision/``.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from conversion_checks import output_distance, relative_l2, saving_gradient_error
from torch import Tensor, nn

from invertible_core import measure_memory
from invertible_models import (
    CoefficientSchedule,
    ConversionError,
    ConvertedModel,
    make_reversible,
)
from invertible_models.conversion import ReversibleEncoder, ReversibleRun
from invertible_models.conversion.torch_encoder import EncoderFeedForward, EncoderSelfAttention

WIDTH, TOKENS, BATCH = 16, 5, 3
METHODS = ("momentum", "two_stream")


class Residual(nn.Module):
    """A block of one's own: ``x + net(x)``."""

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class PostActivated(Residual):
    """``relu(x + net(x))``: a step followed by an elementwise operation."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.net(x))


def encoder(norm_first: bool, layers: int = 3, dropout: float = 0.0) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        WIDTH, 4, 2 * WIDTH, dropout=dropout, batch_first=True, norm_first=norm_first
    )
    model = nn.TransformerEncoder(
        layer, layers, norm=nn.LayerNorm(WIDTH), enable_nested_tensor=False
    )
    return model.double()


def tokens() -> Tensor:
    return torch.randn(BATCH, TOKENS, WIDTH, dtype=torch.float64)


def stack(blocks: int = 4, block: type[Residual] = Residual) -> nn.Sequential:
    return nn.Sequential(*[block() for _ in range(blocks)]).double()


# -- the same parameters, the same names ------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("norm_first", [True, False])
def test_converted_encoder_computes_with_the_original_parameter_objects(method, norm_first):
    original = encoder(norm_first)
    converted = make_reversible(original, method)
    mine, theirs = list(converted.parameters()), list(original.parameters())
    assert len(mine) == len(theirs) and {id(p) for p in mine} == {id(p) for p in theirs}
    assert {id(b) for b in converted.buffers()} == {id(b) for b in original.buffers()}


@pytest.mark.parametrize("method", METHODS)
def test_conversion_leaves_the_original_as_it_was(method):
    original = encoder(norm_first=True)
    x = tokens()
    before = original(x)
    names = [n for n, _ in original.named_modules()]
    converted = make_reversible(original, method)
    assert type(original) is nn.TransformerEncoder
    assert [n for n, _ in original.named_modules()] == names
    assert torch.equal(original(x), before)
    assert not torch.equal(converted(x), before)  # the converted network is another function


def test_an_optimizer_of_the_original_trains_the_converted_network():
    original = stack()
    converted = make_reversible(original, "momentum", residual="x + net(x)")
    optimizer = torch.optim.SGD(original.parameters(), lr=0.1)
    x = tokens()
    before = converted(x).detach()
    converted(x).square().mean().backward()
    assert all(p.grad is not None for p in original.parameters())
    optimizer.step()
    assert not torch.allclose(converted(x), before)


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_keys_are_the_originals_and_load_both_ways(method):
    original = encoder(norm_first=False)
    converted = make_reversible(original, method)
    assert list(converted.state_dict()) == list(original.state_dict())
    other = encoder(norm_first=False)  # other weights, same architecture
    converted.load_state_dict(other.state_dict())  # strict
    for mine, theirs in zip(converted.state_dict().values(), other.state_dict().values()):
        assert torch.equal(mine, theirs)
    third = encoder(norm_first=False)
    third.load_state_dict(converted.state_dict())  # strict, the other way
    x = tokens()
    third.eval(), other.eval()
    assert torch.equal(third(x), other(x))


def test_state_dict_names_hold_for_a_converted_network_inside_another_module():
    original = stack()
    converted = make_reversible(original, "two_stream", residual="x + net(x)")
    parent = nn.Sequential(converted, nn.Linear(WIDTH, 2).double())
    plain_parent = nn.Sequential(stack(), nn.Linear(WIDTH, 2).double())
    assert list(parent.state_dict()) == list(plain_parent.state_dict())
    parent.load_state_dict(plain_parent.state_dict())
    plain_parent.load_state_dict(parent.state_dict())


# -- gradients with memory saving are plain autograd's -------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("norm_first", [True, False])
def test_encoder_gradients_with_memory_saving_equal_plain_autograd(method, norm_first):
    original = encoder(norm_first, dropout=0.1)  # dropout replays its masks in the recompute
    converted = make_reversible(original, method)
    x = tokens().requires_grad_()
    pad = torch.zeros(BATCH, TOKENS, dtype=torch.bool)
    pad[0, -2:] = True
    error = saving_gradient_error(converted, lambda: converted(x, src_key_padding_mask=pad))
    assert error <= 1e-10, error


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("block", "residual"), [(Residual, "x + net(x)"), (PostActivated, "block(x)")]
)
def test_stack_gradients_with_memory_saving_equal_plain_autograd(method, block, residual):
    converted = make_reversible(stack(5, block), method, residual=residual)
    x = tokens()
    error = saving_gradient_error(converted, lambda: converted(x))
    assert error <= 1e-10, error


def test_under_autocast_the_stream_stays_float32_and_saving_changes_no_gradient():
    original = encoder(norm_first=True).float()
    converted = make_reversible(original, "momentum")
    x = torch.randn(BATCH, TOKENS, WIDTH)

    def run() -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return converted(x.bfloat16()).float()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert converted.runs()[0](x.bfloat16()).dtype == torch.float32
    error = saving_gradient_error(converted, run)
    assert error <= 1e-6, error


# -- where the converted network starts ------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "far", "near"),
    [("momentum", {"gamma": 0.9}, {"gamma": 1e-4}), ("two_stream", {"beta": 0.5}, {"beta": 1e-4})],
)
@pytest.mark.parametrize("norm_first", [True, False])
def test_output_at_conversion_approaches_the_original_as_the_coefficient_shrinks(
    method, far, near, norm_first
):
    original = encoder(norm_first)
    x = tokens()

    def distance(options: dict[str, float]) -> float:
        converted = make_reversible(original, method, **options)
        return output_distance(converted, original, lambda m: m(x))

    assert distance(near) < 1e-3 < distance(far)


@pytest.mark.parametrize("norm_first", [True, False])
def test_encoder_units_compute_the_layer_exactly(norm_first):
    layer = encoder(norm_first, layers=1).layers[0]
    attention, feed_forward = EncoderSelfAttention(layer), EncoderFeedForward(layer)
    x = tokens()
    mask = nn.Transformer.generate_square_subsequent_mask(TOKENS, dtype=torch.float64)
    expected = layer(x, src_mask=mask)
    out = feed_forward.with_skip(attention.with_skip(x, 1.0, attn_mask=mask), 1.0)
    assert torch.equal(out, expected)
    # and the residual branches are what the steps add
    h = attention.with_skip(x, 1.0, attn_mask=mask)
    assert torch.allclose(x + attention.residual(x, attn_mask=mask), h, atol=1e-12)


def test_masks_reach_every_attention():
    original = encoder(norm_first=True)
    converted = make_reversible(original, "two_stream", beta=1e-6)
    x = tokens()
    causal = torch.ones(TOKENS, TOKENS, dtype=torch.bool).triu(1)  # True: may not attend
    pad = torch.zeros(BATCH, TOKENS, dtype=torch.bool)
    pad[1, -1] = True
    original.train(), converted.train()  # no fast path: the padded positions are computed
    with torch.no_grad():
        masked = converted(x, mask=causal, src_key_padding_mask=pad)
        assert relative_l2(masked, original(x, mask=causal, src_key_padding_mask=pad)) < 1e-4
        assert relative_l2(masked, converted(x)) > 1e-2


def test_two_stream_pairs_a_lone_unit_with_the_identity():
    original = stack(3)
    converted = make_reversible(original, "two_stream", residual="x + net(x)", beta=1e-6)
    (run,) = converted.runs()
    assert len(run.blocks) == 2  # units 1+2, then 3 with the identity
    x = tokens()
    assert output_distance(converted, original, lambda m: m(x)) < 1e-4


# -- memory ----------------------------------------------------------------------------------------
def _retained(model: nn.Module, x: Tensor) -> int:
    model.train()
    _, stats = measure_memory(lambda: model(x))
    return stats.retained_bytes


def test_memory_saving_keeps_training_memory_flat_in_depth():
    x = torch.randn(4, 16, WIDTH)
    shallow, deep = encoder(True, layers=2).float(), encoder(True, layers=6).float()
    saving = [_retained(make_reversible(m, "momentum"), x) for m in (shallow, deep)]
    # the engine's bookkeeping grows by a few bytes per coupling (measured: 64 bytes for 8);
    # one activation here is 4 KiB, one kept state 8 KiB
    assert saving[1] - saving[0] < 1024
    assert _retained(deep, x) > 2 * saving[1]
    plain = [
        _retained(make_reversible(m, "momentum", memory_saving=False), x) for m in (shallow, deep)
    ]
    assert plain[1] > plain[0] > saving[0]


def test_memory_saving_switch_sets_every_run():
    model = nn.Module()
    model.first, model.second = stack(2), stack(3)
    converted = make_reversible(model, "momentum", residual="x + net(x)", at=["first", "second"])
    runs = converted.runs()
    assert len(runs) == 2
    assert all(run.blocks.memory_saving for run in runs)
    runs[0].blocks.keep_blocks = 1  # a per-block choice, as a memory plan makes
    converted.memory_saving = False
    assert converted.memory_saving is False
    assert not any(run.blocks.memory_saving for run in runs)
    assert runs[0].blocks.keep_blocks == ()


# -- what cannot be converted -------------------------------------------------------------------
def test_an_unsupported_model_gets_one_clear_error_naming_it():
    with pytest.raises(ConversionError, match=r"cannot convert LSTM .*residual="):
        make_reversible(nn.LSTM(4, 4))
    with pytest.raises(ConversionError, match="cannot convert Sequential"):
        make_reversible(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


def test_an_encoder_layer_of_another_class_is_refused_by_its_path():
    class MyLayer(nn.TransformerEncoderLayer):
        def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
            return src

    model = encoder(norm_first=True)
    model.layers[1] = MyLayer(WIDTH, 4, 2 * WIDTH, batch_first=True).double()
    with pytest.raises(ConversionError, match=r"'layers.1' is a MyLayer"):
        make_reversible(model)


def test_residual_descriptions_are_checked():
    with pytest.raises(ValueError, match="does not say where the residual branch is"):
        make_reversible(stack(), residual="net(x) + x + 1")
    with pytest.raises(
        ValueError,
        match=r"block at '0' \(Residual\) has no submodule 'body'; its submodules are net",
    ):
        make_reversible(stack(), residual="x + body(x)")
    with pytest.raises(ConversionError, match="not an nn.Sequential"):
        make_reversible(nn.Linear(4, 4), residual="x + net(x)")
    with pytest.raises(ConversionError, match="has no submodule at that path"):
        make_reversible(stack(), residual="x + net(x)", at="9")
    with pytest.raises(ValueError, match="at= points at nn.Sequential stacks"):
        make_reversible(encoder(True), at="layers")

    class Custom(nn.Sequential):
        def forward(self, x):
            return x

    with pytest.raises(ConversionError, match="with its own forward"):
        make_reversible(Custom(Residual()), residual="x + net(x)")


def test_methods_options_and_coefficients_are_checked():
    model = encoder(norm_first=True)
    with pytest.raises(ValueError, match="unknown method 'revnet'"):
        make_reversible(model, "revnet")
    with pytest.raises(ValueError, match="takes no option beta; its options are gamma"):
        make_reversible(model, "momentum", beta=0.5)
    with pytest.raises(ValueError, match=r"gamma must be in \(0, 1\)"):
        make_reversible(model, "momentum", gamma=1.0)
    with pytest.raises(ValueError, match="cannot be inverted"):
        make_reversible(model, "two_stream", beta=0.0)
    converted = make_reversible(model, "two_stream", beta=0.5)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        converted.set_coefficients(beta=0.2, alpha=2.0)
    assert converted.coefficients.as_dict() == {"alpha": 1.0, "beta": 0.5}  # nothing changed
    with pytest.raises(ConversionError, match="already converted"):
        make_reversible(converted)


# -- coefficients and their schedule --------------------------------------------------------------
def test_coefficients_change_every_coupling_at_once():
    original = stack(4)
    converted = make_reversible(original, "two_stream", residual="x + net(x)", beta=0.5)
    x = tokens()
    converted.eval()
    with torch.no_grad():
        before = converted(x)
        converted.set_coefficients(beta=1e-6)
        assert relative_l2(converted(x), original(x)) < 1e-4 < relative_l2(before, original(x))


def test_schedule_moves_coefficients_linearly_and_resumes():
    converted = make_reversible(stack(), "two_stream", residual="x + net(x)")
    schedule = CoefficientSchedule(converted, steps=4, alpha=(1.0, 0.0), beta=(0.1, 0.9))
    assert converted.coefficients.as_dict() == pytest.approx({"alpha": 1.0, "beta": 0.1})
    schedule.step()
    schedule.step()
    assert converted.coefficients.as_dict() == pytest.approx({"alpha": 0.5, "beta": 0.5})
    resumed = CoefficientSchedule(converted, steps=4, alpha=(1.0, 0.0), beta=(0.1, 0.9))
    resumed.load_state_dict(schedule.state_dict())
    for _ in range(5):
        resumed.step()
    assert converted.coefficients.as_dict() == pytest.approx({"alpha": 0.0, "beta": 0.9})
    with pytest.raises(ValueError, match="this schedule runs"):
        CoefficientSchedule(converted, steps=3, beta=(0.1, 0.9)).load_state_dict(
            schedule.state_dict()
        )
    with pytest.raises(ValueError, match="beta must be in"):
        CoefficientSchedule(converted, steps=4, beta=(0.1, 0.0))
    with pytest.raises(TypeError, match="needs a network from make_reversible"):
        CoefficientSchedule(stack(), steps=4, beta=(0.1, 0.9))


def _reconstruction_error(run: ReversibleRun, x: Tensor) -> float:
    state = run.method.lift(x)
    with torch.no_grad():
        return relative_l2(run.blocks.inverse(run.blocks(state)), state)


def test_the_schedule_ends_on_a_well_conditioned_inverse():
    model = encoder(norm_first=True, layers=4).float().eval()
    converted = make_reversible(model, "two_stream", beta=0.01)
    (run,) = converted.runs()
    x = torch.randn(BATCH, TOKENS, WIDTH)
    start = _reconstruction_error(run, x)
    schedule = CoefficientSchedule(converted, steps=2, alpha=(1.0, 0.0), beta=(0.01, 1.0))
    schedule.step()
    schedule.step()
    end = _reconstruction_error(run, x)
    assert start > 1e-2 and end < 1e-5, (start, end)


def test_two_stream_anchors_every_coupling_by_default_so_its_gradients_are_exact():
    original = encoder(norm_first=True, layers=6).float()
    converted = make_reversible(original, "two_stream")
    assert converted.anchor_every == 1
    assert make_reversible(original, "momentum").anchor_every == 0
    x = torch.randn(BATCH, TOKENS, WIDTH)
    assert saving_gradient_error(converted, lambda: converted(x)) < 1e-5


def test_anchors_make_an_ill_conditioned_run_s_gradients_exact_again():
    original = encoder(norm_first=True, layers=6).float()
    x = torch.randn(BATCH, TOKENS, WIDTH)
    errors = {}
    for anchors in (0, 1):
        converted = make_reversible(original, "two_stream", anchor_every=anchors)
        assert all(run.blocks.anchor_every == anchors for run in converted.runs())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the drift check, tested below
            errors[anchors] = saving_gradient_error(converted, lambda: converted(x))
    assert errors[0] > 1e-1 and errors[1] < 1e-5, errors
    converted.anchor_every = 0  # one switch for every run, as the schedule lowers alpha
    assert converted.anchor_every == 0
    assert all(run.blocks.anchor_every == 0 for run in converted.runs())
    with pytest.raises(ValueError, match="anchor_every must be an int >= 0"):
        converted.anchor_every = -1


def test_an_ill_conditioned_reconstruction_is_not_silent():
    converted = make_reversible(
        encoder(True, layers=4).float(), "two_stream", beta=1e-3, anchor_every=0
    )
    x = torch.randn(BATCH, TOKENS, WIDTH, requires_grad=True)
    converted.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted(x).sum().backward()
    assert any("rebuilt with relative error" in str(w.message) for w in caught)


# -- the converted network as an object ------------------------------------------------------------
def test_the_converted_network_keeps_the_original_class_and_its_methods():
    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder(norm_first=True)
            self.head = nn.Linear(WIDTH, 3).double()

        def features(self, x: Tensor) -> Tensor:
            return self.encoder(x).mean(dim=1)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.features(x))

    original = Classifier()
    converted = make_reversible(original, "momentum")
    assert isinstance(converted, Classifier) and isinstance(converted, ConvertedModel)
    assert type(converted).__name__ == "ReversibleClassifier"
    assert isinstance(converted.encoder, ReversibleEncoder)
    assert converted.head is original.head
    assert converted.features(tokens()).shape == (BATCH, WIDTH)
    assert converted.conversion.runs == [("encoder.layers.0-2", 6)]


def test_inside_nn_transformer_the_encoder_is_converted_and_the_decoder_kept():
    original = nn.Transformer(
        WIDTH, 4, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=2 * WIDTH,
        dropout=0.0, batch_first=True,
    ).double()  # fmt: skip
    converted = make_reversible(original, "two_stream", beta=1e-6)
    assert isinstance(converted.encoder, ReversibleEncoder)
    assert converted.decoder is original.decoder
    src, tgt = tokens(), torch.randn(BATCH, 3, WIDTH, dtype=torch.float64)
    assert output_distance(converted, original, lambda m: m(src, tgt)) < 1e-4


def test_the_converted_network_pickles_and_deep_copies():
    converted = make_reversible(stack(), "two_stream", residual="x + net(x)", beta=0.3)
    x = tokens()
    converted.eval()
    for twin in (copy.deepcopy(converted), pickle.loads(pickle.dumps(converted))):
        assert type(twin) is type(converted)
        assert twin.coefficients.beta == 0.3
        assert not any(p is q for p, q in zip(twin.parameters(), converted.parameters()))
        with torch.no_grad():
            assert torch.equal(twin(x), converted(x))
        assert list(twin.state_dict()) == list(converted.state_dict())
