"""The exercise checkers are honest, and the learners' copies hold no solutions.

For every exercise of every chapter (the table exercise_support.EXERCISES): the cells around
it are laid out as the book expects; the solution written in the notebook passes its checker;
the stub that `make exercises` puts in its place fails with "not implemented"; the learners'
copy holds no solution; the typical wrong answers of the chapter's module in
exercise_support.ANSWERS fail with the message that names the mistake, and its right answers
written otherwise pass. Also: the checkers' shared machinery (bnkit.checks._core) and
tools/make_exercises.py.
"""
from __future__ import annotations

import importlib
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
    ANSWERS,
    EXERCISES,
    MAKE_EXERCISES,
    REPO,
    assert_exercise_layout,
    assert_only_the_checks_fail,
    assert_stub_fails,
    chapter_number,
    chapter_path,
    defined_functions,
    diagnosis,
    exercise_namespace,
    exercise_prompts,
    learner_copy_text,
    make_exercises,
    read_notebook,
    run_learner_copy,
    solution_cells,
    stub,
)

ALL = [(chapter, name) for chapter, names in EXERCISES.items() for name in names]
MIN_WRONG, MIN_RIGHT = 7, 2  # typical wrong answers and right answers written otherwise, each
# chapters whose learners' copy is executed here (a kernel per chapter: the slow ones are left out)
RUN_COPIES = ["04_running_estimates", "05_population_stats", "07_backprop", "08_folding", "10_pitfalls"]  # and 1

WRONG = [(chapter, *row) for chapter in EXERCISES for row in importlib.import_module(ANSWERS[chapter]).WRONG
         if row[0] in EXERCISES[chapter].values()]
RIGHT = [(chapter, *row) for chapter in EXERCISES for row in importlib.import_module(ANSWERS[chapter]).RIGHT
         if row[0] in EXERCISES[chapter].values()]


def _id(chapter, checker, answer, *_) -> str:
    return f"{chapter[:2]}-{checker.__name__}-{getattr(answer, '__name__', 'answer')}"


def _namespace(chapter: str, transform=None) -> dict:
    return exercise_namespace(read_notebook(chapter_path(chapter)), transform, label=chapter)


@pytest.fixture(scope="module")
def solutions() -> dict:
    return {chapter: _namespace(chapter) for chapter in EXERCISES}


# ---------------------------------------------------------------- every exercise of every chapter


@pytest.mark.parametrize("chapter", EXERCISES)
def test_every_exercise_function_has_a_checker_in_the_table(chapter):
    """A new exercise in a chapter must be added to exercise_support.EXERCISES."""
    assert defined_functions(read_notebook(chapter_path(chapter))) == set(EXERCISES[chapter])


@pytest.mark.parametrize("chapter", EXERCISES)
def test_each_exercise_is_followed_by_a_hidden_solution_and_its_check(chapter):
    nb = read_notebook(chapter_path(chapter))
    prompts = exercise_prompts(nb)
    assert prompts == exercise_prompts(nb, make_exercises.EXERCISE) and len(prompts) >= 2
    one = [len(re.findall(r"^(def|class) ", nb.cells[i + 2].source, re.M)) == 1 for i in prompts]
    labels = [assert_exercise_layout(nb, i, "check", first_line_only=o) for i, o in zip(prompts, one)]
    prefix = "-".join(labels[0].split("-")[:2]) + "-"  # ex-steps-, ex-pit-, ...
    assert len(set(labels)) == len(labels) and all(label.startswith(prefix) for label in labels)
    graded = [n for i in prompts for n in re.findall(r"^(?:def|class) ((?:my_|My)\w+)\(", nb.cells[i + 2].source, re.M)]
    assert graded == list(EXERCISES[chapter])  # in the order of the table


@pytest.mark.parametrize("chapter, name", ALL)
def test_solution_in_the_notebook_passes(chapter, name, solutions, capsys):
    assert EXERCISES[chapter][name](solutions[chapter][name]) is None
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("✓ ")  # one short success line


@pytest.mark.parametrize("chapter, name", ALL)
def test_solution_passes_on_fresh_inputs_from_other_seeds(chapter, name, solutions, capsys):
    """The checkers draw their inputs from a seed: a right answer passes whatever the seed."""
    for seed in (1, 2):
        assert EXERCISES[chapter][name](solutions[chapter][name], seed=seed) is None
    assert capsys.readouterr().out.count("✓ ") == 2


@pytest.mark.parametrize("chapter, name", ALL)
def test_stub_fails_with_not_implemented(chapter, name):
    stubbed = _namespace(chapter, stub(f"Exercise {chapter_number(chapter)}.1: "))
    error = assert_stub_fails(EXERCISES[chapter][name], stubbed[name], name)
    assert error.__cause__ is None and error.__suppress_context__  # no traceback into bnkit
    assert "Traceback" not in str(error)


