"""The documentation build's own checks and link resolution (a Sphinx extension).

- **Public names resolve to their reference entry.** Signatures and docstrings name our
  classes by the module that defines them (``invertible_core.couplings.AdditiveCoupling``),
  while the reference documents each at its public name (``invertible_core.AdditiveCoupling``):
  a reference Sphinx cannot find is looked up by identity among the three packages'
  ``__all__`` and pointed at the public entry. A reference to an object that exists but is
  internal (``invertible_train.tasks.task_for``, a private base class in a signature) has no
  page to link to and renders as code. A reference to nothing (a typo, a renamed function)
  stays broken, and the strict build fails on it.
- **Napoleon reads docstrings, not attribute comments.** The ``#:`` comments of attributes
  are prose here, where napoleon would read ``the figure: more`` as a type and a
  description; the Google-style sections (``Args:``, ``Raises:``) of functions and classes
  are napoleon's.
- **Every public name has its entry.** After reading all pages, each name in the
  ``__all__`` of ``invertible_core``, ``invertible_models`` and ``invertible_train`` must be
  documented (``autoclass``, ``autofunction``, ``autoexception`` or ``py:data``) in the API
  reference; a missing one is a warning, so the strict build fails and names it.
- **No broken internal link.** After an HTML build, every page's internal links must lead to
  a page and an anchor that exist (``site_links.broken_links``).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from docutils import nodes
from site_links import broken_links
from sphinx.addnodes import pending_xref
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.ext.napoleon import _process_docstring as napoleon_process_docstring
from sphinx.util import logging

PACKAGES = ("invertible_core", "invertible_models", "invertible_train")

logger = logging.getLogger(__name__)


def public_names(package: str) -> list[str]:
    """``package.__all__``, qualified: ``["invertible_core.ActNorm", ...]``."""
    module = importlib.import_module(package)
    return [f"{package}.{name}" for name in module.__all__]


def _lookup(dotted: list[str]) -> tuple[bool, Any]:
    """The object at ``a.b.c``: the longest importable module prefix, then attributes."""
    for split in range(len(dotted), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(dotted[:split]))
        except ImportError:
            continue
        try:
            for attr in dotted[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False, None
        return True, obj
    return False, None


_aliases: dict[int, str] = {}


def public_alias(obj: Any) -> str | None:
    """The public name (``invertible_core.X``) of ``obj``, if one of ``__all__`` is it."""
    if not _aliases:
        for package in PACKAGES:
            module = importlib.import_module(package)
            for name in module.__all__:
                value = getattr(module, name)
                if not isinstance(value, str):  # __version__: strings are not identities
                    _aliases.setdefault(id(value), f"{package}.{name}")
    return _aliases.get(id(obj))


def resolve_public(
    app: Sphinx, env: BuildEnvironment, node: pending_xref, contnode: nodes.TextElement
) -> nodes.reference | None:
    """``missing-reference``: point a defining-module path at the public entry."""
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    if not target.startswith(tuple(f"{p}." for p in PACKAGES)):
        return None
    parts = target.split(".")
    domain = env.get_domain("py")
    exists = _lookup(parts)[0]
    for split in range(len(parts), 1, -1):
        found, obj = _lookup(parts[:split])
        if not found:
            continue
        alias = public_alias(obj)
        if alias is None:
            continue
        public = ".".join([alias, *parts[split:]])
        if public == target:
            return None
        ref = domain.resolve_xref(
            env, node["refdoc"], app.builder, node["reftype"], public, node, contnode
        )
        if ref is None:  # e.g. :func: for a class: any role that finds the entry will do
            ref = domain.resolve_any_xref(env, node["refdoc"], app.builder, public, node, contnode)
            ref = ref[0][1] if ref else None
        if ref is not None:
            return ref
        break
    return contnode if exists else None


def check_public_names(app: Sphinx, env: BuildEnvironment) -> None:
    """``env-check-consistency``: every name of the three ``__all__`` has its entry."""
    documented = set(env.get_domain("py").objects)
    for package in PACKAGES:
        for name in public_names(package):
            if name not in documented:
                logger.warning(
                    "public name %s has no entry in the API reference: add it to "
                    "docs/api/%s.rst (autoclass, autofunction, autoexception or py:data)",
                    name,
                    package.removeprefix("invertible_"),
                    type="invertible",
                    subtype="api",
                )


def check_links(app: Sphinx, exception: Exception | None) -> None:
    """``build-finished``: no internal link of the HTML site leads nowhere."""
    if exception is not None or app.builder.format != "html":
        return
    for link in broken_links(Path(app.outdir)):
        logger.warning("%s", link, type="invertible", subtype="links")


def napoleon_except_attributes(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    """napoleon's ``autodoc-process-docstring``, for everything but attributes."""
    if what not in ("attribute", "data", "property"):
        napoleon_process_docstring(app, what, name, obj, options, lines)


def setup(app: Sphinx) -> dict[str, Any]:
    app.setup_extension("sphinx.ext.napoleon")
    for listener in list(app.events.listeners["autodoc-process-docstring"]):
        if listener.handler is napoleon_process_docstring:
            app.disconnect(listener.id)
    app.connect("autodoc-process-docstring", napoleon_except_attributes)
    app.connect("missing-reference", resolve_public)
    app.connect("env-check-consistency", check_public_names)
    app.connect("build-finished", check_links)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
