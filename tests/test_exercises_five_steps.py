"""Chapter 1's exercises (the five steps): typical wrong answers and right answers written
otherwise. tests/test_exercises.py runs them (see exercise_support.ANSWERS)."""
from __future__ import annotations

import numpy as np

from bnkit import reference as ref
from bnkit.checks import ch01_five_steps


AXES = lambda z: tuple(a for a in range(z.ndim) if a != 1)  # noqa: E731
VEC = lambda v, z: v.reshape((1, -1) + (1,) * (z.ndim - 2))  # noqa: E731

WRONG = [
    # step 1
    (ch01_five_steps.batch_mean, lambda z: z.mean(axis=1), "wrong axis"),
    (ch01_five_steps.batch_mean, lambda z: z.mean(axis=0), "over the batch axis only"),  # fine for (m, n), not 4-D
    (ch01_five_steps.batch_mean, lambda z: z.mean(axis=AXES(z), keepdims=True), "drop keepdims"),
    (ch01_five_steps.batch_mean, lambda z: z.sum(axis=AXES(z)), "did not divide by m"),
    (ch01_five_steps.batch_mean, lambda z: z.mean(), "one mean of all the values"),
    # step 2
    (ch01_five_steps.center, lambda z, mu: VEC(mu, z) - z, "wrong sign"),
    (ch01_five_steps.center, lambda z, mu: z + VEC(mu, z), "you added mu"),
    (ch01_five_steps.center, lambda z, mu: z - z.mean(axis=1, keepdims=True), "each example's own mean"),
    (ch01_five_steps.center, lambda z, mu: z - mu, "your function raised ValueError: operands could not be broadcast"),
    # step 3
    (ch01_five_steps.batch_variance, lambda x: x.var(axis=AXES(x), ddof=1), "you divided by m-1: at training time BN uses the biased 1/m"),
    (ch01_five_steps.batch_variance, lambda x: x.std(axis=AXES(x)), "standard deviation"),
    (ch01_five_steps.batch_variance, lambda x: x.mean(axis=AXES(x)), "square each value"),
    (ch01_five_steps.batch_variance, lambda x: (x**2).mean(axis=1), "wrong axis"),
    # step 4
    (ch01_five_steps.normalize, lambda x, var, eps: x / (np.sqrt(VEC(var, x)) + eps), "eps belongs inside the square root"),
    (ch01_five_steps.normalize, lambda x, var, eps: x / np.sqrt(VEC(var, x)), "you left out eps"),
    (ch01_five_steps.normalize, lambda x, var, eps: x / VEC(var + eps, x), "divided by the variance"),
    # step 5
    (ch01_five_steps.scale_shift, lambda x, g, b: VEC(b, x) * x + VEC(g, x), "gamma and beta are swapped"),
    (ch01_five_steps.scale_shift, lambda x, g, b: VEC(g, x) * x, "you left out beta"),
    (ch01_five_steps.scale_shift, lambda x, g, b: VEC(g, x) * (x + VEC(b, x)), "beta is added after scaling"),
]

RIGHT: list = []


def test_forward_train_wrong_answer_is_caught():
    from exercise_support import diagnosis

    wrong = lambda z, g, b, eps: ref.forward_train(z - z.mean(axis=1, keepdims=True), g, b, eps)[0]  # noqa: E731
    assert "wrong values" in diagnosis(ch01_five_steps.forward_train, wrong)


# ---------------------------------------------------------------- more typical wrong answers


def mean_median(z):
    return np.median(z, axis=AXES(z))


def mean_divided_by_m_only(z):
    return z.sum(axis=AXES(z)) / z.shape[0]  # m, where a channel has m*H*W values


def mean_drops_last_example(z):
    return z[:-1].mean(axis=AXES(z))  # off by one in the range of examples


def mean_reshape_mixes_channels(z):
    return z.reshape(-1, z.shape[1]).mean(axis=0)  # (m, C, H, W) -> (m*H*W, C) mixes channels


def mean_axes_0_2(z):
    return z.mean(axis=(0, 2)) if z.ndim == 4 else z.mean(axis=0)  # forgot W


def mean_last_axis(z):
    return z.mean(axis=-1)  # "the last axis is the feature axis"


def center_recomputes_mu(z, mu):
    return z - z.mean(axis=AXES(z), keepdims=True)  # ignores the mu it is given


def center_wrong_broadcast(z, mu):
    return z - (mu.reshape(-1, 1) if z.ndim == 2 else mu.reshape(1, 1, 1, -1))  # transposed / last axis


def center_mu_first_element(z, mu):
    return z - mu[0]


def center_divides(z, mu):
    return z / VEC(mu, z)


