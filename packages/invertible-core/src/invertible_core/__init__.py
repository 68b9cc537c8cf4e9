"""invertible-core: memory-efficient invertible (reversible) layers for PyTorch.

Couplings turn shape-preserving functions into invertible blocks; a
:class:`ReversibleSequence` trains a chain of them with memory flat in depth; the
:class:`InvertibleModuleWrapper` (MemCNN's API) saves memory around any single invertible
module; :func:`is_invertible_module` checks invertibility without side effects. Invertible
layers (:class:`InvertibleDownsampling`, :class:`HaarDownsampling`,
:class:`InvertibleConv1x1`, :class:`ActNorm`, :class:`Permutation`) change shape or mix
channels and report their log-determinants, for fully invertible nets and flows.
"""

from invertible_core._version import __version__
from invertible_core.actnorm import ActNorm
from invertible_core.channel_mixing import InvertibleConv1x1, Permutation
from invertible_core.checks import is_invertible_module
from invertible_core.contract import InvertibleBlock, LogDetBlock, is_recomputing
from invertible_core.couplings import (
    AdditiveCoupling,
    AffineAdapterNaive,
    AffineAdapterSigmoid,
    AffineCoupling,
    Coupling,
    create_coupling,
)
from invertible_core.memory import MemoryStats, measure_memory
from invertible_core.resampling import HaarDownsampling, InvertibleDownsampling
from invertible_core.sequence import COUPLING_PROTOCOL, ReversibleSequence
from invertible_core.wrapper import InvertibleModuleWrapper, ReversibleBlock

__all__ = [
    "COUPLING_PROTOCOL",
    "ActNorm",
    "AdditiveCoupling",
    "AffineAdapterNaive",
    "AffineAdapterSigmoid",
    "AffineCoupling",
    "Coupling",
    "HaarDownsampling",
    "InvertibleBlock",
    "InvertibleConv1x1",
    "InvertibleDownsampling",
    "InvertibleModuleWrapper",
    "LogDetBlock",
    "MemoryStats",
    "Permutation",
    "ReversibleBlock",
    "ReversibleSequence",
    "__version__",
    "create_coupling",
    "is_invertible_module",
    "is_recomputing",
    "measure_memory",
]
