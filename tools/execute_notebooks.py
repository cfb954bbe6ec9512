"""Regenerate the stored outputs of the book's notebooks, in place.

    python tools/execute_notebooks.py                # every notebook in _toc.yml
    python tools/execute_notebooks.py chapters/x.ipynb ...
    python tools/execute_notebooks.py --times-only   # only re-measure the run times

Each notebook runs top to bottom in a fresh kernel (this Python's own ipykernel,
as nbval's --nbval-current-env does), in its own directory, with the fixed
environment of tools/notebooks.py. Volatile metadata (timestamps, Python patch
version, widget state) is stripped so a re-run with unchanged code leaves the
file unchanged and `git diff` shows only real changes.

Each notebook's run time (kernel start included, rounded up to 5 s) is recorded
in chapters/_runtimes.json, which the book's introduction shows (_ext/bnkit_book.py).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from notebooks import KERNELSPEC, REPO, apply_kernel_env, toc_notebooks, warm_matplotlib  # noqa: E402

CELL_TIMEOUT_S = 600
RUNTIMES = REPO / "chapters" / "_runtimes.json"  # {"chapters/x.ipynb": seconds}, rounded up to 5 s


def strip_volatile(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Remove what changes from run to run but is not an output."""
    nb.metadata.pop("widgets", None)
    nb.metadata.pop("toc-autonumbering", None)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    lang = nb.metadata.get("language_info", {})
    lang.pop("version", None)  # the Python patch version of whoever ran it
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # iopub/shell timestamps
        cell.metadata.pop("ExecuteTime", None)  # jupyterlab-execute-time
        cell.metadata.pop("collapsed", None)
        cell.metadata.pop("scrolled", None)
    return nb


def execute(path: Path, write: bool = True) -> float:
    """Run the notebook at `path` and write it back with fresh outputs (unless
    `write` is false); return how long it ran, in seconds."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",  # resolved to this interpreter's ipykernel
        resources={"metadata": {"path": str(path.parent)}},
        record_timing=False,
        allow_errors=False,  # a cell tagged raises-exception may still raise
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    nbformat.validate(nb)
    if write:
        path.write_text(nbformat.writes(strip_volatile(nb)) + "\n", encoding="utf-8")
    return seconds


def record_runtime(path: Path, seconds: float, runtimes: Path = RUNTIMES) -> None:
    """Store `seconds`, rounded up to 5 s, as the run time of `path` in `runtimes`."""
    data = json.loads(runtimes.read_text()) if runtimes.exists() else {}
    data[path.resolve().relative_to(REPO).as_posix()] = 5 * max(1, math.ceil(seconds / 5))
    runtimes.write_text(json.dumps(dict(sorted(data.items())), indent=1) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook in _toc.yml")
    parser.add_argument("--times-only", action="store_true",
                        help=f"run the notebooks and record their run times in {RUNTIMES.name}, but leave them unchanged")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or toc_notebooks()
    missing = [str(p) for p in notebooks if not p.exists()]
    if missing:
        print("missing notebooks: " + ", ".join(missing), file=sys.stderr)
        return 1
    apply_kernel_env()
    warm_matplotlib()
    for path in notebooks:
        print(f"executing {path} ...", end=" ", flush=True)
        seconds = execute(path.resolve(), write=not args.times_only)
        record_runtime(path, seconds)
        print(f"{seconds:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
