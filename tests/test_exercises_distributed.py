"""Chapter 9 (more than one device): typical wrong answers and right answers written
otherwise (tests/test_exercises.py runs them), and tests of those checkers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bnkit.checks import ch09_distributed
from bnkit.checks._core import ExerciseError
from bnkit.running import BatchStats

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
    (ch09_distributed.merge, merge_raw_sums, "raw sums of squares"),
    (ch09_distributed.merge, lambda a, b: [a.count + b.count, a.mean, a.m2], "return BatchStats(count, mean, m2)"),
    (ch09_distributed.merge, lambda a, b: BatchStats((a.count + b.count) / 2, a.mean, a.m2), "you averaged the counts"),
    (ch09_distributed.combine_variances, combine_average, "you averaged the workers' variances"),
    (ch09_distributed.combine_variances, combine_weighted_average, "you weighted the variances by count"),
    (ch09_distributed.combine_variances, combine_biased, "you divided by N: the unbiased variance"),
    (ch09_distributed.combine_variances, combine_n_times_var, "you used n_k * var_k"),
    (ch09_distributed.combine_variances, combine_unweighted_global_mean, "not the plain average of the worker means"),
    (ch09_distributed.combine_variances, combine_raw_sums, "raw sums of squares"),
]

RIGHT: list = []


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
