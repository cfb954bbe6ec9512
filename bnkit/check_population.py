"""Exercise checkers for running estimates (chapter 4) and population statistics (chapter 5).

Chapter 4, running estimates across mini-batches:
    bn_infer(fn)          fn(z, gamma, beta, running_mean, running_var, eps) -> z_tilde
    update_running(fn)    fn(running_mean, running_var, mu, var, count, momentum) -> (mean, var)
Chapter 5, population statistics:
    merge(fn)             fn(a, b) -> (count, mean, m2), a and b are running.BatchStats
    algorithm2(fn)        fn(mus, variances, m) -> (mean, var)

Each compares the learner's function with bnkit on fresh inputs (``bnkit.check.check_function``)
and names the typical mistake when the output matches a known wrong variant.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from bnkit import reference as ref
from bnkit import running
from bnkit.check import Case, ExerciseError, check_function

__all__ = ["ExerciseError", "bn_infer", "update_running", "merge", "algorithm2"]


def _features(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A per-feature mean (n,) and variance (n,), different for every feature."""
    return rng.normal(0, 3, n), rng.uniform(0.2, 4.0, n)


def _pair(fn: Callable) -> Callable:
    """Wrap a function that returns (mean, var) so that the checker sees one (2, n) array."""

    @functools.wraps(fn)
    def wrapped(*args: Any) -> Any:
        out = fn(*args)
        if isinstance(out, (tuple, list)) and len(out) == 2:
            return np.stack([_numpy(v) for v in out])
        return out  # None, or the wrong kind of result: check_function explains

    return wrapped


def _check_returns(name: str, fn: Callable, case: Case, size: int, what: str) -> None:
    """Call fn once: if it returns something other than a tuple of ``size`` values, say so.

    Exceptions (a stub's NotImplementedError included) are left to check_function, which
    explains them on the same case.
    """
    try:
        with np.errstate(all="ignore"):
            out = fn(*case.args)
    except Exception:
        return
    if out is not None and not (isinstance(out, (tuple, list)) and len(out) == size):
        got = f"a {type(out).__name__} of length {len(out)}" if isinstance(out, (tuple, list)) else type(out).__name__
        raise ExerciseError(f"{name}: return {what}, {size} values, got {got}")


def _numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor
        v = v.detach().cpu().numpy()
    return np.asarray(v, dtype=np.float64)


# ---------------------------------------------------------------- chapter 4: running estimates


def bn_infer(fn: Callable, seed: int = 0) -> None:
    """Check ``fn(z, gamma, beta, running_mean, running_var, eps) -> z_tilde``, the shape of z."""
    rng = np.random.default_rng(seed)
    cases = []
    for label, shape, eps, dtype in [
        ("a batch z of shape (8, 5)", (8, 5), 1e-3, np.float64),
        ("one example z of shape (6,)", (6,), 1e-5, np.float64),
        ("one example z of shape (4,), eps = 0.5", (4,), 0.5, np.float64),
        ("a batch z of shape (2, 7), float32", (2, 7), 1e-5, np.float32),
        ("one example z of shape (3,), float32, eps = 0.1", (3,), 0.1, np.float32),
    ]:
        n = shape[-1]
        mean, var = _features(rng, n)
        z = mean + np.sqrt(var) * rng.normal(size=shape) + rng.normal(0, 1, n)  # not centred on mean
        gamma = rng.uniform(0.5, 2.0, n) * rng.choice([-1.0, 1.0], n)
        beta = rng.normal(0, 2, n) + 5.0
        args = tuple(a.astype(dtype) for a in (z, gamma, beta, mean, var)) + (eps,)
        cases.append(Case(label, args))

    def batch_stats(z, gamma, beta, mean, var, eps):  # training mode: the statistics of z itself
        z2 = z.reshape(1, -1) if z.ndim == 1 else z
        out = gamma * (z2 - z2.mean(axis=0)) / np.sqrt(z2.var(axis=0) + eps) + beta
        return out.reshape(z.shape)

    def own_stats(z, gamma, beta, mean, var, eps):  # a single example normalised over its features
        return gamma * (z - z.mean(axis=-1, keepdims=True)) / np.sqrt(z.var(axis=-1, keepdims=True) + eps) + beta

    diagnoses = [
        (batch_stats, "you normalised with the statistics of z itself, as in training: at test time "
         "use running_mean and running_var (one example has no batch statistics: its variance is 0)"),
        (own_stats, "you normalised each example over its own features: at test time centre with "
         "running_mean and divide by sqrt(running_var + eps), per feature"),
        (lambda z, g, b, mean, var, eps: g * (z - mean) / (np.sqrt(var) + eps) + b,
         "eps belongs inside the square root: divide by sqrt(running_var + eps)"),
        (lambda z, g, b, mean, var, eps: g * (z - mean) / np.sqrt(var) + b,
         "you left out eps: divide by sqrt(running_var + eps), as in training"),
        (lambda z, g, b, mean, var, eps: g * (z - mean) / (var + eps) + b,
         "you divided by the variance: divide by the standard deviation sqrt(running_var + eps)"),
        (lambda z, g, b, mean, var, eps: b * (z - mean) / np.sqrt(var + eps) + g,
         "gamma and beta are swapped: gamma scales and beta shifts"),
        (lambda z, g, b, mean, var, eps: g * ((z - mean) / np.sqrt(var + eps) + b),
         "beta is added after scaling: gamma * z_norm + beta, not gamma * (z_norm + beta)"),
        (lambda z, g, b, mean, var, eps: (z - mean) / np.sqrt(var + eps),
         "you returned z_norm: finish with step 5, gamma * z_norm + beta"),
        (lambda z, g, b, mean, var, eps: g * (z + mean) / np.sqrt(var + eps) + b,
         "you added running_mean: centre with z - running_mean"),
    ]
    check_function("bn_infer", fn, ref.forward_infer, cases, diagnoses)


