"""The notebooks nbval checks are the ones the book shows, stored as `make
outputs` writes them.

nbval itself runs from `make test` (`pytest tests <notebooks in _toc.yml>
--nbval`, strict): it re-runs every cell and compares each output with the
stored one. These tests make sure that comparison means something: every
chapter notebook is in the toc, exists, and holds the outputs of one clean run
from top to bottom, without volatile metadata.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from execute_notebooks import strip_volatile  # noqa: E402
from notebooks import toc_files, toc_notebooks  # noqa: E402


def test_toc_files_exist():
    missing = [str(p.relative_to(REPO)) for p in toc_files() if not p.exists()]
    assert not missing, f"listed in _toc.yml but missing: {missing}"


def test_every_chapter_notebook_is_in_the_toc():
    listed = {p.resolve() for p in toc_notebooks()}
    orphans = [
        str(p.relative_to(REPO))
        for p in sorted((REPO / "chapters").glob("*.ipynb"))
        if p.resolve() not in listed
    ]
    assert not orphans, f"notebooks nbval would not check (add them to _toc.yml): {orphans}"


@pytest.fixture(params=[p for p in toc_notebooks() if p.exists()], ids=lambda p: p.name)
def notebook(request) -> tuple[Path, nbformat.NotebookNode]:
    path = request.param
    return path, nbformat.read(path, as_version=4)


def test_notebook_is_valid(notebook):
    _, nb = notebook
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.metadata["language_info"]["name"] == "python"


def test_outputs_come_from_one_run_top_to_bottom(notebook):
    """Execution counts 1, 2, 3, ... in cell order: the stored outputs are those
    of a fresh kernel that ran every cell once (as `make outputs` does)."""
    _, nb = notebook
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        "stored outputs are not from one run top to bottom; run `make outputs`"
    )


def test_no_volatile_metadata(notebook):
    """Nothing that changes from run to run is stored (timestamps, Python patch
    version), so a re-run with unchanged code gives an unchanged file."""
    _, nb = notebook
    stripped = strip_volatile(nbformat.from_dict(nb))
    assert stripped == nb, "volatile metadata stored; run `make outputs`"
