"""Shared fixtures of the invertible-models tests: small threads, seeded runs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded() -> Iterator[None]:
    # Each test starts from the same random state, so failures reproduce.
    torch.manual_seed(0)
    yield
