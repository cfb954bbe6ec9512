"""Write the learners' copies of the book's notebooks, with the solutions taken out.

    python tools/make_exercises.py                   # every notebook in _toc.yml -> exercises/
    python tools/make_exercises.py --toc _toc.yml --out /tmp/exercises

In every code cell the lines from `### BEGIN SOLUTION` to `### END SOLUTION` (markers
included) become one stub at the marker's indentation,

    raise NotImplementedError("Exercise 1.2: <the text of the block's `# HINT:` line>")

where 1 is the chapter number (the notebook's leading digits) and 2 counts the
`{exercise}` directives so far. The sphinx-exercise solutions (`{solution-start}` ...
`{solution-end}`, also when they span cells, or a `{solution}` block) are removed from
the markdown (the code cells inside a gated solution stay, as stubs), and every output
and execution count is cleared. After the title comes a cell that installs bnkit and
myst-nb on Colab, and does nothing elsewhere. A BEGIN with no END is an error (exit status 1).

The markdown is turned into plain Markdown that JupyterLab, Jupyter Notebook and Colab
render as the book does (tools/plain_markdown.py): glued values filled in from the
notebook's stored outputs, "**Exercise 1.2** (title)", citations, cross-references and
admonitions; a last cell lists the works cited. A glue key, citation or label the book
does not hold is an error too. The same copies are the book's downloads and what its
Binder and Colab buttons open (_ext/bnkit_book.py).
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import re
import sys
from pathlib import Path

import nbformat
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from notebooks import REPO, TOC, toc_files, toc_notebooks  # noqa: E402
from plain_markdown import Book, ConversionError, Converter, chapter_number, glue_data  # noqa: E402

LEARNERS_DIR = "exercises"  # where `make exercises` writes the copies (and binder/postBuild)
BEGIN, END, HINT = "### BEGIN SOLUTION", "### END SOLUTION", "# HINT:"
DEFAULT_HINT = "replace this line with your code"
_FENCE = r"^(?P<fence>`{3,}|:{3,})\s*\{%s\}"  # a MyST directive opened by ``` or :::
EXERCISE = re.compile(_FENCE % "exercise", re.M)


class SolutionMarkerError(ValueError):
    """The solution markers of a cell do not pair up."""


def stub_solutions(source: str, prefix: str = "") -> str:
    """Replace each BEGIN/END SOLUTION block of a code cell's source by a NotImplementedError stub.

    The stub keeps the BEGIN marker's indentation; its message is ``prefix`` followed by the
    block's ``# HINT:`` text (or a default).
    """
    out: list[str] = []
    block: list[str] | None = None  # lines of the open solution block
    indent = ""
    for lineno, line in enumerate(source.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith(BEGIN):
            if block is not None:
                raise SolutionMarkerError(f"line {lineno}: {BEGIN!r} inside another solution block")
            block, indent, begin_line = [], line[: len(line) - len(line.lstrip())], lineno
        elif stripped.startswith(END):
            if block is None:
                raise SolutionMarkerError(f"line {lineno}: {END!r} with no {BEGIN!r} before it")
            hints = [b.strip()[len(HINT):].strip() for b in block if b.strip().startswith(HINT)]
            message = prefix + (hints[0] if hints else DEFAULT_HINT)
            out.append(f"{indent}raise NotImplementedError({json.dumps(message, ensure_ascii=False)})")
            block = None
        elif block is not None:
            block.append(line)
        else:
            out.append(line)
    if block is not None:
        raise SolutionMarkerError(f"line {begin_line}: {BEGIN!r} has no matching {END!r}")
    return "\n".join(out)


_START, _END, _PLAIN = (re.compile(_FENCE % name) for name in ("solution-start", "solution-end", "solution"))


def _strip(markdown: str, in_gate: bool) -> tuple[str, bool]:
    """strip_solutions for one cell of a notebook whose gated solution may span cells: in_gate
    says whether the cell starts inside a `{solution-start}` ... `{solution-end}` (the code cells
    between them are kept, as stubs); returns the kept text and whether the cell ends inside one."""
    lines, out, i = markdown.splitlines(), [], 0

    def skip_directive(i: int, fence: str) -> int:  # from a directive's opening line past its closing fence
        i += 1
        while i < len(lines) and lines[i].strip() != fence:
            i += 1
        return i + 1

    while i < len(lines):
        if in_gate:
            if m := _END.match(lines[i]):
                i, in_gate = skip_directive(i, m["fence"]), False
            else:
                i += 1  # the solution's text
        elif m := _START.match(lines[i]):
            i, in_gate = skip_directive(i, m["fence"]), True
        elif m := _PLAIN.match(lines[i]):  # a fenced {solution} block
            i = skip_directive(i, m["fence"])
        else:
            out.append(lines[i])
            i += 1
    return "\n".join(out).strip("\n"), in_gate


def strip_solutions(markdown: str) -> str:
    """Remove sphinx-exercise solutions from a markdown cell: gated ones and `{solution}` blocks."""
    text, in_gate = _strip(markdown, False)
    if in_gate:
        raise SolutionMarkerError("{solution-start} with no {solution-end} after it")
    return text


def read_book(toc: Path = TOC) -> Book:
    """The book of a _toc.yml (its documents, labels and references.bib), for cross-references."""
    root = toc.resolve().parent
    book = Book.read(root, toc_files(toc.resolve()), root / "references.bib")
    config = root / "_config.yml"
    if config.exists():
        book.repository = (yaml.safe_load(config.read_text()) or {}).get("repository", {}).get("url", "")
    return book


def colab_setup_cell(repository: str) -> nbformat.NotebookNode:
    """A code cell that, on Colab only, installs what a chapter imports besides Colab's own
    packages: bnkit with its course extra, from the book's repository, and myst-nb (`glue`)."""
    return nbformat.v4.new_code_cell(
        "# On Colab only: install bnkit and myst-nb, which the chapter imports. Binder, `make lab`\n"
        "# and the repository's .venv have them already; there this cell does nothing.\n"
        "import sys\n\n"
        'if "google.colab" in sys.modules:\n'
        f'    %pip install --quiet myst-nb "bnkit[course] @ git+{repository}"',
        id="colab-setup",
    )


