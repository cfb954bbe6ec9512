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


def _backward(mu_path=True, var_path=True, count=None, ones=False, swap=False, eps_used=True, ddof=0):
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
        inv_std = _vec((var + (eps if eps_used else 0.0)) ** -0.5, dz_tilde)
        dz_new = dz_norm * inv_std
        if var_path:
            dvar = -0.5 * (dz_norm * z_new).sum(axis=axes, keepdims=True) * inv_std**3
            dz_new = dz_new + dvar * 2 * z_new / (m - ddof)
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


# ---------------------------------------------------------------- more wrong answers, right answers


def _closed_form(dz_tilde, cache, sqrt_arg=lambda var, eps: var + eps, keepdims=False, axes=None, scale_m=True):
    axes = _axes(dz_tilde) if axes is None else axes(dz_tilde)
    m = dz_tilde.size // dz_tilde.shape[1]
    dbeta = dz_tilde.sum(axis=axes, keepdims=True)
    dgamma = (dz_tilde * cache.z_norm).sum(axis=axes, keepdims=True)
    k = _vec(cache.gamma / np.sqrt(sqrt_arg(cache.var, cache.eps)), dz_tilde) / (m if scale_m else 1)
    dz = k * (m * dz_tilde - dbeta - cache.z_norm * dgamma)
    if keepdims:
        return dz, dgamma, dbeta
    return dz, dgamma.reshape(-1), dbeta.reshape(-1)


def backward_keepdims(dz_tilde, cache):
    return _closed_form(dz_tilde, cache, keepdims=True)


def backward_axis0_only(dz_tilde, cache):
    dz, _, _ = _closed_form(dz_tilde, cache)
    return dz, (dz_tilde * cache.z_norm).sum(axis=0), dz_tilde.sum(axis=0)  # (C, H, W) for 4-D


def backward_without_1_over_m(dz_tilde, cache):
    return _closed_form(dz_tilde, cache, scale_m=False)


def backward_sign(dz_tilde, cache):
    dz, dgamma, dbeta = _closed_form(dz_tilde, cache)
    return -dz, dgamma, dbeta


def backward_no_reshape(dz_tilde, cache):
    axes = _axes(dz_tilde)
    m = dz_tilde.size // dz_tilde.shape[1]
    dbeta, dgamma = dz_tilde.sum(axis=axes), (dz_tilde * cache.z_norm).sum(axis=axes)
    k = cache.gamma / (m * np.sqrt(cache.var + cache.eps))  # (C,): lines up with W for 4-D
    return k * (m * dz_tilde - dbeta - cache.z_norm * dgamma), dgamma, dbeta


def backward_staged(dz_tilde, cache):
    return ref.backward_staged(dz_tilde, cache) if hasattr(ref, "backward_staged") else _backward()(dz_tilde, cache)


def backward_autograd(dz_tilde, cache):
    import torch

    z = torch.tensor(cache.z_new, dtype=torch.float64, requires_grad=True)  # z_new + mu: same gradient
    gamma = torch.tensor(cache.gamma, dtype=torch.float64, requires_grad=True)
    beta = torch.zeros_like(gamma, requires_grad=True)
    axes = _axes(dz_tilde)
    shape = (1, -1) + (1,) * (dz_tilde.ndim - 2)
    z_new = z - z.mean(dim=axes, keepdim=True)
    var = (z_new**2).mean(dim=axes, keepdim=True)
    out = gamma.reshape(shape) * z_new / torch.sqrt(var + cache.eps) + beta.reshape(shape)
    out.backward(torch.as_tensor(dz_tilde, dtype=torch.float64))
    return z.grad.numpy(), gamma.grad.numpy(), beta.grad.numpy()


def _relative(define):
    def directional_error(f, x, grad, h=1e-5, seed=0):
        v = np.random.default_rng(seed).standard_normal(x.shape)
        numeric = (f(x + h * v) - f(x - h * v)) / (2 * h)
        analytic = np.sum(grad * v)
        return define(numeric, analytic)

    return directional_error


