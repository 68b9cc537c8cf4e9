"""Bring your own network: :func:`make_reversible` turns an existing residual network, with
its trained weights, into one whose activations need not be stored.

Most networks that need the memory are not RevNets: a torchvision ResNet, a timm ViT, an
``nn.TransformerEncoder``, a stack of one's own residual blocks, often pretrained. Their
residual steps ``x -> x + f(x)`` can be rewired into invertible couplings that compute with
the very same branch modules ``f`` (the same parameter objects):

- ``method="momentum"`` (Sander et al., ICML 2021): ``v <- gamma v + (1 - gamma) f(x)``,
  ``x <- x + v``, one coupling per residual step (:mod:`invertible_models.conversion.
  momentum`);
- ``method="two_stream"`` (RevViT's two streams with the scale factors of MEFT and Dr2Net):
  two consecutive steps per coupling, ``y1 = beta x1 + alpha x2 + f(x2)``, ``y2 = beta x2 +
  alpha y1 + g(y1)``, which at ``alpha = 1`` and small ``beta`` starts where the original
  network was (:mod:`invertible_models.conversion.two_stream`).

Each stack of consecutive residual steps becomes one run through the core's
``ReversibleSequence``: memory flat in the number of steps. What cannot be inverted (a
stem, a downsampling block, a head) stays as it was, and blocks kept inside a converted
stage are checkpointed while saving memory (``checkpoint_kept``). The result is the
original's class with the zoo's switch ``memory_saving`` mixed in
(:class:`~invertible_models.conversion.ConvertedModel`); its ``state_dict`` has the
original's keys both ways. The original network is left as it was and shares every
parameter with the converted one.

Recognised architectures: torchvision's ``ResNet`` (every stage's identity blocks),
``nn.TransformerEncoder`` (pre- and post-norm layers), timm's ``VisionTransformer``, found
as the model or anywhere inside it; and any ``nn.Sequential`` of residual blocks given
``residual="x + net(x)"`` (at the model, or ``at="path"`` inside it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from invertible_models.conversion.context import ConversionContext, ConversionError
from invertible_models.conversion.converted import ConvertedModel, adopt, shallow_copy
from invertible_models.conversion.method import ConversionMethod
from invertible_models.conversion.momentum import Momentum
from invertible_models.conversion.sequential import rewire_sequential
from invertible_models.conversion.timm_vit import is_timm_vit, rewire_timm_vit
from invertible_models.conversion.torch_encoder import rewire_torch_encoder
from invertible_models.conversion.torchvision_resnet import (
    is_torchvision_resnet,
    rewire_torchvision_resnet,
)
from invertible_models.conversion.two_stream import TwoStream
from invertible_models.conversion.units import ResidualUnit, parse_residual

__all__ = ["METHODS", "ConversionError", "make_reversible"]

#: the conversion methods by name
METHODS: dict[str, ConversionMethod] = {m.name: m for m in (Momentum(), TwoStream())}

Rewire = Callable[[Any, ConversionContext, str], nn.Module]

#: (what it is called, how to recognise it, how to rewire it), tried in order
_ARCHITECTURES: tuple[tuple[str, Callable[[nn.Module], bool], Rewire], ...] = (
    ("torchvision's ResNet", is_torchvision_resnet, rewire_torchvision_resnet),
    ("nn.TransformerEncoder", lambda m: isinstance(m, nn.TransformerEncoder), rewire_torch_encoder),
    ("timm's VisionTransformer", is_timm_vit, rewire_timm_vit),
)


def make_reversible(
    model: nn.Module,
    method: str = "momentum",
    *,
    residual: str | None = None,
    at: str | Sequence[str] | None = None,
    memory_saving: bool = True,
    checkpoint_kept: bool = True,
    anchor_every: int | None = None,
    **options: float,
) -> ConvertedModel:
    """The reversible counterpart of ``model``, computing with the same parameter objects.

    Args:
        model: a torchvision ``ResNet``, an ``nn.TransformerEncoder``, a timm
            ``VisionTransformer``, a model holding any of them, or (with ``residual``) an
            ``nn.Sequential`` of residual blocks. It is not modified.
        method: ``"momentum"`` or ``"two_stream"`` (see the module docstring).
        residual: for an ``nn.Sequential`` of your own residual blocks, where their
            residual branch is: ``"x + net(x)"`` (each block computes its input plus its
            submodule ``net`` applied to it; any submodule path) or ``"block(x)"`` (each
            block computes ``x + f(x)`` as a whole; ``f = block(x) - x``).
        at: with ``residual``, the path(s) of such ``nn.Sequential`` stacks inside
            ``model`` (default: ``model`` itself).
        memory_saving: the zoo's one switch: while training, rebuild the reversible runs'
            activations in backward instead of storing them (default). Settable later on
            the returned network; ``False`` is plain autograd of the same network.
        checkpoint_kept: while saving memory, also recompute the blocks kept as they were
            inside converted stages (a ResNet's downsampling blocks) with
            ``torch.utils.checkpoint`` (default True, as a RevNet's transitions).
        anchor_every: keep the exact state after every k-th coupling of each run (0: none),
            bounding the float rounding of rebuilt activations where the inverse is
            ill-conditioned; costs one state per anchor. Default: the method's (momentum: 0;
            two-stream: 1, since near the original its inverse is ill-conditioned on long
            runs; set ``model.anchor_every = 0`` once a schedule has lowered ``alpha``, see
            the package README).
        **options: the method's coefficients: ``gamma`` (momentum, default 0.9);
            ``alpha`` (default 1) and ``beta`` (default 0.1) for two-stream.

    Returns:
        the converted network (the original's class with
        :class:`~invertible_models.conversion.ConvertedModel` mixed in): same forward
        signature; ``state_dict`` under the original's keys; ``conversion`` records what
        became reversible and what was kept.

    Raises:
        ConversionError: nothing in ``model`` can be converted (the message names the
            model and what would work), or a part of it cannot (named by its path).
        ValueError: an unknown ``method`` or option, or a coefficient out of range.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"make_reversible needs an nn.Module, got {type(model).__name__}")
    if isinstance(model, ConvertedModel):
        raise ConversionError(
            f"make_reversible: this {type(model).__name__} is already converted "
            f"({model.conversion.method}); convert the original network instead"
        )
    if method not in METHODS:
        raise ValueError(
            f"make_reversible: unknown method {method!r}; choose one of {', '.join(METHODS)}"
        )
    chosen = METHODS[method]
    coefficients = chosen.coefficients(dict(options))
    if anchor_every is None:
        anchor_every = chosen.default_anchor_every
    ctx = ConversionContext(
        chosen, coefficients, bool(memory_saving), bool(checkpoint_kept), anchor_every
    )
    if residual is not None:
        unit_of = parse_residual(residual)
        paths = [""] if at is None else [at] if isinstance(at, str) else list(at)
        converted = _replace_at(model, paths, ctx, unit_of)
    else:
        if at is not None:
            raise ValueError(
                "make_reversible: at= points at nn.Sequential stacks described by residual=; "
                "pass residual='x + net(x)' (or 'block(x)') with it"
            )
        found = _rewire_known(model, ctx, "")
        if found is None:
            raise ConversionError(_unsupported(model))
        converted = found
    if ctx.record.num_units == 0:
        raise ConversionError(
            f"make_reversible: {type(model).__name__} has no residual step that keeps its "
            f"input's shape, so nothing can be made reversible ({ctx.record.summary()})"
        )
    if converted is model:
        converted = shallow_copy(model)
    return adopt(
        model, converted, ctx.record, coefficients, memory_saving, checkpoint_kept, anchor_every
    )


