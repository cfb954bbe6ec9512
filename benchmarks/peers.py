"""Batch Norm as two well-known courses write it: the benchmarks' peers (bnkit never uses them).

Written here from their published formulas, for timing only:
- CS231n (Stanford, assignment 2, ``layers.py``): ``batchnorm_forward`` in training and test
  mode, the closed-form ``batchnorm_backward_alt``, and the spatial versions that move the
  channels last and reuse them on (N*H*W, C).
- d2l.ai (Dive into Deep Learning, section "Batch Normalization"): ``batch_norm`` on tensors,
  differentiated by autograd.
"""
from __future__ import annotations

import numpy as np
import torch


# ---------------------------------------------------------------- CS231n, NumPy


def _channels_last(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N*H*W, C), as spatial_batchnorm_* do; (N, D) unchanged."""
    return x if x.ndim == 2 else x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])


def _back(out: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of _channels_last."""
    if len(shape) == 2:
        return out
    n, c, h, w = shape
    return out.reshape(n, h, w, c).transpose(0, 3, 1, 2)


def cs231n_forward(x, gamma, beta, eps=1e-5):
    """batchnorm_forward, mode "train": (out, cache)."""
    shape, x = x.shape, _channels_last(x)
    sample_mean = np.mean(x, axis=0)
    sample_var = np.var(x, axis=0)
    x_hat = (x - sample_mean) / np.sqrt(sample_var + eps)
    out = gamma * x_hat + beta
    return _back(out, shape), (x, x_hat, sample_mean, sample_var, gamma, eps, shape)


def cs231n_backward_alt(dout, cache):
    """batchnorm_backward_alt, the closed form: (dx, dgamma, dbeta)."""
    x, x_hat, mean, var, gamma, eps, shape = cache
    dout = _channels_last(dout)
    n = x.shape[0]
    dbeta = dout.sum(axis=0)
    dgamma = (dout * x_hat).sum(axis=0)
    dx_hat = dout * gamma
    inv_std = 1.0 / np.sqrt(var + eps)
    dx = inv_std / n * (n * dx_hat - dx_hat.sum(axis=0) - x_hat * (dx_hat * x_hat).sum(axis=0))
    return _back(dx, shape), dgamma, dbeta


def cs231n_infer(x, gamma, beta, running_mean, running_var, eps=1e-5):
    """batchnorm_forward, mode "test"."""
    shape, x = x.shape, _channels_last(x)
    x_hat = (x - running_mean) / np.sqrt(running_var + eps)
    return _back(gamma * x_hat + beta, shape)


# ---------------------------------------------------------------- d2l.ai, PyTorch tensors


def d2l_batch_norm(X, gamma, beta, moving_mean, moving_var, eps=1e-5, momentum=0.1):
    """d2l's batch_norm: (Y, moving_mean, moving_var). gamma etc. shaped (1, n) or (1, C, 1, 1)."""
    if not torch.is_grad_enabled():  # prediction mode
        X_hat = (X - moving_mean) / torch.sqrt(moving_var + eps)
    else:
        if X.ndim == 2:
            mean = X.mean(dim=0)
            var = ((X - mean) ** 2).mean(dim=0)
        else:
            mean = X.mean(dim=(0, 2, 3), keepdim=True)
            var = ((X - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        X_hat = (X - mean) / torch.sqrt(var + eps)
        moving_mean = (1.0 - momentum) * moving_mean + momentum * mean
        moving_var = (1.0 - momentum) * moving_var + momentum * var
    Y = gamma * X_hat + beta
    return Y, moving_mean.data, moving_var.data