@functools.lru_cache(maxsize=1)
def _default_book() -> Book:
    return read_book(TOC)


def learner_copy(nb: nbformat.NotebookNode, chapter: str = "", book: Book | None = None,
                 docname: str = "") -> nbformat.NotebookNode:
    """A copy of the notebook with stubs for solutions, no solution text, no outputs, and
    plain Markdown (tools/plain_markdown.py) in place of MyST.

    A gated solution may span cells (solution-start in one markdown cell, the solution code
    cell, solution-end and its explanation in the next markdown cell): the markdown between
    the two goes, the code cell stays as a stub. book (default: the book of _toc.yml) and
    docname ("chapters/04_running_estimates") resolve cross-references; glued values come
    from the notebook's own stored outputs. The works cited are listed in a last cell.
    """
    nb = copy.deepcopy(nb)
    markdown = Converter(book or _default_book(), docname, glue_data(nb), chapter)
    cells, exercise, in_gate = [], 0, False
    for index, cell in enumerate(nb.cells):
        try:
            if cell.cell_type == "markdown":
                exercise += len(EXERCISE.findall(cell.source))
                cell.source, in_gate = _strip(cell.source, in_gate)
                if not cell.source.strip():
                    continue  # the cell held only a solution
                cell.source, attachments = markdown.cell(cell.source)
                if attachments:
                    cell.attachments = attachments
            elif cell.cell_type == "code":
                label = f"{chapter}.{exercise}" if chapter else f"{exercise}"
                cell.source = stub_solutions(cell.source, f"Exercise {label}: " if exercise else "")
                cell.outputs, cell.execution_count = [], None
        except (SolutionMarkerError, ConversionError) as e:
            raise type(e)(f"cell {index}: {e}") from None
        cells.append(cell)
    if in_gate:
        raise SolutionMarkerError("{solution-start} with no {solution-end} after it")
    nb.cells = _finish(cells, markdown)
    return nb


