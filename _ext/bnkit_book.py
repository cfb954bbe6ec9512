"""Sphinx extension of this book, loaded from _config.yml (`sphinx: local_extensions`).

1. Learners' copies. At the start of every HTML build, each notebook in _toc.yml
   is turned into its learners' copy by tools/make_exercises.py (every solution
   replaced by a stub, no outputs, MyST turned into plain Markdown with the glued
   values filled in; the same file `make exercises` writes) and
   written to <html>/exercises/<name>.ipynb. So the published site always ships
   the copies of exactly the notebooks it shows. Every chapter page gets a line
   under its title that downloads its copy, and an entry in the theme's download
   menu; its Binder and Colab buttons open the copy too. The menu's .ipynb is the
   whole chapter converted the same way (solutions and outputs kept), written to
   <html>/notebooks/<name>.ipynb, not the MyST source. The solutions the book shows
   have no `### BEGIN/END SOLUTION` lines (the notebooks keep them).

2. The `chapter-list` directive (used by chapters/intro.md). Its content is YAML:
   for every planned chapter, `name: {title: ..., outcome: what the reader can
   do after it}` (the title is shown only while the chapter is not in the book).
   It renders the chapters in _toc.yml, in book order, each linked with {doc},
   with its outcome and its run time read from chapters/_runtimes.json (written
   by `make outputs`, tools/execute_notebooks.py; never typed by hand); then the
   planned chapters that are not in the book yet. A notebook in the toc with no
   outcome or no recorded run time is a warning (an error under -W).

3. Fixes of the theme's pages, found by tests/test_browser.py: scripts that
   jupyter-book 1 puts twice on every page (one throws), and pydata-sphinx-theme's
   empty default colour mode (a console error).

4. Every screen and every reader (checked by tests/test_browser.py, axe-core included):
   _static/bnkit-book.js makes the visible navigation buttons work (the theme binds only
   the first, hidden one) and _static/bnkit-book.css keeps pages within a phone's width;
   the templates in _ext/templates/ replace three of the theme's components whose
   accessible names or landmarks axe rejects; `accessible_body` fixes the page body's
   markup (the bibliography's list roles, empty table headers).
"""
from __future__ import annotations

import json
import posixpath
import re
import sys
from pathlib import Path

import nbformat
import yaml
from docutils import nodes
from docutils.statemachine import StringList
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from make_exercises import (  # noqa: E402
    EXERCISE, LEARNERS_DIR, ConversionError, SolutionMarkerError, learner_copy_of, read_book,
    rendered_copy, without_markers,
)
from execute_notebooks import RUNTIMES  # noqa: E402
from notebooks import toc_files  # noqa: E402

logger = logging.getLogger(__name__)

# The copies go to <html>/LEARNERS_DIR, the folder `make exercises` writes in the repository;
# the whole chapters, in plain Markdown (the download menu's .ipynb), to <html>/RENDERED_DIR.
RENDERED_DIR = "notebooks"
_n_exercises: dict[str, int] = {}  # docname -> number of {exercise} directives (set at builder-inited)


def _toc(app: Sphinx) -> Path:
    return Path(app.srcdir) / "_toc.yml"


def _toc_notebooks(app: Sphinx) -> dict[str, Path]:
    """docname -> path of every notebook in the toc, in book order."""
    srcdir = Path(app.srcdir)
    return {
        p.relative_to(srcdir).with_suffix("").as_posix(): p
        for p in toc_files(_toc(app)) if p.suffix == ".ipynb"
    }


# --- 1. learners' copies ---------------------------------------------------

def write_learners_copies(app: Sphinx) -> None:
    if app.builder.format != "html":
        return
    out, rendered = Path(app.outdir) / LEARNERS_DIR, Path(app.outdir) / RENDERED_DIR
    out.mkdir(parents=True, exist_ok=True)
    rendered.mkdir(parents=True, exist_ok=True)
    book = read_book(_toc(app))  # cross-references and citations, as plain Markdown links
    for docname, path in _toc_notebooks(app).items():
        if not path.exists():
            continue  # Sphinx itself reports a toc entry with no file
        nb = nbformat.read(path, as_version=4)
        _n_exercises[docname] = sum(len(EXERCISE.findall(c.source)) for c in nb.cells if c.cell_type == "markdown")
        try:
            copy = learner_copy_of(path, book, Path(app.srcdir))
            whole = learner_copy_of(path, book, Path(app.srcdir), make=rendered_copy)
        except (SolutionMarkerError, ConversionError) as e:
            raise ExtensionError(f"learners' copy of {path.name}: {e}") from None
        (out / path.name).write_text(nbformat.writes(copy) + "\n", encoding="utf-8")
        (rendered / path.name).write_text(nbformat.writes(whole) + "\n", encoding="utf-8")


def _learners_uri(docname: str, folder: str = LEARNERS_DIR) -> str:
    """Relative URL, from the page of `docname`, of its learners' copy (in folder)."""
    target = f"{folder}/{posixpath.basename(docname)}.ipynb"
    return posixpath.relpath(target, posixpath.dirname(docname) or ".")


