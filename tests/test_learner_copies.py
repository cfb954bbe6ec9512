"""What a learner opens reads like the book: the learners' copies are plain Markdown.

The copies (`make exercises`, `make lab`, the book's "learners' .ipynb" downloads, what the
Binder and Colab buttons open) are written by tools/make_exercises.py, which turns MyST into
plain Markdown with tools/plain_markdown.py. Checked here:
- no MyST-only syntax is left in any copy (roles, directive fences, `(label)=` targets);
- every paragraph and table cell of every copy, rendered by a CommonMark renderer
  (markdown-it-py, with tables as JupyterLab renders them), is a paragraph of the book's HTML
  page, with the same glued numbers, exercise numbers, citations and cross-references;
- the published solutions show no `### BEGIN/END SOLUTION` lines, but their code;
- each construct's conversion, on small examples;
- the launch buttons open the learners' copies (README: "Binder and Colab").
"""
from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest
import yaml
from markdown_it import MarkdownIt

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from make_exercises import (  # noqa: E402
    BEGIN, END, learner_copy, learner_copy_of, read_book, rendered_copy,
)
from notebooks import toc_notebooks  # noqa: E402
from plain_markdown import ConversionError, Converter, Target, glue_data  # noqa: E402

NOTEBOOKS = toc_notebooks()
# The learners' copies, and the whole chapters in plain Markdown (the download menu's .ipynb).
MAKERS = {"learners": learner_copy, "whole": rendered_copy}
COMMONMARK = MarkdownIt("commonmark").enable("table")  # JupyterLab renders GFM tables too

# MyST that plain Markdown renderers show raw.
MYST_ONLY = {
    "role": re.compile(r"\{[A-Za-z][\w:.+-]*\}`"),
    "directive": re.compile(r"^[ \t>]*(`{3,}|~{3,}|:{3,})[ \t]*\{", re.M),
    "target": re.compile(r"^[ \t]*\([^()\s]+\)=[ \t]*$", re.M),
    "colon fence": re.compile(r"^[ \t>]*:::", re.M),
    "equation label": re.compile(r"^[ \t]*\$\$[ \t]*\([^()\s]+\)[ \t]*$", re.M),
}


def myst_constructs(source: str) -> dict[str, int]:
    return {kind: len(pattern.findall(source)) for kind, pattern in MYST_ONLY.items()}


def markdown_sources(nb: nbformat.NotebookNode) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


@pytest.mark.parametrize("make", MAKERS.values(), ids=MAKERS.keys())
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_myst_syntax_is_left_in_the_copy(path, make):
    source = markdown_sources(nbformat.read(path, as_version=4))
    copy = learner_copy_of(path, make=make)
    nbformat.validate(copy)
    left = {kind: n for kind, n in myst_constructs(markdown_sources(copy)).items() if n}
    assert not left, f"{path.name}'s learners' copy still holds MyST: {left}"
    tags = {c.id: c.metadata.get("tags") for c in nbformat.read(path, as_version=4).cells}
    assert all(c.metadata.get("tags") == tags[c.id] for c in copy.cells if c.id in tags)  # kept
    if "{glue" in source:  # the check sees what it must remove (it could fail)
        assert myst_constructs(source)["role"] > 0


class Paragraphs(HTMLParser):
    """The text of every <p>, <td> and <th> of an HTML page, normalised for comparison:
    math masked (MathJax's \\(...\\) in the book, $...$ in the copies), Sphinx's smart
    quotes and dashes made plain, white space collapsed."""

    BLOCKS = ("p", "td", "th")
    SMART = {"’": "'", "‘": "'", "“": '"', "”": '"', "–": "--", "—": "---", "…": "..."}

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.texts: list[str] = []
        self._depth, self._parts, self._skip = 0, [], False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        if tag in self.BLOCKS:
            self._depth += 1
            if self._depth == 1:
                self._parts = []
        self._skip = tag == "a" and "headerlink" in (dict(attrs).get("class") or "")  # the "#"

    def handle_endtag(self, tag):
        self._skip = False
        if tag in self.BLOCKS and self._depth:
            self._depth -= 1
            if not self._depth:
                self.texts.append(self.normalise("".join(self._parts)))

    def handle_data(self, data):
        if self._depth and not self._skip:
            self._parts.append(data)

    @classmethod
    def normalise(cls, text: str) -> str:
        text = re.sub(r"\\\(.*?\\\)|\$[^$]+\$", "§", text, flags=re.S)
        for smart, plain in cls.SMART.items():
            text = text.replace(smart, plain)
        return re.sub(r"\s+", " ", text).strip()


def _page(html: Path, path: Path) -> str:
    return (html / path.relative_to(REPO).with_suffix(".html")).read_text(encoding="utf-8")


