"""Input checks shared by the NumPy reference and the PyTorch path.

Every check raises a ValueError that names the problem, before any state changes.
They only use ``.ndim``, ``.shape`` and ``isfinite``, so they accept NumPy arrays and
torch tensors alike.
"""
from __future__ import annotations

import math
import numbers

import numpy as np


def feature_axes(ndim: int) -> tuple[int, ...]:
    """All axes but the feature/channel axis 1, for any input of 2 or more dimensions."""
    if ndim < 2:
        raise ValueError(f"expected z with a batch axis and a feature axis, got {ndim} dimension(s)")
    return (0,) + tuple(range(2, ndim))


def stat_axes(ndim: int) -> tuple[int, ...]:
    """Axes the statistics are taken over: the batch (and spatial) axes."""
    if ndim == 2:
        return (0,)  # (m, n): per feature over m values
    if ndim == 4:
        return (0, 2, 3)  # (m, C, H, W): per channel over m*H*W values
    raise ValueError(
        f"expected z of shape (m, n) or (m, C, H, W), got an array with {ndim} dimension(s)"
    )


def values_per_feature(shape: tuple[int, ...]) -> int:
    """How many values each feature/channel's statistics are taken over (m, m*L or m*H*W)."""
    return math.prod(shape[a] for a in feature_axes(len(shape)))


def is_real(x) -> bool:
    """A real number: int, float or a NumPy scalar such as np.float32(1e-5), but not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def check_eps(eps: float) -> None:
    if not (is_real(eps) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive number (it keeps sqrt(var + eps) away from 0), got {eps!r}")


def check_feature_vector(name: str, v, num_features: int) -> None:
    """gamma, beta, mean and var hold one value per feature/channel."""
    if tuple(v.shape) != (num_features,):
        raise ValueError(
            f"{name} must have shape ({num_features},), one value per feature/channel of z, "
            f"got shape {tuple(v.shape)}"
        )


def all_finite(x) -> bool:
    """True if no value of x (a NumPy array or a torch tensor) is NaN or infinite."""
    if hasattr(x, "isfinite"):  # a torch tensor
        return bool(x.isfinite().all())
    return bool(np.isfinite(x).all())


def check_batch_size(z) -> int:
    """A training batch has more than one value per feature; returns how many it has (m or m*H*W)."""
    count = values_per_feature(tuple(z.shape))
    if count < 2:
        raise ValueError(
            f"a training batch needs more than one value per feature/channel, got z of shape "
            f"{tuple(z.shape)}: with one value, mu = z and var = 0, so every output would be beta"
        )
    return count


def check_finite_batch(mu) -> None:
    """A NaN or inf anywhere in a feature of the batch makes its mean mu NaN or inf: one cheap check
    of mu instead of a pass over z (a sum that overflows is refused too)."""
    if not all_finite(mu):
        raise ValueError("the training batch z contains NaN or infinite values (or values whose sum overflows)")


def check_momentum(momentum, allow_none: bool = True) -> None:
    """PyTorch convention: running = (1 - momentum) * running + momentum * batch, 0 <= momentum <= 1."""
    if momentum is None and allow_none:
        return
    if not (is_real(momentum) and 0.0 <= momentum <= 1.0):
        raise ValueError(
            f"momentum must be in [0, 1] (PyTorch convention: the weight of the new batch)"
            f"{' or None (cumulative average)' if allow_none else ''}, got {momentum!r}"
        )
