"""No broken link in the built book, and the links an instructor hands out work.

Every href/src/action of every built page (third-party files under _static/
aside) that points into the site must name a file of the build, and its
#fragment must be an id (or name) in that file. External links are collected
and listed (in external-links.txt under the artefact folder, see test_browser.py)
but never fetched: the tests need no network.

Also checked: every chapter links to its learners' copy (solutions replaced by
stubs, as `make exercises` writes it), has Binder and Colab buttons for its own
notebook, every page has the repository button, the introduction lists every
chapter with its generated run time, and the bibliography lists the works cited.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from execute_notebooks import RUNTIMES  # noqa: E402
from make_exercises import BEGIN, learner_copy_of  # noqa: E402
from notebooks import toc_files, toc_notebooks  # noqa: E402

CONFIG = yaml.safe_load((REPO / "_config.yml").read_text())
URL_ATTRS = ("href", "src", "action", "poster", "data")


class Page(HTMLParser):
    """The ids and the links (tag, attribute, url, all attributes) of one HTML file."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[tuple[str, str, str, dict]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("id", "name"):
            if attrs.get(key):
                self.ids.add(attrs[key])
        for key in URL_ATTRS:
            if attrs.get(key) is not None and not (tag == "meta"):
                self.links.append((tag, key, attrs[key].strip(), attrs))

    handle_startendtag = handle_starttag


def pages(html: Path) -> dict[str, Page]:
    """Every built page but the theme's and MathJax's own files, by path relative to `html`."""
    return {
        p.relative_to(html).as_posix(): Page(p.read_text(encoding="utf-8"))
        for p in sorted(html.rglob("*.html")) if "_static" not in p.relative_to(html).parts
    }


@pytest.fixture(scope="module")
def site(html) -> dict[str, Page]:
    return pages(html)


def is_external(url: str) -> bool:
    return bool(urlsplit(url).scheme) or url.startswith("//")


def check_links(html: Path, site: dict[str, Page]) -> tuple[list[str], set[str]]:
    """(broken links, described; external URLs)."""
    broken, external, targets = [], set(), {}
    for name, page in site.items():
        for tag, attr, url, _ in page.links:
            if not url or url.startswith(("javascript:", "mailto:", "data:", "tel:")):
                continue
            if is_external(url):
                parts = urlsplit(url)
                if parts.hostname in ("127.0.0.1", "localhost"):
                    broken.append(f"{name}: <{tag} {attr}={url!r}> points to a local server")
                external.add(url)
                continue
            parts = urlsplit(url)
            path = unquote(parts.path)
            if path.startswith("/"):
                broken.append(f"{name}: <{tag} {attr}={url!r}> is absolute (breaks under a project URL)")
                continue
            target = posixpath.normpath(posixpath.join(posixpath.dirname(name), path)) if path else name
            if path.endswith("/") or (path and (html / target).is_dir()):
                target = posixpath.join(target, "index.html")
            if target.startswith("../") or not (html / target).is_file():
                broken.append(f"{name}: <{tag} {attr}={url!r}>: no file {target}")
                continue
            fragment = unquote(parts.fragment)
            if fragment and target.endswith(".html"):
                if target not in site and target not in targets:
                    targets[target] = Page((html / target).read_text(encoding="utf-8"))
                ids = (site.get(target) or targets[target]).ids
                if fragment not in ids:
                    broken.append(f"{name}: <{tag} {attr}={url!r}>: no id {fragment!r} in {target}")
    return broken, external


def test_no_broken_internal_link_or_anchor(html, site):
    broken, external = check_links(html, site)
    artifacts = Path(os.environ.get("BNKIT_ARTIFACTS") or REPO / "_build" / "screenshots")
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "external-links.txt").write_text("".join(f"{u}\n" for u in sorted(external)))
    print(f"{len(site)} pages; {len(external)} external links (not fetched), "
          f"listed in {artifacts / 'external-links.txt'}")
    assert len(site) >= len(toc_files())
    assert not broken, f"{len(broken)} broken links:\n" + "\n".join(broken)