def _rewire_known(module: nn.Module, ctx: ConversionContext, path: str) -> nn.Module | None:
    """``module`` rewired where a known architecture is (itself or inside), None if none."""
    for _, matches, rewire in _ARCHITECTURES:
        if matches(module):
            return rewire(module, ctx, path)
    changed: dict[str, nn.Module] = {}
    for name, child in module.named_children():
        new = _rewire_known(child, ctx, f"{path}.{name}" if path else name)
        if new is not None:
            changed[name] = new
    if not changed:
        return None
    copy = shallow_copy(module)
    for name, new in changed.items():
        setattr(copy, name, new)
    return copy


def _replace_at(
    model: nn.Module,
    paths: list[str],
    ctx: ConversionContext,
    unit_of: Callable[[nn.Module, str], ResidualUnit],
) -> nn.Module:
    """``model`` with the ``nn.Sequential`` stacks at ``paths`` rewired (shallow copies on
    the way to them)."""
    if not paths:
        raise ValueError("make_reversible: at= names no path")
    for path in paths:
        try:
            model.get_submodule(path)
        except AttributeError:
            raise ConversionError(
                f"make_reversible: at={path!r}: {type(model).__name__} has no submodule at "
                "that path"
            ) from None

    def rewire(module: nn.Module, where: str, targets: list[str]) -> nn.Module:
        if "" in targets:
            if len(targets) > 1:
                raise ConversionError(
                    f"make_reversible: at= names {where or 'the model'} and paths inside it"
                )
            return rewire_sequential(module, ctx, where, unit_of)
        groups: dict[str, list[str]] = {}
        for target in targets:
            head, _, rest = target.partition(".")
            groups.setdefault(head, []).append(rest)
        copy = shallow_copy(module)
        for head, rests in groups.items():
            child = module.get_submodule(head)
            setattr(copy, head, rewire(child, f"{where}.{head}" if where else head, rests))
        return copy

    return rewire(model, "", paths)


def _unsupported(model: nn.Module) -> str:
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    known = ", ".join(name for name, _, _ in _ARCHITECTURES)
    return (
        f"make_reversible cannot convert {type(model).__name__} ({kind}): it is none of the "
        f"architectures it knows ({known}) and holds none of them. For a stack of your own "
        "residual blocks, say where their residual branch is: make_reversible(model, "
        "residual='x + net(x)') for an nn.Sequential of blocks computing x + block.net(x), "
        "with at='path' for such a stack inside a larger model"
    )
