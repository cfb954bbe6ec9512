"""bnkit.reference's fast paths equal the teaching paths they replace (benchmarks/ measures them).

- forward_train: float64 accumulation in step 1, einsum in step 3, step 4 in place, the
  finiteness check on mu instead of on z; the teaching path is the five step functions
  composed one by one with fresh arrays, and the float32 mean with a correction pass.
- forward_infer_affine (one multiply-add per value) equals forward_infer (steps 2, 4, 5).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from bnkit import reference as ref

SHAPES = [(8, 3), (4, 3, 2, 5), (256, 512)]


def _problem(shape, dtype, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    n = shape[1]
    z = rng.normal(loc=rng.uniform(-3, 3, size=(1, n) + (1,) * (len(shape) - 2)), scale=2.0, size=shape)
    gamma = rng.uniform(0.5, 2.0, n) * rng.choice([-1.0, 1.0], n)
    return (z + offset).astype(dtype), gamma.astype(dtype), rng.normal(size=n).astype(dtype)


def _teaching_forward(z, gamma, beta, eps=1e-5):
    """The five steps one by one, each a fresh array: the table, line by line."""
    mu = ref.batch_mean(z)
    z_new = ref.center(z, mu)
    var = ref.batch_variance(z_new)
    z_norm = ref.normalize(z_new, var, eps)
    return ref.scale_shift(z_norm, gamma, beta), z_norm, var


def _corrected_float32_mean(z):
    """The previous step 1 for float32: a float32 mean plus one correction pass."""
    axes = ref.stat_axes(z.ndim)
    mu = z.mean(axis=axes)
    return mu + (z - ref._per_feature(mu, z.ndim)).mean(axis=axes)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_train_equals_the_five_steps_composed(shape, dtype):
    z, gamma, beta = _problem(shape, dtype)
    z_tilde, cache = ref.forward_train(z, gamma, beta)
    z_tilde_t, z_norm_t, var_t = _teaching_forward(z, gamma, beta)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert z_tilde.dtype == z_norm_t.dtype == dtype
    np.testing.assert_allclose(z_tilde, z_tilde_t, rtol=tol, atol=tol)
    np.testing.assert_allclose(cache.z_norm, z_norm_t, rtol=tol, atol=tol)
    np.testing.assert_allclose(cache.var, var_t, rtol=tol)


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_train_on_tensors_equals_on_arrays(shape):
    z, gamma, beta = _problem(shape, np.float64)
    z_tilde, cache = ref.forward_train(z, gamma, beta)
    zt = torch.from_numpy(z).requires_grad_()  # autograd: the tensor path must not work in place
    z_tilde_t, cache_t = ref.forward_train(zt, torch.from_numpy(gamma), torch.from_numpy(beta))
    z_tilde_t.sum().backward()
    np.testing.assert_allclose(z_tilde_t.detach().numpy(), z_tilde, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cache_t.z_norm.detach().numpy(), cache.z_norm, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "torch"])
@pytest.mark.parametrize("shape", [(256, 5), (16, 3, 4, 4)])
def test_float64_accumulated_mean_equals_the_corrected_float32_mean(shape, as_tensor):
    z = _problem(shape, np.float32, offset=1e4)[0]
    exact = z.astype(np.float64).mean(axis=ref.stat_axes(z.ndim))
    x = torch.from_numpy(z) if as_tensor else z
    mu, mu_corrected = ref.batch_mean(x), _corrected_float32_mean(x)
    assert mu.dtype == x.dtype  # float32 in, float32 out
    ulp = np.spacing(np.float32(1e4))
    np.testing.assert_allclose(np.asarray(mu), exact, atol=ulp)  # the float64 mean, rounded once
    np.testing.assert_allclose(np.asarray(mu), np.asarray(mu_corrected), atol=2 * ulp)


@pytest.mark.parametrize("shape", SHAPES)
def test_sum_of_products_equals_the_product_summed(shape):
    a, b = _problem(shape, np.float64)[0], _problem(shape, np.float64, seed=1)[0]
    expected = (a * b).sum(axis=ref.stat_axes(a.ndim))
    np.testing.assert_allclose(ref._sum_of_products(a, b), expected, rtol=1e-12)
    np.testing.assert_allclose(ref._sum_of_products(torch.from_numpy(a), torch.from_numpy(b)).numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_normalize_in_place_equals_normalize_and_divides(shape):
    z, _, _ = _problem(shape, np.float64)
    mu = ref.batch_mean(z)
    var = ref.batch_variance(ref.center(z, mu))
    expected = ref.center(z, mu) / ref._per_feature(np.sqrt(var + 1e-5), z.ndim)  # step 4 as written
    fresh = ref.normalize(ref.center(z, mu), var, 1e-5)
    z_new = ref.center(z, mu)
    in_place = ref.normalize(z_new, var, 1e-5, in_place=True)
    assert in_place is z_new  # no new array
    np.testing.assert_allclose(fresh, expected, rtol=1e-14)
    np.testing.assert_array_equal(in_place, fresh)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, "both"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_non_finite_batch_is_refused_without_warnings(bad, dtype):
    z, gamma, beta = _problem((6, 3), dtype)
    if bad == "both":  # +inf and -inf in one feature: its sum is inf - inf
        z[0, 1], z[1, 1] = np.inf, -np.inf
    else:
        z[2, 1] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="NaN or infinite"):
            ref.forward_train(z, gamma, beta)


def test_a_batch_of_one_value_per_feature_is_refused_before_any_arithmetic():
    z, gamma, beta = _problem((1, 3), np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="more than one value"):
            ref.forward_train(z, gamma, beta)
        with pytest.raises(ValueError, match="more than one value"):
            ref.forward_train(z[:0], gamma, beta)  # an empty batch too


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_infer_affine_equals_forward_infer(shape, dtype):
    z, gamma, beta = _problem(shape, dtype)
    rng = np.random.default_rng(5)
    mean, var = rng.normal(size=shape[1]).astype(dtype), rng.uniform(0.5, 3, shape[1]).astype(dtype)
    scale, shift = ref.inference_affine(gamma, beta, mean, var)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(
        ref.forward_infer_affine(z, scale, shift), ref.forward_infer(z, gamma, beta, mean, var), rtol=tol, atol=tol
    )


def test_forward_train_does_not_modify_its_input():
    z, gamma, beta = _problem((64, 8), np.float32)
    before = z.copy()
    ref.forward_train(z, gamma, beta)
    np.testing.assert_array_equal(z, before)


@pytest.mark.parametrize("dtypes", [(np.float32,) * 2, (np.float64,) * 2, (np.float32, np.float64)])
@pytest.mark.parametrize("shape", [(37, 5), (7, 3, 4, 5), (300, 64), (96, 64), (256, 16)])  # rows joined
@pytest.mark.parametrize("chunk_bytes", [1, 100, 200, 1000, 10**9])  # one example a chunk ... one chunk
def test_the_chunked_affine_path_equals_the_plain_one(shape, dtypes, chunk_bytes):
    z_dtype, vec_dtype = dtypes  # float32 z with float64 scale: the result's dtype as z * scale
    z, scale, shift = _problem(shape, np.float64, seed=3)
    z, scale, shift = z.astype(z_dtype), scale.astype(vec_dtype), shift.astype(vec_dtype)
    plain = ref._affine_plain(z, scale, shift)
    chunked = ref._affine_in_chunks(z, scale, shift, chunk_bytes=chunk_bytes)
    assert chunked.dtype == plain.dtype and chunked.shape == plain.shape
    np.testing.assert_array_equal(chunked, plain)  # the same operations on every value


@pytest.mark.parametrize("shape", [(8192, 512), (64, 64, 32, 32), (256, 512), (4, 3), (2, 8, 128, 128)])
def test_forward_infer_affine_takes_the_chunked_path_only_for_large_numpy_batches(shape, monkeypatch):
    z, scale, shift = _problem(shape, np.float32, seed=4)
    calls = []
    chunked = ref._affine_in_chunks
    monkeypatch.setattr(ref, "_affine_in_chunks", lambda *a: calls.append(1) or chunked(*a))
    out = ref.forward_infer_affine(z, scale, shift)
    assert bool(calls) == (z.nbytes > ref._PLAIN_UP_TO and z[0].nbytes <= ref._CHUNK_BYTES)
    np.testing.assert_array_equal(out, ref._affine_plain(z, scale, shift))
    np.testing.assert_array_equal(  # tensors and non-contiguous arrays: the plain path
        ref.forward_infer_affine(torch.from_numpy(z), torch.from_numpy(scale), torch.from_numpy(shift)).numpy(), out
    )
