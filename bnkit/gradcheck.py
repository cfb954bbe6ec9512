"""Gradient checks by centred finite differences (in float64), for the backward-pass chapter.

- ``numerical_gradient(f, x)``: every partial derivative of a scalar function, one pair of
  evaluations per element (CS231n style; fine for the small arrays of the chapters).
- ``directional_error(f, x, grad)``: the cheap check along one random direction v
  (HIPS/autograd style): compares (f(x + h v) - f(x - h v)) / 2h with <grad, v>.
- ``rel_error(a, b)``: max |a - b| / max(max |a|, max |b|), the number both report.

A gradient test needs a *random* upstream gradient: Batch Norm's dz is exactly 0 for an
all-ones one, so a test with it cannot fail.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np


def rel_error(a, b) -> float:
    """Largest absolute difference, relative to the largest magnitude of a or b (0 if both are 0)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(float(np.max(np.abs(a), initial=0.0)), float(np.max(np.abs(b), initial=0.0)))
    return 0.0 if scale == 0.0 else float(np.max(np.abs(a - b), initial=0.0)) / scale


def numerical_gradient(f: Callable[[np.ndarray], float], x: np.ndarray, h: float = 1e-5) -> np.ndarray:
    """The gradient of a scalar function f at x (any shape) by centred differences, the shape of x.

    Each element is moved by +h and -h in turn and put back, so x is unchanged afterwards.
    Error O(h^2) from the truncation plus O(round-off / h): h = 1e-5 suits float64.
    """
    x = np.array(x, dtype=np.float64)  # a float64 copy: the caller's array is never touched
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + h
        f_plus = float(f(x))
        x[i] = old - h
        f_minus = float(f(x))
        x[i] = old
        grad[i] = (f_plus - f_minus) / (2 * h)
    return grad


def directional_error(
    f: Callable[[np.ndarray], float], x: np.ndarray, grad: np.ndarray, h: float = 1e-5, seed: int = 0
) -> float:
    """Relative error of ``grad`` along one random direction v (standard normal, from ``seed``).

    Compares the centred difference (f(x + h v) - f(x - h v)) / 2h with <grad, v>: two
    evaluations of f instead of two per element. A wrong gradient is caught unless the
    error happens to be orthogonal to v, which a random v makes (almost surely) impossible.
    """
    x = np.asarray(x, dtype=np.float64)
    v = np.random.default_rng(seed).standard_normal(x.shape)  # the random direction
    numeric = (float(f(x + h * v)) - float(f(x - h * v))) / (2 * h)
    analytic = float(np.sum(np.asarray(grad, dtype=np.float64) * v))
    return rel_error(numeric, analytic)
