"""The book's notebooks: which ones (from _toc.yml) and how they are run.

One source of truth for `make outputs` (tools/execute_notebooks.py), `make
test` (nbval, via tests/conftest.py) and the notebook tests, so the stored
outputs and the re-run that checks them see the same files and environment.

    python tools/notebooks.py      # prints the notebooks in _toc.yml, one a line
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
TOC = REPO / "_toc.yml"

# Environment of every kernel that runs a chapter, when outputs are stored and
# when nbval re-runs them: fixed hash seed, fixed thread counts (float sums
# depend on how work is split), no GPU even where one exists, no debugger noise.
KERNEL_ENV = {
    "PYTHONHASHSEED": "0",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    # The same SIMD code paths on every x86-64 machine with AVX2: float sums depend on the
    # vector width, so an AVX-512 machine would otherwise train to other numbers than the
    # AVX2 one that stored the outputs (seen: test accuracy 0.973 here, 0.976 stored).
    "ATEN_CPU_CAPABILITY": "avx2",  # PyTorch's own kernels
    # MKL (PyTorch's matrix products): conditional numerical reproducibility in the mode MKL
    # documents for Intel and non-Intel processors alike (COMPATIBLE), bitwise the same
    # whatever the arrays' alignment (STRICT). With "AVX2" an Intel Sapphire Rapids machine
    # gave other numbers in chapter 6 than the AMD machines that stored the outputs.
    "MKL_CBWR": "COMPATIBLE,STRICT",
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN (PyTorch's convolutions)
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",  # NumPy's AVX-512 dispatch
    "OPENBLAS_CORETYPE": "Haswell",  # OpenBLAS (NumPy's matrix products): its AVX2 kernels
    "CUDA_VISIBLE_DEVICES": "",
    "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    "MPLBACKEND": "module://matplotlib_inline.backend_inline",
}

# What a stored notebook's kernelspec says, whatever machine ran it.
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def _toc_files(entry: dict) -> list[str]:
    """The `file:` entries of a toc entry and all its children, in order."""
    files = [entry["file"]] if "file" in entry else []
    for key in ("chapters", "sections", "parts"):
        for child in entry.get(key, []) or []:
            files.extend(_toc_files(child))
    return files


def toc_files(toc: Path = TOC) -> list[Path]:
    """Every document in the toc, as a path; `name` without suffix resolves to an
    existing .md, .ipynb or .rst, and to name.ipynb where none exists (so that a
    missing notebook fails loudly rather than silently going untested)."""
    data = yaml.safe_load(toc.read_text())
    paths = []
    for name in [data["root"], *_toc_files(data)]:
        path = toc.parent / name
        if path.suffix not in (".md", ".ipynb", ".rst"):
            existing = [path.with_name(path.name + s) for s in (".md", ".ipynb", ".rst")]
            existing = [p for p in existing if p.exists()]
            path = existing[0] if existing else path.with_name(path.name + ".ipynb")
        paths.append(path)
    return paths


def toc_notebooks(toc: Path = TOC) -> list[Path]:
    """The .ipynb files listed in the toc, in book order."""
    return [p for p in toc_files(toc) if p.suffix == ".ipynb"]


def apply_kernel_env(environ=os.environ) -> dict:
    """Set KERNEL_ENV in `environ` (kernels started afterwards inherit it) and
    return the previous values, for `restore_env`."""
    saved = {key: environ.get(key) for key in KERNEL_ENV}
    environ.update(KERNEL_ENV)
    return saved


def restore_env(saved: dict, environ=os.environ) -> None:
    """Undo `apply_kernel_env`."""
    for key, value in saved.items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value


def warm_matplotlib() -> None:
    """Build matplotlib's font cache now, so that the first notebook cell that
    imports matplotlib does not print "Matplotlib is building the font cache"
    to stderr (an output nbval would then find missing from the stored one)."""
    import matplotlib.font_manager  # noqa: F401  (building the cache is the point)


if __name__ == "__main__":
    for nb in toc_notebooks():
        print(os.path.relpath(nb, Path.cwd()))
    sys.exit(0)