def center_twice(z, mu):
    z_new = z - VEC(mu, z)
    return z_new - VEC(mu, z)


def variance_np_var_ddof1(z_new):
    return np.var(z_new, axis=AXES(z_new), ddof=1)


def variance_of_mean_abs_squared(z_new):
    return np.abs(z_new).mean(axis=AXES(z_new)) ** 2  # (mean |z_new|)^2, not mean(z_new^2)


def variance_over_m_only(z_new):
    return (z_new**2).sum(axis=AXES(z_new)) / z_new.shape[0]


def variance_last_axis(z_new):
    return (z_new**2).mean(axis=-1)


def variance_squared(z_new):
    return ((z_new**2).mean(axis=AXES(z_new))) ** 2


def normalize_eps_outside_squared(z_new, var, eps):
    return z_new / np.sqrt(VEC(var, z_new) + eps**2)


def normalize_no_reshape(z_new, var, eps):
    return z_new / np.sqrt(var + eps)  # right for (m, n), wrong axis for (m, C, H, W)


def normalize_fixed_eps(z_new, var, eps):
    return z_new / np.sqrt(VEC(var, z_new) + 1e-5)  # ignores the eps argument


def normalize_std_of_z_new(z_new, var, eps):
    return z_new / VEC(z_new.std(axis=AXES(z_new), ddof=1) + eps, z_new)


def normalize_squared(z_new, var, eps):
    return z_new**2 / VEC(var + eps, z_new)


def scale_shift_no_reshape(z_norm, gamma, beta):
    return gamma * z_norm + beta  # lines up with the last axis W for (m, C, H, W)


def scale_shift_abs_gamma(z_norm, gamma, beta):
    return VEC(np.abs(gamma), z_norm) * z_norm + VEC(beta, z_norm)


def scale_shift_minus_beta(z_norm, gamma, beta):
    return VEC(gamma, z_norm) * z_norm - VEC(beta, z_norm)


def scale_shift_divides(z_norm, gamma, beta):
    return z_norm / VEC(gamma, z_norm) + VEC(beta, z_norm)


def scale_shift_scalar_gamma(z_norm, gamma, beta):
    return gamma[0] * z_norm + VEC(beta, z_norm)


WRONG += [
    (ch01_five_steps.batch_mean, mean_median, "you took the median"),
    (ch01_five_steps.batch_mean, mean_divided_by_m_only, "you divided by m, not by m*H*W"),
    (ch01_five_steps.batch_mean, mean_drops_last_example, "you left out the last example"),
    (ch01_five_steps.batch_mean, mean_reshape_mixes_channels, "reshape(-1, C) mixes the channels"),
    (ch01_five_steps.batch_mean, mean_axes_0_2, "wrong shape: expected (3,), got (3, 6)"),
    (ch01_five_steps.batch_mean, mean_last_axis, "wrong axis"),
    (ch01_five_steps.center, center_recomputes_mu, "you ignored the mu passed in"),
    (ch01_five_steps.center, center_wrong_broadcast, "your function raised ValueError"),
    (ch01_five_steps.center, center_mu_first_element, "you subtracted one number from everything (mu[0])"),
    (ch01_five_steps.center, center_divides, "you divided by mu"),
    (ch01_five_steps.center, center_twice, "you subtracted mu twice"),
    (ch01_five_steps.batch_variance, variance_np_var_ddof1, "you divided by m-1"),
    (ch01_five_steps.batch_variance, variance_of_mean_abs_squared, "wrong values on z of shape (8, 5)"),
    (ch01_five_steps.batch_variance, variance_over_m_only, "you divided by m, not by m*H*W"),
    (ch01_five_steps.batch_variance, variance_last_axis, "wrong axis"),
    (ch01_five_steps.batch_variance, variance_squared, "you squared the variance"),
    (ch01_five_steps.normalize, normalize_eps_outside_squared, "you added eps**2"),
    (ch01_five_steps.normalize, normalize_no_reshape, "must be reshaped to (1, C, 1, 1)"),
    (ch01_five_steps.normalize, normalize_fixed_eps, "use the eps passed in"),
    (ch01_five_steps.normalize, normalize_std_of_z_new, "use the var passed in, sqrt(var + eps)"),
    (ch01_five_steps.normalize, normalize_squared, "wrong values on z of shape (8, 5)"),
    (ch01_five_steps.scale_shift, scale_shift_no_reshape, "must be reshaped to (1, C, 1, 1)"),
    (ch01_five_steps.scale_shift, scale_shift_abs_gamma, "gamma may be negative"),
    (ch01_five_steps.scale_shift, scale_shift_minus_beta, "you subtracted beta"),
    (ch01_five_steps.scale_shift, scale_shift_divides, "you divided by gamma"),
    (ch01_five_steps.scale_shift, scale_shift_scalar_gamma, "each feature has its own gamma"),
]

