"""Chapters 7 (backprop) and 8 (folding): typical wrong answers and right answers written
otherwise (tests/test_exercises.py runs them), and tests of those checkers."""
from __future__ import annotations

import numpy as np
import pytest

from bnkit import reference as ref
from bnkit.checks import ch07_backprop, ch08_folding
from bnkit.checks._core import ExerciseError

pytest.register_assert_rewrite("exercise_support")
from exercise_support import diagnosis  # noqa: E402

def test_references_pass():
    reference = {
        "my_backward": ref.backward,
        "my_directional_error": __import__("bnkit.gradcheck", fromlist=["x"]).directional_error,
        "my_fold_linear": ch08_folding._fold_reference,
        "my_fold_conv": ch08_folding._fold_reference,
    }
    checkers = {"my_backward": ch07_backprop.backward, "my_directional_error": ch07_backprop.directional_error,
                "my_fold_linear": ch08_folding.fold_linear, "my_fold_conv": ch08_folding.fold_conv}
    for name, checker in checkers.items():
        checker(reference[name])


# ---------------------------------------------------------------- typical wrong answers: backward


def _axes(x):
    return tuple(a for a in range(x.ndim) if a != 1)


def _vec(v, x):
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


def _backward(mu_path=True, var_path=True, count=None, ones=False, swap=False):
    """A learner's staged backward pass, with the chosen mistake."""

    def backward(dz_tilde, cache):
        z_new, var, z_norm, gamma, eps = cache.z_new, cache.var, cache.z_norm, cache.gamma, cache.eps
        axes = _axes(dz_tilde)
        m = count(dz_tilde) if count else dz_tilde.size // dz_tilde.shape[1]
        if ones:
            dz_tilde = np.ones_like(dz_tilde)
        dbeta = dz_tilde.sum(axis=axes)
        dgamma = (dz_tilde * z_norm).sum(axis=axes)
        dz_norm = dz_tilde * _vec(gamma, dz_tilde)
        inv_std = _vec((var + eps) ** -0.5, dz_tilde)
        dz_new = dz_norm * inv_std
        if var_path:
            dvar = -0.5 * (dz_norm * z_new).sum(axis=axes, keepdims=True) * inv_std**3
            dz_new = dz_new + dvar * 2 * z_new / m
        dz = dz_new - dz_new.sum(axis=axes, keepdims=True) / m if mu_path else dz_new
        return (dz, dbeta, dgamma) if swap else (dz, dgamma, dbeta)

    return backward


WRONG_BACKWARD = [
    (ch07_backprop.backward, _backward(mu_path=False), "you left out the path through mu"),
    (ch07_backprop.backward, _backward(var_path=False), "you left out the path through var"),
    (ch07_backprop.backward, _backward(mu_path=False, var_path=False), "you treated mu and var as constants"),
    (ch07_backprop.backward, _backward(ones=True), "all-ones upstream gradient"),
    (ch07_backprop.backward, _backward(count=lambda x: x.shape[0]), "m*H*W values"),
    (ch07_backprop.backward, _backward(swap=True), "dgamma and dbeta are swapped"),
    (ch07_backprop.backward, lambda dz_tilde, cache: ref.backward(dz_tilde, cache)[0], "return a tuple of 3 arrays (dz, dgamma, dbeta)"),
    (ch07_backprop.backward, lambda dz_tilde, cache: None, "returned None"),
]


def test_a_wrong_dz_that_does_not_sum_to_zero_gets_a_note():
    def backward(dz_tilde, cache):  # right, except for an extra constant in dz
        dz, dgamma, dbeta = ref.backward(dz_tilde, cache)
        return dz + 0.1, dgamma, dbeta

    with pytest.raises(ExerciseError, match="does not sum to 0 over the batch"):
        ch07_backprop.backward(backward)


def test_backward_checker_uses_random_upstream_gradients():
    """The trap the chapter is about: the checker's dz_tilde are not all ones, so dz != 0."""
    for case in ch07_backprop._backward_cases(0):
        dz_tilde, cache = case.args
        assert np.ptp(dz_tilde) > 1
        if dz_tilde.size // dz_tilde.shape[1] > 2:  # with 2 values per feature z_norm = +-1: dz ~ eps
            assert np.abs(ref.backward(dz_tilde, cache)[0]).max() > 1e-3
    shapes = [case.args[0].shape for case in ch07_backprop._backward_cases(0)]
    assert any(len(s) == 4 for s in shapes) and any(len(s) == 2 for s in shapes)


def test_backward_checker_does_not_let_the_learner_corrupt_the_cache():
    def in_place(dz_tilde, cache):
        out = ref.backward(dz_tilde, cache)
        cache.z_norm[...] = 0  # vandalism on the learner's copy
        return out

    ch07_backprop.backward(in_place)


# ---------------------------------------------------------------- typical wrong answers: directional check


