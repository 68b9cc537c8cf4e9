"""Versions come from git tags, one series per package, and never crash without them.

Each test works on a fresh clone of the committed HEAD (see the ``clone`` fixture), so
the working tree's state and tags do not leak in. setuptools-scm is asked directly,
with each package's own ``[tool.setuptools_scm]`` configuration, which is what the build
backend does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from packaging.version import Version

NAMES = ["invertible-core", "invertible-models", "invertible-train"]


def scm_env() -> dict[str, str]:
    """The environment without anything that would pretend a version."""
    return {
        k: v for k, v in os.environ.items() if not k.startswith("SETUPTOOLS_SCM_PRETEND_VERSION")
    }


def scm_version(root: Path, name: str, run) -> Version:
    config = root / "packages" / name / "pyproject.toml"
    out = run([sys.executable, "-m", "setuptools_scm", "-c", str(config)], cwd=root, env=scm_env())
    return Version(out.strip().splitlines()[-1])


def test_tagging_one_package_changes_only_its_version(clone, git, run):
    before = {name: scm_version(clone, name, run) for name in NAMES}
    run([git, "tag", "invertible-models-v0.2.0"], cwd=clone)
    after = {name: scm_version(clone, name, run) for name in NAMES}

    assert after["invertible-models"] == Version("0.2.0")
    assert after["invertible-core"] == before["invertible-core"] != Version("0.2.0")
    assert after["invertible-train"] == before["invertible-train"] != Version("0.2.0")


def test_commits_after_a_tag_give_the_next_dev_version(clone, git, run):
    run([git, "tag", "invertible-core-v1.4.0"], cwd=clone)
    ident = ["-c", "user.name=ci", "-c", "user.email=ci@example.invalid"]
    run([git, *ident, "commit", "--quiet", "--allow-empty", "-m", "later"], cwd=clone)
    version = scm_version(clone, "invertible-core", run)
    assert version.is_devrelease
    assert Version("1.4.0") < version < Version("1.5.0")


@pytest.mark.parametrize("name", NAMES)
def test_a_clone_without_tags_still_has_a_version(clone, name, run):
    version = scm_version(clone, name, run)
    assert version.is_devrelease


def test_a_clone_without_tags_still_builds(clone, tmp_path, run):
    out = tmp_path / "dist"
    run(
        [
            sys.executable,
            "-m",
            "build",
            "--sdist",
            "--no-isolation",
            "--outdir",
            str(out),
            "packages/invertible-core",
        ],
        cwd=clone,
        env=scm_env(),
    )
    (sdist,) = out.glob("invertible_core-*.tar.gz")
    assert Version(
        sdist.name.removeprefix("invertible_core-").removesuffix(".tar.gz")
    ).is_devrelease


def test_a_tree_without_git_uses_the_fallback_version(clone, git, tmp_path, run):
    # `git archive` gives the tree as a release tarball or a copy would: no .git anywhere.
    archive = tmp_path / "tree.tar"
    run([git, "archive", "--format=tar", "-o", str(archive), "HEAD"], cwd=clone)
    tree = tmp_path / "tree"
    tree.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    assert not (tree / ".git").exists()
    for name in NAMES:
        assert scm_version(tree, name, run) == Version("0.1.0.dev0")


def test_fallback_version_is_what_the_build_backend_uses(clone, git, tmp_path, run):
    archive = tmp_path / "tree.tar"
    run(
        [git, "archive", "--format=tar", "-o", str(archive), "HEAD", "packages/invertible-core"],
        cwd=clone,
    )
    tree = tmp_path / "tree"
    tree.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--sdist",
            "--no-isolation",
            "--outdir",
            str(tmp_path / "dist"),
            ".",
        ],
        cwd=tree / "packages" / "invertible-core",
        env=scm_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "dist" / "invertible_core-0.1.0.dev0.tar.gz").is_file()
