"""Exercise checkers for the chapter "How robust is it?" (chapter 6).

    steps_needed(fn)   fn(momentum, fraction) -> k, the fewest steps after which an EMA that
                       starts at 0 holds at least ``fraction`` of a constant batch statistic
    adabn(fn)          fn(model, X_target) -> a copy of model whose BN layers hold the exact
                       statistics of the unlabelled inputs X_target (AdaBN)

Each runs the learner's function on fresh inputs, prints one line on success and raises
``bnkit.checks.ExerciseError`` with a message that names the mistake on failure.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

import bnkit
from bnkit.checks._core import Case, does_not_apply, ExerciseError, call_learner, check_function
from bnkit.course.nets import mlp

__all__ = ["ExerciseError", "steps_needed", "adabn"]


# ---------------------------------------------------------------- exercise 1: how many steps


def _steps_needed(momentum: float, fraction: float) -> int:
    """The smallest whole k >= 0 with 1 - (1 - momentum)**k >= fraction (counted, not solved)."""
    k = max(0, math.ceil(math.log(1 - fraction) / math.log(1 - momentum)) - 2)
    while 1 - (1 - momentum) ** k < fraction:
        k += 1
    return k


def steps_needed(fn: Callable, seed: int = 0) -> None:
    """Check ``fn(momentum, fraction) -> k`` (PyTorch's momentum, the weight of the new batch)."""
    # cases where log(1 - fraction) / log(1 - momentum) is not a whole number (no round-off ties)
    # the last two: a large momentum, and a whole-number ratio (0.5**2 = 0.25 exactly)
    pairs = [(0.1, 0.99), (0.01, 0.99), (0.001, 0.5), (0.3, 0.9), (0.05, 0.95), (0.6, 0.9), (0.5, 0.75)]
    cases = [Case(f"momentum = {m:g}, fraction = {f:g}", (m, f)) for m, f in pairs]
    ratio = lambda m, f: math.log(1 - f) / math.log(1 - m)  # noqa: E731
    diagnoses = [
        (lambda m, f: ratio(m, f),
         "you returned log(1 - fraction) / log(1 - momentum) itself: a number of steps is a whole "
         "number, the smallest one at least that large (round up)"),
        (lambda m, f: round(ratio(m, f)),
         "you rounded to the nearest whole number: that can be one step too few; round up"),
        (lambda m, f: math.floor(ratio(m, f)),
         "you rounded down: after floor(...) steps the estimate is still short of the fraction. "
         "k must be a whole number of steps at least log(1 - fraction) / log(1 - momentum): round up"),
        (lambda m, f: 1 / m,
         "1 / momentum is the window of the average (its time scale), not the number of steps to "
         "reach a given fraction: solve 1 - (1 - momentum)**k >= fraction for k"),
        (lambda m, f: math.ceil(math.log(1 - f) / math.log(m)),
         "you used momentum**k: in PyTorch's convention the old estimate keeps the weight "
         "(1 - momentum) at every step, so the initial value's share after k steps is (1 - momentum)**k"),
        (lambda m, f: math.ceil(math.log(f) / math.log(1 - m)),
         "you solved (1 - momentum)**k = fraction: (1 - momentum)**k is the share of the initial "
         "value that is left; the share of the batch statistic is 1 - (1 - momentum)**k"),
        (lambda m, f: math.ceil(math.log(1 - f) / math.log(1 - m)) + 1,
         "one step too many: k = 0 means no step yet, and after k steps the share is 1 - (1 - momentum)**k"),
        (lambda m, f: int(ratio(m, f)) + 1 if ratio(m, f) == int(ratio(m, f)) else does_not_apply(),
         "int(x) + 1 is one step too many when x = log(1 - fraction) / log(1 - momentum) is a whole "
         "number (then 1 - (1 - momentum)**x equals fraction exactly, which is enough: >=); round up "
         "with math.ceil(x)"),
        (lambda m, f: math.ceil(-math.log(1 - f) / m),
         "you used the small-momentum approximation log(1 - momentum) ~ -momentum: it is not exact "
         "for a large momentum; divide by log(1 - momentum) itself"),
        (lambda m, f: math.ceil(math.log(1 - m) / math.log(1 - f)),
         "your ratio is upside down: k >= log(1 - fraction) / log(1 - momentum)"),
        (lambda m, f: math.ceil(math.log10(1 - f) / math.log(1 - m)),
         "you mixed logarithms of different bases (log10 and log): use the same base for both"),
    ]
    check_function("steps_needed", fn, _steps_needed, cases, diagnoses)


# ---------------------------------------------------------------- exercise 2: AdaBN


def _model(seed: int) -> nn.Module:
    """A small BN classifier (6 inputs, two BN layers of 8) in eval mode, with running
    statistics far from those of any target data."""
    model = mlp(hidden=(8, 8), seed=seed, in_features=6, num_classes=4, norm=bnkit.BatchNorm1d)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in bnkit.bn_layers(model):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) * 2 + 0.5)
            bn.num_batches_tracked.fill_(100)
    return model.eval()