def rendered_copy(nb: nbformat.NotebookNode, chapter: str = "", book: Book | None = None,
                  docname: str = "") -> nbformat.NotebookNode:
    """The whole chapter, solutions and outputs included, in plain Markdown as learner_copy
    writes it: what the book's ".ipynb" download gives. Solutions read "**Solution to
    Exercise 4.1**", and their code has no BEGIN/END SOLUTION lines; the values glued for
    the prose are left out of the outputs (the prose holds them)."""
    nb = copy.deepcopy(nb)
    markdown = Converter(book or _default_book(), docname, glue_data(nb), chapter)
    for index, cell in enumerate(nb.cells):
        try:
            if cell.cell_type == "markdown":
                cell.source, attachments = markdown.cell(cell.source)
                if attachments:
                    cell.attachments = attachments
            elif cell.cell_type == "code":
                cell.source = without_markers(cell.source)
                cell.outputs = [o for o in cell.outputs if not _glue_record(o)]
        except ConversionError as e:
            raise ConversionError(f"cell {index}: {e}") from None
    nb.cells = _finish([c for c in nb.cells if c.cell_type != "markdown" or c.source.strip()], markdown)
    return nb


def _glue_record(output: nbformat.NotebookNode) -> bool:
    """Whether the output is only a value myst_nb.glue stored for the prose (already filled in
    there): its MIME types are prefixed, so JupyterLab would say it has no renderer for it."""
    meta = output.get("metadata", {}).get("scrapbook")
    return bool(meta) and all(k.startswith(meta.get("mime_prefix") or "\0") for k in output.get("data", {}))


def without_markers(source: str) -> str:
    """A solution's code as the book shows it: the BEGIN/END SOLUTION lines left out."""
    return "\n".join(line for line in source.split("\n") if not line.strip().startswith((BEGIN, END)))


def _finish(cells: list, markdown: Converter) -> list:
    """The cells of a copy, with the list of the works cited last and, after the title,
    the cell that installs bnkit and myst-nb on Colab (where the chapter imports them)."""
    if references := markdown.references():
        cells.append(nbformat.v4.new_markdown_cell(references, id="references"))
    imports = "\n".join(c.source for c in cells if c.cell_type == "code")
    if markdown.book.repository and re.search(r"^\s*(from|import) (bnkit|myst_nb)\b", imports, re.M):
        first = 1 if cells and cells[0].cell_type == "markdown" else 0  # after the title
        cells.insert(first, colab_setup_cell(markdown.book.repository))
    return cells


def learner_copy_of(path: Path, book: Book | None = None, root: Path = REPO,
                    make=learner_copy) -> nbformat.NotebookNode:
    """The learners' copy of the notebook at path, in the book whose source folder is root
    (make=rendered_copy: the whole chapter, in plain Markdown)."""
    docname = path.resolve().relative_to(root.resolve()).with_suffix("").as_posix()
    return make(nbformat.read(path, as_version=4), chapter_number(path), book, docname)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toc", type=Path, default=TOC, help="the book's _toc.yml (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / LEARNERS_DIR, help="folder for the copies (default: %(default)s)")
    args = parser.parse_args(argv)
    notebooks = toc_notebooks(args.toc.resolve())
    book = read_book(args.toc)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in notebooks:
        if not path.exists():
            print(f"error: {path} is listed in {args.toc} but does not exist", file=sys.stderr)
            return 1
        try:
            learners = learner_copy_of(path, book, args.toc.resolve().parent)
        except (SolutionMarkerError, ConversionError) as e:
            print(f"error: {path}, {e}", file=sys.stderr)
            return 1
        target = args.out / path.name
        target.write_text(nbformat.writes(learners) + "\n", encoding="utf-8")
        print(f"{path.name} -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