def test_the_checker_finds_broken_links(tmp_path):
    """The checker itself: a missing file and a missing anchor are reported."""
    (tmp_path / "a.html").write_text('<p id="here"><a href="b.html#nowhere">x</a><a href="c.html">y</a>'
                                     '<a href="#here">z</a><a href="https://example.org/">w</a></p>')
    (tmp_path / "b.html").write_text('<p id="somewhere"></p>')
    broken, external = check_links(tmp_path, pages(tmp_path))
    assert len(broken) == 2 and "nowhere" in broken[0] and "c.html" in broken[1], broken
    assert external == {"https://example.org/"}


def _page(source: Path) -> str:
    return source.relative_to(REPO).with_suffix(".html").as_posix()


def test_every_chapter_links_to_its_learners_copy(html, site):
    notebooks = toc_notebooks()
    assert notebooks
    for nb_path in notebooks:
        name = _page(nb_path)
        downloads = [(url, attrs) for tag, attr, url, attrs in site[name].links
                     if tag == "a" and url.endswith(f"exercises/{nb_path.name}")
                     and not urlsplit(url).scheme]  # (the launch buttons open the copy too)
        assert downloads, f"{name} has no link to its learners' copy"
        assert any("download" in attrs for _, attrs in downloads), f"{name}: the learners' copy is not a download link"
        copy_path = html / posixpath.normpath(posixpath.join(posixpath.dirname(name), downloads[0][0]))
        copy = nbformat.read(copy_path, as_version=4)
        nbformat.validate(copy)
        expected = learner_copy_of(nb_path)
        assert copy == expected, f"{copy_path.name} differs from what `make exercises` writes"
        sources = "\n".join(c.source for c in copy.cells)
        assert BEGIN not in sources and "{solution-start}" not in sources
        assert not any(c.get("outputs") for c in copy.cells if c.cell_type == "code")


def test_every_chapter_has_launch_buttons(site):
    repo = CONFIG["repository"]["url"].rstrip("/")
    org_repo = urlsplit(repo).path.strip("/")
    branch = CONFIG["repository"]["branch"]
    binder = CONFIG["launch_buttons"]["binderhub_url"].rstrip("/")
    colab = CONFIG["launch_buttons"]["colab_url"].rstrip("/")
    learners = CONFIG["sphinx"]["config"]["bnkit_learners_branch"]
    for nb_path in toc_notebooks():
        name = _page(nb_path)
        urls = [url for tag, _, url, _ in site[name].links if tag == "a"]
        path = f"exercises/{nb_path.name}"  # the learners' copy (tests/test_learner_copies.py)
        assert any(u.startswith(f"{binder}/v2/gh/{org_repo}/{branch}?") and unquote(u).endswith(f"lab/tree/{path}")
                   for u in urls), f"{name}: no Binder button for {path}"
        assert f"{colab}/github/{org_repo}/blob/{learners}/{path}" in urls, f"{name}: no Colab button for {path}"
    for name, page in site.items():
        if name.endswith(("search.html", "genindex.html")) or name == "index.html":
            continue
        assert repo in [url for tag, _, url, _ in page.links if tag == "a"], f"{name}: no repository button"


def test_intro_lists_every_chapter_with_its_run_time(html):
    intro = (html / "chapters" / "intro.html").read_text(encoding="utf-8")
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", intro))
    runtimes = json.loads(RUNTIMES.read_text())
    for nb_path in toc_notebooks():
        key = nb_path.relative_to(REPO).as_posix()
        assert f'href="{nb_path.stem}.html"' in intro, f"the introduction does not link {key}"
        seconds = runtimes[key]
        assert seconds % 5 == 0 and seconds > 0
        assert re.search(rf"runs in {seconds} s or less\)\. After it you can \w", text) or \
            re.search(rf"runs in {seconds // 60} min {seconds % 60:02d} s or less", text), \
            f"the introduction does not give the run time of {key} ({seconds} s)"


def test_bibliography_lists_the_works_cited(html, site):
    bib = site["chapters/bibliography.html"]
    cited = set()
    for name, page in site.items():
        for tag, _, url, attrs in page.links:
            if tag == "a" and "bibliography.html#" in url:
                cited.add(unquote(urlsplit(url).fragment))
    assert cited, "no page cites a work"
    assert cited <= bib.ids, f"cited but not in the bibliography: {sorted(cited - bib.ids)}"