RIGHT = [
    (ch01_five_steps.batch_mean, lambda z: np.moveaxis(z, 1, -1).reshape(-1, z.shape[1]).mean(axis=0)),
    (ch01_five_steps.batch_mean, lambda z: z.sum(axis=AXES(z)) / (z.size // z.shape[1])),
    (ch01_five_steps.batch_mean, lambda z: z.mean(axis=0) if z.ndim == 2 else z.mean(axis=0).mean(axis=(1, 2))),
    (ch01_five_steps.center, lambda z, mu: z - np.expand_dims(mu, (0, *range(2, z.ndim)))),
    (ch01_five_steps.center, lambda z, mu: np.subtract(z, mu[(None, slice(None)) + (None,) * (z.ndim - 2)])),
    (ch01_five_steps.batch_variance, lambda x: x.var(axis=AXES(x))),
    (ch01_five_steps.batch_variance, lambda x: np.einsum("i...,i...->...", x, x).sum(axis=tuple(range(1, x.ndim - 1)))
     / (x.size // x.shape[1])),
    (ch01_five_steps.normalize, lambda x, var, eps: x * VEC(1 / np.sqrt(var + eps), x)),
    (ch01_five_steps.normalize, lambda x, var, eps: x / VEC(var + eps, x) ** 0.5),
    (ch01_five_steps.scale_shift, lambda x, g, b: np.add(np.multiply(x, VEC(g, x)), VEC(b, x))),
    (ch01_five_steps.scale_shift, lambda x, g, b: np.einsum("ic...,c->ic...", x, g) + VEC(b, x)),
]


# ---------------------------------------------------------------- the property test of BN's output


def _property_test(ddof=0, signed_gamma=False, mean_only=False, std_only=False, rtol=1e-3, axes=AXES,
                   reduce=lambda ok: bool(np.all(ok)), exact=False):
    def my_is_batch_normalized(z_tilde, gamma, beta):
        ax = axes(z_tilde)
        mean, std = z_tilde.mean(axis=ax), z_tilde.std(axis=ax, ddof=ddof)
        target = gamma if signed_gamma else np.abs(gamma)
        if exact:
            return bool(np.all(mean == beta) and np.all(std == target))
        mean_ok = np.abs(mean - beta) <= rtol * (np.abs(gamma) + np.abs(beta))
        std_ok = np.isclose(std, target, rtol=rtol, atol=0)
        return reduce(mean_ok if mean_only else std_ok if std_only else mean_ok & std_ok)

    return my_is_batch_normalized


WRONG += [
    (ch01_five_steps.is_batch_normalized, _property_test(ddof=1), "you rejected the right output"),
    (ch01_five_steps.is_batch_normalized, _property_test(signed_gamma=True), "(gamma may be negative)"),
    (ch01_five_steps.is_batch_normalized, _property_test(mean_only=True), "you accepted an output normalised with the unbiased"),
    (ch01_five_steps.is_batch_normalized, _property_test(std_only=True), "you accepted an output with beta left out"),
    (ch01_five_steps.is_batch_normalized, _property_test(rtol=0.1), "a tolerance of 0.1 lets the 1/(m-1) variance through"),
    (ch01_five_steps.is_batch_normalized, _property_test(exact=True), "not with =="),
    (ch01_five_steps.is_batch_normalized, _property_test(axes=lambda z: (0,)), "for z of shape (4, 3, 5, 6)"),
    (ch01_five_steps.is_batch_normalized, _property_test(reduce=lambda ok: ok), "return one bool (True or False), got ndarray"),
]
RIGHT += [
    (ch01_five_steps.is_batch_normalized, _property_test()),
    (ch01_five_steps.is_batch_normalized,
     lambda z, g, b: ch01_five_steps_reference_property(z, g, b)),
]


def ch01_five_steps_reference_property(z_tilde, gamma, beta):
    """Right, another way: standardise back with gamma and beta and test mean 0, std 1."""
    shape = (1, -1) + (1,) * (z_tilde.ndim - 2)
    back = (z_tilde.astype(np.float64) - beta.reshape(shape)) / np.abs(gamma).reshape(shape)
    flat = np.moveaxis(back, 1, 0).reshape(back.shape[1], -1)  # (n, values per feature)
    return bool(np.all(np.abs(flat.mean(axis=1)) < 1e-3) and np.all(np.abs(flat.std(axis=1) - 1) < 1e-3))