def update_running(fn: Callable, seed: int = 0) -> None:
    """Check ``fn(running_mean, running_var, mu, var, count, momentum) -> (new_mean, new_var)``."""
    rng = np.random.default_rng(seed)
    cases = []
    for label, n, count, momentum, fresh, dtype in [
        ("5 features, a batch of 64, momentum 0.1", 5, 64, 0.1, False, np.float64),
        ("3 features, a batch of 2 (the smallest), momentum 0.1", 3, 2, 0.1, False, np.float64),
        ("PyTorch's starting buffers (0 and 1), a batch of 8, momentum 0.1", 4, 8, 0.1, True, np.float64),
        ("6 features, a batch of 3, momentum 0.3", 6, 3, 0.3, False, np.float64),
        ("a conv layer: count = m*H*W = 8*4*4 = 128 values per channel, momentum 0.01", 4, 128, 0.01, False,
         np.float64),
        ("momentum 1 (the buffers become the batch's statistics), a batch of 5", 3, 5, 1.0, False, np.float64),
        ("float32 vectors of 7 features, a batch of 16, momentum 0.1", 7, 16, 0.1, False, np.float32),
    ]:
        if fresh:
            running_mean, running_var = np.zeros(n), np.ones(n)
        else:
            running_mean, running_var = _features(rng, n)
        mu, var = _features(rng, n)
        vectors = tuple(a.astype(dtype) for a in (running_mean, running_var, mu, var))
        cases.append(Case(label, vectors + (count, momentum)))

    def reference(rm, rv, mu, var, count, momentum):
        return np.stack(running.update_running(rm, rv, mu, var, count, 1, "ema", momentum))

    def variant(keras=False, biased=False, inverse=False, after=False, mean_too=False):
        def f(rm, rv, mu, var, count, momentum):
            w = 1 - momentum if keras else momentum
            factor = (count - 1) / count if inverse else (1.0 if biased or after else count / (count - 1))
            new_mean = (1 - w) * rm + w * mu * (count / (count - 1) if mean_too else 1.0)
            new_var = (1 - w) * rv + w * var * factor
            return np.stack([new_mean, new_var * (count / (count - 1) if after else 1.0)])

        return f

    diagnoses = [
        (variant(keras=True), "your momentum weights the old average (Keras's convention): in PyTorch "
         "momentum is the weight of the new batch, running = (1 - momentum) * running + momentum * batch"),
        (variant(biased=True), "you averaged the biased variance: PyTorch mixes the unbiased "
         "count / (count - 1) * var into running_var (it normalises with the biased one)"),
        (variant(inverse=True), "the correction is upside down: the unbiased variance is "
         "count / (count - 1) * var, larger than var"),
        (variant(after=True), "you applied count / (count - 1) to the whole new running_var: only the "
         "batch's variance is corrected, the old running_var is already unbiased"),
        (variant(mean_too=True), "only the variance gets the count / (count - 1) correction, not the mean"),
        (lambda rm, rv, mu, var, count, momentum: np.stack([mu, var * count / (count - 1)]),
         "you returned the batch's statistics: mix them into the running ones with weight momentum"),
        (lambda rm, rv, mu, var, count, momentum: np.stack([rm, rv]),
         "you returned the running statistics unchanged: mix in the batch with weight momentum"),
    ]
    _check_returns("update_running", fn, cases[0], 2, "the pair (new_mean, new_var)")
    check_function("update_running", _pair(fn), reference, cases, diagnoses)


