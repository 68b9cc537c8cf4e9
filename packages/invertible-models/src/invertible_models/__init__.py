"""invertible-models."""

from invertible_models._version import __version__

__all__ = ["__version__"]