@pytest.mark.parametrize("make", MAKERS.values(), ids=MAKERS.keys())
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_copy_renders_the_books_paragraphs(html, path, make):
    """Rendered by CommonMark, every paragraph of the copy is one of the book page's, with
    the same numbers: glued values, exercise numbers, citations, cross-references. Only
    display math is left out (MathJax and markdown-it escape it differently)."""
    book = set(Paragraphs(_page(html, path)).texts)
    source_ids = {c.id for c in nbformat.read(path, as_version=4).cells}
    compared = 0
    for cell in learner_copy_of(path, make=make).cells:
        if cell.cell_type != "markdown" or cell.id not in source_ids:
            continue  # the References cell is the copy's own
        for text in Paragraphs(COMMONMARK.render(cell.source)).texts:
            if text.startswith("$$") or not text.strip("$§ "):
                continue  # display math
            assert text in book, f"{path.name}, cell {cell.id}: not in the book's page:\n{text}"
            compared += 1
    assert compared >= 10


def test_glued_numbers_are_the_stored_values_formatted_as_in_the_book(html):
    """A sentence of chapter 4, with its glued numbers, is the same in the copy and the book."""
    path = REPO / "chapters" / "04_running_estimates.ipynb"
    nb = nbformat.read(path, as_version=4)
    glue = glue_data(nb)
    cell = next(c for c in nb.cells if c.cell_type == "markdown" and "{glue:text}`start_ema_1_10:.1f`" in c.source)
    copied = next(c for c in learner_copy_of(path).cells if c.id == cell.id).source
    value = format(float(glue["start_ema_1_10"]["text/plain"]), ".1f")
    sentence = f"PyTorch's variances are {value} times the batch variances"
    assert sentence in " ".join(copied.split())
    book = " ".join(Paragraphs(_page(html, path)).texts)
    assert sentence in book


def test_published_solutions_show_no_markers_but_their_code(html):
    for path in NOTEBOOKS:
        page = _page(html, path)
        assert BEGIN not in page and END not in page, f"{path.name}: the book shows a solution marker"
        text = re.sub(r"<[^>]+>", "", page)
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "code" and BEGIN in cell.source:
                solution = cell.source.split(BEGIN, 1)[1].split(END, 1)[0]
                last = [line.strip() for line in solution.splitlines() if line.strip()][-1]
                assert _unescape(last) in _unescape(text), f"{path.name}: solution line {last!r} not shown"


def test_the_download_menus_notebook_is_the_whole_chapter_in_plain_markdown(html):
    for path in NOTEBOOKS:
        page = _page(html, path)
        hrefs = re.findall(r'<a href="([^"]*)"[^>]*\bbtn-download-source-button\b', page)
        assert hrefs == [f"../notebooks/{path.name}"], f"{path.name}: the .ipynb download is {hrefs}"
        whole = nbformat.read(html / "notebooks" / path.name, as_version=4)
        assert whole == learner_copy_of(path, make=rendered_copy)
        code = [c for c in whole.cells if c.cell_type == "code"]
        assert any(c.outputs for c in code) and not any(BEGIN in c.source or END in c.source for c in code)
        mimes = {m for c in code for o in c.outputs for m in o.get("data", {})}
        assert not [m for m in mimes if "papermill" in m]  # the glued values are in the prose
        solutions = sum(c.source.count("**Solution to Exercise ") for c in whole.cells)
        assert solutions == markdown_sources(nbformat.read(path, as_version=4)).count("{solution-start}")


def _unescape(text: str) -> str:
    import html
    return " ".join(html.unescape(text).split())


# ------------------------------------------------------------------ each construct


def _glued(name: str, mime: dict) -> dict:
    prefix = "application/papermill.record/"  # how myst_nb.glue stores a value
    return nbformat.v4.new_output("display_data", data={prefix + k: v for k, v in mime.items()},
                                  metadata={"scrapbook": {"name": name, "mime_prefix": prefix}})


def _copy(markdown: str, outputs=(), chapter: str = "4", docname: str = "chapters/04_running_estimates"):
    code = nbformat.v4.new_code_cell("glue(...)", outputs=list(outputs))
    nb = nbformat.v4.new_notebook(cells=[code, nbformat.v4.new_markdown_cell(markdown)])
    return learner_copy(nb, chapter, read_book(), docname)


def test_glue_roles_take_the_stored_value_and_its_format():
    copy = _copy("ratio {glue:text}`r:.1f`, count {glue:text}`n`, raw {glue}`r`, pct {glue:text}`r:.0%`.",
                 [_glued("r", {"text/plain": "8.4171"}), _glued("n", {"text/plain": "110"})])
    assert copy.cells[1].source == "ratio 8.4, count 110, raw 8.4171, pct 842%."
    with pytest.raises(ConversionError, match="'missing'"):
        _copy("{glue:text}`missing`")


