"""Where test-time statistics come from: running averages and population estimators.

Exponentially weighted average (EWA) of a sequence theta_1, theta_2, ...:

    v_0 = 0,   v_t = beta * v_{t-1} + (1 - beta) * theta_t,   corrected: v_t / (1 - beta**t)

Every estimator of the test-time mean and variance here is one update rule,

    running <- (1 - w_t) * running + w_t * (batch statistic),   t = 1, 2, ...

with a different weight w_t for batch t (see ``update_weight``):

    "ema"           w_t = momentum                              PyTorch's default (momentum 0.1)
    "ema_debiased"  w_t = (1 - beta) / (1 - beta**t), beta = 1 - momentum   bias-corrected EWA
    "cumulative"    w_t = 1 / t     the plain average of the batches: PyTorch's momentum=None,
                                    Ioffe & Szegedy's Algorithm 2

Like PyTorch, the variance that is averaged is the *unbiased* batch variance
count / (count - 1) * var, where var is the biased one used to normalise; the running mean
starts at 0 and the running variance at 1. For "ema_debiased" and "cumulative" w_1 = 1, so
the starting values do not matter.

Exact whole-set statistics are merged from per-batch (count, mean, M2) with Chan et al.'s
formula, in float64: ``batch_stats``, ``merge``, ``finalize``.

All functions work on NumPy arrays and on torch tensors: most only use arithmetic;
``batch_stats`` and ``merge_all`` call the matching library (in place, and one stacked merge,
to keep the number of small kernel calls down in ``recompute_stats``).
"""
from __future__ import annotations

from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

from bnkit._validate import all_finite, check_momentum, feature_axes, is_real, values_per_feature

Array = Any  # a NumPy array or a torch tensor

ESTIMATORS = ("ema", "ema_debiased", "cumulative")


# ---------------------------------------------------------------- exponentially weighted averages


def _check_beta(beta: float, upper_included: bool = False) -> None:
    if not (is_real(beta) and 0.0 <= beta and (beta <= 1.0 if upper_included else beta < 1.0)):
        interval = "[0, 1]" if upper_included else "[0, 1)"
        raise ValueError(f"beta must be in {interval} (the EWA weight of the old average), got {beta!r}")


def ema(values: Array, beta: float, bias_correction: bool = False) -> np.ndarray:
    """The running averages v_1 .. v_T of a sequence, v_0 = 0.

    values: (T, ...), one entry per step. Returns an array of the same shape, in float64:
    v_t, or v_t / (1 - beta**t) with ``bias_correction``. The window is about 1 / (1 - beta).
    """
    _check_beta(beta)
    values = np.asarray(values, dtype=np.float64)
    v = np.zeros(values.shape[1:])
    out = np.empty_like(values)
    for t, theta in enumerate(values, start=1):
        v = beta * v + (1 - beta) * theta  # the recursion always uses the raw v
        out[t - 1] = v / (1 - beta**t) if bias_correction else v
    return out


# ---------------------------------------------------------------- momentum conventions

# PyTorch:   running = (1 - m) * running + m * batch    m = 0.1 by default   -> beta = 1 - m
# Keras:     moving = momentum * moving + (1 - momentum) * batch, default 0.99 -> beta = momentum
# CS231n:    running = momentum * running + (1 - momentum) * batch, 0.9     -> beta = momentum
CONVENTIONS = {"pytorch": 0.1, "keras": 0.99, "cs231n": 0.9, "beta": 0.9}  # name -> default


def to_beta(momentum: float, convention: str) -> float:
    """The EWA beta (weight of the old average) for a momentum given in ``convention``.

    convention: "pytorch" (beta = 1 - m), "keras" or "cs231n" (beta = momentum), "beta".
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {sorted(CONVENTIONS)}, got {convention!r}")
    check_momentum(momentum, allow_none=False)
    return 1.0 - momentum if convention == "pytorch" else float(momentum)


def from_beta(beta: float, convention: str) -> float:
    """The momentum in ``convention`` that gives the EWA weight ``beta``; inverse of to_beta."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {sorted(CONVENTIONS)}, got {convention!r}")
    _check_beta(beta, upper_included=True)  # beta = 1 is PyTorch's momentum 0 (never update)
    return 1.0 - beta if convention == "pytorch" else float(beta)


def convert_momentum(momentum: float, source: str, target: str) -> float:
    """The same averaging expressed in another convention, e.g. pytorch 0.1 -> keras 0.9."""
    return from_beta(to_beta(momentum, source), target)


# ---------------------------------------------------------------- running estimators


