"""Helpers shared by the exercise tests (tests/test_exercises*.py).

Every chapter's exercises are tested the same way: the solution written in the notebook
(between `### BEGIN SOLUTION` and `### END SOLUTION`) passes its checker, the stub that
`make exercises` (tools/make_exercises.py) puts in its place fails with "not implemented",
typical wrong answers fail with the message that names the mistake, the cells around an
exercise are laid out as the book expects, and the learners' copy holds no solution.
These functions read the notebooks, build the stubs and do the checks that are the same
for every chapter; what differs between chapters is a parameter.

The test modules import this one as `exercise_support` (pyproject.toml puts tests/ on
sys.path) after `pytest.register_assert_rewrite("exercise_support")`, so that the asserts
here report their values as the asserts in the tests do.
"""
from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path
from typing import Callable

import nbformat
import pytest

from bnkit.checks import (
    ch01_five_steps as ch01,
    ch02_test_time_problem as ch02,
    ch03_ewa as ch03,
    ch04_running_estimates as ch04,
    ch05_population_stats as ch05,
    ch06_robustness as ch06,
    ch07_backprop as ch07,
    ch08_folding as ch08,
    ch09_distributed as ch09,
    ch10_pitfalls as ch10,
)
from bnkit.checks._core import ExerciseError

REPO = Path(__file__).resolve().parent.parent
MAKE_EXERCISES = REPO / "tools" / "make_exercises.py"

# chapter -> {function (or class) a learner writes: its checker}, in the order of the exercises. A new
# exercise goes here (tests/test_exercises.py then tests its layout, solution, stub and copy)
# and its wrong and right answers into the chapter's module in ANSWERS.
EXERCISES = {
    "01_five_steps": {
        "my_batch_mean": ch01.batch_mean,
        "my_center": ch01.center,
        "my_batch_variance": ch01.batch_variance,
        "my_normalize": ch01.normalize,
        "my_scale_shift": ch01.scale_shift,
        "my_is_batch_normalized": ch01.is_batch_normalized,
    },
    "02_test_time_problem": {
        "my_predict_with_batch_stats": ch02.predict_with_batch_stats,
        "my_fraction_changed": ch02.fraction_changed,
    },
    "03_ewa": {
        "my_ema": ch03.ema,
        "my_convert_momentum": ch03.convert_momentum,
        "my_debiased_weight": ch03.debiased_weight,
    },
    "04_running_estimates": {
        "my_bn_infer": ch04.bn_infer,
        "my_update_running": ch04.update_running,
        "MyBatchNorm": ch04.batch_norm_layer,
    },
    "05_population_stats": {
        "my_merge": ch05.merge,
        "my_algorithm2": ch05.algorithm2,
        "my_layer_by_layer_stats": ch05.layer_by_layer_stats,
    },
    "06_robustness": {
        "my_steps_needed": ch06.steps_needed,
        "my_adabn": ch06.adabn,
    },
    "07_backprop": {
        "my_backward": ch07.backward,
        "my_directional_error": ch07.directional_error,
    },
    "08_folding": {
        "my_fold_linear": ch08.fold_linear,
        "my_fold_conv": ch08.fold_conv,
    },
    "09_distributed": {
        "my_merge": ch09.merge,
        "my_combine_variances": ch09.combine_variances,
    },
    "10_pitfalls": {
        "my_batch_stat_layers": ch10.batch_stat_layers,
        "my_stable_variance": ch10.stable_variance,
    },
}
# The test modules that hold each chapter's typical wrong answers (WRONG: a list of (checker,
# wrong answer, what the message must say)) and right answers written otherwise (RIGHT: a
# list of (checker, right answer)).
ANSWERS = {
    "01_five_steps": "test_exercises_five_steps",
    "02_test_time_problem": "test_exercises_ewa",
    "03_ewa": "test_exercises_ewa",
    "04_running_estimates": "test_exercises_population",
    "05_population_stats": "test_exercises_population",
    "06_robustness": "test_exercises_robustness",
    "07_backprop": "test_exercises_deploy",
    "08_folding": "test_exercises_deploy",
    "09_distributed": "test_exercises_distributed",
    "10_pitfalls": "test_exercises_pitfalls",
}


def chapter_path(chapter: str) -> Path:
    """chapters/<chapter>.ipynb."""
    return REPO / "chapters" / f"{chapter}.ipynb"


def chapter_number(chapter: str) -> str:
    """"4" for "04_running_estimates"."""
    return str(int(chapter[:2]))