def test_glued_markdown_and_figures():
    table = "| a | b |\n|---|---|\n| 1 | {cite}`ioffe2015batch` |"
    copy = _copy("```{glue:md} t\n:format: myst\n```\n\n```{glue:figure} fig\n:name: f\n\nThe caption.\n```",
                 [_glued("t", {"text/markdown": table, "text/plain": "<Markdown>"}),
                  _glued("fig", {"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"})])
    source = copy.cells[1].source
    assert "| 1 | \\[[Ioffe and Szegedy, 2015](https://proceedings.mlr.press/v37/ioffe15.html)\\] |" in source
    assert "![The caption.](attachment:fig.png)" in source and "\n\nThe caption." in source
    assert copy.cells[1].attachments == {"fig.png": {"image/png": "iVBORw0KGgo="}}


def test_exercises_are_numbered_as_in_the_book():
    copy = _copy("```{exercise} First\n:label: ex-a\n\nDo $x$.\n```\n\n:::{exercise}\nAgain.\n:::", chapter="7")
    assert copy.cells[1].source == "**Exercise 7.1** (First)\n\nDo $x$.\n\n**Exercise 7.2**\n\nAgain."


def test_admonitions_become_block_quotes_with_nested_markup():
    copy = _copy("```{note}\nSee {math}`x^2`.\n\nTwo lines.\n```\n\n"
                 ":::{admonition} My title\n:class: tip\nBody.\n:::")
    assert copy.cells[1].source == "> **Note**\n>\n> See $x^2$.\n>\n> Two lines.\n\n> **My title**\n>\n> Body."
    html = COMMONMARK.render(copy.cells[1].source)
    assert html.count("<blockquote>") == 2 and "<strong>Note</strong>" in html
    # text right after the closing fence is a paragraph of its own, not part of the quote
    after = COMMONMARK.render(_copy("```{warning}\nCareful.\n```\nNext paragraph.").cells[1].source)
    assert after.endswith("</blockquote>\n<p>Next paragraph.</p>\n")


def test_citations_and_cross_references():
    copy = _copy("{cite:t}`wu2021rethinking` and {cite:p}`chan1983variance,ioffe2017renorm`; "
                 "see {doc}`05_population_stats`, {doc}`the start <04_running_estimates>`, "
                 "{ref}`ex-rob-1` and {numref}`Ex. %s <ex-rob-2>`.")
    assert copy.cells[1].source == (
        "Wu and Johnson \\[[2021](https://arxiv.org/abs/2105.07576)\\] and "
        "\\[[Chan et al., 1983](https://doi.org/10.1080/00031305.1983.10483115), Ioffe, 2017\\]; see "
        "[Population statistics](05_population_stats.ipynb), the start, "
        "[Exercise 6.1](06_robustness.ipynb) and [Ex. 6.2](06_robustness.ipynb).")
    references = copy.cells[-1].source
    assert references.startswith("## References") and references.count("\n- ") == 3
    for bad, message in (("{cite}`nobody2020`", "does not hold"), ("{doc}`99_nowhere`", "no such document"),
                         ("{ref}`no-label`", "no such label")):
        with pytest.raises(ConversionError, match=message):
            _copy(bad)


def test_math_targets_code_and_other_roles():
    source = ("(sec-a)=\n## A section\n\n$$\nx = 1\n$$ (eq-a)\n\n```{math}\ny = 2\n```\n\n"
              "```python\n{glue:text}`stays` in code\n```\n\nInline `{cite}` code, H{sub}`2`O, {term}`a term`, "
              "{py:func}`f <bnkit.f>`, {abbr}`BN (Batch Norm)`, {kbd}`Ctrl`.\n\n```{toctree}\nx\n```")
    copy = _copy(source).cells[1].source
    assert copy == ("## A section\n\n$$\nx = 1\n$$\n\n$$\ny = 2\n$$\n\n```python\n{glue:text}`stays` in code\n```"
                    "\n\nInline `{cite}` code, H<sub>2</sub>O, a term, `f`, BN, <kbd>Ctrl</kbd>.\n")
    book = read_book()
    book.equations["eq-a"] = Target("(1)", "chapters/x")
    assert Converter(book, "chapters/x").cell("see {eq}`eq-a`")[0] == "see (1)"


# ------------------------------------------------------------------ what the launch buttons open


