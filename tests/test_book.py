"""The book builds with no warning, from the stored outputs, and needs no network.

One build (as `make book` does it: -W -n --keep-going) into a temporary
directory: the session fixture `book` of tests/conftest.py, shared with the link
and browser tests.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from notebooks import toc_files  # noqa: E402

def test_builds_without_warnings(book):
    proc, _ = book
    log = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)  # no colour codes
    warnings = [line for line in log.splitlines() if re.search(r"WARNING|ERROR|CRITICAL", line)]
    assert not warnings, "\n".join(warnings)
    assert proc.returncode == 0, log[-4000:]


def test_every_toc_page_is_built(book):
    _, html = book
    assert (html / "index.html").exists()
    for source in toc_files():
        page = html / source.relative_to(REPO).with_suffix(".html")
        assert page.exists(), f"{page.name} missing from the build"


def test_mathjax_is_served_locally(book):
    _, html = book
    assert (html / "_static" / "mathjax" / "tex-chtml.js").exists()
    for page in html.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        for src in re.findall(r"<script[^>]*\bsrc=\"([^\"]*mathjax[^\"]*)\"", text, flags=re.I):
            assert not re.match(r"(https?:)?//", src), f"{page.name} loads MathJax from {src}"


def test_no_page_loads_anything_from_the_network(book):
    """Scripts, stylesheets and images all come from the build itself, so the
    book renders offline (links to papers are fine: nothing fetches them)."""
    _, html = book
    remote = re.compile(r"^(?:https?:)?//", re.I)
    for page in html.rglob("*.html"):
        for tag in re.findall(r"<(?:script|img|link)\b[^>]*>", page.read_text(encoding="utf-8"), flags=re.I):
            url = re.search(r"\b(?:src|href)=\"([^\"]*)\"", tag)
            if not url or not remote.match(url.group(1)):
                continue
            rel = re.search(r"\brel=\"([^\"]*)\"", tag)
            if tag.lower().startswith("<link") and not (rel and re.search(r"stylesheet|preload|icon|modulepreload", rel.group(1))):
                continue  # e.g. <link rel="canonical">: not fetched
            pytest.fail(f"{page.relative_to(html)} fetches {url.group(1)}: {tag}")


def test_exercises_are_numbered_as_in_the_learners_copies(book):
    """The book numbers a chapter's exercises "Exercise <chapter>.<k>", k = 1, 2, ..., in page
    order, the numbers the stubs of `make exercises` quote (tools/make_exercises.py)."""
    _, html = book
    import make_exercises  # tools/ is on sys.path (above)
    import nbformat

    numbered = 0
    for source in toc_files():
        if source.suffix != ".ipynb":
            continue
        page = (html / source.relative_to(REPO).with_suffix(".html")).read_text(encoding="utf-8")
        shown = re.findall(r'<span class="caption-number">Exercise ([0-9.]+) </span>', page)
        cells = nbformat.read(source, as_version=4).cells
        n = sum(len(make_exercises.EXERCISE.findall(c.source)) for c in cells if c.cell_type == "markdown")
        chapter = make_exercises.chapter_number(source)
        assert shown == [f"{chapter}.{k}" for k in range(1, n + 1)], source.name
        numbered += len(shown)
    assert numbered >= 20
