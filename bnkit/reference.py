"""Batch Norm, the five steps of the table, in NumPy: the teaching reference.

    step 1   mu       = 1/m sum_i z_i                     batch_mean(z)
    step 2   z_new    = z - mu                            center(z, mu)
    step 3   var      = 1/m sum_i z_new_i**2              batch_variance(z_new)
    step 4   z_norm   = z_new / sqrt(var + eps)           normalize(z_new, var, eps)
    step 5   z_tilde  = gamma * z_norm + beta             scale_shift(z_norm, gamma, beta)

z is (m, n): statistics per feature over the m examples; or (m, C, H, W): per channel
over the m*H*W values. Per-feature vectors (mu, var, gamma, beta) have shape (n,) or (C,).

The functions use only array methods and operators that NumPy arrays and torch tensors
share, so the PyTorch path (``bnkit.modules``, ``bnkit.folding``) runs these same lines on tensors (any device, autograd).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from bnkit._validate import (
    check_eps,
    check_feature_vector,
    check_batch_size,
    check_finite_batch,
    stat_axes,
    values_per_feature,
)

Array = Any  # a NumPy array, or a torch tensor when called on tensors


def _per_feature(v: Array, ndim: int) -> Array:
    """Reshape a per-feature vector (n,) or (C,) so it broadcasts against z."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))  # (1, n) or (1, C, 1, 1)


def _mean_in_float64(z: Array, axes: tuple[int, ...]) -> Array:
    """The mean over ``axes`` summed in float64 (no float64 copy of z), returned in z's dtype."""
    if isinstance(z, np.ndarray):
        return z.mean(axis=axes, dtype=np.float64).astype(z.dtype)
    import torch  # z is a tensor, so torch is loaded already

    return z.mean(dim=axes, dtype=torch.float64).to(z.dtype)


def _sum_of_products(a: Array, b: Array) -> Array:
    """sum(a * b) per feature, shape (n,) or (C,), for a and b of the shape of z.

    NumPy's einsum adds each product as it makes it (no temporary array the size of z);
    tensors use a * b, which autograd differentiates.
    """
    if isinstance(a, np.ndarray):
        return np.einsum("ij,ij->j" if a.ndim == 2 else "ijkl,ijkl->j", a, b)
    return (a * b).sum(axis=stat_axes(a.ndim))


# ---------------------------------------------------------------- the five steps


def batch_mean(z: Array) -> Array:
    """Step 1: mu, shape (n,) or (C,), the mean of each feature over the batch."""
    axes = stat_axes(z.ndim)
    if z.itemsize < 8:  # float32: a float32 running sum of values far from 0 loses the digits of
        return _mean_in_float64(z, axes)  # their spread, so the sum runs in float64 (same single pass)
    return z.mean(axis=axes)


def center(z: Array, mu: Array) -> Array:
    """Step 2: z_new = z - mu, the shape of z."""
    return z - _per_feature(mu, z.ndim)


def batch_variance(z_new: Array) -> Array:
    """Step 3: var, shape (n,) or (C,), the biased (1/m) variance of the centred batch."""
    return _sum_of_products(z_new, z_new) / values_per_feature(z_new.shape)


def normalize(z_new: Array, var: Array, eps: float, in_place: bool = False) -> Array:
    """Step 4: z_norm = z_new / sqrt(var + eps), the shape of z_new. eps sits inside the root.

    With ``in_place`` the result overwrites z_new (no new array; ``forward_train`` does this).
    """
    inv_std = _per_feature((var + eps) ** -0.5, z_new.ndim)  # one root per feature, then multiply
    if in_place:
        z_new *= inv_std
        return z_new
    return z_new * inv_std


def scale_shift(z_norm: Array, gamma: Array, beta: Array) -> Array:
    """Step 5: z_tilde = gamma * z_norm + beta, the shape of z_norm."""
    z_tilde = _per_feature(gamma, z_norm.ndim) * z_norm
    z_tilde += _per_feature(beta, z_norm.ndim)  # in place: no second temporary array
    return z_tilde


# ---------------------------------------------------------------- training and test time


class Cache(NamedTuple):
    """What the backward pass needs from forward_train."""

    z_norm: Array  # (m, n) or (m, C, H, W), step 4
    var: Array  # (n,) or (C,), step 3 (biased)
    gamma: Array  # (n,) or (C,)
    eps: float

    @property
    def z_new(self) -> Array:
        """Step 2's z - mu, recovered as z_norm * sqrt(var + eps) (not stored: saves memory)."""
        return self.z_norm * _per_feature((self.var + self.eps) ** 0.5, self.z_norm.ndim)