def test_binder_and_colab_find_the_learners_copies():
    """The launch buttons (tests/test_links.py) open exercises/<chapter>.ipynb: on Binder the
    copies binder/postBuild writes, on Colab those CI pushes to the branch _config.yml names."""
    import make_exercises  # tools/ is on sys.path

    commands = [line for line in (REPO / "binder" / "postBuild").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert "python tools/make_exercises.py" in commands  # writes exercises/ (its default --out)
    assert make_exercises.LEARNERS_DIR == "exercises"
    branch = yaml.safe_load((REPO / "_config.yml").read_text())["sphinx"]["config"]["bnkit_learners_branch"]
    jobs = yaml.safe_load((REPO / ".github" / "workflows" / "book.yml").read_text())["jobs"]
    uploads = [s for s in jobs["test-and-build"]["steps"] if s.get("with", {}).get("name") == "learners-copies"]
    assert uploads and uploads[0]["with"]["path"].rstrip("/") == "_build/html/exercises"
    script = "\n".join(s.get("run", "") for s in jobs["learners-branch"]["steps"])
    assert f"git checkout --orphan {branch}" in script and f"git push --force origin {branch}" in script
    assert "git add exercises" in script and jobs["learners-branch"]["needs"] == "test-and-build"


def test_on_colab_the_copy_installs_what_it_imports():
    """A Colab runtime has torch, NumPy, scikit-learn and matplotlib, not bnkit or myst-nb: the
    copy's second cell installs them there (from the repository _config.yml names, which CI
    points at its own) and is a no-op elsewhere (the copies run in the exercise tests)."""
    from IPython.core.inputtransformer2 import TransformerManager

    repository = yaml.safe_load((REPO / "_config.yml").read_text())["repository"]["url"]
    for path in NOTEBOOKS:
        copy = learner_copy_of(path)
        setup = copy.cells[1]
        assert copy.cells[0].source.startswith("# ") and setup.cell_type == "code", path.name
        assert f'%pip install --quiet myst-nb "bnkit[course] @ git+{repository}"' in setup.source
        python = TransformerManager().transform_cell(setup.source)
        compile(python, path.name, "exec")
        namespace: dict = {}
        exec(python.replace("get_ipython()", "(1/0)"), namespace)  # not on Colab: no install
        assert "sys" in namespace


def test_constructs_the_chapters_do_not_use_yet_render_as_a_numbered_book_shows_them(tmp_path):
    """A small numbered book with what the chapters may use later (admonitions, labelled
    equations, a named figure, section labels, {numref}, {eq}, an exercise referred to from
    another chapter), built by jupyter-book: every paragraph of its copies is on its pages."""
    from conftest import JUPYTER_BOOK, OFFLINE_ENV

    (tmp_path / "_config.yml").write_text(
        'title: t\nexecute:\n  execute_notebooks: "off"\nparse:\n  myst_enable_extensions: '
        "[amsmath, colon_fence, dollarmath]\nsphinx:\n  extra_extensions: [sphinx_exercise]\n")
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: intro\noptions:\n  numbered: true\n"
                                       "chapters:\n  - file: 01_a\n  - file: 02_b\n")
    (tmp_path / "intro.md").write_text("# Intro\n")
    (REPO / "_static" / "favicon.svg").exists() and (tmp_path / "pic.svg").write_text(
        (REPO / "_static" / "favicon.svg").read_text())
    first = ["# First\n\nText.", "```{exercise} Try\n:label: ex-x\n\nDo it.\n```"]
    second = [
        "# Second\n\n(sec-x)=\n## Sub section\n\n$$\nx = 1\n$$ (eq-a)\n\n```{math}\n:label: eq-b\n\ny = 2\n```",
        "```{figure} pic.svg\n:name: fig-a\n\nThe caption.\n```\n\n:::{warning}\nA *warning*.\n:::",
        "See {eq}`eq-a`, {eq}`eq-b`, {numref}`fig-a`, {ref}`sec-x`, {numref}`sec-x`, {ref}`fig-a`, "
        "{numref}`Ex. %s <ex-x>` and {doc}`01_a`.",
    ]
    for name, cells in (("01_a", first), ("02_b", second)):
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(c) for c in cells])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, tmp_path / f"{name}.ipynb")
    proc = subprocess.run([*JUPYTER_BOOK, "build", "-W", "-n", "--builder", "html", str(tmp_path)],
                          capture_output=True, text=True, env=OFFLINE_ENV, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    book = read_book(tmp_path / "_toc.yml")
    for name in ("01_a", "02_b"):
        page = set(Paragraphs((tmp_path / "_build" / "html" / f"{name}.html").read_text()).texts)
        copy = learner_copy_of(tmp_path / f"{name}.ipynb", book, tmp_path)
        texts = [t for c in copy.cells if c.cell_type == "markdown"
                 for t in Paragraphs(COMMONMARK.render(c.source)).texts if t.strip("$§ ")]
        assert texts and not [t for t in texts if t not in page], (texts, page)
    copy = learner_copy_of(tmp_path / "02_b.ipynb", book, tmp_path)
    assert "\\tag{2.1}" in copy.cells[0].source and "\\tag{2.2}" in copy.cells[0].source
