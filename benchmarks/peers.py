"""The peers bench_core runs beside invertible-core, each built around the same ``(F, G)`` pairs.

Facts about their APIs, from their sources (the versions the bench environment pins):

- **MemCNN 1.5.2**: ``InvertibleModuleWrapper(AdditiveCoupling(F, G, split_dim=d))`` per
  block; the coupling chunks its input along ``split_dim`` (``y1 = x1 + F(x2)``, ``y2 = x2 +
  G(y1)``, concatenated). The wrapper frees its input's storage after the forward pass and
  refills it in backward (two extra forwards per block). No side inputs.
- **revlib 1.7.2**: ``ReversibleSequential(F1, G1, F2, G2, ..., split_dim=d)``: every module
  is one half-step ``(a, b) -> (b, a + m(b))`` on two streams chunked from the input along
  ``split_dim``, so alternating ``F``, ``G`` gives exactly the additive coupling above.
- **RevTorch 0.2.4**: ``ReversibleSequence(nn.ModuleList([ReversibleBlock(F, G,
  split_along_dim=d), ...]))``, one autograd function for the whole chain. No side inputs.
- **reformer-pytorch 1.4.4** (``reversible.py``, which imports only torch):
  ``ReversibleSequence(nn.ModuleList([nn.ModuleList([F, G]), ...]))``; its blocks chunk
  along dim 2, always (a ``(B, T, C)`` layout), so it cannot run a chain split along another
  dim. The file is loaded by path, without importing the ``reformer_pytorch`` package,
  whose ``__init__`` imports its other dependencies (einops, local-attention, ...).

A peer that is not installed, or fails on a chain, is reported with the reason; a peer's
wrong gradients are measured, not hidden.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType

from torch import nn

from chains import Pairs
from measure import describe

Builder = Callable[[Pairs, int], nn.Module]


@dataclass(frozen=True)
class Peer:
    """A peer as the benchmark sees it: a builder, or why there is none (``status`` is then
    ``'not installed'`` or ``'not importable'``, and ``missing`` says why and what to do)."""

    name: str
    version: str | None
    build: Builder | None
    missing: str | None = None
    status: str = "available"


def _memcnn(module: ModuleType) -> Builder:
    def build(pairs: Pairs, split_dim: int) -> nn.Module:
        return nn.Sequential(
            *(
                module.InvertibleModuleWrapper(module.AdditiveCoupling(f, g, split_dim=split_dim))
                for f, g in pairs
            )
        )

    return build


def _revlib(module: ModuleType) -> Builder:
    def build(pairs: Pairs, split_dim: int) -> nn.Module:
        halves = [m for pair in pairs for m in pair]
        return module.ReversibleSequential(*halves, split_dim=split_dim)

    return build


def _revtorch(module: ModuleType) -> Builder:
    def build(pairs: Pairs, split_dim: int) -> nn.Module:
        blocks = nn.ModuleList(
            module.ReversibleBlock(f, g, split_along_dim=split_dim) for f, g in pairs
        )
        return module.ReversibleSequence(blocks)

    return build


def _reformer(module: ModuleType) -> Builder:
    def build(pairs: Pairs, split_dim: int) -> nn.Module:
        # split_dim is not an option of reformer's blocks (they chunk dim 2): a chain split
        # elsewhere fails when run, and that failure is what the benchmark reports
        return module.ReversibleSequence(nn.ModuleList(nn.ModuleList([f, g]) for f, g in pairs))

    return build


def load_file(package: str, filename: str) -> ModuleType:
    """One file of an installed package, loaded as a module of its own by path: the
    package's ``__init__`` (and whatever it imports) never runs."""
    spec = importlib.util.find_spec(package)  # finds a top-level package, does not execute it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{package} is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    file_spec = importlib.util.spec_from_file_location(f"{package}_{path.stem}", path)
    if file_spec is None or file_spec.loader is None or not path.is_file():
        raise ImportError(f"{package} has no {filename} at {path}")
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class PeerSpec:
    """Where a peer comes from and how the benchmark builds a chain with it."""

    distribution: str  # its name on the package index
    pinned: str  # the version the bench environment installs
    load: Callable[[], ModuleType]
    builder: Callable[[ModuleType], Builder]


PEERS: dict[str, PeerSpec] = {
    "memcnn": PeerSpec("memcnn", "1.5.2", lambda: importlib.import_module("memcnn"), _memcnn),
    "revlib": PeerSpec("revlib", "1.7.2", lambda: importlib.import_module("revlib"), _revlib),
    "revtorch": PeerSpec(
        "revtorch", "0.2.4", lambda: importlib.import_module("revtorch"), _revtorch
    ),
    "reformer": PeerSpec(
        "reformer-pytorch",
        "1.4.4",
        lambda: load_file("reformer_pytorch", "reversible.py"),
        _reformer,
    ),
}


def load_peers() -> dict[str, Peer]:
    """Every peer of :data:`PEERS`, importable or not (then with the reason)."""
    peers: dict[str, Peer] = {}
    for name, spec in PEERS.items():
        try:
            version: str | None = metadata.version(spec.distribution)
        except metadata.PackageNotFoundError:
            version = None
        try:
            module = spec.load()
        except Exception as exc:  # ImportError, or a missing dependency of the peer itself
            status = "not installed" if version is None else "not importable"
            fix = f"pip install --no-deps {spec.distribution}=={spec.pinned}"
            peers[name] = Peer(name, version, None, f"{describe(exc)} ({fix})", status)
            continue
        peers[name] = Peer(name, version, spec.builder(module))
    return peers