def _check_params(z: Array, **vectors: Array) -> None:
    stat_axes(z.ndim)  # (m, n) or (m, C, H, W), else ValueError
    for name, v in vectors.items():
        check_feature_vector(name, v, z.shape[1])


def forward_train(z: Array, gamma: Array, beta: Array, eps: float = 1e-5) -> tuple[Array, Cache]:
    """Training-time Batch Norm with the statistics of the batch itself.

    z: (m, n) or (m, C, H, W); gamma, beta: (n,) or (C,).
    Returns z_tilde (the shape of z) and the Cache for ``backward``.
    The batch mean and variance are ``batch_mean(z)`` and ``cache.var``.
    """
    _check_params(z, gamma=gamma, beta=beta)
    check_eps(eps)
    check_batch_size(z)  # more than one value per feature
    with np.errstate(invalid="ignore", over="ignore"):  # a NaN or inf in z: refused just below
        mu = batch_mean(z)  # step 1: (n,)
    check_finite_batch(mu)  # all values finite (a NaN or inf in z shows in mu)
    z_new = center(z, mu)  # step 2: (m, n)
    var = batch_variance(z_new)  # step 3: (n,)
    z_norm = normalize(z_new, var, eps, in_place=isinstance(z, np.ndarray))  # step 4: (m, n), into z_new:
    del z_new  # not needed again (cache.z_new recovers it); tensors keep theirs for autograd
    z_tilde = scale_shift(z_norm, gamma, beta)  # step 5: (m, n)
    return z_tilde, Cache(z_norm, var, gamma, eps)


def forward_infer(
    z: Array, gamma: Array, beta: Array, mean: Array, var: Array, eps: float = 1e-5
) -> Array:
    """Test-time Batch Norm: steps 2, 4 and 5 with a fixed mean and var (no batch statistics).

    z: (m, n), (m, C, H, W), or a single example: (n,) or an image (C, H, W).
    gamma, beta, mean, var: (n,) or (C,). Returns an array the shape of z.
    """
    single = z.ndim in (1, 3)
    if z.ndim == 3 and z.shape[0] != len(gamma):
        raise ValueError(
            f"a 3-D z is one image (C, H, W), so C = {z.shape[0]}, but gamma has shape {tuple(gamma.shape)}; "
            f"a batch must be (m, n) or (m, C, H, W), got z of shape {tuple(z.shape)}"
        )
    if single:
        z = z[None]  # one example: (1, n) or (1, C, H, W)
    _check_params(z, gamma=gamma, beta=beta, mean=mean, var=var)
    check_eps(eps)
    z_new = center(z, mean)  # step 2 with the running/population mean
    z_norm = normalize(z_new, var, eps)  # step 4 with the running/population variance
    z_tilde = scale_shift(z_norm, gamma, beta)  # step 5
    return z_tilde[0] if single else z_tilde


def inference_affine(
    gamma: Array, beta: Array, mean: Array, var: Array, eps: float = 1e-5
) -> tuple[Array, Array]:
    """At test time BN is the affine map z -> scale * z + shift, per feature.

    scale = gamma / sqrt(var + eps), shift = beta - mean * scale; all shapes (n,) or (C,).
    The same scale and shift fold BN into a preceding Linear or Conv layer.
    """
    check_eps(eps)
    scale = gamma / (var + eps) ** 0.5
    return scale, beta - mean * scale


def forward_infer_affine(z: Array, scale: Array, shift: Array) -> Array:
    """The fast test-time path: one multiply-add per value with a precomputed scale and shift.

    z: (m, n) or (m, C, H, W); scale, shift: (n,) or (C,) from ``inference_affine``.
    Equal to ``forward_infer`` up to round-off. A large NumPy batch goes through in chunks
    (``_affine_in_chunks``: the same values); small arrays and tensors take the plain path.
    """
    _check_params(z, scale=scale, shift=shift)
    if (isinstance(z, np.ndarray) and z.flags.c_contiguous and z.nbytes > _PLAIN_UP_TO
            and z[0].nbytes <= _CHUNK_BYTES):
        return _affine_in_chunks(z, scale, shift)
    return _affine_plain(z, scale, shift)


_CHUNK_BYTES = 1 << 18  # 256 KiB of output per chunk: it stays in the L2 cache until the add
_PLAIN_UP_TO = 1 << 21  # up to 2 MiB the whole batch stays in cache anyway: the plain path


def _affine_plain(z: Array, scale: Array, shift: Array) -> Array:
    z_tilde = z * _per_feature(scale, z.ndim)  # one pass writes the output ...
    z_tilde += _per_feature(shift, z.ndim)  # ... and one adds in place (NumPy has no fused multiply-add)
    return z_tilde


