"""Exercise checkers for chapter 5, population statistics.

    merge(fn)         fn(a, b) -> (count, mean, m2), a and b are running.BatchStats
    algorithm2(fn)    fn(mus, variances, m) -> (mean, var)
    layer_by_layer_stats(fn)  fn(model, batches): every BN layer's population statistics, by hand

Each compares the learner's function with bnkit on fresh inputs and names the typical
mistake when the output matches a known wrong variant.
"""
from __future__ import annotations

import ast
import contextlib
import copy
import functools
import inspect
import io
import textwrap
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bnkit import running
from bnkit.checks._core import (
    Case, ExerciseError, _check_returns, _features, _numpy, _pair, call_learner, check_function, describe_difference,
)

__all__ = ["merge", "algorithm2", "layer_by_layer_stats"]


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


def _merge_with(mean_m2: Callable) -> Callable:
    """A merge whose (mean, m2) come from mean_m2(a, b, n, delta), for sets that are not empty."""

    def f(a: running.BatchStats, b: running.BatchStats) -> np.ndarray:
        n = a.count + b.count
        if a.count == 0 or b.count == 0:
            raise ValueError("not applicable")
        mean, m2 = mean_m2(a, b, n, b.mean - a.mean)
        return np.concatenate([[n], mean, m2])

    return f


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
        Case("two empty sets (count 0 each)", (_stats(rng, 0, 3), _stats(rng, 0, 3))),
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
        (_merge_with(lambda a, b, n, d: (a.mean + d * a.count / n, a.m2 + b.m2 + d**2 * a.count * b.count / n)),
         "the weights are swapped: the new mean is mean_a + delta * n_b / n (the larger set pulls the "
         "mean towards itself)"),
        (_merge_with(lambda a, b, n, d: (a.mean - d * b.count / n, a.m2 + b.m2 + d**2 * a.count * b.count / n)),
         "delta has the wrong sign: delta = mean_b - mean_a, and the new mean is mean_a + delta * n_b / n"),
        (_merge_with(lambda a, b, n, d: (a.mean + d * b.count / n, (a.m2 + b.m2 + d**2 * a.count * b.count / n) / n)),
         "you returned the variance M2 / n: return M2 itself, the sum of squared deviations"),
        (_merge_with(lambda a, b, n, d: (a.mean + d * b.count / n,
                                         a.m2 + b.m2 + d**2 * a.count * b.count / max(n - 1, 1))),
         "the spread term divides by n = n_a + n_b, not n - 1: delta**2 * n_a * n_b / n"),
        (lambda a, b: np.concatenate([[a.count + b.count], (a.mean + b.mean) / 2, (a.m2 + b.m2) / 2]),
         "you averaged the two sets' statistics: counts add, means are weighted by the counts, and M2 is a "
         "sum of squares, M2 = M2_a + M2_b + delta**2 * n_a * n_b / n"),
    ]
    _check_returns("merge", fn, cases[0], 3, "(count, mean, m2)")
    check_function("merge", _triple(fn), reference, cases, diagnoses, unchanged=True)


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
        (lambda mus, v, m: np.stack([mus.mean(0), m // (m - 1) * v.mean(0)]),
         "m // (m - 1) is an integer division (1 for m > 2): write m / (m - 1)"),
        (lambda mus, v, m: np.stack([np.median(mus, 0), m / (m - 1) * np.median(v, 0)]),
         "you took medians: Algorithm 2 averages over the batches, E_B[...] is a mean"),
        (lambda mus, v, m: np.stack([m / (m - 1) * mus.mean(0), m / (m - 1) * v.mean(0)]),
         "only the variance gets the m/(m-1) correction: the mean is E_B[mu_B], the plain average"),
        (lambda mus, v, m: np.stack([m / (m - 1) * v.mean(0), mus.mean(0)]),
         "you returned (var, mean): return them in the order (mean, var)"),
    ]
    _check_returns("algorithm2", fn, cases[0], 2, "the pair (mean, var)")
    check_function("algorithm2", _pair(fn), reference, cases, diagnoses, unchanged=True)


# ---------------------------------------------------------------- per-layer statistics by hand

_SHORTCUTS = ("recompute_stats", "population_stats", "update_bn")


def _uses_shortcut(fn: Callable) -> str | None:
    """The name of a library function that does the whole exercise, if fn's code calls it."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    for node in ast.walk(tree):
        name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
        if name in _SHORTCUTS:
            return name
    return None


def _nets(seed: int) -> list[tuple[str, torch.nn.Module, list[torch.Tensor]]]:
    """(label, model, batches): an MLP and a conv net, uneven batches, inputs far from 0."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                              torch.nn.Linear(8, 5), torch.nn.BatchNorm1d(5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    X = torch.randn(151, 6, generator=gen) * 2 + 3
    cnn = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                              torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 3 * 3, 6), torch.nn.BatchNorm1d(6))
    images = torch.randn(37, 2, 7, 7, generator=gen) + 1
    for model in (mlp, cnn):  # training-time running statistics, far from the data's
        with torch.no_grad():
            for bn in (m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
                bn.running_mean.normal_(generator=gen)
                bn.running_var.uniform_(0.5, 2.0, generator=gen)
    return [
        ("an MLP with two BatchNorm1d layers in eval mode, batches of 64, 64 and 23 (6 features)",
         mlp.eval(), list(X.split(64))),
        ("a conv net (BatchNorm2d, BatchNorm2d, BatchNorm1d) in training mode, batches of 16, 16 and 5 "
         "images (2, 7, 7)", cnn.train(), list(images.split(16))),
    ]


def _buffers(model: torch.nn.Module) -> list[tuple[str, np.ndarray, np.ndarray]]:
    return [(n, m.running_mean.double().numpy().copy(), m.running_var.double().numpy().copy())
            for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _same(a: list, b: list) -> bool:
    return all(np.allclose(x[1], y[1], rtol=1e-4, atol=1e-5) and np.allclose(x[2], y[2], rtol=1e-4, atol=1e-5)
               for x, y in zip(a, b))


def _recomputed(model: torch.nn.Module, batches: list, **kwargs: Any) -> list:
    from bnkit.population import recompute_stats

    copy_ = copy.deepcopy(model)
    recompute_stats(copy_, batches, **kwargs)
    return _buffers(copy_)


def _one_pass_old(model: torch.nn.Module, batches: list) -> list:
    """Every layer measured in one eval-mode pass, before any is updated."""
    model = copy.deepcopy(model).eval()
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    inputs: dict = {bn: [] for bn in layers}
    hooks = [bn.register_forward_pre_hook(lambda m, a: inputs[m].append(a[0].double())) for bn in layers]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    for bn in layers:
        z = torch.cat(inputs[bn])
        axes = [0] + list(range(2, z.dim()))
        with torch.no_grad():
            bn.running_mean.copy_(z.mean(dim=axes))
            bn.running_var.copy_(z.var(dim=axes))
    return _buffers(model)


def _layer_mistake(model: torch.nn.Module, batches: list, got: list, old: list) -> str:
    """Name a known mistake from the statistics the learner left in the layers, or ''."""
    first = next(i for i, (g, e) in enumerate(zip(got, _recomputed(model, batches, upstream="eval")))
                 if not _same([g], [e]))
    name = got[first][0]
    if _same([got[first]], [old[first]]):
        return (f"layer {name!r} still holds its old statistics: set every BN layer's running_mean and "
                "running_var")
    if _same(got, _recomputed(model, batches, upstream="train")):
        return ("you gathered every layer's inputs in one pass with the BN layers in training mode: "
                f"the first layer is right, but {name!r} saw its upstream layers normalise with batch "
                "statistics. Go layer after layer, with the layers before it already updated and in "
                "eval mode")
    if _same(got, _one_pass_old(model, batches)):
        return ("you measured every layer in one pass with the old statistics upstream: the first layer "
                f"is right, but {name!r} must see what its upstream layers give with their NEW "
                "statistics; update the layers one after the other, each measured after the ones "
                "before it are updated")
    if _same(got, _recomputed(model, batches, estimator="algorithm2", upstream="eval")):
        return ("you averaged per-batch statistics with every batch weighted alike (Algorithm 2): the "
                "batches have different sizes here; take the mean and variance over all the values "
                "(concatenate the inputs, or weight each batch by its count)")
    e_mean, e_var = _recomputed(model, batches, upstream="eval")[first][1:]
    g_mean, g_var = got[first][1:]
    if np.allclose(g_mean, e_mean, rtol=1e-4, atol=1e-5):
        ratio = float(np.median(g_var / e_var))
        if ratio < 1:
            return (f"the means of layer {name!r} are right but its variances are {ratio:.4g} times too "
                    "small: running_var holds the unbiased variance (divide by N - 1, N the number of "
                    "values per feature or channel), as torch.nn does")
        return f"the means of layer {name!r} are right but not its variances ({ratio:.4g} times the right ones)"
    return ""


def layer_by_layer_stats(fn: Callable, seed: int = 0) -> None:
    """Check ``fn(model, batches)``: it sets every BN layer's running_mean / running_var to the
    exact mean and unbiased variance of the layer's input over all batches, layer after layer
    with the layers before it already updated and in eval mode, leaves the model's modes as they
    were, and calls no library shortcut (bnkit.recompute_stats, update_bn)."""
    __tracebackhide__ = True
    name = "layer_by_layer_stats"
    if not callable(fn):
        raise ExerciseError(f"{name}: expected a function, got {type(fn).__name__}")
    used = _uses_shortcut(fn)
    if used:
        raise ExerciseError(f"{name}: you called {used}: the exercise is to do by hand what it does "
                            "(hooks on each BN layer, layer after layer); use it afterwards to compare")
    for label, model, batches in _nets(seed):
        old, modes = _buffers(model), [m.training for m in model.modules()]
        expected = _recomputed(model, batches, upstream="eval")
        reference_model = copy.deepcopy(model)
        with contextlib.redirect_stdout(io.StringIO()):
            call_learner(name, fn, (model, [b.clone() for b in batches]), label=label)
        if [m.training for m in model.modules()] != modes:
            raise ExerciseError(f"{name}: your function changed the modes of the model's layers (on {label}): "
                                "remember model.training and restore it (model.train(was_training))")
        got = _buffers(model)
        if _same(got, expected):
            continue
        mistake = _layer_mistake(reference_model, batches, got, old)
        if mistake:
            raise ExerciseError(f"{name}: {mistake} (on {label})")
        k = next(i for i, (g, e) in enumerate(zip(got, expected)) if not _same([g], [e]))
        g, e = got[k], expected[k]
        what = "running_mean" if not np.allclose(g[1], e[1], rtol=1e-4, atol=1e-5) else "running_var"
        i = 1 if what == "running_mean" else 2
        raise ExerciseError(
            f"{name}: layer {g[0]!r} on {label}: {what} is wrong: "
            f"{describe_difference(g[i], e[i], Case(f'layer {g[0]!r}', (e[i],), 'the statistics of the layer input over all batches, with the layers before it in eval mode'))}"
        )
    print(f"✓ {name}: every layer matches bnkit.recompute_stats(upstream=\"eval\") on {len(_nets(seed))} models")
