"""Exercise checkers for the test-time problem and exponentially weighted averages (chapters 2, 3).

Chapter 2, batch statistics at test time:
    predict_with_batch_stats(fn)   fn(model, X, batch_size) -> labels (m,)
    fraction_changed(fn)           fn(model, X, batch_size, order_a, order_b) -> float
Chapter 3, exponentially weighted averages:
    ema(fn)                        fn(values, beta, bias_correction) -> (T, ...)
    convert_momentum(fn)           fn(momentum, source, target) -> float
    debiased_weight(fn)            fn(t, momentum) -> float

Each compares the learner's function with bnkit on fresh inputs (``bnkit.check.check_function``)
and names the typical mistake when the output matches a known wrong variant.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bnkit import running, testtime
from bnkit.check import Case, ExerciseError, check_function
from bnkit.nets import mlp

__all__ = ["ExerciseError", "predict_with_batch_stats", "fraction_changed", "ema", "convert_momentum", "debiased_weight"]


# ---------------------------------------------------------------- chapter 2: batch statistics at test time


def _model(seed: int, in_features: int = 6, num_classes: int = 4) -> torch.nn.Module:
    """A small BN classifier in eval mode, with running statistics far from any test batch's."""
    model = mlp(hidden=(8, 8), seed=seed, in_features=in_features, num_classes=num_classes)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, torch.nn.BatchNorm1d):
                layer.running_mean.copy_(torch.randn(layer.num_features, generator=gen))
                layer.running_var.copy_(torch.rand(layer.num_features, generator=gen) * 2 + 0.5)
                layer.num_batches_tracked.fill_(100)
    return model.eval()


def _inputs(rng: np.random.Generator, m: int, in_features: int = 6) -> np.ndarray:
    """X (m, in_features), float32, features with different offsets and spreads."""
    X = rng.normal(size=(m, in_features)) * rng.uniform(0.5, 3, in_features) + rng.normal(0, 2, in_features)
    return X.astype(np.float32)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _check_untouched(name: str, fn: Callable, args: tuple) -> None:
    """Run fn once on a fresh model: it must leave the running statistics and the mode alone."""
    model = args[0]
    before, mode = _state(model), model.training
    try:
        with torch.no_grad(), np.errstate(all="ignore"):
            fn(*args)
    except Exception:  # reported with its message by check_function
        return
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    if changed:
        stats = ", ".join(k for k in changed if "running" in k or "num_batches" in k) or ", ".join(changed)
        raise ExerciseError(
            f"{name}: your function changed the model ({stats}). Putting the model itself in training "
            "mode updates its running statistics with every test batch; run the batches through a "
            "copy (copy.deepcopy(model).train()) so the model stays as it was"
        )
    if model.training != mode:
        raise ExerciseError(
            f"{name}: your function left the model in training mode; it must leave the model's mode "
            "as it found it (work on a copy, or call model.eval() afterwards)"
        )


def _eval_predictions(model: torch.nn.Module, X: np.ndarray, batch_size: int) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.as_tensor(X)).argmax(dim=1).numpy()


def _logits(model: torch.nn.Module, X: np.ndarray, batch_size: int) -> np.ndarray:
    import copy

    with torch.no_grad():
        m = copy.deepcopy(model).train()
        return torch.cat([m(torch.as_tensor(X[s : s + batch_size])) for s in range(0, len(X), batch_size)]).numpy()


def _dropped_last(model: torch.nn.Module, X: np.ndarray, batch_size: int) -> np.ndarray:
    full = len(X) - len(X) % batch_size
    if full == len(X):
        raise ValueError("no partial batch to drop")
    return testtime.predict_with_batch_stats(model, X[:full], batch_size)


