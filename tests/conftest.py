"""Fixtures shared by the book tests (test_book.py, test_links.py, test_browser.py).

`book` builds the book once per pytest session, as `make book` does it
(-W -n --keep-going), into a temporary directory (or, where $BNKIT_BOOK_OUT is set,
into $BNKIT_BOOK_OUT/_build/html, so that CI publishes the very HTML the tests
checked), and is shared by every test that needs the HTML.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# jupyter-book's console script, run by this interpreter.
JUPYTER_BOOK = [sys.executable, "-c", "import sys; from jupyter_book.cli.main import main; sys.exit(main())"]
BUILD_TIMEOUT_S = 900
# The build must need no network: every HTTP(S) request it might make goes to a closed port,
# fails, and so shows up as a warning, which fails test_builds_without_warnings.
_NOWHERE = "http://127.0.0.1:9"
OFFLINE_ENV = {**os.environ, **{k: _NOWHERE for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")},
               "no_proxy": "", "NO_PROXY": ""}


@pytest.fixture(scope="session")
def book(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """(the finished build process, the HTML folder)."""
    target = os.environ.get("BNKIT_BOOK_OUT")
    out = Path(target).resolve() if target else tmp_path_factory.mktemp("book")
    proc = subprocess.run(
        [*JUPYTER_BOOK, "build", "-W", "-n", "--keep-going", "--builder", "html",
         "--path-output", str(out), str(REPO)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, env=OFFLINE_ENV,
    )
    return proc, out / "_build" / "html"


@pytest.fixture(scope="session")
def html(book) -> Path:
    """The HTML folder of a build that succeeded (the tests that read the pages
    fail here, with the build's log, when it did not)."""
    proc, path = book
    if proc.returncode != 0 or not (path / "index.html").exists():
        pytest.fail("the book did not build:\n" + (proc.stdout + proc.stderr)[-4000:])
    return path
