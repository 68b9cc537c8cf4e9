"""No module of a package imports, directly or through others, a module that imports it back.

A circle of imports works only as long as each module in it happens to be half-initialised
in the right order; it also means two concepts cannot be read apart. Every import counts
(at module level and inside functions: a lazy import hides a circle, it does not remove
it), except those under ``if TYPE_CHECKING:``, which never run. ``from package import name``
counts as importing ``package.name`` when that is a module, else the package's
``__init__``. Importing ``package.module`` runs the package's ``__init__`` first, but that
implicit step is not counted: the ``__init__`` that gathers a package's modules (as timm's
does) is the usual shape, not a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "invertible_core": REPO_ROOT / "packages/invertible-core/src/invertible_core",
    "invertible_models": REPO_ROOT / "packages/invertible-models/src/invertible_models",
    "invertible_train": REPO_ROOT / "packages/invertible-train/src/invertible_train",
}


def module_names(root: Path, package: str) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of a package."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join((package, *parts))] = path
    return names


def _runs(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except what sits under ``if TYPE_CHECKING:``."""
    found: list[ast.AST] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        found.append(node)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)
    return found


def imports_of(source: str, module: str, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that ``source`` (the text of ``module``) imports."""
    package = module.split(".")[0]
    is_init = module not in modules or any(m.startswith(module + ".") for m in modules)
    found = set()
    for node in _runs(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                base = module.split(".")
                base = base if is_init else base[:-1]
                base = base[: len(base) - node.level + 1]
                origin = ".".join([*base, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            if origin.split(".")[0] != package:
                continue
            for alias in node.names:
                target = f"{origin}.{alias.name}"
                found.add(target if target in modules else origin)
    return found & modules - {module}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected group of modules (Tarjan), as a path back to its start."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_path(graph, group) for group in groups]


def _path(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """A circle through the first module of ``group``, found breadth-first."""
    start = group[0]
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for target in sorted(graph[node] & set(group)):
            if target == start:
                return [*paths[node], start]
            if target not in paths:
                paths[target] = [*paths[node], target]
                queue.append(target)
    return group  # pragma: no cover - a strongly connected group always has a circle


def import_graph(package: str) -> dict[str, set[str]]:
    files = module_names(PACKAGES[package], package)
    modules = set(files)
    return {
        name: imports_of(path.read_text(encoding="utf-8"), name, modules)
        for name, path in files.items()
    }


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_circles_inside_a_package(package: str) -> None:
    found = [" -> ".join(circle) for circle in cycles(import_graph(package))]
    assert found == [], "import circles:\n" + "\n".join(found)


def test_the_models_registry_is_a_leaf() -> None:
    """timm's shape: the registry imports no model file; the model files import it."""
    graph = import_graph("invertible_models")
    assert graph["invertible_models.registry"] == set()
    assert "invertible_models.registry" in graph["invertible_models.resnet"]


def test_the_scan_finds_circles_lazy_ones_included_and_skips_type_checking() -> None:
    modules = {"p", "p.a", "p.b", "p.c", "p.d"}
    sources = {
        "p.a": "from p.b import thing\n",
        "p.b": "def later():\n    from p import c\n",
        "p.c": "from . import a\nif TYPE_CHECKING:\n    from p.d import Hint\n",
        "p.d": "import p.c\n",
        "p": "from p.a import thing\n",
    }
    graph = {name: imports_of(text, name, modules) for name, text in sources.items()}
    assert graph["p.b"] == {"p.c"} and graph["p.c"] == {"p.a"} and graph["p.d"] == {"p.c"}
    assert cycles(graph) == [["p.a", "p.b", "p.c", "p.a"]]
