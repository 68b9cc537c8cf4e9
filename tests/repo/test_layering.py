"""Each layer imports only from the layers below it.

    invertible_train   -> anything (torchvision, tqdm, tensorboard, ...)
    invertible_models  -> stdlib, torch, invertible_core (matplotlib only inside a function)
    invertible_core    -> stdlib, torch

Checked twice: statically, by reading every source file's imports (so a rarely run code
path cannot hide a forbidden import), and dynamically, by importing each package in a
fresh interpreter and looking at what ended up in ``sys.modules``.
"""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SRC = {
    "invertible_core": REPO_ROOT / "packages/invertible-core/src/invertible_core",
    "invertible_models": REPO_ROOT / "packages/invertible-models/src/invertible_models",
    "invertible_train": REPO_ROOT / "packages/invertible-train/src/invertible_train",
}
STDLIB = set(sys.stdlib_module_names)

# What each package may import at module level (its own name included).
ALLOWED = {
    "invertible_core": STDLIB | {"torch", "invertible_core"},
    "invertible_models": STDLIB | {"torch", "invertible_core", "invertible_models"},
}
# What it may import only where the import runs on demand (inside a function).
ALLOWED_LAZILY = {
    "invertible_core": set(),
    "invertible_models": {"matplotlib"},
}


def _imports(tree: ast.AST) -> list[tuple[str, int, bool]]:
    """(top-level module, line, inside a function or a TYPE_CHECKING block) per import."""
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            child_lazy = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for stmt in child.body:
                    visit_stmt(stmt, True)
                for stmt in child.orelse:
                    visit_stmt(stmt, lazy)
                continue
            visit_stmt(child, child_lazy)

    def visit_stmt(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((alias.name.split(".")[0], node.lineno, lazy) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node.lineno, lazy))
        visit(node, lazy)

    visit(tree, False)
    return found


def _violations(package: str) -> list[str]:
    bad = []
    for path in sorted(SRC[package].rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for module, line, lazy in _imports(tree):
            if module in ALLOWED[package]:
                continue
            if lazy and module in ALLOWED_LAZILY[package]:
                continue
            where = "inside a function" if lazy else "at module level"
            bad.append(f"{path.relative_to(REPO_ROOT)}:{line}: imports {module} {where}")
    return bad


def test_source_trees_exist():
    for package, path in SRC.items():
        assert (path / "__init__.py").is_file(), f"{package} has no source at {path}"


@pytest.mark.parametrize("package", ["invertible_core", "invertible_models"])
def test_source_imports_only_lower_layers(package):
    assert _violations(package) == []


def test_the_scan_sees_forbidden_imports():
    """The scanner itself: a checker that finds nothing must be able to find something."""
    source = (
        "import os\nimport torchvision\nfrom invertible_train import cli\n"
        "def plot():\n    import matplotlib.pyplot as plt\n"
        "if TYPE_CHECKING:\n    from numpy import ndarray\n"
    )
    found = _imports(ast.parse(source))
    assert found == [
        ("os", 1, False),
        ("torchvision", 2, False),
        ("invertible_train", 3, False),
        ("matplotlib", 5, True),
        ("numpy", 7, True),
    ]


@functools.cache
def _loaded_after(code: str) -> frozenset[str]:
    """Every module a fresh interpreter holds after running ``code`` (each asked once: an
    interpreter that imports torch costs seconds)."""
    code = f"{code}; import json, sys; print(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return frozenset(json.loads(proc.stdout.strip().splitlines()[-1]))


def _modules_after_import(package: str) -> set[str]:
    return {name.split(".")[0] for name in _loaded_after(f"import {package}")}


@pytest.mark.slow  # a fresh interpreter that imports torch
@pytest.mark.parametrize(
    ("package", "absent"),
    [
        (
            "invertible_core",
            {"torchvision", "invertible_models", "invertible_train", "matplotlib", "tensorboard"},
        ),
        ("invertible_models", {"torchvision", "invertible_train", "matplotlib", "tensorboard"}),
    ],
)
def test_importing_a_layer_loads_nothing_from_above_it(package, absent):
    loaded = _modules_after_import(package)
    assert package in loaded
    assert loaded & absent == set()


@pytest.mark.slow  # a fresh interpreter that imports torch
def test_importing_train_works():
    assert "invertible_train" in _modules_after_import("invertible_train")


#: the measuring machinery: the planner's fitting, costs and step, the memory measurement,
#: the profiler; none of it may load with the core or the training CLI
MEASURING = {
    "torch._dynamo",  # the compiler: seconds of CPU, needed only when something compiles
    "invertible_core.planner.fit",
    "invertible_core.planner.costs",
    "invertible_core.planner.step",
    "invertible_core.memory",
    "invertible_models.profiler",
    "invertible_models.memory_budget",
}


@pytest.mark.slow  # a fresh interpreter that imports torch (three)
def test_importing_the_core_or_the_training_cli_loads_no_measuring_machinery():
    assert _loaded_after("import invertible_core") & MEASURING == set()
    assert _loaded_after("import invertible_train.cli") & MEASURING == set()
    # the public names still come from the core, loaded on first use
    used = _loaded_after(
        "import invertible_core as c; c.fit_memory_budget, c.TrainingStep, c.measure_memory"
    )
    assert MEASURING - used == {
        "torch._dynamo",
        "invertible_models.profiler",
        "invertible_models.memory_budget",
    }