def _target(rng: np.random.Generator, m: int) -> np.ndarray:
    """Unlabelled target inputs X (m, 6), float32: features with large offsets and spreads."""
    X = rng.normal(size=(m, 6)) * rng.uniform(1, 4, 6) + rng.normal(3, 2, 6)
    return X.astype(np.float32)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _stats(model: nn.Module) -> list[tuple[str, np.ndarray, np.ndarray]]:
    names = {m: n for n, m in model.named_modules()}
    return [(names[bn], bn.running_mean.double().numpy(), bn.running_var.double().numpy())
            for bn in bnkit.bn_layers(model)]


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    scale = max(1.0, float(np.max(np.abs(b))))
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-4, atol=1e-4 * scale))


def _call_adabn(fn: Callable, model: nn.Module, X: np.ndarray, label: str) -> nn.Module:
    """Run fn on a case; explain a stub, an exception, a wrong return value or a changed model."""
    name = "adabn"
    before, mode = _state(model), model.training
    with contextlib.redirect_stdout(io.StringIO()):
        adapted = call_learner(name, fn, (model, X.copy()), label=label)
    if adapted is None:
        raise ExerciseError(f"{name}: your function returned None: return the adapted copy of the model")
    if not isinstance(adapted, nn.Module):
        raise ExerciseError(f"{name}: your function returned {type(adapted).__name__}: return the adapted model (an nn.Module)")
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    if changed or adapted is model:
        raise ExerciseError(
            f"{name}: your function changed the model passed in ({', '.join(changed) or 'it returned the model itself'}). "
            "Adapt a copy, adapted = copy.deepcopy(model), and return it: the source model must stay as it was, "
            "to compare the two"
        )
    if model.training != mode:
        raise ExerciseError(f"{name}: your function changed the mode of the model passed in: leave it in eval mode")
    if adapted.training:
        raise ExerciseError(
            f"{name}: the model you returned is in training mode: it would normalise every test batch with "
            "its own statistics and ignore the new ones. Return it in eval mode (adapted.eval())"
        )
    return adapted


def _settings(model: nn.Module) -> list[tuple]:
    """Each BN layer's name and settings (momentum, eps, affine, track_running_stats)."""
    layers = bnkit.bn_layers(model)
    return [(n, m.momentum, m.eps, m.affine, m.track_running_stats)
            for n, m in model.named_modules() if any(m is bn for bn in layers)]


def _check_settings(name: str, model: nn.Module, adapted: nn.Module) -> None:
    """The adapted copy keeps the source's BN settings and dtype."""
    changed = [a[0] for a, b in zip(_settings(adapted), _settings(model)) if a != b]
    if changed:
        raise ExerciseError(
            f"{name}: you changed the settings of the returned copy's BN layer(s) "
            f"{', '.join(map(repr, changed))} (momentum, eps, affine or track_running_stats): "
            "AdaBN changes only running_mean and running_var"
        )
    dtypes = {p.dtype for p in adapted.parameters()} - {p.dtype for p in model.parameters()}
    if dtypes:
        raise ExerciseError(
            f"{name}: the copy you returned has {', '.join(str(d).replace('torch.', '') for d in dtypes)} "
            "parameters, the model passed in float32: compute in float64 if you like, but return a "
            "model of the source's dtype"
        )


