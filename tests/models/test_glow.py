"""Glow: parameter counts, the data convention, the change of variables checked by brute
force, invertibility, exact gradients and flat memory with saving, training on digits."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from invertible_core import (
    ActNorm,
    AffineCoupling,
    InvertibleConv1x1,
    InvertibleDownsampling,
    ReversibleSequence,
    is_invertible_module,
)
from invertible_core.memory import measure_memory
from invertible_models import Glow, create_model
from invertible_models.flow_blocks import SigmoidScaleAdapter, quantize, to_levels

#: 3 levels x 16 steps x 2 coupling networks of width 512: the paper's 3 x 32 networks.
CIFAR_PARAMETERS = 44_051_472


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny(**options: object) -> Glow:
    """1 x 4 x 4 images, 2 levels of 2 steps, 8 hidden channels, 4 levels per value."""
    config: dict[str, object] = {
        "in_channels": 1,
        "image_size": 4,
        "levels": 2,
        "steps": 2,
        "hidden_channels": 8,
        "num_bins": 4,
    }
    config.update(options)
    return Glow(**config)  # type: ignore[arg-type]


def digits_glow(**options: object) -> Glow:
    config: dict[str, object] = {
        "in_channels": 1,
        "image_size": 8,
        "levels": 2,
        "steps": 4,
        "hidden_channels": 32,
        "num_bins": 17,
    }
    config.update(options)
    return Glow(**config)  # type: ignore[arg-type]


def initialised(model: Glow, batch: int = 16) -> Glow:
    """The model after one training-mode pass (ActNorm's data-dependent initialisation)."""
    x = torch.randint(
        0, model.num_bins, (batch, model.in_channels, model.image_size, model.image_size)
    )
    with torch.no_grad():
        model.train()(x)
    return model


def network_parameters(c_in: int, c_out: int, hidden: int) -> int:
    """conv3x3 (no bias), ActNorm, conv1x1 (no bias), ActNorm, zero conv3x3 (+bias, logs)."""
    return (
        9 * c_in * hidden
        + 2 * hidden
        + hidden * hidden
        + 2 * hidden
        + 9 * hidden * c_out
        + 2 * c_out
    )


def glow_parameters(c: int, levels: int, steps: int, hidden: int) -> int:
    total = 0
    for level in range(levels):
        channels, half = 4 * c, 2 * c
        step = 2 * channels  # ActNorm
        step += 2 * channels**2 + channels  # LU factors of the 1x1 convolution
        step += 2 * network_parameters(half, channels, hidden)  # Fm and Gm
        total += steps * step
        if level < levels - 1:
            total += 9 * half * channels + 2 * channels  # the split prior's zero conv
            c = half
        else:
            c = channels
    return total + 2 * c  # the top prior


def test_the_cifar_model_has_the_papers_coupling_networks_and_a_stable_count() -> None:
    model = create_model("glow")
    assert isinstance(model, Glow)
    assert n_parameters(model) == CIFAR_PARAMETERS == glow_parameters(3, 3, 16, 512)
    assert len(model.levels) == 3
    # num_classes is accepted for create_model's uniform call and changes nothing
    assert n_parameters(create_model("glow", num_classes=100, steps=1)) == glow_parameters(
        3, 3, 1, 512
    )


def test_each_level_is_squeeze_then_steps_of_actnorm_conv_coupling_in_one_chain() -> None:
    model = digits_glow(steps=3)
    for level in model.levels:
        assert isinstance(level.flow, ReversibleSequence)
        kinds = [type(block) for block in level.flow]
        assert kinds == [InvertibleDownsampling] + [ActNorm, InvertibleConv1x1, AffineCoupling] * 3
    assert n_parameters(model) == glow_parameters(1, 2, 3, 32)
    assert model.levels[0].prior is not None and model.levels[-1].prior is None


def test_latents_have_the_multiscale_shapes() -> None:
    model = initialised(digits_glow())
    latents, logdet = model.encode(torch.rand(5, 1, 8, 8) - 0.5)
    # 8 x 8 -> squeeze 4 x 4 x 4, half out; 2 x 4 x 4 -> squeeze 8 x 2 x 2 (the top)
    assert [tuple(z.shape) for z in latents] == [(5, 2, 4, 4), (5, 8, 2, 2)]
    assert logdet.shape == (5,)
    assert sum(z[0].numel() for z in latents) == 64


def test_log_prob_is_the_dequantised_density_minus_d_log_bins() -> None:
    model = initialised(digits_glow()).eval()
    x = torch.randint(0, 17, (6, 1, 8, 8))
    torch.manual_seed(4)
    got = model.log_prob(x)
    torch.manual_seed(4)
    y = model.dequantize(x)
    expected = model.log_density(y) - 64 * math.log(17)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.shape == (6,)
    # y lies in the bin of each level: (k + u) / 17 - 0.5
    assert torch.equal(torch.floor((y + 0.5) * 17).long(), x)
    torch.manual_seed(4)
    torch.testing.assert_close(model.bits_per_dim(x), -got / (64 * math.log(2)), rtol=0, atol=0)
    # floats in [0, 1] are the levels divided by num_bins - 1 (ToTensor's scaling)
    torch.manual_seed(4)
    torch.testing.assert_close(model.log_prob(x.float() / 16), got, rtol=0, atol=0)
    assert model(x).shape == (6,)  # forward is log_prob


def test_images_outside_the_convention_are_refused_with_the_fix() -> None:
    model = digits_glow()
    with pytest.raises(ValueError, match="levels in 0..16"):
        model.log_prob(torch.full((2, 1, 8, 8), 17))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        model.log_prob(torch.full((2, 1, 8, 8), 1.5))
    with pytest.raises(ValueError, match="image_size="):
        model.log_prob(torch.zeros(2, 1, 16, 16))
    with pytest.raises(TypeError, match="integer or floating"):
        to_levels(torch.zeros(2, 1, 8, 8, dtype=torch.bool), 17)
    with pytest.raises(ValueError, match="divisible by 2 \\*\\* levels"):
        Glow(1, 8, levels=4)
    with pytest.raises(ValueError, match="one per level"):
        Glow(1, 8, levels=2, steps=[1, 2, 3])
    with pytest.raises(ValueError, match="levels must be"):
        Glow(1, 8, levels=0)
    with pytest.raises(ValueError, match="num_bins"):
        Glow(1, 8, levels=2, num_bins=1)


def _perturbed(model: Glow, scale: float = 0.01) -> Glow:
    """Every parameter moved off its initial value (zero convolutions included), so no
    coupling is the identity and every prior is a real conditional Gaussian."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(".logs") or "prior" in name:
                p.add_(scale * torch.randn_like(p))
    return model


def test_log_density_is_the_change_of_variables_by_brute_force() -> None:
    model = _perturbed(initialised(tiny().double()), 0.05).eval()
    y = model.dequantize(torch.randint(0, 4, (1, 1, 4, 4))).double()

    def flat_latents(v: torch.Tensor) -> torch.Tensor:
        latents, _ = model.encode(v.reshape(1, 1, 4, 4))
        return torch.cat([z.flatten() for z in latents])

    jacobian = torch.autograd.functional.jacobian(flat_latents, y.flatten())
    assert jacobian.shape == (16, 16)
    logdet = torch.linalg.slogdet(jacobian).logabsdet
    latents, reported = model.encode(y)
    torch.testing.assert_close(reported[0], logdet, rtol=1e-9, atol=1e-9)
    assert abs(float(logdet)) > 1.0  # the flow really changes volume
    # the prior: the factored-out half given the kept half, then the learned top Gaussian
    z_out, z_top = latents
    first = model.levels[0]
    out = first.flow(y)
    assert first.prior is not None
    mean, logs = first.prior.params(out[:, : first.out_channels])
    prior = torch.distributions.Normal(mean, logs.exp()).log_prob(z_out).sum()
    top = model.top_prior
    prior += torch.distributions.Normal(top.mean, top.logs.exp()).log_prob(z_top).sum()
    torch.testing.assert_close(model.log_density(y)[0], prior + logdet, rtol=1e-9, atol=1e-9)


def test_the_level_chains_are_invertible_modules_and_x_to_z_to_x_round_trips() -> None:
    model = _perturbed(initialised(digits_glow())).eval()
    for level, channels, size in zip(model.levels, (1, 2), (8, 4)):
        assert is_invertible_module(level.flow, (4, channels, size, size), atol=1e-4)
    y = model.dequantize(torch.randint(0, 17, (4, 1, 8, 8)))
    with torch.no_grad():
        latents, _ = model.encode(y)
        torch.testing.assert_close(model.decode(latents), y, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="expected 2 latents"):
        model.decode(latents[:1])


def test_every_coupling_starts_as_the_identity() -> None:
    model = initialised(digits_glow())
    couplings = [b for level in model.levels for b in level.flow if isinstance(b, AffineCoupling)]
    assert len(couplings) == 8
    for coupling in couplings:
        assert isinstance(coupling.Fm, SigmoidScaleAdapter)
        channels = coupling.split_sizes[0] + coupling.split_sizes[1]  # type: ignore[index]
        size = 4 if channels == 4 else 2
        x = torch.randn(3, channels, size, size)
        y, logdet = coupling.forward_with_logdet(x)
        torch.testing.assert_close(y, x, rtol=0, atol=1e-6)
        torch.testing.assert_close(logdet, torch.zeros(3), rtol=0, atol=1e-5)


def test_actnorm_initialises_on_the_first_training_batch_then_stays() -> None:
    model = digits_glow(memory_saving=True)
    actnorms = [m for m in model.modules() if isinstance(m, ActNorm)]
    assert actnorms and not any(a.is_initialized() for a in actnorms)
    with pytest.raises(RuntimeError, match="ActNorm"):
        model.sample(2)  # nothing to sample from before the first batch
    x = torch.randint(0, 17, (64, 1, 8, 8))
    model.train()
    torch.manual_seed(2)
    model.log_prob(x).mean().backward()  # memory saving on: the recompute must not re-initialise
    assert all(a.is_initialized() for a in actnorms)
    # that batch, through the first ActNorm: zero mean, unit variance per channel
    torch.manual_seed(2)
    first = model.levels[0].flow[1]
    with torch.no_grad():
        out = first(model.levels[0].flow[0](model.dequantize(x)))
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(
        out.std(dim=(0, 2, 3), correction=0), torch.ones(4), rtol=0, atol=1e-4
    )
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.log_prob(torch.randint(0, 17, (64, 1, 8, 8)))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_samples_are_images_of_the_levels_and_temperature_zero_is_deterministic() -> None:
    model = _perturbed(initialised(digits_glow())).eval()
    images = model.sample(6, temperature=0.7)
    assert images.shape == (6, 1, 8, 8)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    levels = images * 16
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-5)
    assert model.log_prob(images).shape == (6,)  # samples are valid inputs
    torch.testing.assert_close(model.sample(2, 0.0), model.sample(2, 0.0), rtol=0, atol=0)
    with pytest.raises(ValueError, match="temperature"):
        model.sample(2, temperature=-1.0)
    with pytest.raises(ValueError, match="n must be"):
        model.sample(0)
    assert torch.equal(
        quantize(torch.tensor([-0.7, -0.5, 0.0, 0.49, 0.8]), 2),
        torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]),
    )


def test_gradients_with_saving_equal_plain_autograd() -> None:
    model = _perturbed(initialised(digits_glow().double()))
    y = model.dequantize(torch.randint(0, 17, (8, 1, 8, 8))).double()
    grads = []
    for saving in (False, True):
        model.memory_saving = saving
        assert model.memory_saving is saving
        model.zero_grad(set_to_none=True)
        model.log_density(y).mean().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert grads[0].numel() == n_parameters(model)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-11)


def test_memory_saving_is_a_property_that_changes_no_state_dict_key() -> None:
    model = initialised(digits_glow())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.memory_saving = False
    assert not any(level.flow.memory_saving for level in model.levels)
    assert list(model.state_dict()) == list(state)
    assert create_model("glow", memory_saving=False, steps=1).memory_saving is False


def _training_peak(steps: int, saving: bool) -> tuple[int, int]:
    torch.manual_seed(0)
    model = digits_glow(steps=steps, hidden_channels=16, memory_saving=saving)
    x = torch.randint(0, 17, (32, 1, 8, 8))

    def step() -> None:
        (-model.log_prob(x).mean()).backward()

    step()
    model.zero_grad(set_to_none=False)
    return measure_memory(step)[1].peak_bytes, n_parameters(model) * 4


@pytest.mark.slow  # about 8 s on 2 cores: K=32 Glow, saving on and off
def test_training_memory_is_flat_in_depth_and_a_quarter_of_plain_at_depth_32() -> None:
    (shallow, shallow_params), (deep, deep_params) = (_training_peak(k, True) for k in (8, 32))
    assert deep - shallow <= deep_params - shallow_params + 16 * 1024
    plain, _ = _training_peak(32, False)
    assert deep <= 0.25 * plain


@pytest.mark.slow  # about 8 s on 2 cores: trains a Glow on the digits
def test_a_few_steps_on_the_digits_lower_the_bits_per_dim() -> None:
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images[:512], dtype=torch.int64).unsqueeze(1)  # 0..16
    torch.manual_seed(0)
    model = digits_glow()
    assert model.memory_saving
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    bpd = []
    for step in range(30):
        batch = images[64 * (step % 8) : 64 * (step % 8 + 1)]
        optimizer.zero_grad()
        loss = model.bits_per_dim(batch).mean()
        loss.backward()
        optimizer.step()
        bpd.append(loss.item())
    assert sum(bpd[-4:]) / 4 < sum(bpd[:4]) / 4 - 0.5
