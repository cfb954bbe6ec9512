"""Exercise checkers for chapter 3, exponentially weighted averages.

    ema(fn)                fn(values, beta, bias_correction) -> (T, ...)
    convert_momentum(fn)   fn(momentum, source, target) -> float
    debiased_weight(fn)    fn(t, momentum) -> float

Each compares the learner's function with bnkit on fresh inputs and names the typical
mistake when the output matches a known wrong variant.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from bnkit import running
from bnkit.course import testtime
from bnkit.checks._core import Case, does_not_apply, check_function

__all__ = ["ema", "convert_momentum", "debiased_weight"]


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


def _ema_store(store: Callable) -> Callable:
    """An EWA that returns store(v_t, t, beta, T) when bias_correction is True, v_t otherwise."""

    def f(values: Any, beta: float, bias_correction: bool = False) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if not bias_correction:
            return running.ema(values, beta)
        raw = running.ema(values, beta)
        t = np.arange(1, len(values) + 1).reshape((-1,) + (1,) * (values.ndim - 1))
        with np.errstate(all="ignore"):
            return store(raw, t, beta, len(values))

    return f


def _ema_behind(values: Any, beta: float, bias_correction: bool = False) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    raw = np.concatenate([np.zeros((1,) + values.shape[1:]), running.ema(values, beta)[:-1]])
    if not bias_correction:
        return raw
    t = np.maximum(np.arange(len(values)), 1).reshape((-1,) + (1,) * (values.ndim - 1))
    return raw / (1 - beta**t)


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
        Case("integer values 1, 2, ..., 12 (an int64 array), beta = 0.7, bias_correction=True",
             (np.arange(1, 13), 0.7, True)),
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
        (lambda values, beta, bc: np.trunc(running.ema(values, beta, bc)) if np.asarray(values).dtype.kind == "i"
         else does_not_apply(),
         "your averages are rounded to whole numbers: the output array took the integer dtype of "
         "values (np.zeros_like(values)); make it float (np.zeros(values.shape))"),
        (_ema_store(lambda v, t, beta, T: v / (1 - beta) ** t),
         "you divided by (1 - beta)**t: the bias correction divides by 1 - beta**t"),
        (_ema_store(lambda v, t, beta, T: v / (1 - beta**T)),
         "you divided every v_t by the same factor 1 - beta**T (T, the last step): the correction "
         "of step t is 1 - beta**t"),
        (_ema_behind,
         "your output is one step behind: out[t-1] must be v_t, after the update with theta_t, "
         "not v_{t-1}"),
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
            (0.0003, "pytorch", "keras"),
            (0.9, "keras", "cs231n"),
            (0.2, "beta", "cs231n"),
        ]
    ]
    pytorch_style = ("pytorch",)
    to_beta = lambda m, s, flip: 1 - m if s in flip else m  # noqa: E731
    diagnoses = [
        (lambda m, s, t: 1 - m,
         "you flipped the momentum whatever the conventions: only PyTorch's momentum is 1 - beta; "
         "between Keras, CS231n and beta nothing changes, and from PyTorch to PyTorch neither"),
        (lambda m, s, t: to_beta(to_beta(m, s, ("pytorch", "cs231n")), t, ("pytorch", "cs231n")),
         "CS231n's momentum is Keras-style, the weight of the old average (beta = momentum): only "
         "PyTorch's is 1 - beta"),
        (lambda m, s, t: to_beta(to_beta(m, s, ("pytorch", "beta")), t, ("pytorch", "beta")),
         'the convention "beta" is beta itself, the weight of the old average: only PyTorch\'s '
         "momentum is 1 - beta"),
        (lambda m, s, t: 1 - m if t in pytorch_style else m,
         "you only converted when the target is PyTorch: a PyTorch source needs beta = 1 - momentum "
         "too; go through beta both ways"),
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
             [(1, 0.1), (3, 0.1), (2, 0.1), (10, 0.01), (50, 0.1), (4, 0.5), (1000, 0.1)]]
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
        (lambda t, m: (1 - m) / (1 - (1 - m) ** t),
         "the numerator is 1 - beta (the momentum), not beta: w_t = (1 - beta) / (1 - beta**t)"),
        (lambda t, m: m / m**t,
         "you divided by (1 - beta)**t: the total weight of t batches is 1 - beta**t"),
    ]
    check_function("debiased_weight", fn, ref, cases, diagnoses)
