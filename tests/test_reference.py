"""bnkit.reference: the five steps, forward (train/test) and backward, triangulated in float64.

NumPy reference vs torch.nn.functional.batch_norm vs autograd (the same reference functions
run on tensors) vs centred finite differences, always with a *random* upstream gradient.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bnkit import reference as ref

SHAPES = [(8, 3), (4, 3, 2, 5)]  # (m, n) and (m, C, H, W)
PROPERTY = settings(max_examples=25, deadline=None)


# ---------------------------------------------------------------- helpers


def _problem(shape, seed=0, dtype=np.float64):
    """z (shifted, scaled normal), gamma (random signs) and beta, from a seeded generator."""
    rng = np.random.default_rng(seed)
    n = shape[1]
    z = rng.normal(loc=rng.uniform(-3, 3, size=(1, n) + (1,) * (len(shape) - 2)), scale=2.0, size=shape)
    gamma = rng.uniform(0.5, 2.0, n) * rng.choice([-1.0, 1.0], n)
    beta = rng.normal(size=n)
    return z.astype(dtype), gamma.astype(dtype), beta.astype(dtype)


def _running_stats(n, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=n), rng.uniform(0.5, 3.0, n)  # mean, var > 0


def _t(x):
    return torch.from_numpy(np.asarray(x))


def _torch_train(z, gamma, beta, eps=1e-5):
    return F.batch_norm(_t(z), None, None, _t(gamma), _t(beta), training=True, eps=eps).numpy()


def _torch_infer(z, gamma, beta, mean, var, eps=1e-5):
    return F.batch_norm(_t(z), _t(mean), _t(var), _t(gamma), _t(beta), training=False, eps=eps).numpy()


def _loss(dz_tilde, gamma, beta):
    """The scalar sum(dz_tilde * z_tilde) whose gradient in z_tilde is dz_tilde."""
    return lambda z: float(np.sum(dz_tilde * ref.forward_train(z, gamma, beta)[0]))


def _centred_gradient(f, x, h=1e-5):
    """Every partial derivative of the scalar f at x by centred differences (x is not modified)."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        grad[i] = (f(x + e) - f(x - e)) / (2 * h)
    return grad


def _rel_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), np.max(np.abs(b))))


def _gradients(shape, seed=0):
    """A problem, a random upstream gradient, and the closed-form backward's (dz, dgamma, dbeta)."""
    z, gamma, beta = _problem(shape, seed)
    dz_tilde = np.random.default_rng(seed + 1000).normal(size=shape)  # random, never all-ones
    _, cache = ref.forward_train(z, gamma, beta)
    return (z, gamma, beta, dz_tilde), ref.backward(dz_tilde, cache)


# ---------------------------------------------------------------- forward, training time


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_train_matches_torch(shape):
    z, gamma, beta = _problem(shape)
    z_tilde, _ = ref.forward_train(z, gamma, beta)
    np.testing.assert_allclose(z_tilde, _torch_train(z, gamma, beta), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_five_steps_give_the_batch_mean_and_biased_variance(shape):
    z, gamma, beta = _problem(shape)
    axes = (0,) if len(shape) == 2 else (0, 2, 3)
    _, cache = ref.forward_train(z, gamma, beta)
    np.testing.assert_allclose(ref.batch_mean(z), z.mean(axis=axes), rtol=1e-14)
    np.testing.assert_allclose(cache.var, z.var(axis=axes), rtol=1e-12)  # biased (1/m)
    mu = ref.batch_mean(z)
    np.testing.assert_allclose(cache.z_new, ref.center(z, mu), atol=1e-12)


def test_forward_train_does_not_modify_its_inputs():
    z, gamma, beta = _problem((6, 4))
    before = [a.copy() for a in (z, gamma, beta)]
    ref.forward_train(z, gamma, beta)
    for a, b in zip((z, gamma, beta), before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_train_float32_matches_torch(shape):
    z, gamma, beta = _problem(shape, dtype=np.float32)
    z_tilde, _ = ref.forward_train(z, gamma, beta)
    assert z_tilde.dtype == np.float32
    np.testing.assert_allclose(z_tilde, _torch_train(z, gamma, beta), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "torch"])
def test_float32_is_stable_with_a_large_offset(as_tensor):
    """1e4 + 0.1 * noise in float32: mean 0 and std 1 to 1e-2, and the float64 result on the same data.

    (The ulp of 1e4 in float32 is 1e-3, 1% of the spread: a mean that is a few ulps off already
    shifts the output by several hundredths; E[z^2] - E[z]^2 would lose the variance entirely.)"""
    rng = np.random.default_rng(3)
    n = 5
    z = (1e4 + 0.1 * rng.normal(size=(256, n))).astype(np.float32)
    ones, zeros = np.ones(n, np.float32), np.zeros(n, np.float32)
    args = tuple(map(_t, (z, ones, zeros))) if as_tensor else (z, ones, zeros)
    z_tilde = np.asarray(ref.forward_train(*args)[0])
    assert z_tilde.dtype == np.float32
    np.testing.assert_allclose(z_tilde.mean(axis=0), 0.0, atol=1e-2)
    np.testing.assert_allclose(z_tilde.std(axis=0), 1.0, atol=1e-2)
    z_tilde64, _ = ref.forward_train(z.astype(np.float64), ones.astype(np.float64), zeros.astype(np.float64))
    np.testing.assert_allclose(z_tilde, z_tilde64, atol=1e-2)


# ---------------------------------------------------------------- forward, test time


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_infer_matches_torch_eval(shape):
    z, gamma, beta = _problem(shape)
    mean, var = _running_stats(shape[1])
    out = ref.forward_infer(z, gamma, beta, mean, var)
    np.testing.assert_allclose(out, _torch_infer(z, gamma, beta, mean, var), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(5,), (1, 5)])
