"""tox.ini names the environments the README documents, and plain `tox` runs the test ones."""

from __future__ import annotations

import configparser
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def tox_ini() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO_ROOT / "tox.ini", encoding="utf-8")
    return parser


def test_plain_tox_runs_lint_type_build_every_test_env_and_the_docs_but_not_bench():
    env_list = tox_ini()["tox"]["env_list"].split()
    assert env_list == [
        "lint",
        "type",
        "build",
        "core-torch{oldest,2.13,latest}",
        "models",
        "train",
        "docs",
    ]


def test_every_documented_env_is_defined():
    sections = set(tox_ini().sections())
    for env in [
        "core-torch{oldest,2.13,latest}",
        "models",
        "train",
        "lint",
        "type",
        "build",
        "bench",
        "docs",
    ]:
        assert f"testenv:{env}" in sections


def test_oldest_torch_is_the_lower_bound_the_core_declares():
    deps = tox_ini()["testenv:core-torch{oldest,2.13,latest}"]["deps"]
    assert "torcholdest: torch==2.4.1" in deps
    core = (REPO_ROOT / "packages/invertible-core/pyproject.toml").read_text(encoding="utf-8")
    assert 'dependencies = ["torch>=2.4"]' in core