def _affine_in_chunks(z: np.ndarray, scale, shift, chunk_bytes: int = _CHUNK_BYTES) -> np.ndarray:
    """_affine_plain on k examples at a time, k examples of about ``chunk_bytes``: each chunk of
    the output is written by the multiply and still in the L2 cache when the add reads it back.

    NumPy runs its inner loop along one row, and per-feature vectors broadcast against (m, n)
    or (m, C, H, W) give it short rows (n values, or H*W), so each chunk is flattened into one
    long row and the scale and shift are laid out once to match it (repeated H*W times per
    channel, then k times). The same multiply and add of the same values as _affine_plain.
    """
    z_tilde = np.empty(z.shape, np.result_type(z, scale, shift))  # the dtype z * scale + shift has
    m, per_feature = z.shape[0], z[0].size // z.shape[1]  # examples; values per feature per example
    k = max(1, min(m, chunk_bytes // max(1, z_tilde[0].nbytes)))  # examples per chunk
    s, t = (np.tile(np.repeat(v, per_feature), k) for v in (scale, shift))  # one chunk's layout
    full = m - m % k  # examples in whole chunks
    rows, out = z[:full].reshape(full // k, -1), z_tilde[:full].reshape(full // k, -1)
    for row, out_row in zip(rows, out):  # (k * values per example,) each
        np.multiply(row, s, out=out_row)
        out_row += t
    if full < m:  # the last m % k examples
        np.multiply(z[full:], _per_feature(scale, z.ndim), out=z_tilde[full:])
        z_tilde[full:] += _per_feature(shift, z.ndim)
    return z_tilde


# ---------------------------------------------------------------- backward


def backward_staged(dz_tilde: Array, cache: Cache) -> tuple[Array, Array, Array]:
    """The chain rule back through the five steps, one step at a time (step 5 to step 1).

    dz_tilde: upstream gradient, the shape of z. Returns (dz, dgamma, dbeta):
    dz the shape of z, dgamma and dbeta (n,) or (C,).
    """
    z_norm, var, gamma, eps = cache
    z_new = cache.z_new  # (m, n), step 2's output
    axes, nd = stat_axes(z_new.ndim), z_new.ndim
    m = values_per_feature(z_new.shape)  # values per feature
    # step 5: z_tilde = gamma * z_norm + beta
    dgamma = (dz_tilde * z_norm).sum(axis=axes)
    dbeta = dz_tilde.sum(axis=axes)
    dz_norm = dz_tilde * _per_feature(gamma, nd)
    # step 4: z_norm = z_new * (var + eps) ** -1/2  (z_new reaches z_norm directly and through var)
    inv_std = (var + eps) ** -0.5
    dz_new = dz_norm * _per_feature(inv_std, nd)
    dvar = -0.5 * (dz_norm * z_new).sum(axis=axes) * inv_std**3
    # step 3: var = 1/m sum z_new**2
    dz_new = dz_new + _per_feature(dvar, nd) * 2.0 * z_new / m
    # step 2: z_new = z - mu  (z reaches z_new directly and through mu)
    dmu = -dz_new.sum(axis=axes)
    # step 1: mu = 1/m sum z
    dz = dz_new + _per_feature(dmu, nd) / m
    return dz, dgamma, dbeta


def backward(dz_tilde: Array, cache: Cache) -> tuple[Array, Array, Array]:
    """The closed form: dz = gamma / (m sqrt(var + eps)) * (m dz_tilde - dbeta - z_norm dgamma),
    with dbeta = sum dz_tilde and dgamma = sum(dz_tilde z_norm) over the m values of each feature.

    Same arguments and results as ``backward_staged``, in fewer passes over the data: the two
    sums, then one new array for dz (the two terms that are per-feature affine in z_norm, by
    the test-time path's ``forward_infer_affine``) and two updates of it in place.
    """
    z_norm, var, gamma, eps = cache
    axes, nd = stat_axes(z_norm.ndim), z_norm.ndim
    m = values_per_feature(z_norm.shape)
    dbeta = dz_tilde.sum(axis=axes)  # (n,)
    dgamma = _sum_of_products(dz_tilde, z_norm)  # (n,): sum(dz_tilde * z_norm), no temporary array
    dz = forward_infer_affine(z_norm, -dgamma / m, -dbeta / m)  # (m, n): -(dgamma z_norm + dbeta)/m
    dz += dz_tilde  # + dz_tilde
    dz *= _per_feature(gamma * (var + eps) ** -0.5, nd)  # all times gamma / sqrt(var + eps)
    return dz, dgamma, dbeta
