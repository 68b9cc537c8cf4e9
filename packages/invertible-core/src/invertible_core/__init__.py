"""invertible-core: memory-efficient invertible (reversible) layers for PyTorch."""

from invertible_core._version import __version__

__all__ = ["__version__"]
