"""Each package's ``__version__`` is the version of the distribution pip installed."""

from __future__ import annotations

import importlib
from importlib.metadata import version

import pytest
from packaging.version import Version


@pytest.mark.parametrize(
    ("package", "distribution"),
    [
        ("invertible_core", "invertible-core"),
        ("invertible_models", "invertible-models"),
        ("invertible_train", "invertible-train"),
    ],
)
def test_version_attribute_is_the_installed_metadata(package, distribution):
    module = importlib.import_module(package)
    assert module.__version__ == version(distribution)
    Version(module.__version__)  # a valid PEP 440 version, not "0.0.0+unknown" by accident
    assert module.__version__ != "0.0.0+unknown"
