"""Exercise checkers for chapter 9, statistics across devices and processes.

    merge(fn)              fn(a: BatchStats, b: BatchStats) -> BatchStats(count, mean, m2)
    combine_variances(fn)  fn(counts (K,), means (K, n), variances (K, n)) -> var (n,)

Each compares the learner's function with ``bnkit.running`` on fresh inputs
(``bnkit.checks._core.check_function``) and names the typical mistake when the output matches a
known wrong variant. On success it prints one line.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
from collections.abc import Callable
from typing import Any

import numpy as np

from bnkit import running
from bnkit.checks._core import Case, does_not_apply, ExerciseError, check_function, not_implemented
from bnkit.running import BatchStats

__all__ = ["ExerciseError", "merge", "combine_variances"]



def _cancellation_hint(offset: str, square: str, deviations: str) -> str:
    return (
        f"the values here sit near {offset}: a formula through raw sums of squares, "
        f"n * (var + mean**2) minus n * mean**2, subtracts two numbers near {square} and loses "
        f"the digits that matter; work with deviations from the means instead ({deviations})."
    )


def _silently(check: Callable[[], None]) -> None:
    """Run a check_function call without its success line (the caller prints one line)."""
    with contextlib.redirect_stdout(io.StringIO()):
        check()


# ---------------------------------------------------------------- exercise 1: merge two sets


def _merge_cases(seed: int) -> list[Case]:
    """(a, b) pairs of BatchStats: unequal counts, different means, an offset, a single value, an empty set."""
    rng = np.random.default_rng(seed)

    def stats(m: int, n: int, offset: Any = 0.0) -> BatchStats:
        z = rng.normal(size=(m, n)) * rng.uniform(0.5, 3, n) + rng.normal(0, 3, n) + offset
        return running.batch_stats(z)

    n = 4
    return [
        Case("a: 12 values, b: 5 values per feature, different means", (stats(12, n), stats(5, n, 4.0))),
        Case("a and b: 8 values each", (stats(8, 3), stats(8, 3, -2.0))),
        Case("a: 30 values, b: 3 values, 5 features", (stats(30, 5, 1.0), stats(3, 5))),
        Case("a: 20 values, b: 1 value (M2 = 0)", (stats(20, n), stats(1, n, 2.0))),
        Case("a: an empty worker (count 0), b: 6 values", (BatchStats(0, np.zeros(n), np.zeros(n)), stats(6, n))),
        Case("a: 10, b: 25 values near 1e6", (stats(10, n, 1e6), stats(25, n, 1e6 + 3.0)),
             _cancellation_hint("1e6", "1e13", "delta = mean_b - mean_a")),
    ]


def _part(fn: Callable, index: int) -> Callable:
    """fn's output's count (0), mean (1) or m2 (2), from fresh copies of the inputs."""

    @functools.wraps(fn)
    def part(a: BatchStats, b: BatchStats) -> Any:
        return fn(copy.deepcopy(a), copy.deepcopy(b))[index]

    return part


def _delta(a: BatchStats, b: BatchStats) -> Any:
    return b.mean - a.mean


def merge(fn: Callable, seed: int = 0) -> None:
    """Check ``fn(a, b) -> BatchStats(count, mean, m2)``, Chan et al.'s exact merge."""
    name = "merge"
    if not callable(fn):
        raise ExerciseError(f"{name}: expected a function, got {type(fn).__name__}")
    cases = _merge_cases(seed)
    try:
        out = fn(*copy.deepcopy(cases[0].args))
    except NotImplementedError:
        raise not_implemented(name, fn) from None
    except Exception:  # check_function reports it, with the learner's line
        out = (None, None, None)
    if out is None:
        raise ExerciseError(f"{name}: your function returned None: did you forget `return`?")
    if not (isinstance(out, tuple) and len(out) == 3):
        raise ExerciseError(
            f"{name}: return BatchStats(count, mean, m2) (or a tuple of the three), got {type(out).__name__}"
        )
    n_of = lambda a, b: a.count + b.count  # noqa: E731
    count_mistakes = [
        (lambda a, b: (a.count + b.count) / 2, "you averaged the counts: the merged set has n_a + n_b values"),
        (lambda a, b: max(a.count, b.count), "the merged count is n_a + n_b, the values of both sets"),
        (lambda a, b: a.count if a.count == 0 else does_not_apply(),
         "when a is empty (count 0) the union is b: you returned a; the formula needs no special "
         "case (with n_a = 0 it gives b)"),
    ]
    mean_mistakes = [
        (lambda a, b: (a.mean + b.mean) / 2,
         "you averaged the means without weighting by count: the merged mean is "
         "(n_a * mean_a + n_b * mean_b) / (n_a + n_b), i.e. mean_a + delta * n_b / n"),
        (lambda a, b: a.mean + b.mean, "you added the means: weight each by its count and divide by n = n_a + n_b"),
        (lambda a, b: a.count * a.mean + b.count * b.mean,
         "you summed count * mean but did not divide by n = n_a + n_b"),
        (lambda a, b: a.mean + _delta(a, b) * a.count / n_of(a, b),
         "the weights are swapped: mean = mean_a + delta * n_b / n (the larger set pulls the mean towards itself)"),
        (lambda a, b: a.mean - _delta(a, b) * b.count / n_of(a, b),
         "delta has the wrong sign: delta = mean_b - mean_a, and the mean is mean_a + delta * n_b / n"),
        (lambda a, b: a.mean if a.count == 0 else does_not_apply(),
         "when a is empty (count 0) the union is b: you returned a's mean; the formula needs no special "
         "case (with n_a = 0 it gives b)"),
        (lambda a, b: np.float32(a.mean) + (np.float32(b.mean) - np.float32(a.mean)) * (b.count / n_of(a, b)),
         "you computed in float32: it keeps about 7 digits, too few for values near 1e6; keep float64"),
    ]
    between = lambda a, b: _delta(a, b) ** 2 * (a.count * b.count / n_of(a, b))  # noqa: E731
    m2_mistakes = [
        (lambda a, b: a.m2 + b.m2,
         "you forgot the between-group term delta^2 * n_a * n_b / n: each M2 measures the spread "
         "around its own set's mean, and the two means differ (delta = mean_b - mean_a)"),
        (lambda a, b: a.m2 + b.m2 + _delta(a, b) ** 2 * a.count * b.count,
         "the between-group term is delta^2 * n_a * n_b / n: you did not divide by n = n_a + n_b"),
        (lambda a, b: a.m2 + b.m2 + _delta(a, b) * (a.count * b.count / n_of(a, b)),
         "square delta in the between-group term: delta^2 * n_a * n_b / n"),
        (lambda a, b: (a.m2 + b.m2) / 2 + between(a, b),
         "you averaged the M2s: M2 is a sum of squared deviations, so the two sets' M2s add up"),
        (lambda a, b: (a.m2 + b.m2 + between(a, b)) / n_of(a, b),
         "you returned the variance M2 / n: M2 is the sum of squared deviations, not divided by the count"),
        (lambda a, b: a.m2 + b.m2 + _delta(a, b) ** 2 * a.count * b.count / (n_of(a, b) - 1),
         "the between-group term divides by n = n_a + n_b, not n - 1: delta^2 * n_a * n_b / n"),
        (lambda a, b: a.m2 + b.m2 + _delta(a, b) ** 2 * (a.count * b.count / n_of(a, b)) ** 2,
         "square delta, not the counts: delta^2 * n_a * n_b / n"),
        (lambda a, b: a.m2 + b.m2 + ((a.mean + b.mean) / 2 - a.mean) ** 2 * a.count
         + ((a.mean + b.mean) / 2 - b.mean) ** 2 * b.count,
         "the between-group term measures the distance of each set's mean from the *merged* mean "
         "(the count-weighted one): delta^2 * n_a * n_b / n"),
    ]
    reference = running.merge
    _silently(lambda: check_function(name, _part(fn, 0), lambda a, b: reference(a, b).count, cases, count_mistakes))
    _silently(lambda: check_function(name, _part(fn, 1), lambda a, b: reference(a, b).mean, cases, mean_mistakes))
    _silently(lambda: check_function(name, _part(fn, 2), lambda a, b: reference(a, b).m2, cases, m2_mistakes))
    print(f"✓ {name}: count, mean and M2 correct on {len(cases)} test cases")


