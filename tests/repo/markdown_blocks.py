"""Fenced code blocks of Markdown files (the READMEs, the documentation site's pages), as the
tests that run them need them."""

from __future__ import annotations

import re

FENCE = re.compile(
    r"^```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL
)


def code_blocks(text: str, lang: str) -> list[tuple[int, str]]:
    """(line number of the opening fence, body) of each fenced block in ``lang``."""
    return [
        (text.count("\n", 0, m.start()) + 1, m.group("body"))
        for m in FENCE.finditer(text)
        if m.group("lang") == lang
    ]


def page_script(text: str, lang: str = "python") -> str:
    """The page's ``lang`` blocks as one script, each line at its line number in the page.

    Everything that is not code (prose, other blocks, the fences) becomes an empty line, so
    a traceback's line number is the line of the Markdown file, and the blocks run in order
    in one namespace, as a reader runs them.
    """
    lines = [""] * (text.count("\n") + 1)
    for fence_line, body in code_blocks(text, lang):
        for offset, source in enumerate(body.splitlines()):
            lines[fence_line + offset] = source  # the body starts on the line after the fence
    return "\n".join(lines).rstrip("\n") + "\n"