# ---------------------------------------------------------------- chapter 5: population statistics


def _stats(rng: np.random.Generator, count: int, n: int, offset: float = 0.0) -> running.BatchStats:
    """The BatchStats of ``count`` random values per feature (n features)."""
    if count == 0:
        return running.BatchStats(0, np.zeros(n), np.zeros(n))
    z = rng.normal(size=(count, n)) * rng.uniform(0.5, 3, n) + rng.normal(0, 3, n) + offset
    return running.batch_stats(z)


def _triple(fn: Callable) -> Callable:
    """Wrap fn(a, b) -> (count, mean, m2) so that the checker sees one array [count, mean..., m2...]."""

    @functools.wraps(fn)
    def wrapped(a: running.BatchStats, b: running.BatchStats) -> Any:
        out = fn(a, b)
        if not (isinstance(out, (tuple, list)) and len(out) == 3):
            return out  # None, or the wrong kind of result: check_function explains
        count, mean, m2 = out
        count = _numpy(count)
        if count.size != 1:
            count = np.full(1, np.nan)  # a count per feature: the comparison fails and says where
        return np.concatenate([count.ravel(), _numpy(mean).ravel(), _numpy(m2).ravel()])

    return wrapped


def merge(fn: Callable, seed: int = 0) -> None:
    """Check ``fn(a, b) -> (count, mean, m2)``: Chan et al.'s exact merge of two BatchStats."""
    rng = np.random.default_rng(seed)
    cases = [
        Case("two batches of 64 and 64 values, 4 features", (_stats(rng, 64, 4), _stats(rng, 64, 4))),
        Case("uneven batches of 50 and 3 values, 5 features", (_stats(rng, 50, 5), _stats(rng, 3, 5))),
        Case("a single value (count 1, m2 = 0) and a batch of 10", (_stats(rng, 1, 3), _stats(rng, 10, 3))),
        Case("an empty set (count 0) and a batch of 7", (_stats(rng, 0, 3), _stats(rng, 7, 3))),
        Case("a batch of 9 and an empty set (count 0)", (_stats(rng, 9, 2), _stats(rng, 0, 2))),
        Case("batches of 1000 and 20 values around 1e6", (_stats(rng, 1000, 3, 1e6), _stats(rng, 20, 3, 1e6))),
    ]

    def reference(a, b):
        s = running.merge(a, b)
        return np.concatenate([[s.count], s.mean, s.m2])

    def variant(spread: str = "right", mean: str = "weighted"):
        def f(a, b):
            n = a.count + b.count
            if n == 0:
                raise ValueError("not applicable")
            delta = b.mean - a.mean
            new_mean = (a.mean + b.mean) / 2 if mean == "plain" else (a.count * a.mean + b.count * b.mean) / n
            extra = {"right": delta**2 * a.count * b.count / n, "none": 0 * delta,
                     "no_n": delta**2 * a.count * b.count}[spread]
            return np.concatenate([[n], new_mean, a.m2 + b.m2 + extra])

        return f

    diagnoses = [
        (variant(spread="none"), "you added the two M2s but left out the spread between the two means: "
         "M2 = M2_a + M2_b + delta**2 * n_a * n_b / n, with delta = mean_b - mean_a"),
        (variant(mean="plain", spread="none"), "weight each mean by its count: mean = (n_a mean_a + n_b mean_b) / n "
         "(and M2 also needs the term delta**2 * n_a * n_b / n)"),
        (variant(mean="plain"), "weight each mean by its count: mean = (n_a mean_a + n_b mean_b) / n, "
         "not the plain average of the two means"),
        (variant(spread="no_n"), "the spread term is delta**2 * n_a * n_b / n: you forgot to divide by n = n_a + n_b"),
        (lambda a, b: np.concatenate([[a.count + b.count], (a.mean + b.mean) / 2, (a.m2 + b.m2) / 2]),
         "you averaged the two sets' statistics: counts add, means are weighted by the counts, and M2 is a "
         "sum of squares, M2 = M2_a + M2_b + delta**2 * n_a * n_b / n"),
    ]
    _check_returns("merge", fn, cases[0], 3, "(count, mean, m2)")
    check_function("merge", _triple(fn), reference, cases, diagnoses)