def predict_with_batch_stats(fn: Callable, seed: int = 0) -> None:
    """Check ``fn(model, X, batch_size) -> labels (m,)``, BN normalising each batch with its own statistics."""
    name = "predict_with_batch_stats"
    rng = np.random.default_rng(seed)
    _check_untouched(name, fn, (_model(seed + 100), _inputs(rng, 20), 5))
    cases = [
        Case("X of shape (23, 6) in batches of 5 (the last batch holds 3)", (_model(seed), _inputs(rng, 23), 5)),
        Case("X of shape (20, 6) in batches of 4", (_model(seed + 1), _inputs(rng, 20), 4)),
        Case("X of shape (12, 6) in batches of 2, the smallest possible", (_model(seed + 2), _inputs(rng, 12), 2)),
        Case("X of shape (10, 6) in one batch of 10", (_model(seed + 3), _inputs(rng, 10), 10)),
        Case("X of shape (9, 6) with batch_size 32 > m: one batch of 9", (_model(seed + 4), _inputs(rng, 9), 32)),
    ]
    diagnoses = [
        (_eval_predictions,
         "your predictions are the eval-mode ones, made with the running statistics: here every "
         "batch must be normalised with its own mean and variance (BN in training mode)"),
        (lambda model, X, b: testtime.predict_with_batch_stats(model, X, len(X)),
         "you normalised all of X as one batch: cut X into consecutive batches X[0:b], X[b:2b], ... "
         "and normalise each with its own statistics"),
        (_logits, "you returned the logits: return the predicted labels, logits.argmax(dim=1), shape (m,)"),
        (_dropped_last, "you left out the last, smaller batch: every example of X needs a prediction"),
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        check_function(name, fn, testtime.predict_with_batch_stats, cases, diagnoses)
    print(f"✓ {name}: correct on {len(cases)} test cases, and the model is left unchanged")


def _orders(rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.permutation(m), rng.permutation(m)


def _changed_without_unpermuting(model, X, b, order_a, order_b) -> float:
    pred_a = testtime.predict_with_batch_stats(model, X[order_a], b)
    pred_b = testtime.predict_with_batch_stats(model, X[order_b], b)
    return float(np.mean(pred_a != pred_b))


def _changed_permuted_twice(model, X, b, order_a, order_b) -> float:
    pred_a = testtime.predict_with_batch_stats(model, X[order_a], b)[order_a]
    pred_b = testtime.predict_with_batch_stats(model, X[order_b], b)[order_b]
    return float(np.mean(pred_a != pred_b))


def fraction_changed(fn: Callable, seed: int = 0) -> None:
    """Check ``fn(model, X, batch_size, order_a, order_b) -> float``, the fraction of changed predictions."""
    rng = np.random.default_rng(seed + 1)
    cases = []
    for k, (m, b) in enumerate([(40, 4), (60, 6), (32, 5), (24, 8)]):
        X = _inputs(rng, m)
        cases.append(Case(f"X of shape {X.shape} in batches of {b}, two random orders",
                          (_model(seed + 10 + k), X, b, *_orders(rng, m))))
    ref = testtime.fraction_changed
    diagnoses = [
        (_changed_without_unpermuting,
         "you compared the two lists of predictions without putting them back in X's order: "
         "prediction i of X[order_a] belongs to example order_a[i] (undo it with out[order_a] = pred)"),
        (_changed_permuted_twice,
         "you reordered with pred[order], which applies the permutation a second time: undo it with "
         "pred[np.argsort(order)], or out = np.empty_like(pred); out[order] = pred"),
        (lambda *a: 1.0 - ref(*a), "you returned the fraction of predictions that stay the same"),
        (lambda *a: ref(*a) * len(a[1]), "you returned how many predictions changed: return a fraction, divide by len(X)"),
        (lambda *a: 100.0 * ref(*a), "you returned a percentage: return a fraction between 0 and 1"),
    ]
    check_function("fraction_changed", fn, ref, cases, diagnoses)


# ---------------------------------------------------------------- chapter 3: exponentially weighted averages


def _ema_variant(feed_back: bool = False, swap: bool = False, start_first: bool = False, t0: int = 1,
                 correct: bool | None = None) -> Callable[..., np.ndarray]:
    """A (wrong) EWA: correct=None follows the flag, True/False ignores it."""

    def f(values: Any, beta: float, bias_correction: bool = False) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        corr = bias_correction if correct is None else correct
        v = values[0].copy() if start_first else np.zeros(values.shape[1:])
        out = np.empty_like(values)
        for t, theta in enumerate(values, start=t0):
            v = (1 - beta) * v + beta * theta if swap else beta * v + (1 - beta) * theta
            with np.errstate(all="ignore"):
                out[t - t0] = v / (1 - beta**t) if corr else v
            if feed_back and corr:
                v = out[t - t0]
        return out

    return f


def ema(fn: Callable, seed: int = 0) -> None:
    """Check ``fn(values, beta, bias_correction) -> v`` (T, ...), the EWA with v_0 = 0."""
    rng = np.random.default_rng(seed)
    series = testtime.temperature_series(60, seed=seed)
    cases = [
        Case("a series of 60 values, beta = 0.9, bias_correction=True", (series, 0.9, True)),
        Case("a series of 60 values, beta = 0.9, bias_correction=False", (series, 0.9, False)),
        Case("values of shape (30, 3) (three features), beta = 0.5, bias_correction=True",
             (rng.normal(5, 2, (30, 3)), 0.5, True)),
        Case("a constant series of 20 fives, beta = 0.98, bias_correction=False", (np.full(20, 5.0), 0.98, False)),
        Case("a single value (T = 1), beta = 0.98, bias_correction=True", (np.array([7.0]), 0.98, True)),
        Case("beta = 0 (no memory), bias_correction=False", (rng.normal(size=10), 0.0, False)),
        Case("float32 values of shape (25, 2), beta = 0.8, bias_correction=True",
             (rng.normal(3, 1, (25, 2)).astype(np.float32), 0.8, True)),
    ]
    diagnoses = [
        (_ema_variant(feed_back=True),
         "you fed the corrected value back into the recursion: the next step must use the raw "
         "v_t = beta * v_{t-1} + (1 - beta) * theta_t; divide by (1 - beta**t) only what you return"),
        (_ema_variant(swap=True),
         "your beta weights the new value: in v_t = beta * v_{t-1} + (1 - beta) * theta_t, beta is the "
         "weight of the old average"),
        (_ema_variant(start_first=True),
         "you started from v_0 = theta_1: the EWA starts from v_0 = 0 (which is why it needs bias correction)"),
        (_ema_variant(t0=0), "t counts from 1: the first average is divided by 1 - beta**1, not 1 - beta**0 = 0"),
        (_ema_variant(t0=2), "t counts from 1: the first average is divided by 1 - beta**1, not 1 - beta**2"),
        (_ema_variant(correct=False), "with bias_correction=True return v_t / (1 - beta**t), not v_t"),
        (_ema_variant(correct=True), "with bias_correction=False return the raw v_t, without dividing by 1 - beta**t"),
        (lambda values, beta, bc: running.ema(values, beta, bc)[-1],
         "you returned only the last average: return v_t for every t, an array the shape of values"),
    ]
    check_function("ema", fn, running.ema, cases, diagnoses)


def convert_momentum(fn: Callable, seed: int = 0) -> None:
    """Check ``fn(momentum, source, target) -> float`` between "pytorch", "keras", "cs231n", "beta"."""
    cases = [
        Case(f"momentum {m} from {s} to {t}", (m, s, t))
        for m, s, t in [
            (0.1, "pytorch", "keras"),
            (0.99, "keras", "pytorch"),
            (0.9, "cs231n", "keras"),
            (0.3, "pytorch", "pytorch"),
            (0.98, "beta", "pytorch"),
            (0.05, "pytorch", "cs231n"),
            (0.999, "keras", "beta"),
        ]
    ]
    pytorch_style = ("pytorch",)
    diagnoses = [
        (lambda m, s, t: m,
         "you returned the momentum unchanged: PyTorch's momentum weights the new batch (beta = 1 - m), "
         "Keras's and CS231n's weight the old average (beta = momentum)"),
        (lambda m, s, t: m if s == t else 1 - m,
         "Keras, CS231n and beta all mean the weight of the old average: between them nothing changes; "
         "only PyTorch's momentum is 1 - beta"),
        (lambda m, s, t: 1 - m if s in pytorch_style else m,
         "you stopped at beta: convert it on to the target convention (PyTorch's momentum is 1 - beta)"),
        (lambda m, s, t: running.to_beta(m, s) if t in pytorch_style else 1 - running.to_beta(m, s),
         "you have the conventions the wrong way round: PyTorch's momentum weights the new batch "
         "(beta = 1 - m), Keras's weights the old average (beta = momentum)"),
    ]
    check_function("convert_momentum", fn, running.convert_momentum, cases, diagnoses)


def debiased_weight(fn: Callable, seed: int = 0) -> None:
    """Check ``fn(t, momentum) -> w_t``, the update weight of the bias-corrected EWA (PyTorch momentum)."""
    cases = [Case(f"t = {t}, momentum = {m}", (t, m)) for t, m in
             [(3, 0.1), (2, 0.1), (1, 0.1), (10, 0.01), (50, 0.1), (4, 0.5), (1000, 0.1)]]
    ref = lambda t, m: running.update_weight("ema_debiased", t, m)  # noqa: E731
    diagnoses = [
        (lambda t, m: m,
         "that is the uncorrected weight, PyTorch's momentum: with bias correction batch t gets "
         "w_t = (1 - beta) / (1 - beta**t), beta = 1 - momentum"),
        (lambda t, m: (1 - m) / (1 - m**t),
         "you took beta = momentum (Keras's convention): here momentum is PyTorch's, beta = 1 - momentum"),
        (lambda t, m: m / (1 - (1 - m) ** (t + 1)),
         "t counts batches from 1: the first batch gets w_1 = 1 (it replaces the starting value)"),
        (lambda t, m: 1.0 / t, "1 / t is the cumulative average (momentum=None), not the bias-corrected EWA"),
        (lambda t, m: 1 - (1 - m) ** t, "1 - beta**t is the correction factor; the weight is (1 - beta) / (1 - beta**t)"),
    ]
    check_function("debiased_weight", fn, ref, cases, diagnoses)
