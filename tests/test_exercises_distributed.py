"""The exercise checkers of chapter 9 (across devices and processes) are honest.

For every exercise: the solution written in the notebook passes its checker; the stub that
`make exercises` puts in its place fails with "not implemented"; typical wrong answers fail
with the message that names the mistake.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bnkit.checks import ch09_distributed
from bnkit.checks._core import ExerciseError
from bnkit.running import BatchStats

pytest.register_assert_rewrite("exercise_support")
from exercise_support import (  # noqa: E402
    REPO,
    assert_exercise_layout,
    assert_one_success_line,
    assert_stub_fails,
    assert_two_diagnoses_each,
    diagnosis,
    exercise_namespace,
    exercise_prompts,
    learner_copy_text,
    read_notebook,
    stub,
)

CHAPTER = REPO / "chapters" / "09_distributed.ipynb"

# every function a learner writes in the chapter, and its checker, in the order of the exercises
CHECKERS = {
    "my_merge": ch09_distributed.merge,
    "my_combine_variances": ch09_distributed.combine_variances,
}


def _notebook():
    return read_notebook(CHAPTER)


@pytest.fixture(scope="module")
def solutions() -> dict:
    return exercise_namespace(_notebook(), label="09_distributed")


@pytest.fixture(scope="module")
def stubs() -> dict:
    return exercise_namespace(_notebook(), stub("Exercise 9.1: "), label="09_distributed")


# ---------------------------------------------------------------- solutions, stubs, structure


@pytest.mark.parametrize("name", CHECKERS)
def test_solution_in_the_notebook_passes(name, solutions, capsys):
    assert CHECKERS[name](solutions[name]) is None
    assert_one_success_line(capsys.readouterr().out)


@pytest.mark.parametrize("name", CHECKERS)
def test_stub_fails_with_not_implemented(name, stubs):
    assert_stub_fails(CHECKERS[name], stubs[name], name)  # names the function to fill in


def test_every_exercise_has_a_checker_a_check_cell_and_a_hidden_solution():
    nb = _notebook()
    exercises = exercise_prompts(nb)
    assert len(exercises) == len(CHECKERS) >= 2
    for i, name in zip(exercises, CHECKERS):
        assert_exercise_layout(nb, i, "check", name)


def test_learner_copy_has_no_solutions():
    text = learner_copy_text(_notebook(), "9")
    assert text.count("raise NotImplementedError") == len(CHECKERS)


# ---------------------------------------------------------------- typical wrong answers, exercise 1


def _n(a, b):
    return a.count + b.count


def _right_mean(a, b):
    return a.mean + (b.mean - a.mean) * (b.count / _n(a, b))


def _right_m2(a, b):
    delta = b.mean - a.mean
    return a.m2 + b.m2 + delta**2 * (a.count * b.count / _n(a, b))


def merge_unweighted_mean(a, b):
    return BatchStats(_n(a, b), (a.mean + b.mean) / 2, _right_m2(a, b))


def merge_no_between_term(a, b):
    return BatchStats(_n(a, b), _right_mean(a, b), a.m2 + b.m2)


def merge_between_not_divided(a, b):
    delta = b.mean - a.mean
    return BatchStats(_n(a, b), _right_mean(a, b), a.m2 + b.m2 + delta**2 * a.count * b.count)


def merge_returns_variance(a, b):
    return BatchStats(_n(a, b), _right_mean(a, b), _right_m2(a, b) / _n(a, b))


def merge_swapped_weights(a, b):
    return BatchStats(_n(a, b), a.mean + (b.mean - a.mean) * (a.count / _n(a, b)), _right_m2(a, b))


def merge_raw_sums(a, b):
    """Right algebra, through raw sums of squares: cancels for values near 1e6."""
    n = _n(a, b)
    mean = (a.count * a.mean + b.count * b.mean) / n
    sum_sq = a.m2 + a.count * a.mean**2 + b.m2 + b.count * b.mean**2
    return BatchStats(n, mean, sum_sq - n * mean**2)


def merge_torch(a, b):
    """Right, in torch: the checker accepts tensors too."""
    a = BatchStats(a.count, torch.as_tensor(a.mean), torch.as_tensor(a.m2))
    b = BatchStats(b.count, torch.as_tensor(b.mean), torch.as_tensor(b.m2))
    return BatchStats(_n(a, b), _right_mean(a, b), _right_m2(a, b))


# ---------------------------------------------------------------- typical wrong answers, exercise 2


def combine_average(counts, means, variances):
    return variances.mean(axis=0)


def combine_weighted_average(counts, means, variances):
    return (counts[:, None] * variances).sum(axis=0) / counts.sum()


def _between(counts, means):
    mean = (counts[:, None] * means).sum(axis=0) / counts.sum()
    return (counts[:, None] * (means - mean) ** 2).sum(axis=0)


def combine_biased(counts, means, variances):
    return (((counts[:, None] - 1) * variances).sum(axis=0) + _between(counts, means)) / counts.sum()


def combine_n_times_var(counts, means, variances):
    return ((counts[:, None] * variances).sum(axis=0) + _between(counts, means)) / (counts.sum() - 1)


def combine_unweighted_global_mean(counts, means, variances):
    w = counts[:, None]
    between = (w * (means - means.mean(axis=0)) ** 2).sum(axis=0)
    return (((w - 1) * variances).sum(axis=0) + between) / (counts.sum() - 1)


def combine_raw_sums(counts, means, variances):
    w, N = counts[:, None], counts.sum()
    mean = (w * means).sum(axis=0) / N
    return (((w - 1) * variances + w * means**2).sum(axis=0) - N * mean**2) / (N - 1)


WRONG = [
    (ch09_distributed.merge, merge_unweighted_mean, "you averaged the means without weighting by count"),
    (ch09_distributed.merge, merge_no_between_term, "you forgot the between-group term delta^2 * n_a * n_b / n"),
    (ch09_distributed.merge, merge_between_not_divided, "you did not divide by n = n_a + n_b"),
    (ch09_distributed.merge, merge_returns_variance, "you returned the variance M2 / n"),
    (ch09_distributed.merge, merge_swapped_weights, "the weights are swapped"),
    (ch09_distributed.merge, merge_raw_sums, "values near 1e6: wrong values"),
    (ch09_distributed.merge, lambda a, b: [a.count + b.count, a.mean, a.m2], "return BatchStats(count, mean, m2)"),
    (ch09_distributed.merge, lambda a, b: BatchStats((a.count + b.count) / 2, a.mean, a.m2), "you averaged the counts"),
    (ch09_distributed.combine_variances, combine_average, "you averaged the workers' variances"),
    (ch09_distributed.combine_variances, combine_weighted_average, "you weighted the variances by count"),
    (ch09_distributed.combine_variances, combine_biased, "you divided by N: the unbiased variance"),
    (ch09_distributed.combine_variances, combine_n_times_var, "you used n_k * var_k"),
    (ch09_distributed.combine_variances, combine_unweighted_global_mean, "not the plain average of the worker means"),
    (ch09_distributed.combine_variances, combine_raw_sums, "values near 1e8: wrong values"),
]


@pytest.mark.parametrize("checker, wrong, message", WRONG, ids=[f"{c.__name__}-{m[:30]}" for c, _, m in WRONG])
def test_typical_wrong_answer_is_diagnosed(checker, wrong, message):
    text = diagnosis(checker, wrong)
    if message.endswith(": wrong values"):  # the cancellation: no variant matches, the case's hint explains
        where = message.split(":")[0]
        assert "wrong values" in text and where in text and "raw sums of squares" in text
    else:
        assert message in text


def test_every_exercise_has_two_diagnosed_mistakes():
    assert_two_diagnoses_each(WRONG, CHECKERS.values())


def test_merge_accepts_tensors_and_a_learner_that_modifies_its_inputs(capsys):
    ch09_distributed.merge(merge_torch)

    def in_place(a, b):
        expected = BatchStats(_n(a, b), _right_mean(a, b), _right_m2(a, b))
        a.mean[:] = 0  # changes the checker's copy only
        return expected

    ch09_distributed.merge(in_place)
    assert capsys.readouterr().out.count("✓") == 2


def test_learner_errors_are_explained():
    with pytest.raises(ExerciseError, match="did you forget `return`"):
        ch09_distributed.merge(lambda a, b: None)
    with pytest.raises(ExerciseError, match="your function raised AttributeError"):
        ch09_distributed.merge(lambda a, b: a.variance)
    with pytest.raises(ExerciseError, match="expected a function"):
        ch09_distributed.combine_variances(np.zeros(3))