def load_make_exercises():
    """tools/make_exercises.py, loaded by its path (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_exercises", MAKE_EXERCISES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_exercises = load_make_exercises()


# ---------------------------------------------------------------- a chapter's exercise cells


def read_notebook(path: Path) -> nbformat.NotebookNode:
    """The notebook at path, as nbformat version 4."""
    return nbformat.read(path, as_version=4)


def solution_cells(nb: nbformat.NotebookNode) -> list[str]:
    """The sources of the notebook's exercise cells: the code cells with a `### BEGIN SOLUTION`."""
    return [c.source for c in nb.cells if c.cell_type == "code" and make_exercises.BEGIN in c.source]


def notebook_imports(nb: nbformat.NotebookNode) -> str:
    """The import statements of the notebook's code cells, one a line: what its exercise cells see."""
    lines = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            for node in ast.parse(cell.source).body:
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    lines.append(ast.unparse(node))
    return "\n".join(lines)


def exercise_namespace(
    nb: nbformat.NotebookNode, transform: Callable[[str], str] | None = None, label: str = ""
) -> dict:
    """Run the notebook's imports, then its exercise cells, in a fresh namespace, and return it.

    transform: applied to each exercise cell's source first (`stub(...)` for the learners'
    version); None runs the solutions as written. Cell i is compiled with the file name
    `<{label} exercise cell {i}>` (`<exercise cell {i}>` without a label).
    """
    namespace: dict = {}
    exec(notebook_imports(nb), namespace)
    where = f"{label} exercise cell" if label else "exercise cell"
    for i, source in enumerate(solution_cells(nb)):
        exec(compile(transform(source) if transform else source, f"<{where} {i}>", "exec"), namespace)
    return namespace


def stub(prefix: str = "") -> Callable[[str], str]:
    """The transform `make exercises` applies to an exercise cell: each solution becomes
    `raise NotImplementedError(prefix + hint)` (prefix such as "Exercise 9.1: ")."""
    return lambda source: make_exercises.stub_solutions(source, prefix)


