"""Broken internal links in a rendered HTML site: a link to a page that is not there, or to
an anchor that its page does not have.

Standard library only, so that the tests (tests/repo/test_docs.py) use it without Sphinx;
the documentation build runs it on every page it wrote (``invertible_docs``), and
``python docs/_ext/site_links.py BUILD_DIR`` checks a built site from the command line.
External links (``http:``, ``https:``, ``mailto:``, ``//host``) are not followed: the build
has no network, and they are not ours to keep.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

__all__ = ["BrokenLink", "broken_links"]

# (tag, attribute) pairs that point at another file of the site
_LINKING = {("a", "href"), ("link", "href"), ("script", "src"), ("img", "src"), ("iframe", "src")}


@dataclass(frozen=True)
class BrokenLink:
    """``href`` on ``page`` (a path relative to the site's root) leads nowhere: ``reason``."""

    page: str
    href: str
    reason: str

    def __str__(self) -> str:
        return f"{self.page}: broken link {self.href!r}: {self.reason}"


class _Page(HTMLParser):
    """The anchors (``id`` and ``<a name>``) a page defines and the links it makes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.anchors: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value is None:
                continue
            if name == "id" or (tag == "a" and name == "name"):
                self.anchors.add(value)
            elif (tag, name) in _LINKING:
                self.links.append(value)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8", errors="replace"))
    page.close()
    return page


def _is_external(href: str) -> bool:
    parts = urlsplit(href)
    return bool(parts.scheme) or href.startswith("//")


def broken_links(site: Path) -> list[BrokenLink]:
    """Every internal link of every ``*.html`` file under ``site`` that leads nowhere.

    A link leads nowhere when its file does not exist under ``site`` (a folder counts when it
    holds an ``index.html``), when it climbs out of ``site``, or when its ``#fragment`` is not
    an ``id`` (or ``<a name>``) of the page it points to. A bare ``#`` is the top of the page.
    """
    site = site.resolve()
    pages = {path: _parse(path) for path in sorted(site.rglob("*.html"))}
    broken: list[BrokenLink] = []
    for path, page in pages.items():
        where = path.relative_to(site).as_posix()
        for href in page.links:
            if _is_external(href):
                continue
            parts = urlsplit(href)
            target = path if not parts.path else (path.parent / unquote(parts.path)).resolve()
            if target != site and site not in target.parents:
                broken.append(BrokenLink(where, href, "it points outside the site"))
                continue
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(BrokenLink(where, href, "no such file"))
                continue
            fragment = unquote(parts.fragment)
            if not fragment or target.suffix != ".html":
                continue
            anchors = pages[target].anchors if target in pages else _parse(target).anchors
            if fragment not in anchors:
                broken.append(
                    BrokenLink(
                        where, href, f"{target.relative_to(site).as_posix()} has no #{fragment}"
                    )
                )
    return broken


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python docs/_ext/site_links.py BUILD_DIR", file=sys.stderr)
        return 2
    site = Path(argv[0])
    if not site.is_dir():
        print(f"{site}: no such folder (build the site first: tox -e docs)", file=sys.stderr)
        return 2
    broken = broken_links(site)
    for link in broken:
        print(link)
    pages = sum(1 for _ in site.rglob("*.html"))
    print(f"{pages} pages, {len(broken)} broken internal links")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
