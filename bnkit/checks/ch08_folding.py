"""Exercise checkers for chapter 8, folding Batch Norm for deployment.

- ``fold_linear(fn)`` / ``fold_conv(fn)``: ``fn(W, b, gamma, beta, mean, var, eps) -> (W', b')``
  against the fold built from ``bnkit.reference.inference_affine``.

One line on success, an ``ExerciseError`` naming the mistake otherwise.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bnkit import reference as ref
from bnkit.checks._core import Case, Variant, check_results

__all__ = ["fold_linear", "fold_conv"]


def _fold_reference(W: np.ndarray, b: np.ndarray, gamma, beta, mean, var, eps) -> tuple:
    """W' = diag(s) W (output rows / output channels), b' = (b - mean) s + beta."""
    scale, shift = ref.inference_affine(gamma, beta, mean, var, eps)
    return scale.reshape((-1,) + (1,) * (W.ndim - 1)) * W, b * scale + shift


def _fold_cases(seed: int, conv: bool) -> list[Case]:
    """Random layers (W, b) and BN parameters; the first layer is square, so row/column mix-ups show."""
    rng = np.random.default_rng(seed)
    if conv:  # (C_out, C_in, kh, kw)
        shapes = [(4, 4, 3, 3), (6, 3, 3, 3), (8, 1, 5, 5), (2, 5, 1, 1)]
        what = "conv weight"
        hint = ("the weight has shape (C_out, C_in, kh, kw) and BN scales the output channels: "
                "s.reshape(-1, 1, 1, 1) * W")
    else:  # (n_out, n_in)
        shapes = [(5, 5), (3, 7), (10, 4), (1, 6)]
        what = "weight"
        hint = ("W has shape (n_out, n_in) and BN's features are the layer's outputs: scale the "
                "rows, s[:, None] * W")
    epss = [1e-5, 1e-3, 0.1, 1e-5]
    cases = []
    for k, (shape, eps) in enumerate(zip(shapes, epss)):
        n = shape[0]
        W = rng.normal(size=shape)
        b = np.zeros(n) if k == 3 else rng.normal(size=n)
        gamma = rng.uniform(0.5, 2.0, n) * rng.choice([-1.0, 1.0], n)
        beta = rng.normal(0, 2, n)
        mean = rng.normal(0, 3, n)
        var = rng.uniform(0.05, 4.0, n)
        label = f"a {what} of shape {shape}, eps = {eps:g}" + (" and b = 0 (a layer with bias=False)" if k == 3 else "")
        cases.append(Case(label, (W, b, gamma, beta, mean, var, eps), hint if k else ""))
    return cases


def _wrong_fold(
    eps_outside: bool = False, no_sqrt: bool = False, no_gamma: bool = False, columns: bool = False,
    bias: str = "", fixed_eps: bool = False, abs_gamma: bool = False,
) -> Variant:
    def f(W, b, gamma, beta, mean, var, eps):
        eps = 1e-5 if fixed_eps else eps
        std = np.sqrt(var) + eps if eps_outside else (var + eps if no_sqrt else np.sqrt(var + eps))
        s = (1.0 if no_gamma else np.abs(gamma) if abs_gamma else gamma) / std
        if columns:  # along the input axis 1
            W2 = W * s.reshape((1, -1) + (1,) * (W.ndim - 2))
        else:
            W2 = W * s.reshape((-1,) + (1,) * (W.ndim - 1))
        b2 = {
            "": (b - mean) * s + beta,
            "no_mean": b * s + beta,
            "unscaled_b": b - mean * s + beta,
            "no_beta": (b - mean) * s,
            "mean_unscaled": b * s - mean + beta,
            "no_gamma": (b - mean) / std + beta,
            "sign": (mean - b) * s + beta,
        }[bias]
        return W2, b2

    return f


def _fold_diagnoses(axis_name: str) -> list[tuple[Variant, str, str]]:
    eps = "eps belongs inside the square root: s = gamma / sqrt(var + eps)"
    return [
        (_wrong_fold(columns=True), "W_folded",
         f"you scaled the {axis_name[1]} instead of the {axis_name[0]}: BN normalises the layer's "
         f"outputs, so s multiplies the {axis_name[0]} of W (W' = diag(s) W)"),
        (_wrong_fold(eps_outside=True), "W_folded", eps),
        (_wrong_fold(no_sqrt=True), "W_folded", "divide by the standard deviation sqrt(var + eps), not by the variance"),
        (_wrong_fold(no_gamma=True), "W_folded", "you forgot gamma: s = gamma / sqrt(var + eps)"),
        (_wrong_fold(eps_outside=True), "b_folded", eps),
        (_wrong_fold(bias="no_mean"), "b_folded",
         "you forgot to subtract the mean from the bias: b' = (b - mean) * s + beta"),
        (_wrong_fold(bias="unscaled_b"), "b_folded",
         "the layer's own bias b passes through BN too, so it is scaled: b' = (b - mean) * s + beta"),
        (_wrong_fold(bias="no_beta"), "b_folded", "you forgot beta: b' = (b - mean) * s + beta"),
        (_wrong_fold(bias="mean_unscaled"), "b_folded",
         "the mean is subtracted before scaling: b' = (b - mean) * s + beta, not b * s - mean + beta"),
        (_wrong_fold(fixed_eps=True), "W_folded", "you used eps = 1e-5 whatever the argument: use the eps passed in"),
        (_wrong_fold(abs_gamma=True), "W_folded", "you used |gamma|: gamma may be negative, s = gamma / sqrt(var + eps)"),
        (lambda W, b, *a: (_fold_reference(W, b, *a)[0].T, None), "W_folded",
         "you returned W_folded transposed: it has W's shape, (n_out, n_in), with row j scaled by s_j"),
        (_wrong_fold(bias="no_gamma"), "b_folded",
         "the bias is scaled by s = gamma / sqrt(var + eps), gamma included: b' = (b - mean) * s + beta"),
        (_wrong_fold(bias="sign"), "b_folded", "wrong sign: b' = (b - mean) * s + beta, not (mean - b) * s + beta"),
    ]


def fold_linear(fn: Callable, seed: int = 0) -> None:
    """Check ``fn(W, b, gamma, beta, mean, var, eps) -> (W_folded, b_folded)`` for Linear + BN.

    W: (n_out, n_in), b and the BN vectors: (n_out,).
    """
    __tracebackhide__ = True
    check_results("fold_linear", fn, _fold_reference, _fold_cases(seed, conv=False), ("W_folded", "b_folded"),
                  _fold_diagnoses(("rows (outputs)", "columns (inputs)")), unchanged=True)


def fold_conv(fn: Callable, seed: int = 0) -> None:
    """Check ``fn(W, b, gamma, beta, mean, var, eps) -> (W_folded, b_folded)`` for Conv2d + BN2d.

    W: (C_out, C_in, kh, kw), b and the BN vectors: (C_out,).
    """
    __tracebackhide__ = True
    check_results("fold_conv", fn, _fold_reference, _fold_cases(seed, conv=True), ("W_folded", "b_folded"),
                  _fold_diagnoses(("output channels (axis 0)", "input channels (axis 1)")), unchanged=True)
