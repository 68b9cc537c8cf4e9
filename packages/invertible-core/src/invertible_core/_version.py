"""The installed distribution's version (set from git tags by setuptools-scm at build time)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__: str = version("invertible-core")
except (
    PackageNotFoundError
):  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
