"""The exercise checkers are honest, and the learners' copies hold no solutions.

For every exercise of the chapters: the solution written in the notebook passes its
checker; the stub that `make exercises` puts in its place fails with "not implemented";
typical wrong answers fail with the message that names the mistake.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest

from bnkit import reference as ref
from bnkit.checks import ch01_five_steps
from bnkit.checks._core import Case, ExerciseError, check_function

pytest.register_assert_rewrite("exercise_support")
from exercise_support import (  # noqa: E402
    MAKE_EXERCISES,
    REPO,
    assert_exercise_layout,
    assert_one_success_line,
    assert_only_the_checks_fail,
    assert_stub_fails,
    assert_two_diagnoses_each,
    defined_functions,
    diagnosis,
    exercise_namespace,
    exercise_prompts,
    make_exercises,
    read_notebook,
    run_learner_copy,
    solution_cells,
    stub,
)

CHAPTER = REPO / "chapters" / "01_five_steps.ipynb"

# Every function a learner writes in a chapter, and the checker that grades it.
CHECKERS = {
    "my_batch_mean": ch01_five_steps.batch_mean,
    "my_center": ch01_five_steps.center,
    "my_batch_variance": ch01_five_steps.batch_variance,
    "my_normalize": ch01_five_steps.normalize,
    "my_scale_shift": ch01_five_steps.scale_shift,
}


# ---------------------------------------------------------------- the notebook's exercise cells


def _notebook() -> nbformat.NotebookNode:
    return read_notebook(CHAPTER)


@pytest.fixture(scope="module")
def solutions() -> dict:
    return exercise_namespace(_notebook())


@pytest.fixture(scope="module")
def stubs() -> dict:
    return exercise_namespace(_notebook(), stub())


def test_every_exercise_function_has_a_checker_here():
    """A new exercise in the chapter must be added to CHECKERS (and so to these tests)."""
    assert defined_functions(_notebook()) == set(CHECKERS)


def test_each_exercise_is_followed_by_its_check_and_a_hidden_solution():
    nb = _notebook()
    exercises = exercise_prompts(nb)
    assert len(exercises) >= 2
    for i in exercises:
        assert_exercise_layout(nb, i, "check")


@pytest.mark.parametrize("name", sorted(CHECKERS))
def test_solution_in_the_notebook_passes(name, solutions, capsys):
    assert CHECKERS[name](solutions[name]) is None
    assert_one_success_line(capsys.readouterr().out)


@pytest.mark.parametrize("name", sorted(CHECKERS))
def test_stub_fails_with_not_implemented(name, stubs):
    assert_stub_fails(CHECKERS[name], stubs[name], name)


# ---------------------------------------------------------------- typical wrong answers

AXES = lambda z: tuple(a for a in range(z.ndim) if a != 1)  # noqa: E731
VEC = lambda v, z: v.reshape((1, -1) + (1,) * (z.ndim - 2))  # noqa: E731

WRONG = [
    # step 1
    (ch01_five_steps.batch_mean, lambda z: z.mean(axis=1), "wrong axis"),
    (ch01_five_steps.batch_mean, lambda z: z.mean(axis=0), "over the batch axis only"),  # fine for (m, n), not 4-D
    (ch01_five_steps.batch_mean, lambda z: z.mean(axis=AXES(z), keepdims=True), "drop keepdims"),
    (ch01_five_steps.batch_mean, lambda z: z.sum(axis=AXES(z)), "did not divide by m"),
    (ch01_five_steps.batch_mean, lambda z: z.mean(), "one mean of all the values"),
    # step 2
    (ch01_five_steps.center, lambda z, mu: VEC(mu, z) - z, "wrong sign"),
    (ch01_five_steps.center, lambda z, mu: z + VEC(mu, z), "you added mu"),
    (ch01_five_steps.center, lambda z, mu: z - z.mean(axis=1, keepdims=True), "each example's own mean"),
    (ch01_five_steps.center, lambda z, mu: z - mu, "your function raised ValueError: operands could not be broadcast"),
    # step 3
    (ch01_five_steps.batch_variance, lambda x: x.var(axis=AXES(x), ddof=1), "you divided by m-1: at training time BN uses the biased 1/m"),
    (ch01_five_steps.batch_variance, lambda x: x.std(axis=AXES(x)), "standard deviation"),
    (ch01_five_steps.batch_variance, lambda x: x.mean(axis=AXES(x)), "square each value"),
    (ch01_five_steps.batch_variance, lambda x: (x**2).mean(axis=1), "wrong axis"),
    # step 4
    (ch01_five_steps.normalize, lambda x, var, eps: x / (np.sqrt(VEC(var, x)) + eps), "eps belongs inside the square root"),
    (ch01_five_steps.normalize, lambda x, var, eps: x / np.sqrt(VEC(var, x)), "you left out eps"),
    (ch01_five_steps.normalize, lambda x, var, eps: x / VEC(var + eps, x), "divided by the variance"),
    # step 5
    (ch01_five_steps.scale_shift, lambda x, g, b: VEC(b, x) * x + VEC(g, x), "gamma and beta are swapped"),
    (ch01_five_steps.scale_shift, lambda x, g, b: VEC(g, x) * x, "you left out beta"),
    (ch01_five_steps.scale_shift, lambda x, g, b: VEC(g, x) * (x + VEC(b, x)), "beta is added after scaling"),
    # steps 1-5 at once
    (ch01_five_steps.forward_train, lambda z, g, b, eps: ref.forward_train(z - z.mean(axis=1, keepdims=True), g, b, eps)[0], "wrong values"),
]


@pytest.mark.parametrize("checker, wrong, message", WRONG, ids=[f"{c.__name__}-{m[:30]}" for c, _, m in WRONG])
def test_typical_wrong_answer_is_diagnosed(checker, wrong, message):
    assert message in diagnosis(checker, wrong)


def test_every_checked_step_has_two_diagnosed_mistakes():
    assert_two_diagnoses_each(WRONG, CHECKERS.values())


def test_a_learners_exception_is_reported_without_bnkit_traceback():
    def my_batch_mean(z):
        return z.mean(axis=(0, 2, 3))  # right for 4-D, fails on (m, n)

    with pytest.raises(ExerciseError) as info:
        ch01_five_steps.batch_mean(my_batch_mean)
    message = str(info.value)
    assert message.startswith("batch_mean: your function raised AxisError")
    assert "return z.mean(axis=(0, 2, 3))" in message  # the learner's own line
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained traceback
    assert info.value._render_traceback_() == [f"ExerciseError: {message}"]  # what Jupyter shows


def test_returning_none_and_wrong_types_are_explained():
    with pytest.raises(ExerciseError, match="forget `return`"):
        ch01_five_steps.batch_variance(lambda z_new: None)
    with pytest.raises(ExerciseError, match="returned str, not an array of numbers"):
        ch01_five_steps.batch_mean(lambda z: "mu")
    with pytest.raises(ExerciseError, match="expected a function"):
        ch01_five_steps.batch_variance(3.0)


def test_learner_may_return_a_torch_tensor_or_modify_its_input():
    torch = pytest.importorskip("torch")
    ch01_five_steps.batch_mean(lambda z: torch.as_tensor(z).mean(dim=AXES(z)))

    def in_place(z, mu):
        z -= VEC(mu, z)  # changes the checker's copy only
        return z

    ch01_five_steps.center(in_place)


def test_exercise_error_is_an_assertion_error():
    assert issubclass(ExerciseError, AssertionError)


def test_forward_train_checker_accepts_the_reference():
    ch01_five_steps.forward_train(ref.forward_train)  # returns (z_tilde, cache): the checker takes z_tilde


def test_a_new_checker_is_a_few_lines(capsys):
    """check_function grades any function against a reference with a list of diagnoses."""
    cases = [Case("z of shape (3, 2)", (np.arange(6.0).reshape(3, 2),))]
    diagnoses = [(lambda z: z.sum(axis=0), "you summed: take the mean")]
    check_function("column_mean", lambda z: z.mean(axis=0), lambda z: z.mean(axis=0), cases, diagnoses)
    assert capsys.readouterr().out == "✓ column_mean: correct on 1 test cases\n"
    with pytest.raises(ExerciseError, match="column_mean: you summed: take the mean"):
        check_function("column_mean", lambda z: z.sum(axis=0), lambda z: z.mean(axis=0), cases, diagnoses)


# ---------------------------------------------------------------- tools/make_exercises.py


def test_stub_keeps_indentation_and_uses_the_hint():
    source = (
        "def f(z):\n"
        '    """Doc."""\n'
        "    ### BEGIN SOLUTION\n"
        "    # HINT: use z.mean\n"
        "    return z.mean()\n"
        "    ### END SOLUTION\n"
        "\n"
        "x = 1"
    )
    stubbed = make_exercises.stub_solutions(source, "Exercise 1.2: ")
    assert stubbed == 'def f(z):\n    """Doc."""\n    raise NotImplementedError("Exercise 1.2: use z.mean")\n\nx = 1'


def test_stub_without_hint_and_with_quotes():
    source = '### BEGIN SOLUTION\ny = "a"\n### END SOLUTION'
    assert make_exercises.stub_solutions(source) == f'raise NotImplementedError("{make_exercises.DEFAULT_HINT}")'
    quoted = '### BEGIN SOLUTION\n# HINT: say "hi" \\ there\n### END SOLUTION'
    stub = make_exercises.stub_solutions(quoted)
    with pytest.raises(NotImplementedError, match=r'say "hi" \\ there'):
        exec(stub)


@pytest.mark.parametrize(
    "source, message",
    [
        ("def f():\n    ### BEGIN SOLUTION\n    return 1\n", "has no matching"),
        ("### END SOLUTION\n", "with no"),
        ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n", "inside another"),
    ],
)
def test_unpaired_markers_are_errors(source, message):
    with pytest.raises(make_exercises.SolutionMarkerError, match=message):
        make_exercises.stub_solutions(source)


def test_solutions_are_removed_from_markdown():
    markdown = (
        "Before.\n"
        "```{solution-start} ex-a\n:class: dropdown\n```\nThe answer.\n```{solution-end}\n```\n"
        "Between.\n"
        ":::{solution} ex-b\nAnother answer.\n:::\n"
        "After."
    )
    assert make_exercises.strip_solutions(markdown) == "Before.\nBetween.\nAfter."


def test_a_gated_solution_spanning_cells_leaves_only_the_stubbed_code():
    """solution-start in one markdown cell, the code, solution-end with its explanation in the next."""
    cells = [
        nbformat.v4.new_markdown_cell("```{exercise} Do it\n:label: ex-a\n\nWrite f.\n```"),
        nbformat.v4.new_markdown_cell("```{solution-start} ex-a\n:class: dropdown\n```"),
        nbformat.v4.new_code_cell("def f():\n    ### BEGIN SOLUTION\n    # HINT: return 1\n    return 1\n    ### END SOLUTION"),
        nbformat.v4.new_markdown_cell("It returns one.\n\n```{solution-end}\n```\nAfter the solution."),
        nbformat.v4.new_code_cell("check(f)"),
    ]
    copy = make_exercises.learner_copy(nbformat.v4.new_notebook(cells=cells), "3")
    assert [c.source for c in copy.cells] == [
        "**Exercise 3.1** (Do it)\n\nWrite f.",  # plain Markdown (tests/test_learner_copies.py)
        'def f():\n    raise NotImplementedError("Exercise 3.1: return 1")',
        "After the solution.",
        "check(f)",
    ]
    with pytest.raises(make_exercises.SolutionMarkerError, match="no {solution-end}"):
        make_exercises.learner_copy(nbformat.v4.new_notebook(cells=cells[:3]))


def _run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(MAKE_EXERCISES), *args], capture_output=True, text=True, cwd=REPO)


def _book(tmp_path: Path, notebook: nbformat.NotebookNode) -> Path:
    """A throwaway book: chapters/intro.md, chapters/01_five_steps.ipynb, the book's
    references.bib (the chapter cites) and a _toc.yml."""
    (tmp_path / "chapters").mkdir()
    shutil.copy(REPO / "references.bib", tmp_path / "references.bib")
    (tmp_path / "chapters" / "intro.md").write_text("# Intro\n")
    nbformat.write(notebook, tmp_path / "chapters" / "01_five_steps.ipynb")
    toc = tmp_path / "_toc.yml"
    toc.write_text("format: jb-book\nroot: chapters/intro\nchapters:\n  - file: chapters/01_five_steps\n")
    return toc


def test_learners_copy_has_stubs_and_no_solutions_or_outputs(tmp_path):
    nb = _notebook()
    toc = _book(tmp_path, nb)
    result = _run_script("--toc", str(toc), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    copy = nbformat.read(tmp_path / "out" / "01_five_steps.ipynb", as_version=4)
    text = nbformat.writes(copy)

    assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text
    assert "solution-start" not in text and "solution-end" not in text
    solution_lines = set()  # every line written between the markers in the chapter
    for source in solution_cells(nb):
        inside = False
        for line in source.splitlines():
            if make_exercises.BEGIN in line or make_exercises.END in line:
                inside = make_exercises.BEGIN in line
            elif inside and line.strip():
                solution_lines.add(line.strip())
    code = "\n".join(c.source for c in copy.cells if c.cell_type == "code")
    assert not [line for line in solution_lines if line in code]
    for cell in copy.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
    stubs = re.findall(r'raise NotImplementedError\("Exercise 1\.(\d): ', code)
    assert len(stubs) == len(CHECKERS) and set(stubs) == {"1", "2"}
    assert len(re.findall(r"\*\*Exercise 1\.[12]\*\*", text)) == 2  # the prompts stay, as plain Markdown
    assert all(f"({name})" in code for name in CHECKERS)  # and the check cells
    # only each exercise's two gate cells (its markdown) are gone; a last cell lists the works cited
    assert len(copy.cells) == len(nb.cells) - 4 + 1 and copy.cells[-1].source.startswith("## References")


def test_script_reads_the_real_toc(tmp_path):
    result = _run_script("--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "01_five_steps.ipynb").exists()


def test_script_fails_clearly_on_begin_without_end(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("def f():\n    ### BEGIN SOLUTION\n    return 1")])
    toc = _book(tmp_path, nb)
    result = _run_script("--toc", str(toc), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "01_five_steps.ipynb" in result.stderr and "has no matching '### END SOLUTION'" in result.stderr


def test_learners_copy_runs_and_only_the_checks_fail(tmp_path):
    """In the learners' copy every cell runs except the check cells, which say 'not implemented'."""
    copy = run_learner_copy(_notebook(), "1", CHAPTER.parent)
    errors, _ = assert_only_the_checks_fail(copy, "check.")
    for output in errors.values():
        assert output.traceback == [f"ExerciseError: {output.evalue}"]  # no traceback into bnkit