def test_forward_infer_on_a_single_example(shape):
    z, gamma, beta = _problem((1, 5))
    mean, var = _running_stats(5)
    out = ref.forward_infer(z.reshape(shape), gamma, beta, mean, var)
    assert out.shape == shape
    expected = _torch_infer(z, gamma, beta, mean, var)
    np.testing.assert_allclose(out.reshape(1, 5), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "torch"])
def test_forward_infer_on_a_single_image(as_tensor):
    """One (C, H, W) example: per channel, as the same image in a batch of one."""
    z, gamma, beta = _problem((1, 3, 4, 5))
    mean, var = _running_stats(3)
    args = (z[0], gamma, beta, mean, var)
    out = ref.forward_infer(*(map(_t, args) if as_tensor else args))
    assert tuple(out.shape) == (3, 4, 5)
    expected = _torch_infer(z, gamma, beta, mean, var)[0]
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-12, atol=1e-12)


def test_forward_infer_is_not_forward_train():
    """With running statistics far from the batch's, test time differs from training time."""
    z, gamma, beta = _problem((8, 3))
    mean, var = _running_stats(3)
    assert not np.allclose(ref.forward_infer(z, gamma, beta, mean, var), ref.forward_train(z, gamma, beta)[0])


@pytest.mark.parametrize("shape", SHAPES + [(1000, 100)])  # (1000, 100): several cache blocks
def test_forward_infer_affine_equals_forward_infer(shape):
    z, gamma, beta = _problem(shape)
    mean, var = _running_stats(shape[1])
    scale, shift = ref.inference_affine(gamma, beta, mean, var)
    out = ref.forward_infer_affine(z, scale, shift)
    np.testing.assert_allclose(out, ref.forward_infer(z, gamma, beta, mean, var), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_infer_affine_on_tensors(shape):
    z, gamma, beta = _problem(shape)
    mean, var = _running_stats(shape[1])
    scale, shift = ref.inference_affine(*map(_t, (gamma, beta, mean, var)))
    out = ref.forward_infer_affine(_t(z), scale, shift)
    np.testing.assert_allclose(out.numpy(), _torch_infer(z, gamma, beta, mean, var), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- backward


@pytest.mark.parametrize("shape", SHAPES)
def test_staged_and_closed_form_backward_agree(shape):
    (z, gamma, beta, dz_tilde), closed = _gradients(shape)
    staged = ref.backward_staged(dz_tilde, ref.forward_train(z, gamma, beta)[1])
    for a, b in zip(staged, closed):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backward", [ref.backward, ref.backward_staged])
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_autograd_of_the_reference_on_tensors(shape, backward):
    (z, gamma, beta, dz_tilde), _ = _gradients(shape)
    zt, gt, bt = (_t(a).clone().requires_grad_(True) for a in (z, gamma, beta))
    z_tilde, _ = ref.forward_train(zt, gt, bt)
    (z_tilde * _t(dz_tilde)).sum().backward()
    dz, dgamma, dbeta = backward(dz_tilde, ref.forward_train(z, gamma, beta)[1])
    np.testing.assert_allclose(dz, zt.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dgamma, gt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dbeta, bt.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_autograd_of_torch_batch_norm(shape):
    (z, gamma, beta, dz_tilde), (dz, dgamma, dbeta) = _gradients(shape)
    zt, gt, bt = (_t(a).clone().requires_grad_(True) for a in (z, gamma, beta))
    (F.batch_norm(zt, None, None, gt, bt, training=True) * _t(dz_tilde)).sum().backward()
    np.testing.assert_allclose(dz, zt.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dgamma, gt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dbeta, bt.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_backward_on_tensors_equals_backward_on_arrays(shape):
    (z, gamma, beta, dz_tilde), expected = _gradients(shape)
    _, cache = ref.forward_train(_t(z), _t(gamma), _t(beta))
    for got, want in zip(ref.backward(_t(dz_tilde), cache), expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backward", [ref.backward, ref.backward_staged])
def test_dz_matches_centred_differences(backward):
    (z, gamma, beta, dz_tilde), _ = _gradients((6, 3))
    dz, _, _ = backward(dz_tilde, ref.forward_train(z, gamma, beta)[1])
    assert _rel_error(dz, _centred_gradient(_loss(dz_tilde, gamma, beta), z)) < 1e-7


@pytest.mark.parametrize("backward", [ref.backward, ref.backward_staged])
@pytest.mark.parametrize("shape", SHAPES)
def test_dz_along_a_random_direction(shape, backward):
    """HIPS/autograd-style check: (f(z + h v) - f(z - h v)) / 2h = <dz, v> for a random v."""
    (z, gamma, beta, dz_tilde), _ = _gradients(shape)
    dz, _, _ = backward(dz_tilde, ref.forward_train(z, gamma, beta)[1])
    f, h = _loss(dz_tilde, gamma, beta), 1e-5
    for seed in range(3):
        v = np.random.default_rng(seed + 50).normal(size=shape)
        numeric = (f(z + h * v) - f(z - h * v)) / (2 * h)
        assert numeric == pytest.approx(np.sum(dz * v), rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("backward", [ref.backward, ref.backward_staged])
@pytest.mark.parametrize("shape", SHAPES)
def test_dgamma_and_dbeta_match_centred_differences(shape, backward):
    (z, gamma, beta, dz_tilde), _ = _gradients(shape)
    _, dgamma, dbeta = backward(dz_tilde, ref.forward_train(z, gamma, beta)[1])
    loss = lambda g, b: float(np.sum(dz_tilde * ref.forward_train(z, g, b)[0]))  # noqa: E731
    assert _rel_error(dgamma, _centred_gradient(lambda g: loss(g, beta), gamma)) < 1e-8
    assert _rel_error(dbeta, _centred_gradient(lambda b: loss(gamma, b), beta)) < 1e-8


@pytest.mark.parametrize("backward", [ref.backward, ref.backward_staged])
@pytest.mark.parametrize("shape", SHAPES)
def test_an_all_ones_upstream_gradient_gives_dz_zero(shape, backward):
    """Why a gradient test must use a random upstream gradient: with all ones, dz = 0 whatever the
    code gets wrong in the parts that matter (sum of z_tilde = m * sum of beta does not depend on z)."""
    z, gamma, beta = _problem(shape)
    dz, _, dbeta = backward(np.ones(shape), ref.forward_train(z, gamma, beta)[1])
    np.testing.assert_allclose(dz, 0.0, atol=1e-12)
    np.testing.assert_allclose(dbeta, z.size / shape[1])  # dbeta is then just the count


# ---------------------------------------------------------------- properties (hypothesis)


@st.composite
def problems(draw):
    """A batch with every feature's variance far above eps: shape, seed, gamma, beta."""
    four_d = draw(st.booleans())
    m = draw(st.integers(4, 12))
    n = draw(st.integers(1, 4))
    shape = (m, n, draw(st.integers(1, 3)), draw(st.integers(1, 3))) if four_d else (m, n)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    loc = draw(st.floats(-100, 100))
    scale = draw(st.floats(1.0, 50.0))
    z = loc + scale * rng.normal(size=shape)
    gamma = rng.uniform(0.2, 3.0, n) * rng.choice([-1.0, 1.0], n)
    beta = rng.uniform(-5, 5, n)
    return z, gamma, beta, rng


def _axes(z):
    return (0,) if z.ndim == 2 else (0, 2, 3)


@PROPERTY
@given(problems())
def test_output_has_mean_beta_and_std_abs_gamma(problem):
    z, gamma, beta, _ = problem
    axes = _axes(z)
    assume(z.var(axis=axes).min() > 1e3 * 1e-5)  # var >> eps, so sqrt(var / (var + eps)) ~ 1
    z_tilde, _ = ref.forward_train(z, gamma, beta)
    np.testing.assert_allclose(z_tilde.mean(axis=axes), beta, atol=1e-9)
    np.testing.assert_allclose(z_tilde.std(axis=axes), np.abs(gamma), rtol=1e-3)


@PROPERTY
@given(problems(), st.data())
def test_output_is_invariant_to_positive_scale_and_shift(problem, data):
    z, gamma, beta, _ = problem
    n = z.shape[1]
    shape = (1, n) + (1,) * (z.ndim - 2)
    a = np.array(data.draw(st.lists(st.floats(0.25, 4.0), min_size=n, max_size=n))).reshape(shape)
    b = np.array(data.draw(st.lists(st.floats(-100, 100), min_size=n, max_size=n))).reshape(shape)
    assume(z.var(axis=_axes(z)).min() > 1.0)  # a**2 var >> eps: eps's share is below 1e-4
    z_tilde, _ = ref.forward_train(z, gamma, beta)
    np.testing.assert_allclose(ref.forward_train(a * z + b, gamma, beta)[0], z_tilde, atol=1e-3)


@PROPERTY
@given(problems())
def test_dz_sums_to_zero_over_the_batch(problem):
    z, gamma, beta, rng = problem
    dz_tilde = rng.normal(size=z.shape)
    dz, _, _ = ref.backward(dz_tilde, ref.forward_train(z, gamma, beta)[1])
    total = dz.sum(axis=_axes(z))
    np.testing.assert_allclose(total, 0.0, atol=1e-10 * max(1.0, np.abs(dz).sum()))


@PROPERTY
@given(problems())
def test_staged_and_closed_form_backward_agree_property(problem):
    z, gamma, beta, rng = problem
    dz_tilde = rng.normal(size=z.shape)
    _, cache = ref.forward_train(z, gamma, beta)
    for a, b in zip(ref.backward_staged(dz_tilde, cache), ref.backward(dz_tilde, cache)):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9 * max(1.0, np.abs(b).max()))


# ---------------------------------------------------------------- bad input: clear ValueErrors


@pytest.mark.parametrize("shape", [(1, 4), (1, 4, 1, 1)])
def test_a_training_batch_with_one_value_per_feature_is_refused(shape):
    z, gamma, beta = _problem(shape)
    with pytest.raises(ValueError, match="more than one value per feature"):
        ref.forward_train(z, gamma, beta)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_training_batch_is_refused(bad):
    z, gamma, beta = _problem((6, 3))
    z[2, 1] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        ref.forward_train(z, gamma, beta)


@pytest.mark.parametrize("eps", [np.float32(1e-3), np.float64(1e-5), 1])
def test_eps_may_be_any_positive_real_number(eps):
    """NumPy scalars too (torch.nn accepts them), and the result is that of the float."""
    z, gamma, beta = _problem((6, 3))
    expected, _ = ref.forward_train(z, gamma, beta, eps=float(eps))
    np.testing.assert_array_equal(ref.forward_train(z, gamma, beta, eps=eps)[0], expected)


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), True, "1e-5", None])
def test_eps_must_be_positive(eps):
    z, gamma, beta = _problem((6, 3))
    mean, var = _running_stats(3)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        ref.forward_train(z, gamma, beta, eps=eps)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        ref.forward_infer(z, gamma, beta, mean, var, eps=eps)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        ref.inference_affine(gamma, beta, mean, var, eps=eps)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["gamma", "beta"])
def test_forward_train_refuses_parameters_of_the_wrong_shape(shape, name):
    z, gamma, beta = _problem(shape)
    args = {"gamma": gamma, "beta": beta, name: np.ones(shape[1] + 1)}
    with pytest.raises(ValueError, match=rf"{name} must have shape \({shape[1]},\)"):
        ref.forward_train(z, **args)


@pytest.mark.parametrize("name", ["gamma", "beta", "mean", "var"])
def test_forward_infer_refuses_vectors_of_the_wrong_shape(name):
    z, gamma, beta = _problem((6, 3))
    mean, var = _running_stats(3)
    args = {"gamma": gamma, "beta": beta, "mean": mean, "var": var, name: np.ones((3, 1))}
    with pytest.raises(ValueError, match=rf"{name} must have shape \(3,\)"):
        ref.forward_infer(z, **args)


def test_forward_infer_affine_refuses_vectors_of_the_wrong_shape():
    z, _, _ = _problem((6, 3))
    with pytest.raises(ValueError, match=r"shift must have shape \(3,\)"):
        ref.forward_infer_affine(z, np.ones(3), np.ones(2))


@pytest.mark.parametrize("shape", [(4, 3, 5), (2, 3, 2, 2, 2)])
def test_wrong_number_of_dimensions_is_refused(shape):
    z = np.random.default_rng(0).normal(size=shape)
    gamma, beta = np.ones(3), np.zeros(3)
    with pytest.raises(ValueError, match=r"\(m, n\) or \(m, C, H, W\)"):
        ref.forward_train(z, gamma, beta)
    with pytest.raises(ValueError, match=r"\(m, n\) or \(m, C, H, W\)"):  # a 3-D z: one image of 4 channels
        ref.forward_infer(z, gamma, beta, np.zeros(3), np.ones(3))