def _directional(direction="random", centred=True, in_place=False, seeded=True):
    def directional_error(f, x, grad, h=1e-5, seed=0):
        rng = np.random.default_rng(seed if seeded else None)
        if direction == "ones":
            v = np.ones_like(x)
        elif direction == "one-hot":
            v = np.zeros_like(x)
            v.flat[0] = 1.0
        else:
            v = rng.standard_normal(x.shape)
        if in_place:
            x += h * v
            f_plus = f(x)
            numeric = (f_plus - f(x - 2 * h * v)) / (2 * h)
        elif centred:
            numeric = (f(x + h * v) - f(x - h * v)) / (2 * h)
        else:
            numeric = (f(x + h * v) - f(x)) / h
        analytic = np.sum(grad * v)
        return abs(numeric - analytic) / max(abs(numeric), abs(analytic), 1e-300)

    return directional_error


WRONG_DIRECTIONAL = [
    (ch07_backprop.directional_error, _directional(direction="ones"), "all entries equal"),
    (ch07_backprop.directional_error, _directional(direction="one-hot"), "one element of x at a time"),
    (ch07_backprop.directional_error, _directional(centred=False), "centred difference"),
    (ch07_backprop.directional_error, _directional(in_place=True), "changed x in place"),
    (ch07_backprop.directional_error, _directional(seeded=False), "same seed"),
    (ch07_backprop.directional_error, lambda f, x, grad, h=1e-5, seed=0: 0.0, "never evaluated away from x"),
    (ch07_backprop.directional_error, lambda f, x, grad, h=1e-5, seed=0: np.zeros(3), "return one number"),
]


def test_directional_check_with_absolute_error_is_caught():
    def absolute(f, x, grad, h=1e-5, seed=0):
        v = np.random.default_rng(seed).standard_normal(x.shape)
        return abs((f(x + h * v) - f(x - h * v)) / (2 * h) - np.sum(grad * v))  # not relative

    with pytest.raises(ExerciseError, match="1.5 times too large"):
        ch07_backprop.directional_error(absolute)


# ---------------------------------------------------------------- typical wrong answers: folding


def _fold(eps_outside=False, subtract_mean=True, rows=True, scale_b=True):
    def fold(W, b, gamma, beta, mean, var, eps):
        s = gamma / (np.sqrt(var) + eps if eps_outside else np.sqrt(var + eps))
        shape = [1] * W.ndim
        shape[0 if rows else 1] = -1
        W_folded = W * s.reshape(shape)
        b_scaled = b * s if scale_b else b
        b_folded = b_scaled - (mean * s if subtract_mean else 0) + beta
        return W_folded, b_folded

    return fold


WRONG_FOLD = [
    (ch08_folding.fold_linear, _fold(eps_outside=True), "eps belongs inside the square root"),
    (ch08_folding.fold_linear, _fold(subtract_mean=False), "you forgot to subtract the mean from the bias"),
    (ch08_folding.fold_linear, _fold(rows=False), "you scaled the columns (inputs) instead of the rows"),
    (ch08_folding.fold_linear, _fold(scale_b=False), "the layer's own bias b passes through BN too"),
    (ch08_folding.fold_linear, lambda W, b, g, be, mu, var, eps: W, "return a tuple of 2 arrays"),
    (ch08_folding.fold_conv, _fold(rows=False), "you scaled the input channels (axis 1) instead of the output channels"),
    (ch08_folding.fold_conv, _fold(eps_outside=True), "eps belongs inside the square root"),
    (ch08_folding.fold_conv, _fold(subtract_mean=False), "you forgot to subtract the mean from the bias"),
    (ch08_folding.fold_conv,
     lambda W, b, g, be, mu, var, eps: (g / np.sqrt(var + eps) * W, (b - mu) * g / np.sqrt(var + eps) + be),
     "your function raised ValueError"),  # s lined up with the last axis: broadcasting fails on (8, 1, 5, 5)
]


WRONG = WRONG_BACKWARD + WRONG_DIRECTIONAL + WRONG_FOLD
RIGHT: list = []


def test_fold_reference_agrees_with_torch_fold_bn():
    """The checkers' reference fold is what bnkit.fold_bn does to a Linear + BN pair."""
    torch = pytest.importorskip("torch")
    from bnkit.folding import fold_bn

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4)).double()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.normal_()
        model[1].bias.normal_()
    folded = fold_bn(model)
    lin, bn = model
    W, b = ch08_folding._fold_reference(
        lin.weight.detach().numpy(), lin.bias.detach().numpy(), bn.weight.detach().numpy(),
        bn.bias.detach().numpy(), bn.running_mean.numpy(), bn.running_var.numpy(), bn.eps,
    )
    layer = folded.get_submodule("0")
    np.testing.assert_allclose(layer.weight.detach().numpy(), W, rtol=1e-12)
    np.testing.assert_allclose(layer.bias.detach().numpy(), b, rtol=1e-12)