@pytest.mark.parametrize("chapter", EXERCISES)
def test_learner_copy_has_no_solutions(chapter):
    nb = read_notebook(chapter_path(chapter))
    number = chapter_number(chapter)
    text = learner_copy_text(nb, number)
    stubs = re.findall(rf'raise NotImplementedError\("Exercise {number}\.(\d+): ', text)
    blocks = sum(source.count(make_exercises.BEGIN) for source in solution_cells(nb))
    assert len(stubs) == text.count("raise NotImplementedError") == blocks >= len(EXERCISES[chapter])
    assert sorted(set(stubs), key=int) == [str(k) for k in range(1, len(exercise_prompts(nb)) + 1)]


@pytest.mark.parametrize("chapter", RUN_COPIES)
def test_learners_copy_of_the_chapter_runs_and_only_the_checks_fail(chapter):
    """In the learners' copy every cell runs except the check cells, which say 'not implemented'."""
    nb = read_notebook(chapter_path(chapter))
    learner = run_learner_copy(nb, chapter_number(chapter), chapter_path(chapter).parent)
    _, checks = assert_only_the_checks_fail(learner, "check.")
    assert len(checks) == len(exercise_prompts(nb))


# ---------------------------------------------------------------- typical wrong answers, right answers


@pytest.mark.parametrize("chapter, checker, wrong, message", WRONG, ids=[_id(*row) for row in WRONG])
def test_typical_wrong_answer_is_caught_and_named(chapter, checker, wrong, message):
    text = diagnosis(checker, wrong)
    assert message in text
    assert "Traceback" not in text
    with pytest.raises(ExerciseError):  # caught on the inputs of another seed too
        checker(wrong, seed=1)


@pytest.mark.parametrize("chapter, checker, right", RIGHT, ids=[_id(*row) for row in RIGHT])
def test_right_answer_written_otherwise_passes(chapter, checker, right, capsys):
    assert checker(right) is None
    assert capsys.readouterr().out.startswith("✓ ")


@pytest.mark.parametrize("chapter, name", ALL)
def test_every_exercise_has_many_wrong_and_two_right_answers(chapter, name):
    checker = EXERCISES[chapter][name]
    assert sum(row[1] is checker for row in WRONG) >= MIN_WRONG
    assert sum(row[1] is checker for row in RIGHT) >= MIN_RIGHT


# ---------------------------------------------------------------- the checkers' shared machinery

AXES = lambda z: tuple(a for a in range(z.ndim) if a != 1)  # noqa: E731
VEC = lambda v, z: v.reshape((1, -1) + (1,) * (z.ndim - 2))  # noqa: E731


@pytest.mark.parametrize("wrong, said", [
    (lambda e: 2.5 * e, "every value is 2.5 times the expected one (a constant factor)"),
    (lambda e: -e, "the sign is flipped"),
    (lambda e: e + 0.75, "every value is off by the same constant 0.75 (an offset)"),
    (lambda e: e + np.arange(e.shape[1]), "each feature (axis 1) is off by its own constant"),
    (lambda e: e * np.arange(1, e.shape[1] + 1), "each feature (axis 1) is off by its own factor"),
    (lambda e: np.where(np.arange(e.shape[1]) == 2, e + np.arange(len(e))[:, None], e),
     "only feature (axis 1) [2] of 5 differ"),
    (lambda e: e.T, "wrong shape: expected (8, 5), got (5, 8): transposed?"),
    (lambda e: e[:, None], "extra axes of size 1 (keepdims=True"),
    (lambda e: e.mean(axis=0), "you reduced over more axes than you should"),
    (lambda e: np.where(e > 1, np.nan, e), "NaN or inf at"),
    (lambda e: e * (1 + 1e-6), "close but not equal (largest relative difference 1.0e-06"),
])
def test_a_wrong_output_that_matches_no_known_mistake_is_described(wrong, said):
    """check_function's fallback: how the output differs, on which input shape, with a hint."""
    z = np.random.default_rng(0).normal(size=(8, 5)) + 0.5
    cases = [Case("z of shape (8, 5)", (z,), "")]
    with pytest.raises(ExerciseError) as info:
        check_function("f", lambda z: wrong(z * 3), lambda z: z * 3, cases)
    message = str(info.value)
    assert said in message and "z of shape (8, 5)" in message and "Hint: " in message


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


CHAPTER = chapter_path("01_five_steps")
CHECKERS = EXERCISES["01_five_steps"]


def _notebook() -> nbformat.NotebookNode:
    return read_notebook(CHAPTER)


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
    exercises = len(exercise_prompts(nb))
    assert len(stubs) == len(CHECKERS) and set(stubs) == {str(k) for k in range(1, exercises + 1)}
    prompts = re.findall(r"\*\*Exercise 1\.(\d+)\*\*", text)  # the prompts stay, as plain Markdown
    assert sorted(prompts) == [str(k) for k in range(1, exercises + 1)]
    assert all(f"({name})" in code for name in CHECKERS)  # and the check cells
    # only each exercise's two gate cells (its markdown) are gone; a last cell lists the works cited
    assert len(copy.cells) == len(nb.cells) - 2 * exercises + 1
    assert copy.cells[-1].source.startswith("## References")


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
