"""What ``bench_models.py`` needs for the invertible networks: real digits, a training step
for likelihood models, FrEIA's Glow, and the i-RevNet reconstruction and Glow bits-per-dim
measurements.

FrEIA 0.2 (``pip install FrEIA==0.2``) builds the same Glow from its own modules: per level
``IRevNetDownsampling`` (the squeeze), then K times ``ActNorm``, ``Fixed1x1Conv`` (FrEIA has
no learned 1x1 convolution: a fixed random rotation in its place) and ``GLOWCouplingBlock``
(an affine coupling of both halves, one network each, as ours), and a ``Split`` node
between levels whose first half leaves as a latent. The coupling networks are the same
``CouplingNetwork`` as ours (FrEIA takes them from the user); the prior is a standard normal
on every latent (FrEIA has no learned prior; ours, a zero-initialised convolution per
split, stores one feature map per level). FrEIA runs plain autograd: every activation of
every step is kept for backward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from invertible_core import TrainingStep, round_to_grid
from invertible_models import Glow, create_model
from invertible_models.flow_blocks import CouplingNetwork, dequantize
from invertible_models.step import training_step

#: Glow on 8 x 8 digits: 2 levels, 17 levels per value (the digits are 0..16).
DIGITS_GLOW: dict[str, Any] = {"in_channels": 1, "image_size": 8, "levels": 2, "num_bins": 17}


def digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 handwritten digits as int64 levels 0..16, ``(N, 1, 8, 8)``,
    split into the first 1,500 (training) and the last 297 (held out)."""
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images, dtype=torch.int64).unsqueeze(1)
    return images[:1500], images[1500:]


def likelihood_step(model: nn.Module, images: Tensor, device: str = "cpu") -> TrainingStep:
    """The training step of a likelihood model (``model(x)`` is the per-sample
    log-likelihood) on a fixed batch ``images``: the negative log-likelihood per value
    (nats), ``-model(images).mean() / values per image``, SGD with momentum at 1e-3 (the
    zoo's step for flows, :func:`invertible_models.step.training_step`, which FrEIA's Glow,
    having no ``log_prob``, would otherwise take for a classifier)."""
    images = images.to(device)
    values = images[0].numel()
    return training_step(
        model,
        images=images,
        loss=lambda log_prob, _: -log_prob.mean() / values,
        optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9),
    )


class FreiaGlow(nn.Module):
    """The architecture of :class:`~invertible_models.Glow`, built from FrEIA's modules.

    ``forward(x)`` is the per-sample log-likelihood in nats of the dequantised images, with
    the data convention of ``Glow.log_prob`` and a standard normal prior on every latent.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        levels: int,
        steps: int,
        hidden_channels: int,
        num_bins: int,
    ) -> None:
        super().__init__()
        import FrEIA.framework as Ff
        import FrEIA.modules as Fm

        def subnet(c_in: int, c_out: int) -> nn.Module:
            return CouplingNetwork(c_in, c_out, hidden_channels)

        nodes: list[Any] = [Ff.InputNode(in_channels, image_size, image_size, name="input")]
        outputs: list[Any] = []
        channels = in_channels
        head = nodes[0]
        for level in range(levels):
            head = Ff.Node(head, Fm.IRevNetDownsampling, {})
            nodes.append(head)
            channels *= 4
            for _ in range(steps):
                rotation = torch.linalg.qr(torch.randn(channels, channels)).Q
                for module, args in (
                    (Fm.ActNorm, {}),
                    (Fm.Fixed1x1Conv, {"M": rotation}),
                    (Fm.GLOWCouplingBlock, {"subnet_constructor": subnet}),
                ):
                    head = Ff.Node(head, module, args)
                    nodes.append(head)
            if level < levels - 1:
                kept = channels // 2
                split = Ff.Node(head, Fm.Split, {"section_sizes": [kept, channels - kept]})
                nodes.append(split)
                outputs.append(Ff.OutputNode(split.out1))
                head = split.out0
                channels = kept
        outputs.append(Ff.OutputNode(head))
        self.inn = Ff.GraphINN(nodes + outputs)
        self.num_bins = num_bins
        self.num_dims = in_channels * image_size * image_size

    def forward(self, x: Tensor) -> Tensor:
        latents, log_jac = self.inn(dequantize(x, self.num_bins))
        prior = sum(
            (-0.5 * (z.square() + math.log(2 * math.pi))).flatten(1).sum(1) for z in latents
        )
        return prior + log_jac - self.num_dims * math.log(self.num_bins)


def glow_model(kind: str, steps: int, hidden_channels: int, memory_saving: bool) -> nn.Module:
    """Our Glow (``kind="glow"``) or FrEIA's (``"freia"``) on digits, ``steps`` per level."""
    if kind == "freia":
        return FreiaGlow(**DIGITS_GLOW, steps=steps, hidden_channels=hidden_channels)
    return create_model(
        "glow",
        steps=steps,
        hidden_channels=hidden_channels,
        memory_saving=memory_saving,
        **DIGITS_GLOW,
    )


