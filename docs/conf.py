"""Sphinx configuration of the documentation site (``tox -e docs`` builds it).

The build is strict: ``tox -e docs`` runs ``sphinx-build -W --keep-going -n``, so any
warning (a broken cross-reference, a page in no table of contents, a docstring that does not
parse, a public name without a reference entry, a broken internal link in the rendered
HTML) fails it. Why Sphinx, and how the pages are tested: ``contributing/documentation.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))

import invertible_core  # noqa: E402  (the installed package; its version names the release)

project = "invertible"
author = "the invertible developers"
copyright = "the invertible developers, MIT licence"
release = invertible_core.__version__
version = release.split("+")[0]  # 0.1.0.dev165, without the local part

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",
    "invertible_docs",
    "benchmark_results.directives",
]

# Guides are Markdown (MyST); the API reference is reStructuredText, because autodoc
# generates reST from the docstrings, which are written in reST.
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]

# Strict: every cross-reference must resolve (nitpicky), except to the libraries below.
# Without network access there is no intersphinx inventory of Python's or PyTorch's docs, so
# their names in signatures render as plain text instead of links. Our own names must
# resolve: `invertible_docs` maps a defining module's path (invertible_core.couplings.X) to
# the public name (invertible_core.X) and reports anything else as broken.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|numpy|abc|collections\.abc|contextlib|pathlib|enum|argparse|os)(\..*)?"),
    (r"py:.*", r"(Tensor|Module|Parameter|Generator|Path|Enum|Callable|Iterable|Iterator)"),
    (r"py:.*", r"(Sequence|Mapping|MutableMapping|ContextManager|AbstractContextManager)"),
    (r"py:.*", r"(nn|torch)\..*"),
    (r"py:.*", r"(StrEnum|ArgumentParser|Namespace|Pool|Event)"),
    # the harness's checkpoint folders (one file per point, or DCP's sharded layout): the
    # type of Trainer.checkpoints, internal to invertible_train, rendered as plain text
    (r"py:class", r"(CheckpointStore|ShardedCheckpointStore)"),
]

# Types in the signature, as annotated (shortened: ``Tensor``, not ``torch.Tensor``).
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_member_order = "bysource"
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}
autodoc_class_signature = "mixed"
autodoc_inherit_docstrings = False
add_module_names = False
python_use_unqualified_type_names = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False

myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist"]

html_theme = "furo"
html_title = f"invertible {version}"
html_static_path: list[str] = []
html_theme_options = {
    "source_edit_link": None,
    "navigation_with_keys": True,
}
pygments_style = "sphinx"
pygments_dark_style = "monokai"