def defined_functions(nb: nbformat.NotebookNode) -> set[str]:
    """The names of the functions and classes the notebook's exercise cells define: what the
    learner writes."""
    defined = set()
    for source in solution_cells(nb):
        defined |= {n.name for n in ast.parse(source).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    return defined


# ---------------------------------------------------------------- the cells around an exercise


def exercise_prompts(nb: nbformat.NotebookNode, pattern: re.Pattern | None = None) -> list[int]:
    """The indices of the cells that open an exercise.

    Without pattern: the markdown cells with a ```` ```{exercise} ```` directive; with one
    (e.g. make_exercises.EXERCISE): every cell whose source the pattern matches.
    """
    if pattern is None:
        return [i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and "```{exercise}" in c.source]
    return [i for i, c in enumerate(nb.cells) if pattern.search(c.source)]


def assert_exercise_layout(
    nb: nbformat.NotebookNode,
    i: int,
    checker_module: str,
    name: str | None = None,
    first_line_only: bool = False,
) -> str:
    """Check the cells after the exercise prompt nb.cells[i], and return the exercise's label.

    They are: the opening of the gated solution (```` ```{solution-start} <label> ```` with
    `:class: dropdown`), the solution cell (solution markers and a `# HINT:`), the explanation
    that closes the gated solution (```` ```{solution-end} ````), and the check cell, which
    grades the exercise's functions with `{checker_module}.<checker>(<function>)`. So the book
    shows the solution code and its explanation in one collapsed dropdown.
    name: the function the exercise asks for (the solution cell must define it); None: every
    function the solution cell defines. first_line_only: the check must be on the check
    cell's first line.
    """
    label = re.search(r":label: (\S+)", nb.cells[i].source)[1]
    start, solution, end, check_cell = nb.cells[i + 1 : i + 5]
    assert start.cell_type == "markdown" and start.source.startswith(f"```{{solution-start}} {label}\n")
    assert ":class: dropdown" in start.source and "solution-end" not in start.source
    assert solution.cell_type == "code" and make_exercises.BEGIN in solution.source and "# HINT:" in solution.source
    assert "hide-input" not in solution.metadata.get("tags", [])  # the dropdown hides it
    if name is not None:
        assert f"def {name}(" in solution.source
        names = [name]
    else:
        names = [n.name for n in ast.parse(solution.source).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert end.cell_type == "markdown" and end.source.rstrip().endswith("```{solution-end}\n```")
    assert check_cell.cell_type == "code"
    graded = check_cell.source.splitlines()[0] if first_line_only else check_cell.source
    for function in names:  # the check cell grades every function of the exercise
        assert re.search(rf"{checker_module}\.\w+\({function}\)", graded), function
    return label


def assert_check_cell_follows_each_solution(nb: nbformat.NotebookNode, names) -> None:
    """The notebook has one exercise per function in names (at least two), and the cell that
    defines each function holds a solution with a hint, inside a gated dropdown solution
    (solution-start before it, solution-end after it), followed by a code cell that checks it."""
    sources = [c.source for c in nb.cells]
    assert sum(len(make_exercises.EXERCISE.findall(s)) for s in sources) == len(names) >= 2
    for name in names:
        i = next(k for k, s in enumerate(sources) if f"def {name}(" in s)
        assert make_exercises.BEGIN in sources[i] and "# HINT:" in sources[i]
        assert sources[i - 1].startswith("```{solution-start}") and ":class: dropdown" in sources[i - 1]
        assert sources[i + 1].rstrip().endswith("```{solution-end}\n```")
        assert nb.cells[i + 2].cell_type == "code" and f"({name})" in sources[i + 2]  # the check cell


# ---------------------------------------------------------------- the learners' copy


def learner_copy_text(nb: nbformat.NotebookNode, chapter: str) -> str:
    """The sources of the learners' copy of nb (chapter: its number, e.g. "9"), one after the
    other, after checking that no solution is left in them."""
    learner = make_exercises.learner_copy(nb, chapter)
    text = "\n".join(c.source for c in learner.cells)
    assert make_exercises.BEGIN not in text and "solution-start" not in text
    return text


def run_learner_copy(nb: nbformat.NotebookNode, chapter: str, folder: Path) -> nbformat.NotebookNode:
    """The learners' copy of nb, executed in a fresh python3 kernel started in folder, errors
    allowed (skips the test where nbclient is not installed)."""
    nbclient = pytest.importorskip("nbclient")
    copy = make_exercises.learner_copy(nb, chapter)
    client = nbclient.NotebookClient(
        copy, timeout=300, kernel_name="python3", allow_errors=True,
        resources={"metadata": {"path": str(folder)}},
    )
    client.execute()
    return copy


def assert_only_the_checks_fail(copy: nbformat.NotebookNode, marker: str) -> tuple[dict, list[int]]:
    """In an executed learners' copy, exactly the check cells (the code cells that contain
    marker, e.g. "check."), raised an error, each an ExerciseError saying "not implemented yet".
    Returns ({cell index: its error output}, the check cells' indices)."""
    errors = {i: o for i, c in enumerate(copy.cells) if c.cell_type == "code" for o in c.outputs if o.output_type == "error"}
    called = re.compile(rf"(?<![\w.]){re.escape(marker)}")  # "check." but not "gradcheck."
    checks = [i for i, c in enumerate(copy.cells) if c.cell_type == "code" and called.search(c.source)]
    assert sorted(errors) == checks
    for output in errors.values():
        assert output.ename == "ExerciseError" and "not implemented yet" in output.evalue
    return errors, checks


# ---------------------------------------------------------------- checkers' verdicts


def assert_one_success_line(out: str, says_correct: bool = True) -> None:
    """What a checker printed for a right answer: one line starting with "✓ " (which says
    "correct" unless says_correct is False)."""
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("✓ ")
    if says_correct:
        assert "correct" in lines[0]


def assert_stub_fails(checker: Callable, fn: Callable, name: str | None = None) -> ExerciseError:
    """checker rejects the stub fn with "not implemented yet" (a message that names the function
    to fill in, where name is given); returns the ExerciseError."""
    with pytest.raises(ExerciseError, match="not implemented yet") as info:
        checker(fn)
    if name is not None:
        assert name in str(info.value)  # the message names the function to fill in
    return info.value


def diagnosis(checker: Callable, wrong: Callable) -> str:
    """The message of the ExerciseError checker raises on the wrong answer (the test fails
    where it raises none)."""
    with pytest.raises(ExerciseError) as info:
        checker(wrong)
    return str(info.value)


def assert_two_diagnoses_each(wrong: list[tuple], checkers) -> None:
    """Each of checkers has at least two typical wrong answers in wrong, a list of
    (checker, wrong answer, message)."""
    counts = {checker: sum(c is checker for c, _, _ in wrong) for checker in checkers}
    assert all(n >= 2 for n in counts.values())
