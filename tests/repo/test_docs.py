"""The documentation site (``docs/``) is tested like code.

- Every ```python block of every page runs: a page's blocks run in order, as one script in a
  fresh interpreter (a reader runs a guide top to bottom), each line at its line number in
  the page, so a traceback points into the Markdown file.
- Every public name (each package's ``__all__``) has an entry in the API reference
  (``docs/api/*.rst``), a docstring of its own and a fully annotated signature; the
  reference documents nothing else. The strict Sphinx build (``tox -e docs``) checks the
  same from the rendered site, and fails on any warning.
- The installation page gives the README's two commands, and every ``invertible-train``
  command line shown on a page (``torchrun ... -m invertible_train`` included) is one the
  command's parser accepts.
- The link check the build runs on the rendered site finds a missing page and a missing
  anchor.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from markdown_blocks import code_blocks, page_script

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = REPO_ROOT / "docs"
PACKAGES = ("invertible_core", "invertible_models", "invertible_train")
PAGE_TIMEOUT_S = 300

PAGES = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.relative_to(DOCS).parts)
PAGES_WITH_CODE = [p for p in PAGES if code_blocks(p.read_text(encoding="utf-8"), "python")]


def test_the_guides_have_code_to_run():
    names = {p.relative_to(DOCS).as_posix() for p in PAGES_WITH_CODE}
    assert {"concepts.md", "guides/flows.md", "guides/transformers.md"} <= names, names


@pytest.mark.parametrize(
    "page", PAGES_WITH_CODE, ids=[p.relative_to(DOCS).as_posix() for p in PAGES_WITH_CODE]
)
def test_docs_page_code_runs(page: Path, tmp_path: Path):
    script = tmp_path / f"{page.stem}.md.py"  # a real file: torch.multiprocessing can spawn it
    script.write_text(page_script(page.read_text(encoding="utf-8")), encoding="utf-8")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="default")
    proc = subprocess.run(
        [sys.executable, script.name],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=PAGE_TIMEOUT_S,
        check=False,
    )
    where = f"{page.relative_to(REPO_ROOT)} (line numbers below are the page's)"
    assert proc.returncode == 0, f"{where}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def test_page_script_keeps_the_line_numbers_of_the_page():
    text = "# title\n\n```python\na = 1\n```\n\ntext\n\n```bash\nls\n```\n```python\nb = a\n```\n"
    lines = page_script(text).splitlines()
    assert lines[3] == "a = 1" and lines[12] == "b = a"
    assert [line for line in lines if line] == ["a = 1", "b = a"]


# -- the API reference ------------------------------------------------------------------------

DIRECTIVE = re.compile(
    r"^\.\. (?:autoclass|autofunction|autoexception|autodata|py:data|py:currentmodule)::\s*(\S+)",
    re.MULTILINE,
)


def reference_entries() -> dict[str, str]:
    """Qualified name -> reference page, for every entry of ``docs/api/*.rst``."""
    entries: dict[str, str] = {}
    for page in sorted((DOCS / "api").glob("*.rst")):
        module = ""
        for match in DIRECTIVE.finditer(page.read_text(encoding="utf-8")):
            name = match.group(1)
            if match.group(0).startswith(".. py:currentmodule::"):
                module = name
            else:
                entries[name if "." in name else f"{module}.{name}"] = page.name
    return entries


def public_objects() -> list[tuple[str, Any]]:
    found = []
    for package in PACKAGES:
        module = importlib.import_module(package)
        found += [(f"{package}.{name}", getattr(module, name)) for name in module.__all__]
    return found


PUBLIC = public_objects()
PUBLIC_IDS = [name for name, _ in PUBLIC]


@pytest.mark.parametrize("name", PUBLIC_IDS)
def test_every_public_name_has_a_reference_entry(name: str):
    package = name.split(".")[0].removeprefix("invertible_")
    assert name in reference_entries(), (
        f"{name} is public (in __all__) but has no entry in the API reference: add "
        f"'.. autoclass:: {name}' (or autofunction, autoexception) to docs/api/{package}.rst"
    )


def test_the_reference_documents_only_public_names():
    extra = sorted(set(reference_entries()) - set(PUBLIC_IDS))
    assert not extra, f"documented in docs/api but not in any __all__: {extra}"


def own_docstring(obj: Any) -> str | None:
    if isinstance(obj, str):  # __version__: documented by its py:data entry
        return "the version string"
    if inspect.isclass(obj):
        return vars(obj).get("__doc__")  # not inherited from a base class
    return getattr(obj, "__doc__", None)


@pytest.mark.parametrize(("name", "obj"), PUBLIC, ids=PUBLIC_IDS)
def test_every_public_name_has_a_docstring_of_its_own(name: str, obj: Any):
    doc = own_docstring(obj)
    assert doc and doc.strip(), f"{name} has no docstring: its reference entry would be empty"


def unannotated(fn: Any) -> list[str]:
    signature = inspect.signature(fn)
    missing = [
        p.name
        for p in signature.parameters.values()
        if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty
    ]
    if signature.return_annotation is inspect.Signature.empty:
        missing.append("the return value")
    return missing


def public_callables(name: str, obj: Any) -> list[tuple[str, Any]]:
    """The function, or a class's own ``__init__`` and public methods and properties."""
    if not inspect.isclass(obj):
        return [(name, obj)] if callable(obj) else []
    found = []
    for attr, value in vars(obj).items():
        if attr.startswith("_") and attr != "__init__":
            continue
        if attr == "__init__" and getattr(obj, "_is_protocol", False):
            continue  # typing.Protocol's placeholder
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, property):
            value = value.fget
        if inspect.isfunction(value):
            found.append((f"{name}.{attr}", value))
    return found


@pytest.mark.parametrize(("name", "obj"), PUBLIC, ids=PUBLIC_IDS)
def test_every_public_signature_is_annotated(name: str, obj: Any):
    missing = {
        where: params for where, fn in public_callables(name, obj) if (params := unannotated(fn))
    }
    assert not missing, f"the reference would show these without types: {missing}"


def test_an_unannotated_function_is_found():
    def f(a, b: int):  # type: ignore[no-untyped-def]
        return a

    assert unannotated(f) == ["a", "the return value"]


# -- the installation page and the rendered site ----------------------------------------------


def shell_commands(text: str) -> list[str]:
    lines = [line.strip() for _, body in code_blocks(text, "bash") for line in body.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_the_installation_page_gives_the_readme_quick_start_commands():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    quick_start = re.search(r"^## Quick start\s*$(.*?)(?=^## )", readme, re.M | re.S)
    assert quick_start
    readme_commands = shell_commands(quick_start.group(1))
    install = (DOCS / "installation.md").read_text(encoding="utf-8")
    first_block = code_blocks(install, "bash")[0][1]
    assert shell_commands(f"```bash\n{first_block}```\n") == readme_commands


def train_command_lines() -> list[tuple[str, list[str]]]:
    """(page, arguments) of every ``invertible-train`` command in the pages' shell blocks."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8").replace("\\\n", " ")
        for line in shell_commands(text):
            words = shlex.split(line.split(" #")[0])
            for start in ("invertible-train", "invertible_train"):
                if start in words:
                    found.append(
                        (page.relative_to(DOCS).as_posix(), words[words.index(start) + 1 :])
                    )
    return found


def test_every_train_command_on_a_page_parses(capsys: pytest.CaptureFixture[str]):
    from invertible_train.cli import build_parser

    commands = train_command_lines()
    assert len(commands) >= 5, commands
    for page, arguments in commands:
        try:
            build_parser().parse_args(arguments)
        except SystemExit as stop:  # --help and --version exit 0; an unknown option 2
            assert stop.code == 0, (
                f"{page}: invertible-train {shlex.join(arguments)}: {capsys.readouterr().err}"
            )


def load_site_links() -> ModuleType:
    path = DOCS / "_ext" / "site_links.py"
    spec = importlib.util.spec_from_file_location("site_links", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


def test_the_site_link_check_finds_missing_pages_and_anchors(tmp_path: Path):
    site_links = load_site_links()
    (tmp_path / "api").mkdir()
    (tmp_path / "index.html").write_text(
        '<a href="api/core.html#ReversibleSequence">ok</a> <a href="#top">ok</a>'
        '<a href="api/core.html#Gone">anchor</a> <a href="guides/x.html">page</a>'
        '<a href="https://example.org/nowhere">external, not followed</a>'
        '<a href="../outside.html">outside</a> <div id="top"></div>',
        encoding="utf-8",
    )
    (tmp_path / "api" / "core.html").write_text(
        '<dt id="ReversibleSequence"></dt><a href="../index.html#top">back</a>'
        '<link href="../_static/missing.css">',
        encoding="utf-8",
    )
    broken = {(b.page, b.href) for b in site_links.broken_links(tmp_path)}
    assert broken == {
        ("index.html", "api/core.html#Gone"),
        ("index.html", "guides/x.html"),
        ("index.html", "../outside.html"),
        ("api/core.html", "../_static/missing.css"),
    }