# ---------------------------------------------------------------- exercise 2: per-worker variances


def _workers(rng: np.random.Generator, counts: list[int], n: int, offset: float = 0.0) -> tuple:
    """(counts (K,), means (K, n), unbiased variances (K, n)) of K workers' data."""
    spread = rng.uniform(0.5, 3, n)
    shards = [rng.normal(size=(m, n)) * spread + rng.normal(0, 2, n) + offset for m in counts]
    means = np.stack([s.mean(axis=0) for s in shards])  # (K, n)
    variances = np.stack([s.var(axis=0, ddof=1) for s in shards])  # (K, n), unbiased
    return np.array(counts), means, variances


def _combine(counts: np.ndarray, means: np.ndarray, variances: np.ndarray) -> np.ndarray:
    """The reference: merge every worker's (count, mean, (count - 1) * var) exactly."""
    stats = [BatchStats(int(c), m, (c - 1) * v) for c, m, v in zip(counts, means, variances)]
    return running.finalize(running.merge_all(stats))[1]


def combine_variances(fn: Callable, seed: int = 0) -> None:
    """Check ``fn(counts, means, variances) -> var``: the global unbiased variance, shape (n,),
    from K workers' counts (K,), means (K, n) and unbiased variances (K, n)."""
    rng = np.random.default_rng(seed)
    cases = [
        Case("3 workers with 20, 7 and 45 values, 4 features", _workers(rng, [20, 7, 45], 4)),
        Case("2 workers with 16 values each, 3 features", _workers(rng, [16, 16], 3)),
        Case("4 workers with 2, 9, 30 and 5 values, 5 features", _workers(rng, [2, 9, 30, 5], 5)),
        Case("3 workers with 12, 40 and 8 values near 1e8", _workers(rng, [12, 40, 8], 4, 1e8),
             _cancellation_hint("1e8", "1e18", "mean_k - mean")),
    ]

    def parts(counts: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
        w = counts[:, None].astype(np.float64)  # (K, 1)
        return w, int(counts.sum()), (w * means).sum(axis=0) / counts.sum()

    def between(counts: np.ndarray, means: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
        w, _, global_mean = parts(counts, means)
        mean = global_mean if mean is None else mean
        return (w * (means - mean) ** 2).sum(axis=0)

    def within(counts: np.ndarray, variances: np.ndarray) -> np.ndarray:
        return ((counts[:, None] - 1) * variances).sum(axis=0)

    diagnoses = [
        (lambda c, m, v: v.mean(axis=0),
         "you averaged the workers' variances (Algorithm 2's way): that leaves out how far the "
         "workers' means lie from each other, and weights a small worker like a large one"),
        (lambda c, m, v: (c[:, None] * v).sum(axis=0) / c.sum(),
         "you weighted the variances by count, but left out the spread of the worker means: add "
         "the between-worker term sum_k n_k (mean_k - mean)^2 to the sum of squared deviations"),
        (lambda c, m, v: within(c, v) / (c.sum() - 1),
         "you pooled the within-worker sums (n_k - 1) var_k but left out the between-worker term "
         "sum_k n_k (mean_k - mean)^2"),
        (lambda c, m, v: within(c, v) / (c.sum() - len(c)),
         "that is the pooled within-worker variance (divided by N - K): the global variance also "
         "counts the spread of the worker means, sum_k n_k (mean_k - mean)^2, and divides by N - 1"),
        (lambda c, m, v: (within(c, v) + between(c, m)) / c.sum(),
         "you divided by N: the unbiased variance divides the sum of squared deviations by N - 1"),
        (lambda c, m, v: ((c[:, None] * v).sum(axis=0) + between(c, m)) / (c.sum() - 1),
         "each worker's sum of squared deviations is (n_k - 1) * var_k, because var_k is the "
         "unbiased variance: you used n_k * var_k"),
        (lambda c, m, v: (within(c, v) + between(c, m, m.mean(axis=0))) / (c.sum() - 1),
         "the global mean weights each worker's mean by its count: sum_k n_k mean_k / N, not the "
         "plain average of the worker means"),
        (lambda c, m, v: (within(c, v) + (m - m.mean(axis=0)) ** 2 @ np.ones(len(c))) / (c.sum() - 1),
         "the between-worker term weights each squared distance by the worker's count: "
         "sum_k n_k (mean_k - mean)^2"),
        (lambda c, m, v: (within(c, v) + between(c, m) / c.sum()) / (c.sum() - 1),
         "you divided the between-worker term by N before adding it: both sums of squared "
         "deviations add as they are, then divide the total by N - 1"),
        (lambda c, m, v: (within(c, v) + ((c[:, None] - 1) * (m - parts(c, m)[2]) ** 2).sum(axis=0)) / (c.sum() - 1),
         "the between-worker term weights by n_k, not n_k - 1: sum_k n_k (mean_k - mean)^2 (each of the "
         "n_k values sits at mean_k on average)"),
        (lambda c, m, v: (c[:, None] * np.sqrt(v)).sum(axis=0) ** 2 / c.sum() ** 2,
         "you averaged standard deviations: combine variances (sums of squared deviations), not their roots"),
        (lambda c, m, v: np.stack([parts(c, m)[2], _combine(c, m, v)]),
         "return only the variance, shape (n,): not (mean, var)"),
    ]
    name = "combine_variances"
    if not callable(fn):
        raise ExerciseError(f"{name}: expected a function, got {type(fn).__name__}")
    _silently(lambda: check_function(name, fn, _combine, cases, diagnoses))
    print(f"✓ {name}: correct on {len(cases)} test cases")