def _diagnose(old, got, exact, count: int, label: str) -> str:
    """The message for statistics ``got`` that differ from ``exact`` (lists of (name, mean, var))."""
    first = next(i for i, (g, e) in enumerate(zip(got, exact)) if not (_close(g[1], e[1]) and _close(g[2], e[2])))
    name, g_mean, g_var = got[first]
    _, o_mean, o_var = old[first]
    _, e_mean, e_var = exact[first]
    if _close(g_mean, o_mean) and _close(g_var, o_var):
        return (f"layer {name!r} still holds its old statistics: re-estimate every BN layer's running_mean "
                "and running_var on X_target")
    if first > 0:  # the first layer's inputs do not depend on any BN layer; the later ones do
        return (f"the first BN layer is right, but layer {name!r} is not: you gathered its statistics with the "
                "BN layers before it in training mode (batch statistics). At test time those layers use their "
                "new running statistics, so estimate each layer with the layers before it already adapted "
                "(recompute_stats(..., upstream=\"eval\"))")
    if _close(g_mean, e_mean):
        if _close(g_var, e_var * (count - 1) / count):
            return ("the means are right but the variances are the biased (1/m) ones: running_var holds the "
                    "unbiased variance, m/(m-1) times larger, as torch.nn does")
        return (f"the means of layer {name!r} are right but not its variances: running_var must be the "
                "(unbiased) variance of the layer's inputs over all of X_target")
    step = e_mean - o_mean  # (n,): a running average moves the old mean part of the way towards the new one
    w = float(np.dot(g_mean - o_mean, step) / np.dot(step, step))
    if 0.02 < w < 0.98 and np.linalg.norm(g_mean - o_mean - w * step) < 0.25 * np.linalg.norm(step):
        return (f"in layer {name!r} the mean moved only part of the way (about {w:.0%}) from its old value "
                "towards the mean of X_target: a running average with momentum keeps a share of the old "
                "statistics. Use population statistics instead: bnkit.bnkit.recompute_stats(copy, batches, "
                "estimator=\"exact\", upstream=\"eval\")")
    i = int(np.argmax(np.abs(g_mean - e_mean)))
    return (f"wrong statistics in layer {name!r} on {label}: feature {i} has running_mean {g_mean[i]:.4g}, "
            f"expected {e_mean[i]:.4g} (the mean of that layer's inputs over X_target, with the layers before "
            "it already adapted)")


def adabn(fn: Callable, seed: int = 0) -> None:
    """Check ``fn(model, X_target) -> adapted``: a copy of ``model`` in eval mode whose BN layers
    hold the exact mean and unbiased variance of their inputs over X_target (m, features), each
    layer measured with the layers before it already adapted; ``model`` itself unchanged."""
    rng = np.random.default_rng(seed)
    cases = [(seed + k, _target(rng, m)) for k, m in enumerate((300, 57, 1000))]
    for k, (model_seed, X) in enumerate(cases):
        label = f"case {k + 1}: X_target of shape {X.shape}"
        model = _model(model_seed)
        adapted = _call_adabn(fn, model, X, label)
        if len(bnkit.bn_layers(adapted)) != len(bnkit.bn_layers(model)):
            raise ExerciseError("adabn: the model you returned does not have the BN layers of the model passed in")
        reference = copy.deepcopy(model)
        bnkit.recompute_stats(reference, [torch.as_tensor(X)], estimator="exact", upstream="eval")
        got, exact = _stats(adapted), _stats(reference)
        if all(_close(g[1], e[1]) and _close(g[2], e[2]) for g, e in zip(got, exact)):
            _check_settings("adabn", model, adapted)
            continue
        raise ExerciseError("adabn: " + _diagnose(_stats(model), got, exact, len(X), label))
    print(f"✓ adabn: correct on {len(cases)} models and target sets, and the source model is left unchanged")