def directional_fixed_h(f, x, grad, h=1e-5, seed=0):
    return _relative(lambda n, a: abs(n - a) / max(abs(n), abs(a)))(f, x, grad, 1e-5, seed)  # ignores h


def directional_uniform(f, x, grad, h=1e-5, seed=0):
    v = np.random.default_rng(seed).uniform(-1, 1, x.shape)  # random, but not the v the prompt asks for
    numeric = (f(x + h * v) - f(x - h * v)) / (2 * h)
    analytic = np.sum(grad * v)
    return abs(numeric - analytic) / max(abs(numeric), abs(analytic))


def directional_matrix_product(f, x, grad, h=1e-5, seed=0):
    v = np.random.default_rng(seed).standard_normal(x.shape)
    numeric = (f(x + h * v) - f(x - h * v)) / (2 * h)
    analytic = np.dot(grad.ravel(), v.ravel()) if x.ndim == 1 else np.trace(grad @ v.T) * 0 + np.sum(grad) * np.mean(v)
    return abs(numeric - analytic) / max(abs(numeric), abs(analytic))


def directional_with_normal(f, x, grad, h=1e-5, seed=0):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=x.shape)  # the same stream as standard_normal
    f_plus, f_minus = f(x + h * v), f(x - h * v)
    numeric, analytic = (f_plus - f_minus) / (2 * h), float(np.vdot(grad, v))
    denominator = max(abs(numeric), abs(analytic))
    return abs(numeric - analytic) / denominator if denominator else 0.0


def directional_with_numpy_max(f, x, grad, h=1e-5, seed=0):
    v = np.random.default_rng(seed).standard_normal(x.shape)
    numeric = (f(x + h * v) - f(x - h * v)) / (2 * h)
    analytic = np.tensordot(grad, v, axes=grad.ndim)
    both = np.abs([numeric, analytic])
    return float(np.abs(numeric - analytic) / both.max()) if both.max() > 0 else 0.0


def fold_in_place(W, b, gamma, beta, mean, var, eps):
    s = gamma / np.sqrt(var + eps)
    W *= s.reshape((-1,) + (1,) * (W.ndim - 1))  # the caller's layer is changed
    return W, (b - mean) * s + beta


def fold_fixed_eps(W, b, gamma, beta, mean, var, eps):
    return _fold()(W, b, gamma, beta, mean, var, 1e-5)


def fold_abs_gamma(W, b, gamma, beta, mean, var, eps):
    return _fold()(W, b, np.abs(gamma), beta, mean, var, eps)


def fold_transposed(W, b, gamma, beta, mean, var, eps):
    W_folded, b_folded = _fold()(W, b, gamma, beta, mean, var, eps)
    return W_folded.T, b_folded


def fold_bias_without_gamma(W, b, gamma, beta, mean, var, eps):
    W_folded, _ = _fold()(W, b, gamma, beta, mean, var, eps)
    return W_folded, (b - mean) / np.sqrt(var + eps) + beta


def fold_bias_sign(W, b, gamma, beta, mean, var, eps):
    W_folded, _ = _fold()(W, b, gamma, beta, mean, var, eps)
    return W_folded, (mean - b) * gamma / np.sqrt(var + eps) + beta


def fold_conv_like_linear(W, b, gamma, beta, mean, var, eps):
    s = gamma / np.sqrt(var + eps)
    return s[:, None] * W, (b - mean) * s + beta  # right for Linear; lines up with (kh, kw) for a conv


def fold_diag(W, b, gamma, beta, mean, var, eps):
    s = gamma / np.sqrt(var + eps)
    return np.diag(s) @ W, beta + s * (b - mean)


def fold_einsum(W, b, gamma, beta, mean, var, eps):
    inv_std = 1 / np.sqrt(var + eps)
    return np.einsum("o,o...->o...", gamma * inv_std, W), gamma * inv_std * b + (beta - gamma * inv_std * mean)


