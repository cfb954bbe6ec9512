"""Chapter 9 (more than one device): typical wrong answers and right answers written
otherwise (tests/test_exercises.py runs them), and tests of those checkers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bnkit.checks import ch09_distributed
from bnkit.checks._core import ExerciseError
from bnkit import running
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


# ---------------------------------------------------------------- more wrong answers, right answers


def merge_delta_sign(a, b):
    delta = a.mean - b.mean
    return BatchStats(_n(a, b), a.mean + delta * (b.count / _n(a, b)), a.m2 + b.m2 + delta**2 * (a.count * b.count / _n(a, b)))


def merge_returns_a_when_empty(a, b):
    if a.count == 0 or b.count == 0:
        return a  # wrong when a is the empty one
    return BatchStats(_n(a, b), _right_mean(a, b), _right_m2(a, b))


def merge_float32(a, b):
    f = lambda x: np.asarray(x, dtype=np.float32)  # noqa: E731  "to save memory"
    delta = f(b.mean) - f(a.mean)
    return BatchStats(_n(a, b), f(a.mean) + delta * (b.count / _n(a, b)),
                      f(a.m2) + f(b.m2) + delta**2 * (a.count * b.count / _n(a, b)))


def merge_between_n_minus_one(a, b):
    delta = b.mean - a.mean
    return BatchStats(_n(a, b), _right_mean(a, b), a.m2 + b.m2 + delta**2 * a.count * b.count / (_n(a, b) - 1))


def merge_counts_squared(a, b):
    delta = b.mean - a.mean
    return BatchStats(_n(a, b), _right_mean(a, b), a.m2 + b.m2 + delta**2 * (a.count * b.count / _n(a, b)) ** 2)


def merge_through_weighted_mean(a, b):
    n = a.count + b.count
    mean = (a.count * a.mean + b.count * b.mean) / n
    return BatchStats(n, mean, a.m2 + a.count * (a.mean - mean) ** 2 + b.m2 + b.count * (b.mean - mean) ** 2)


def merge_with_running_merge_all(a, b):
    return tuple(running.merge_all([a, b]))


def combine_between_over_n(counts, means, variances):
    w, N = counts[:, None], counts.sum()
    mean = (w * means).sum(axis=0) / N
    return (((w - 1) * variances).sum(axis=0) + (w * (means - mean) ** 2).sum(axis=0) / N) / (N - 1)


def combine_between_weights_minus_one(counts, means, variances):
    w, N = counts[:, None], counts.sum()
    mean = (w * means).sum(axis=0) / N
    return (((w - 1) * variances).sum(axis=0) + ((w - 1) * (means - mean) ** 2).sum(axis=0)) / (N - 1)


def combine_stds(counts, means, variances):
    return ((counts[:, None] * np.sqrt(variances)).sum(axis=0) / counts.sum()) ** 2


def combine_returns_mean_too(counts, means, variances):
    w, N = counts[:, None], counts.sum()
    mean = (w * means).sum(axis=0) / N
    return mean, (((w - 1) * variances).sum(axis=0) + (w * (means - mean) ** 2).sum(axis=0)) / (N - 1)


def combine_drops_last_worker(counts, means, variances):
    counts, means, variances = counts[:-1], means[:-1], variances[:-1]  # range(K - 1)
    w, N = counts[:, None], counts.sum()
    mean = (w * means).sum(axis=0) / N
    return (((w - 1) * variances).sum(axis=0) + (w * (means - mean) ** 2).sum(axis=0)) / (N - 1)


def combine_by_merging(counts, means, variances):
    total = running.BatchStats(0, np.zeros(means.shape[1]), np.zeros(means.shape[1]))
    for c, m, v in zip(counts, means, variances):
        total = running.merge(total, running.BatchStats(int(c), m, (c - 1) * v))
    return total.m2 / (total.count - 1)


def combine_law_of_total_variance(counts, means, variances):
    N = counts.sum()
    mean = np.average(means, axis=0, weights=counts)
    within = np.einsum("k,kn->n", counts - 1, variances)
    between = np.einsum("k,kn->n", counts, (means - mean) ** 2)
    return (within + between) / (N - 1)


WRONG += [
    (ch09_distributed.merge, merge_delta_sign, "delta has the wrong sign"),
    (ch09_distributed.merge, merge_returns_a_when_empty, "when a is empty (count 0) the union is b"),
    (ch09_distributed.merge, merge_float32, "you computed in float32"),
    (ch09_distributed.merge, merge_between_n_minus_one, "divides by n = n_a + n_b, not n - 1"),
    (ch09_distributed.merge, merge_counts_squared, "square delta, not the counts"),
    (ch09_distributed.combine_variances, combine_between_over_n, "you divided the between-worker term by N"),
    (ch09_distributed.combine_variances, combine_between_weights_minus_one, "weights by n_k, not n_k - 1"),
    (ch09_distributed.combine_variances, combine_stds, "you averaged standard deviations"),
    (ch09_distributed.combine_variances, combine_returns_mean_too, "return only the variance"),
    (ch09_distributed.combine_variances, combine_drops_last_worker, "wrong values on 3 workers with 20, 7 and 45 values"),
]

RIGHT = [
    (ch09_distributed.merge, merge_through_weighted_mean),
    (ch09_distributed.merge, merge_with_running_merge_all),
    (ch09_distributed.combine_variances, combine_by_merging),
    (ch09_distributed.combine_variances, combine_law_of_total_variance),
]


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
