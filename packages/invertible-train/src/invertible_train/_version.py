"""The installed distribution's version (set from git tags by setuptools-scm at build time)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__: str = version("invertible-train")
except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "0.0.0+unknown"
