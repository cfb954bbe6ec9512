"""The layout: the library (bnkit/*.py) needs NumPy and PyTorch only, and imports nothing from
the course's helpers (bnkit/course) or the exercise checkers (bnkit/checks)."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = sorted((ROOT / "bnkit").glob("*.py"))
COURSE_ONLY = ("sklearn", "matplotlib", "bnkit.course", "bnkit.checks")

# Runs in a fresh interpreter in which importing scikit-learn or matplotlib (or the course's
# modules) fails, as in an environment where only `pip install .` was run.
WITHOUT_COURSE = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("sklearn", "matplotlib") or name.startswith(("bnkit.course", "bnkit.checks")):
            raise ImportError(f"{name} is not installed (blocked by the test)")
sys.meta_path.insert(0, Block())

import numpy as np, torch
import bnkit
from bnkit import distributed, gradcheck, recording, reference, running

z = np.random.default_rng(0).normal(size=(8, 3))
z_tilde, cache = reference.forward_train(z, np.ones(3), np.zeros(3))
dz, dgamma, dbeta = reference.backward(np.ones_like(z), cache)

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), bnkit.BatchNorm2d(4), torch.nn.ReLU(),
                            torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3), bnkit.BatchNorm1d(3))
x = torch.randn(16, 2, 6, 6)
model(x).sum().backward()                                    # a training step's forward/backward
bnkit.recompute_stats(model, [x[:8], x[8:]])
folded = bnkit.fold_bn(model)
model.eval()
assert torch.allclose(folded(x), model(x), atol=1e-5)
report = bnkit.doctor(model, [x[:8], x[8:]])                 # the audit, printed and as data
assert str(report).startswith(report.verdict) and report.to_dict()["layers"]
try:
    report.plot()                                            # plotting alone needs matplotlib
except ImportError as error:
    assert "blocked by the test" in str(error)
else:
    raise AssertionError("Report.plot ran without matplotlib")
assert not any(m.startswith(("sklearn", "matplotlib", "bnkit.course", "bnkit.checks")) for m in sys.modules)
print("ok")
"""


def test_the_library_runs_without_the_course_dependencies():
    out = subprocess.run([sys.executable, "-c", WITHOUT_COURSE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_the_block_in_that_test_works():
    """The blocking finder really hides the course's dependencies (so the test above can fail)."""
    code = WITHOUT_COURSE.split("import numpy")[0] + "import bnkit.course.data\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "blocked by the test" in out.stderr


def _imports(path: pathlib.Path, in_functions: bool = False) -> set[str]:
    """The modules ``path`` imports outside functions (or, with ``in_functions``, inside them)."""
    tree = ast.parse(path.read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inside = {id(n) for f in functions for n in ast.walk(f) if n is not f}
    names = set()
    for node in ast.walk(tree):
        if (id(node) in inside) != in_functions:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_no_library_module_imports_the_course_or_the_checkers():
    """Only a plotting function may import matplotlib, inside itself (Report.plot)."""
    assert LIBRARY, "no library modules found"
    for path in LIBRARY:
        bad = sorted(n for n in _imports(path) if n.startswith(COURSE_ONLY))
        bad += sorted(n for n in _imports(path, in_functions=True)
                      if n.startswith(COURSE_ONLY) and not n.startswith("matplotlib"))
        assert not bad, f"{path.name} imports {bad}"
    assert "matplotlib.pyplot" in _imports(ROOT / "bnkit" / "doctor.py", in_functions=True)


def test_the_package_needs_numpy_and_torch_and_the_course_is_an_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert sorted(project["dependencies"]) == ["numpy", "torch"]
    assert {"scikit-learn", "matplotlib"} <= set(project["optional-dependencies"]["course"])


def test_every_checker_module_is_named_after_a_chapter():
    chapters = {p.stem for p in (ROOT / "chapters").glob("*.ipynb")}
    checkers = {p.stem for p in (ROOT / "bnkit" / "checks").glob("ch*.py")}
    assert checkers and {c.removeprefix("ch") for c in checkers} <= chapters
