"""What `pip install` gets from each built distribution: files, metadata, dependencies.

The tox ``build`` env builds every wheel from its sdist (``python -m build`` does that by
default), so "the wheel holds every source file" also proves the sdist is complete.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[2]
NAMES = ["invertible-core", "invertible-models", "invertible-train"]


def requirements(meta) -> tuple[dict[str, Requirement], dict[str, Requirement]]:
    """Requires-Dist split into (always required, only under an extra), keyed by name."""
    always, extra = {}, {}
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        target = extra if req.marker is not None and "extra" in str(req.marker) else always
        target[canonicalize_name(req.name)] = req
    return always, extra


def source_files(import_name: str, dist_name: str) -> set[str]:
    """Files under the package's source folder, as paths inside a wheel."""
    src = REPO_ROOT / "packages" / dist_name / "src"
    files = set()
    for path in (src / import_name).rglob("*"):
        if (
            path.is_file()
            and "__pycache__" not in path.parts
            and path.suffix not in {".pyc", ".pyo"}
        ):
            files.add(path.relative_to(src).as_posix())
    return files


@pytest.mark.parametrize("name", NAMES)
def test_sdist_and_wheel_carry_the_same_version(built, name):
    dist = built[name]
    sdist_version = dist.sdist_metadata()["Version"]
    assert dist.wheel_metadata()["Version"] == sdist_version
    Version(sdist_version)  # a valid PEP 440 version


@pytest.mark.parametrize("name", NAMES)
def test_wheel_is_pure_python(built, name):
    assert built[name].wheel.name.endswith("-py3-none-any.whl")


@pytest.mark.parametrize("name", NAMES)
def test_wheel_holds_every_source_file_and_the_type_marker(built, name):
    dist = built[name]
    in_wheel = set(dist.wheel_files())
    missing = source_files(dist.import_name, name) - in_wheel
    assert not missing, (
        f"{dist.wheel.name} lacks {sorted(missing)} (the sdist it was built from is incomplete)"
    )
    assert f"{dist.import_name}/py.typed" in in_wheel


@pytest.mark.parametrize("name", NAMES)
def test_wheel_holds_only_its_own_package(built, name):
    dist = built[name]
    tops = {f.split("/", 1)[0] for f in dist.wheel_files()}
    tops = {t for t in tops if not t.endswith(".dist-info")}
    assert tops == {dist.import_name}


@pytest.mark.parametrize("name", NAMES)
def test_sdist_holds_project_files(built, name):
    files = set(built[name].sdist_files())
    for required in ["pyproject.toml", "README.md", "CHANGELOG.md", "LICENSE", "PKG-INFO"]:
        assert required in files, f"{built[name].sdist.name} lacks {required}"


@pytest.mark.parametrize("name", NAMES)
def test_metadata_declares_licence_python_and_readme(built, name):
    meta = built[name].wheel_metadata()
    assert meta["License-Expression"] == "MIT"
    assert "LICENSE" in (meta.get_all("License-File") or [])
    assert meta["Requires-Python"] == ">=3.10"
    assert meta["Description-Content-Type"] == "text/markdown"


def test_core_requires_torch_and_nothing_else(built):
    meta = built["invertible-core"].wheel_metadata()
    always, extra = requirements(meta)
    assert set(always) == {"torch"}
    assert extra == {}, "invertible-core must not grow optional dependencies"
    assert always["torch"].marker is None
    assert always["torch"].specifier.contains("2.4.1"), "the oldest supported torch is 2.4"


def test_models_requires_core_and_torch(built):
    meta = built["invertible-models"].wheel_metadata()
    always, extra = requirements(meta)
    assert set(always) == {"invertible-core", "torch"}
    assert set(extra) <= {"matplotlib", "timm"}
    assert {"plot", "timm"} <= set(meta.get_all("Provides-Extra") or [])


def test_train_requires_models_torchvision_tqdm_tensorboard_plots_and_digits_only_as_extras(
    built,
):
    meta = built["invertible-train"].wheel_metadata()
    always, extra = requirements(meta)
    assert {"invertible-models", "torchvision", "tqdm", "tensorboard"} <= set(always)
    # direct imports are declared too; tomli only where tomllib is missing (Python 3.10)
    assert set(always) - {"invertible-models", "torchvision", "tqdm", "tensorboard"} <= {
        "invertible-core",
        "torch",
        "tomli",
    }
    if "tomli" in always:
        assert "python_version" in str(always["tomli"].marker)
    assert "matplotlib" not in always and "scikit-learn" not in always
    assert set(extra) == {"matplotlib", "scikit-learn"}
    assert {"plot", "digits"} <= set(meta.get_all("Provides-Extra") or [])


@pytest.mark.parametrize(
    ("name", "dependency"),
    [("invertible-models", "invertible-core"), ("invertible-train", "invertible-models")],
)
def test_our_own_dependencies_declare_a_lower_bound(built, name, dependency):
    always, _ = requirements(built[name].wheel_metadata())
    operators = {spec.operator for spec in always[dependency].specifier}
    assert operators & {">=", "~=", ">"}, f"{name} needs {dependency} with a lower bound"


def test_train_console_scripts_point_at_modules_in_the_wheel(built):
    dist = built["invertible-train"]
    with zipfile.ZipFile(dist.wheel) as whl:
        entry_points = next(n for n in whl.namelist() if n.endswith(".dist-info/entry_points.txt"))
        text = whl.read(entry_points).decode()
    scripts = {}
    for line in text.splitlines():
        if "=" in line:
            key, value = (part.strip() for part in line.split("=", 1))
            scripts[key] = value
    for script in ["invertible-train", "invertible-demo"]:
        assert script in scripts, f"the README promises a `{script}` command"
    files = set(dist.wheel_files())
    missing = []
    for target in scripts.values():
        path = target.split(":", 1)[0].replace(".", "/")
        if f"{path}.py" not in files and f"{path}/__init__.py" not in files:
            missing.append(target)
    assert missing == [], f"console scripts whose module is not in {dist.wheel.name}: {missing}"


def test_repository_root_is_tool_configuration_only():
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert "project" not in config
    assert "build-system" not in config


@pytest.mark.parametrize("name", NAMES)
def test_each_package_takes_its_version_from_its_own_tags(name):
    config = tomllib.loads((REPO_ROOT / "packages" / name / "pyproject.toml").read_text())
    scm = config["tool"]["setuptools_scm"]
    assert scm["root"] == "../.."
    assert f"^{name}-v" in scm["tag_regex"]
    assert f"{name}-v*" in scm["scm"]["git"]["describe_command"]
    assert "fallback_version" in scm
    assert config["project"]["dynamic"] == ["version"]
