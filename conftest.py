"""pytest set-up for the notebooks nbval runs (`make test`).

It lives at the repository root, not in tests/, because its hooks must apply to
chapters/*.ipynb: a conftest.py only affects the files under its own folder.

nbval starts one kernel per notebook and the kernel inherits this process's
environment; here that environment is made the one `make outputs` stored the
outputs with (tools/notebooks.py), only while the kernel starts, so that unit
tests in this process (which may use a GPU) are not affected.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent


def _load_tools_notebooks():
    spec = importlib.util.spec_from_file_location("_bnkit_tools_notebooks", REPO / "tools" / "notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


notebooks = _load_tools_notebooks()


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("nbval", default=False) or config.getoption("nbval_lax", default=False):
        notebooks.warm_matplotlib()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    if item.path.suffix != ".ipynb":  # not an nbval cell
        return (yield)
    saved = notebooks.apply_kernel_env()  # nbval starts the kernel in this setup
    try:
        return (yield)
    finally:
        notebooks.restore_env(saved)

