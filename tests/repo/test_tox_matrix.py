"""tox.ini agrees with what it must agree with: every test folder runs somewhere, every env
plain ``tox`` names exists, the development page (``docs/contributing/development.md``)
documents the envs there are, and the oldest torch tested is the one the core declares.

Each test compares tox.ini with another file of the repository (or with the test folders on
disk), so that changing one side alone fails here; none restates tox.ini's own text.
"""

from __future__ import annotations

import configparser
import itertools
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def tox_ini() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO_ROOT / "tox.ini", encoding="utf-8")
    return parser


def expand(name: str) -> list[str]:
    """tox's generative names: ``core-torch{oldest,latest}`` is two envs."""
    parts = re.split(r"\{([^}]*)\}", name)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(combo) for combo in itertools.product(*choices)]


def env_sections() -> dict[str, str]:
    """Every env tox.ini defines -> its section name."""
    sections = {}
    for section in tox_ini().sections():
        if section.startswith("testenv:"):
            for env in expand(section.removeprefix("testenv:")):
                sections[env] = section
    return sections


def test_every_env_plain_tox_runs_is_defined() -> None:
    envs = [e for entry in tox_ini()["tox"]["env_list"].split() for e in expand(entry)]
    missing = [env for env in envs if env not in env_sections()]
    assert envs and not missing, f"env_list names envs without a [testenv:...]: {missing}"


def test_every_test_folder_is_run_by_an_env_of_plain_tox() -> None:
    """A test folder no env runs would never run in CI, silently."""
    ini = tox_ini()
    plain = {e for entry in ini["tox"]["env_list"].split() for e in expand(entry)}
    commands = " ".join(ini[env_sections()[env]].get("commands", "") for env in plain)
    folders = sorted(
        p.relative_to(REPO_ROOT).as_posix()
        for p in (REPO_ROOT / "tests").iterdir()
        if p.is_dir() and any(p.glob("test_*.py"))
    )
    assert folders, "no test folder found"
    unrun = [f for f in folders if not re.search(rf"(^|\s){re.escape(f)}(\s|/|$)", commands)]
    assert not unrun, f"no env of plain tox runs {unrun}"


def test_the_development_page_documents_exactly_the_envs_tox_defines() -> None:
    development = (REPO_ROOT / "docs/contributing/development.md").read_text(encoding="utf-8")
    table = development[: development.index("\n\n", development.index("| env |"))]
    documented = set(re.findall(r"^\| `([^`]+)` \|", table, re.MULTILINE))
    assert documented == set(env_sections()), (
        "the env table of docs/contributing/development.md and tox.ini disagree: "
        f"only on the page {sorted(documented - set(env_sections()))}, "
        f"only in tox.ini {sorted(set(env_sections()) - documented)}"
    )


def test_oldest_torch_is_the_lower_bound_the_core_declares() -> None:
    deps = tox_ini()[env_sections()["core-torcholdest"]]["deps"]
    (pinned,) = re.findall(r"torcholdest:\s*torch==(\d+\.\d+)\.\d+", deps)
    core = (REPO_ROOT / "packages/invertible-core/pyproject.toml").read_text(encoding="utf-8")
    (declared,) = re.findall(r'"torch>=(\d+\.\d+)"', core)
    assert pinned == declared