def fold_by_loop(W, b, gamma, beta, mean, var, eps):
    W_folded, b_folded = W.astype(float), np.empty(len(b))  # new arrays
    for c in range(len(b)):
        s = gamma[c] / (var[c] + eps) ** 0.5
        W_folded[c] = W[c] * s
        b_folded[c] = (b[c] - mean[c]) * s + beta[c]
    return W_folded, b_folded


WRONG_FOLD_MORE = [
    (checker, wrong, message)
    for checker in (ch08_folding.fold_linear, ch08_folding.fold_conv)
    for wrong, message in [
        (fold_in_place, "changed its input `W` in place"),
        (fold_fixed_eps, "use the eps passed in"),
        (fold_abs_gamma, "you used |gamma|"),
        (fold_bias_without_gamma, "the bias is scaled by s = gamma / sqrt(var + eps), gamma included"),
        (fold_bias_sign, "wrong sign: b' = (b - mean) * s + beta"),
    ]
] + [
    (ch08_folding.fold_linear, fold_transposed, "you returned W_folded transposed"),
    (ch08_folding.fold_conv, fold_conv_like_linear, "your function raised ValueError: operands could not be broadcast"),
]

WRONG_BACKWARD_MORE = [
    (ch07_backprop.backward, _backward(eps_used=False), "you left out eps"),
    (ch07_backprop.backward, _backward(ddof=1), "you divided by m-1 in the path through var"),
    (ch07_backprop.backward, backward_keepdims, "wrong shape: expected (5,), got (1, 5)"),
    (ch07_backprop.backward, backward_axis0_only, "wrong shape: expected (3,), got (3, 5, 6)"),
    (ch07_backprop.backward, backward_without_1_over_m, "every value is 8 times the expected one"),
    (ch07_backprop.backward, backward_sign, "the sign of dz is flipped"),
    (ch07_backprop.backward, backward_no_reshape, "reshape per-channel vectors to (1, C, 1, 1)"),
]
WRONG_DIRECTIONAL_MORE = [
    (ch07_backprop.directional_error, _relative(lambda n, a: abs(n - a) / abs(n)), "you divided by |numeric|:"),
    (ch07_backprop.directional_error, _relative(lambda n, a: abs(n - a) / abs(a)), "you divided by |analytic|:"),
    (ch07_backprop.directional_error, _relative(lambda n, a: abs(n - a) / (abs(n) + abs(a))),
     "you divided by |numeric| + |analytic|"),
    (ch07_backprop.directional_error, _relative(lambda n, a: abs(n - a) / min(abs(n), abs(a))),
     "you divided by min(|numeric|, |analytic|)"),
    (ch07_backprop.directional_error, _relative(lambda n, a: (n - a) / max(abs(n), abs(a))),
     "your relative error is negative"),
    (ch07_backprop.directional_error, _relative(lambda n, a: abs(n - a) / max(abs(n), abs(a))),
     "return 0 when both are 0"),
    (ch07_backprop.directional_error, directional_fixed_h, "use the h you are given"),
    (ch07_backprop.directional_error, directional_uniform, "a standard normal, from the seed you are given"),
    (ch07_backprop.directional_error, directional_matrix_product, "for a correct gradient of a quadratic"),
]

WRONG = WRONG_BACKWARD + WRONG_DIRECTIONAL + WRONG_FOLD + WRONG_BACKWARD_MORE + WRONG_DIRECTIONAL_MORE + WRONG_FOLD_MORE
RIGHT = [
    (ch07_backprop.backward, backward_staged),
    (ch07_backprop.backward, backward_autograd),
    (ch07_backprop.directional_error, directional_with_normal),
    (ch07_backprop.directional_error, directional_with_numpy_max),
    (ch08_folding.fold_linear, fold_diag),
    (ch08_folding.fold_linear, fold_einsum),
    (ch08_folding.fold_linear, fold_by_loop),
    (ch08_folding.fold_conv, fold_einsum),
    (ch08_folding.fold_conv, fold_by_loop),
]


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

