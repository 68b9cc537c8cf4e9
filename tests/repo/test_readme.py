"""The READMEs are executable documentation.

Every ```python block of the top README and of each package's README runs, each in a fresh
interpreter (a fresh namespace, nothing left over from the block before), on the CPU,
within a time limit. The quick start holds exactly two commands, and the second is the one
`.ci/run` runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from markdown_blocks import code_blocks

REPO_ROOT = Path(__file__).resolve().parents[2]
README = REPO_ROOT / "README.md"
CI_RUN = REPO_ROOT / ".ci" / "run"
EXAMPLE_TIMEOUT_S = 300


def section(text: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\s*$(?P<body>.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match.group("body")


PYTHON_BLOCKS = code_blocks(README.read_text(encoding="utf-8"), "python")
PACKAGE_READMES = sorted((REPO_ROOT / "packages").glob("*/README.md"))
ALL_BLOCKS = [
    (path.relative_to(REPO_ROOT).as_posix(), line, body)
    for path in (README, *PACKAGE_READMES)
    for line, body in code_blocks(path.read_text(encoding="utf-8"), "python")
]


def test_readme_has_python_examples():
    """The top README shows one example of each of its two packages of code (the guides hold
    the rest, run by tests/repo/test_docs.py); the package READMEs of the libraries one each."""
    assert len(PYTHON_BLOCKS) >= 2
    for readme in PACKAGE_READMES:
        if readme.parent.name != "invertible-train":  # the harness's example is a command line
            assert code_blocks(readme.read_text(encoding="utf-8"), "python"), readme


def test_the_package_readmes_are_collected():
    assert [p.parent.name for p in PACKAGE_READMES] == [
        "invertible-core",
        "invertible-models",
        "invertible-train",
    ]


@pytest.mark.slow  # a fresh interpreter that imports torch per example
@pytest.mark.parametrize(
    "source",
    [body for _, _, body in ALL_BLOCKS],
    ids=[f"{name}:{line}" for name, line, _ in ALL_BLOCKS],
)
def test_readme_python_example_runs(source, tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="default")
    proc = subprocess.run(
        [sys.executable, "-c", source],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def quick_start_commands() -> list[str]:
    blocks = code_blocks(section(README.read_text(encoding="utf-8"), "Quick start"), "bash")
    assert len(blocks) == 1, "the quick start is one shell block"
    lines = [line.strip() for line in blocks[0][1].splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_quick_start_is_two_commands():
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    install, _ = commands
    assert install.startswith(
        "pip install ./packages/invertible-core ./packages/invertible-models ./packages/invertible-train"
    )
    assert install.endswith("invertible-demo")


def test_ci_runs_exactly_the_readme_test_command():
    _, test_command = quick_start_commands()
    ci_lines = [line.strip() for line in CI_RUN.read_text(encoding="utf-8").splitlines()]
    assert test_command in ci_lines, f".ci/run must run `{test_command}` as a line of its own"
    assert os.access(CI_RUN, os.X_OK), ".ci/run must be executable"