def glow_bits_per_dim(
    budget: int, steps: int, hidden_channels: int, batch_size: int, lr: float = 1e-3
) -> dict[str, Any]:
    """Train our Glow on the digits for ``budget`` Adam steps (memory saving on, seed 0) and
    report the held-out bits per dimension before and after (dequantisation noise seeded)."""
    train, test = digits()
    torch.manual_seed(0)
    model = glow_model("glow", steps, hidden_channels, True)
    assert isinstance(model, Glow)

    def held_out() -> float:
        model.eval()
        with torch.no_grad():
            torch.manual_seed(1)
            value = float(model.bits_per_dim(test).mean())
        model.train()
        return value

    with torch.no_grad():  # ActNorm's data-dependent initialisation on the first batch
        model.train()(train[:batch_size])
    before = held_out()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(budget):
        batch = train[torch.randint(0, len(train), (batch_size,), generator=generator)]
        optimizer.zero_grad()
        model.bits_per_dim(batch).mean().backward()
        optimizer.step()
    return {
        "steps_per_level": steps,
        "hidden_channels": hidden_channels,
        "batch_size": batch_size,
        "adam_steps": budget,
        "lr": lr,
        "held_out_images": len(test),
        "bits_per_dim_at_init": before,
        "bits_per_dim": held_out(),
    }


def irevnet_reconstruction(stage_blocks: tuple[int, ...], batch_size: int) -> list[dict[str, Any]]:
    """How exactly ``features_inverse(features(x))`` rebuilds ``x``, per configuration.

    ``irevnet`` with ``stage_blocks``, 3 x 32 x 32 uniform random images, float32; BatchNorm
    statistics first fitted by 5 training-mode passes; then one batch through, in eval mode
    and in train mode (no dropout). Errors against the input (and, with fixed point,
    against the input rounded to the grid, which is what the chain sees).
    """
    rows = []
    for bits, padding in ((16, "zeros"), (None, "zeros"), (None, "repeat")):
        torch.manual_seed(0)
        model = create_model(
            "irevnet", stage_blocks=stage_blocks, fixed_point_bits=bits, stem_padding=padding
        )
        x = torch.rand(batch_size, 3, 32, 32)
        with torch.no_grad():
            for _ in range(5):
                model.train()(torch.rand(batch_size, 3, 32, 32))
            for mode in ("eval", "train"):
                model.train(mode == "train")
                rebuilt = model.features_inverse(model.features(x))
                target = round_to_grid(x, bits)
                rows.append(
                    {
                        "fixed_point_bits": bits,
                        "stem_padding": padding,
                        "mode": mode,
                        "max_abs_error": float((rebuilt - x).abs().max()),
                        "max_abs_error_to_grid": float((rebuilt - target).abs().max()),
                        "relative_l2_error": float((rebuilt - x).norm() / x.norm()),
                    }
                )
    return rows


def format_reconstruction(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'fixed point':<12} {'padding':<8} {'mode':<6} {'max |err|':>10} {'to grid':>10} "
        f"{'rel. L2':>10}",
        "-" * 62,
    ]
    for r in rows:
        bits = "off" if r["fixed_point_bits"] is None else f"{r['fixed_point_bits']} bits"
        lines.append(
            f"{bits:<12} {r['stem_padding']:<8} {r['mode']:<6} {r['max_abs_error']:>10.3g} "
            f"{r['max_abs_error_to_grid']:>10.3g} {r['relative_l2_error']:>10.3g}"
        )
    return "\n".join(lines)
