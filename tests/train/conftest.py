"""Shared fixtures: the tiny test models, a fast synthetic experiment, a runner for the CLI."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from .tiny_model import register

register()
# one thread: these models are tiny, and the machine is shared (threads that wait on
# each other under load cost far more than they gain)
torch.set_num_threads(1)

#: a synthetic experiment that trains the tiny model in well under a second
FAST = [
    "--set", "data.image_size=8",
    "--set", "data.crop_padding=1",
    "--set", "data.synthetic_train_size=256",
    "--set", "data.synthetic_test_size=64",
    "--set", "data.eval_batch_size=64",
    "--set", "train.measure_memory=false",
    "--set", "train.tensorboard=false",
    "--batch-size", "16",
    "--quiet",
]  # fmt: skip


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., int]:
    """Call ``invertible-train`` in-process with results under ``tmp_path/results``."""
    from invertible_train.cli import main

    def run(*args: str, fast: bool = True) -> int:
        # the test's own options come last so that they win over FAST
        return main([*(FAST if fast else []), *args, "--results-dir", str(tmp_path / "results")])

    return run
