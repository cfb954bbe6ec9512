"""Exercise checkers for chapter 4, running estimates across mini-batches.

    bn_infer(fn)          fn(z, gamma, beta, running_mean, running_var, eps) -> z_tilde
    update_running(fn)    fn(running_mean, running_var, mu, var, count, momentum) -> (mean, var)

Each compares the learner's function with bnkit on fresh inputs and names the typical
mistake when the output matches a known wrong variant.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bnkit import reference as ref
from bnkit import running
from bnkit.checks._core import Case, _check_returns, _features, _pair, check_function

__all__ = ["bn_infer", "update_running"]


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
        (lambda z, g, b, mean, var, eps: g * (mean - z) / np.sqrt(var + eps) + b,
         "wrong sign: centre with z - running_mean, not running_mean - z"),
        (lambda z, g, b, mean, var, eps: g * (z - mean) / np.sqrt(var + 1e-5) + b,
         "you used eps = 1e-5 whatever the argument: use the eps passed in"),
        (lambda z, g, b, mean, var, eps: g * z / np.sqrt(var + eps) - mean + b,
         "you subtracted running_mean after dividing: centre first, (z - running_mean) / sqrt(running_var + eps)"),
        (lambda z, g, b, mean, var, eps: g * (z - mean) * np.sqrt(var + eps) + b,
         "you multiplied by sqrt(running_var + eps): divide by it"),
        (lambda z, g, b, mean, var, eps: np.abs(g) * (z - mean) / np.sqrt(var + eps) + b,
         "you used |gamma|: gamma may be negative"),
        (lambda z, g, b, mean, var, eps: g * (z - mean) / np.sqrt(np.sqrt(var) + eps) + b,
         "you took running_var for a standard deviation: it is a variance, divide by sqrt(running_var + eps)"),
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
        (lambda rm, rv, mu, var, count, momentum: reference(rm, rv, mu, var, count, 0.1),
         "you used momentum = 0.1 whatever the argument: use the momentum passed in"),
        (lambda rm, rv, mu, var, count, momentum: reference(rm, rv, mu, var, count, momentum)[::-1],
         "you returned (new_var, new_mean): return them in the order (new_mean, new_var)"),
        (lambda rm, rv, mu, var, count, momentum: np.stack(
            [(1 - momentum) * rm + momentum * mu, (1 - momentum) * rv + momentum * var * count / (count + 1)]),
         "the correction is count / (count - 1), not count / (count + 1)"),
        (lambda rm, rv, mu, var, count, momentum: np.stack(
            [momentum * rm + (1 - momentum) * mu, (1 - momentum) * rv + momentum * var * count / (count - 1)]),
         "your running mean uses Keras's convention (momentum weights the old average) while the "
         "variance uses PyTorch's: in PyTorch, momentum weights the new batch in both"),
        (lambda rm, rv, mu, var, count, momentum: np.stack(
            [(1 - momentum) * rm + momentum * mu, (1 - momentum) * rv + momentum * var * (count // (count - 1))]),
         "count // (count - 1) is an integer division (1 for count > 2): write count / (count - 1)"),
    ]
    _check_returns("update_running", fn, cases[0], 2, "the pair (new_mean, new_var)")
    check_function("update_running", _pair(fn), reference, cases, diagnoses, unchanged=True)


