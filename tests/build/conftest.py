"""Fixtures for the packaging tests: the built distributions and the repository they came from.

Run by the tox ``build`` env after it has built an sdist and a wheel (from that sdist) of
each of the three packages into one folder::

    pytest tests/build --dist-dir DIR

Without ``--dist-dir`` the tests that need the built files are skipped; the tests of
versions from git tags still run.
"""

from __future__ import annotations

import email.message
import email.parser
import shutil
import subprocess
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# distribution name -> import name
PACKAGES = {
    "invertible-core": "invertible_core",
    "invertible-models": "invertible_models",
    "invertible-train": "invertible_train",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--dist-dir",
        default=None,
        help="folder holding the sdists and wheels of the three packages (built by tox -e build)",
    )


@dataclass(frozen=True)
class BuiltDist:
    """The sdist and the wheel of one package, as found in --dist-dir."""

    name: str
    import_name: str
    sdist: Path
    wheel: Path

    def wheel_files(self) -> list[str]:
        with zipfile.ZipFile(self.wheel) as whl:
            return whl.namelist()

    def wheel_metadata(self) -> email.message.Message:
        with zipfile.ZipFile(self.wheel) as whl:
            meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
            return email.parser.BytesParser().parsebytes(whl.read(meta))

    def sdist_files(self) -> list[str]:
        """Paths inside the sdist, without its top folder (``name-version/``)."""
        with tarfile.open(self.sdist) as tar:
            return [
                m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name and m.isfile()
            ]

    def sdist_metadata(self) -> email.message.Message:
        with tarfile.open(self.sdist) as tar:
            top = tar.getnames()[0].split("/", 1)[0]
            member = tar.extractfile(f"{top}/PKG-INFO")
            assert member is not None
            return email.parser.BytesParser().parsebytes(member.read())


@pytest.fixture(scope="session")
def dist_dir(request: pytest.FixtureRequest) -> Path:
    value = request.config.getoption("--dist-dir", default=None)
    if not value:
        pytest.skip("no --dist-dir given (run through `tox -e build`)")
    path = Path(value)
    assert path.is_dir(), f"--dist-dir {path} is not a folder"
    return path


@pytest.fixture(scope="session")
def built(dist_dir: Path) -> dict[str, BuiltDist]:
    """The three packages' dists; fails unless each has exactly one sdist and one wheel."""
    found = {}
    for name, import_name in PACKAGES.items():
        sdists = sorted(dist_dir.glob(f"{import_name}-*.tar.gz"))
        wheels = sorted(dist_dir.glob(f"{import_name}-*.whl"))
        assert len(sdists) == 1, f"expected one sdist of {name} in {dist_dir}, found {sdists}"
        assert len(wheels) == 1, f"expected one wheel of {name} in {dist_dir}, found {wheels}"
        found[name] = BuiltDist(name, import_name, sdists[0], wheels[0])
    return found


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run a command, return its stdout; on failure show its output in the test report."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )
    return proc.stdout


@pytest.fixture
def run() -> Callable[..., str]:
    """``run(cmd, cwd, env=None)``: run a command, return its stdout, fail the test on error."""
    return _run


@pytest.fixture
def git() -> str:
    exe = shutil.which("git")
    if exe is None:
        pytest.skip("git is not installed")
    return exe


@pytest.fixture
def clone(tmp_path: Path, git: str) -> Path:
    """A fresh clone of the repository's committed HEAD, with every tag removed."""
    if not (REPO_ROOT / ".git").exists():
        pytest.skip(f"{REPO_ROOT} is not a git checkout")
    dest = tmp_path / "clone"
    _run([git, "clone", "--quiet", "--no-hardlinks", str(REPO_ROOT), str(dest)], cwd=tmp_path)
    tags = _run([git, "tag", "--list"], cwd=dest).split()
    if tags:
        _run([git, "tag", "--delete", *tags], cwd=dest)
    return dest