def add_learners_link(app: Sphinx, doctree: nodes.document, docname: str) -> None:
    """Put a download line for the learners' copy under the chapter's title."""
    if app.builder.format != "html" or docname not in _toc_notebooks(app):
        return
    section = next(iter(doctree.findall(nodes.section)), None)
    if section is None:
        return
    name = posixpath.basename(docname) + ".ipynb"
    link = addnodes.download_reference("", "", nodes.literal(name, name), refuri=_learners_uri(docname))
    if _n_exercises.get(docname):
        words = ("Exercises: ", "download the learners' copy of this chapter, ",
                 ", in which every solution is replaced by a stub; the check cell after "
                 "each stub says whether your answer is right.")
    else:
        words = ("Run it yourself: ", "download this chapter's notebook, ", ", with its outputs cleared.")
    para = nodes.paragraph("", "", nodes.strong(words[0], words[0]), nodes.Text(words[1]), link, nodes.Text(words[2]))
    note = nodes.container("", para, classes=["bnkit-learners-copy"])
    index = 1 if section.children and isinstance(section[0], nodes.title) else 0
    section.insert(index, note)


def add_learners_button(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    """Add the learners' copy to the theme's download menu (after the theme filled it), and
    make its .ipynb the whole chapter in plain Markdown, not the MyST source."""
    if pagename not in _toc_notebooks(app):
        return
    for group in context.get("header_buttons", []):
        if group.get("label") == "download-buttons":
            for button in group["buttons"]:
                if button.get("label") == "download-source-button" and button.get("text") == ".ipynb":
                    button["url"] = _learners_uri(pagename, RENDERED_DIR)
                    button["tooltip"] = "Download this chapter as a notebook (solutions and outputs included)"
            group["buttons"].insert(0, {
                "type": "link",
                "url": _learners_uri(pagename),
                "text": "learners' .ipynb",
                "tooltip": "Download the learners' copy (solutions replaced by stubs)",
                "icon": "fas fa-pencil-alt",
                "label": "download-learners-copy-button",
            })


def point_launch_buttons(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    """Make the theme's Binder and Colab buttons open the chapter's learners' copy.

    Binder builds the repository's branch, whose binder/postBuild writes the copies to
    exercises/ (tools/make_exercises.py), so the button opens exercises/<name>.ipynb there.
    Colab opens a file of a GitHub branch: the copies the book's CI publishes on the branch
    `bnkit_learners_branch` (.github/workflows/book.yml), at exercises/<name>.ipynb."""
    if pagename not in _toc_notebooks(app):
        return
    source = f"{pagename}.ipynb"  # the theme's path, relative to the repository (path_to_book "")
    copy = f"{LEARNERS_DIR}/{posixpath.basename(pagename)}.ipynb"
    for group in context.get("header_buttons", []):
        if group.get("label") != "launch-buttons":
            continue
        for button in group["buttons"]:
            url = button.get("url", "")
            if button.get("text") == "Binder" and url.endswith(f"/{source}"):
                button["url"] = url[: -len(source)] + copy
                button["tooltip"] = "Launch the learners' copy on Binder"
            elif button.get("text") == "Colab" and "/blob/" in url and url.endswith(f"/{source}"):
                head = url.split("/blob/", 1)[0]
                button["url"] = f"{head}/blob/{app.config.bnkit_learners_branch}/{copy}"
                button["tooltip"] = "Launch the learners' copy on Colab"


def hide_solution_markers(app: Sphinx, doctree: nodes.document) -> None:
    """Drop the `### BEGIN SOLUTION` / `### END SOLUTION` lines from the code the book shows.

    The notebooks keep them (nbval runs the solutions; make_exercises cuts the stubs at
    them); a reader of a published solution only sees the code between them."""
    for block in list(doctree.findall(nodes.literal_block)):
        if not _in_cell_input(block):
            continue
        text = without_markers(block.astext())
        if text != block.astext():
            block.rawsource = text  # the HTML writer highlights rawsource
            block.children = [nodes.Text(text)]


def _in_cell_input(node: nodes.Node) -> bool:
    """Whether the node is the source of a notebook code cell (not a code block in the prose)."""
    parent = node.parent
    while parent is not None:
        if "cell_input" in parent.get("classes", []):
            return True
        parent = parent.parent
    return False


# --- 2. the chapter list of the introduction ---------------------------------

def _chapters(content: StringList) -> dict[str, dict]:
    """The directive's YAML: {name: {title: ..., outcome: ...}}, in the order written."""
    data = yaml.safe_load("\n".join(content)) or {}
    if not isinstance(data, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("title"), str) and isinstance(v.get("outcome"), str)
        for v in data.values()
    ):
        raise ValueError("expected YAML `name: {title: ..., outcome: ...}` for every chapter")
    return data


def _duration(seconds: int) -> str:
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min {seconds % 60:02d} s"


class ChapterList(SphinxDirective):
    has_content = True

    def run(self) -> list[nodes.Node]:
        toc, runtimes_file = _toc(self.env.app), RUNTIMES
        self.env.note_dependency(str(toc))
        self.env.note_dependency(str(runtimes_file))
        try:
            chapters = _chapters(self.content)
        except (ValueError, yaml.YAMLError) as e:
            return [self.state.document.reporter.warning(f"chapter-list: {e}", line=self.lineno)]
        runtimes = json.loads(runtimes_file.read_text()) if runtimes_file.exists() else {}
        srcdir = Path(self.env.srcdir)
        in_book = _toc_notebooks(self.env.app)

        lines, total = [], 0
        for docname, path in in_book.items():
            name = posixpath.basename(docname)
            key = path.relative_to(srcdir).as_posix()
            outcome = chapters.get(name, {}).get("outcome")
            if outcome is None:
                logger.warning(f"chapter-list: {key} is in _toc.yml but has no `{name}: ...` line "
                               f"saying what the reader can do after it", location=(self.env.docname, self.lineno))
                outcome = ""
            seconds = runtimes.get(key)
            if seconds is None:
                logger.warning(f"chapter-list: no recorded run time for {key} in "
                               f"{runtimes_file.relative_to(srcdir)}: run `make outputs` "
                               f"(or `python tools/execute_notebooks.py {key}`)",
                               location=(self.env.docname, self.lineno))
                when = "run time not measured yet"
            else:
                total += seconds
                when = f"runs in {_duration(seconds)} or less"
            lines.append(f"- {{doc}}`/{docname}` ({when}). After it you can {outcome}")
        if in_book and total:
            lines += ["", f"All {len(in_book)} chapters together run in {_duration(total)} or less."]

        names = {posixpath.basename(d) for d in in_book}
        coming = [c for n, c in chapters.items() if n not in names]
        if coming:
            lines += ["", "Coming (not in the book yet):", ""]
            lines += [f"- {c['title']}: you will be able to {c['outcome']}" for c in coming]

        container = nodes.container(classes=["bnkit-chapter-list"])
        self.state.nested_parse(StringList(lines, source=self.env.docname), self.content_offset, container)
        return [container]


# --- 3. fixes of the theme's pages -----------------------------------------------

def default_mode(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    """pydata-sphinx-theme writes `dataset.mode = ... || "{{ default_mode }}"`; with no
    default_mode in the context it logs "Got invalid theme mode" as a console error
    on every page a new reader opens. "auto" follows the reader's system setting."""
    context.setdefault("default_mode", "auto")


def dedupe_scripts(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    """sphinx-thebe's and sphinx-togglebutton's inline scripts end up twice on every
    page under jupyter-book 1 (filename None, then ""), and the second copy of
    sphinx-thebe's throws "Identifier 'THEBE_JS_URL' has already been declared"."""
    seen, unique = set(), []
    for script in context.get("script_files", []):
        key = (getattr(script, "filename", None) or "",  # None and "" both mean inline
               tuple(sorted((getattr(script, "attributes", None) or {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


# --- 4. every screen and every reader ----------------------------------------------

TEMPLATES = Path(__file__).resolve().parent / "templates"


def add_templates(app: Sphinx, config) -> None:
    """Put _ext/templates/ first, so its components replace the theme's of the same name."""
    config.templates_path = [str(TEMPLATES), *config.templates_path]


_EMPTY_TH = re.compile(r"<th(\s[^>]*)?>(\s*)</th>")


def accessible_body(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    """Docutils marks the bibliography `role="list"` with `role="doc-biblioentry"` entries,
    a deprecated role that is no list item (axe: aria-required-children, critical); a table's
    empty corner cell (a pandas index) is a header with no text (empty-table-header): it
    becomes a plain cell; the toggle of a folded (hide-input) cell is labelled "Toggle hidden
    content" while it shows "Show code cell source" (label-content-name-mismatch, serious):
    without the label its name is the text it shows."""
    body = context.get("body")
    if isinstance(body, str):
        body = body.replace('role="doc-biblioentry"', 'role="listitem"')
        body = body.replace('<summary aria-label="Toggle hidden content">', "<summary>")
        context["body"] = _EMPTY_TH.sub(r"<td\1>\2</td>", body)


def setup(app: Sphinx) -> dict:
    app.connect("builder-inited", write_learners_copies)
    app.connect("doctree-resolved", add_learners_link)
    app.connect("doctree-read", hide_solution_markers)
    # The theme adds the launch buttons at priority 501.
    app.add_config_value("bnkit_learners_branch", "learners", "html")
    app.connect("html-page-context", point_launch_buttons, priority=600)
    # The theme fills the download menu at priority 501.
    app.connect("html-page-context", add_learners_button, priority=600)
    app.add_directive("chapter-list", ChapterList)
    app.connect("html-page-context", default_mode)
    app.connect("html-page-context", dedupe_scripts, priority=900)
    app.connect("config-inited", add_templates)
    app.connect("html-page-context", accessible_body)
    app.add_js_file("bnkit-book.js")
    app.add_css_file("bnkit-book.css")
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