def update_weight(estimator: str, t: int, momentum: float | None = 0.1) -> float:
    """w_t, the weight of batch t (t = 1, 2, ...) in running <- (1 - w_t) running + w_t batch.

    momentum is in PyTorch's convention (the weight of the new batch); "cumulative"
    ignores it. PyTorch's momentum=None means "cumulative".
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not (isinstance(t, (int, np.integer)) and t >= 1):
        raise ValueError(f"t counts batches from 1, got {t!r}")
    if estimator == "cumulative" or momentum is None:
        return 1.0 / t
    check_momentum(momentum, allow_none=False)
    if estimator == "ema":
        return float(momentum)
    beta = 1.0 - momentum  # "ema_debiased": the corrected EWA written as an update of itself
    return (1.0 - beta) / (1.0 - beta**t) if beta < 1.0 else 1.0 / t


def unbiased(var: Array, count: int) -> Array:
    """count / (count - 1) * var: the unbiased variance from the biased (1/count) one."""
    if count < 2:
        raise ValueError(f"the unbiased variance needs count >= 2, got {count}")
    return var * (count / (count - 1))


def update_running(
    running_mean: Array,
    running_var: Array,
    mu: Array,
    var: Array,
    count: int,
    t: int,
    estimator: str = "ema",
    momentum: float | None = 0.1,
) -> tuple[Array, Array]:
    """One step of a running estimator; returns the new (running_mean, running_var).

    running_mean, running_var, mu, var: (n,) or (C,); mu, var are batch t's mean and
    *biased* variance over ``count`` values per feature. running_var stores the unbiased
    variance, as PyTorch does. Nothing is modified in place.
    """
    w = update_weight(estimator, t, momentum)
    if not (all_finite(mu) and all_finite(var)):
        raise ValueError("the batch statistics contain NaN or infinite values")
    new_mean = (1 - w) * running_mean + w * mu
    new_var = (1 - w) * running_var + w * unbiased(var, count)
    return new_mean, new_var


def running_estimates(
    mus: Array,
    variances: Array,
    count: int | Sequence[int],
    estimator: str = "ema",
    momentum: float | None = 0.1,
    init: tuple[float, float] = (0.0, 1.0),
) -> tuple[np.ndarray, np.ndarray]:
    """The estimate after each of T batches, starting from PyTorch's (0, 1).

    mus, variances: (T, n) batch means and biased variances; count: the number of values
    per feature in every batch, or one count per batch, (T,) (a last batch may be smaller).
    Returns (means, vars), each (T, n) in float64: row t is the estimate after batch t + 1.
    """
    mus, variances = np.asarray(mus, np.float64), np.asarray(variances, np.float64)
    counts = np.broadcast_to(np.asarray(count), (len(mus),))
    mean, var = np.full(mus.shape[1:], init[0]), np.full(mus.shape[1:], init[1])
    means, vars_ = np.empty_like(mus), np.empty_like(mus)
    for t in range(1, len(mus) + 1):
        mean, var = update_running(
            mean, var, mus[t - 1], variances[t - 1], int(counts[t - 1]), t, estimator, momentum
        )
        means[t - 1], vars_[t - 1] = mean, var
    return means, vars_


def algorithm2(mus: Array, variances: Array, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Ioffe & Szegedy's Algorithm 2: E[x] = E_B[mu_B], Var[x] = m/(m-1) E_B[var_B].

    mus, variances: (T, n) over T batches of ``count`` values each (biased variances).
    Returns (mean, var), each (n,). Leaves out the spread of the batch means.
    """
    mus, variances = np.asarray(mus, np.float64), np.asarray(variances, np.float64)
    return mus.mean(axis=0), unbiased(variances.mean(axis=0), count)


# ---------------------------------------------------------------- exact, mergeable statistics


class BatchStats(NamedTuple):
    """Sufficient statistics of a set of values, per feature; merge with ``merge``."""

    count: int  # values per feature
    mean: Array  # (n,), float64
    m2: Array  # (n,), the sum of squared deviations from mean, float64


def batch_stats(z: Array) -> BatchStats:
    """(count, mean, M2) of z, per feature, in float64 (two passes: stable).

    z: (m, n), (m, C, L) or (m, C, H, W), ...: features on axis 1; a NumPy array or a tensor.
    """
    axes = feature_axes(z.ndim)
    count = values_per_feature(tuple(z.shape))
    shape = (1, -1) + (1,) * (z.ndim - 2)
    if hasattr(z, "double"):  # a tensor: in place on a float64 copy (fewer small kernel calls)
        import torch

        z_new = z.to(torch.float64, copy=True)
        mean = z_new.mean(axis=axes)
        z_new.sub_(mean.reshape(shape))
        return BatchStats(count, mean, z_new.square_().sum(axis=axes))
    z = np.asarray(z, dtype=np.float64)
    mean = z.mean(axis=axes)
    z_new = z - mean.reshape(shape)
    return BatchStats(count, mean, (z_new * z_new).sum(axis=axes))


def merge(a: BatchStats, b: BatchStats) -> BatchStats:
    """Chan et al.'s exact merge of two sets' (count, mean, M2)."""
    if a.count == 0:
        return b
    if b.count == 0:
        return a
    n = a.count + b.count
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / n)
    m2 = a.m2 + b.m2 + delta * delta * (a.count * b.count / n)
    return BatchStats(n, mean, m2)


def merge_all(stats: Iterable[BatchStats]) -> BatchStats:
    """Merge any number of BatchStats (e.g. one per batch, or one per process).

    Equal to folding ``merge`` over them, in one step: the total M2 is the sum of the sets'
    M2 plus the spread of their means, sum_b count_b * (mean_b - mean)**2.
    """
    stats = [s for s in stats if s.count > 0]
    if not stats:
        raise ValueError("no statistics to merge: the sequence of batches was empty")
    if len(stats) == 1:
        return stats[0]
    counts = [s.count for s in stats]
    n = sum(counts)
    if hasattr(stats[0].mean, "double"):  # tensors
        import torch

        means, m2s = torch.stack([s.mean for s in stats]), torch.stack([s.m2 for s in stats])  # (B, n)
        w = torch.as_tensor(counts, dtype=means.dtype, device=means.device)
    else:
        means, m2s = np.stack([s.mean for s in stats]), np.stack([s.m2 for s in stats])  # (B, n)
        w = np.asarray(counts, dtype=means.dtype)
    w = w.reshape((-1,) + (1,) * (means.ndim - 1))  # (B, 1): count of each set
    mean = (w * means).sum(0) / n  # (n,)
    dev = means - mean  # (B, n): each set's mean from the whole mean
    return BatchStats(n, mean, m2s.sum(0) + (w * dev * dev).sum(0))


def finalize(stats: BatchStats) -> tuple[Array, Array]:
    """(mean, unbiased variance) of the whole set, each (n,), in float64."""
    return stats.mean, unbiased(stats.m2 / stats.count, stats.count)