def algorithm2(fn: Callable, seed: int = 0) -> None:
    """Check ``fn(mus, variances, m) -> (mean, var)``: Ioffe & Szegedy's Algorithm 2."""
    rng = np.random.default_rng(seed)
    cases = []
    for label, T, n, m, dtype in [
        ("10 batches of m = 16, 4 features", 10, 4, 16, np.float64),
        ("3 batches of m = 2 (the smallest batch), 5 features", 3, 5, 2, np.float64),
        ("40 batches of m = 5, 3 features", 40, 3, 5, np.float64),
        ("a single batch of m = 8, 6 features", 1, 6, 8, np.float64),
        ("7 batches of m = 32, float32", 7, 2, 32, np.float32),
    ]:
        mean, var = _features(rng, n)
        z = mean + np.sqrt(var) * rng.normal(size=(T, m, n))  # (T, m, n): T batches of m examples
        mus, variances = z.mean(axis=1), z.var(axis=1)  # (T, n) batch means, biased batch variances
        cases.append(Case(f"{label} (mus, variances of shape {mus.shape})",
                          (mus.astype(dtype), variances.astype(dtype), m)))

    def reference(mus, variances, m):
        return np.stack(running.algorithm2(mus, variances, m))

    diagnoses = [
        (lambda mus, v, m: np.stack([mus.mean(0), v.mean(0)]),
         "you forgot the m/(m-1) correction: Var[x] = m/(m-1) * E_B[var_B], because the batch variances are the "
         "biased (1/m) ones"),
        (lambda mus, v, m: np.stack([mus.mean(0), v.mean(0) * (m - 1) / m]),
         "the correction is upside down: Var[x] = m/(m-1) * E_B[var_B], larger than the average"),
        (lambda mus, v, m: np.stack([mus.mean(0), v.mean(0) * len(v) / (len(v) - 1)]),
         "the correction uses the batch size m, m/(m-1), not the number of batches"),
        (lambda mus, v, m: np.stack([mus.mean(0), m / (m - 1) * (v.mean(0) + mus.var(0))]),
         "you averaged the variances but also added the spread of the batch means: that is (nearly) the "
         "whole-set variance, not Algorithm 2, which is only m/(m-1) * E_B[var_B]"),
        (lambda mus, v, m: np.stack([mus.mean(0), (v.mean(0) + mus.var(0)) * len(v) * m / (len(v) * m - 1)]),
         "you averaged the variances but also added the spread of the batch means: that is the whole-set "
         "variance, not Algorithm 2, which is only m/(m-1) * E_B[var_B]"),
        (lambda mus, v, m: np.stack([mus.mean(0), mus.var(0)]),
         "that is the variance of the batch means, not the average variance within a batch: "
         "Var[x] = m/(m-1) * E_B[var_B]"),
        (lambda mus, v, m: np.stack([mus.mean(0), m / (m - 1) * np.sqrt(v).mean(0) ** 2]),
         "you averaged standard deviations: Algorithm 2 averages the variances, m/(m-1) * E_B[var_B]"),
        (lambda mus, v, m: np.stack([mus[-1], m / (m - 1) * v[-1]]),
         "you used only the last batch: average over all the batches (axis 0)"),
        (lambda mus, v, m: np.stack([mus.mean(1), m / (m - 1) * v.mean(1)]),
         "you averaged over the features (axis 1): average over the batches, axis 0, one value per feature"),
    ]
    _check_returns("algorithm2", fn, cases[0], 2, "the pair (mean, var)")
    check_function("algorithm2", _pair(fn), reference, cases, diagnoses)
