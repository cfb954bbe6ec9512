"""The chapters' running example: scikit-learn's bundled handwritten digits (no download).

1797 images of 8x8 pixels, flattened to 64 features, 10 classes. Pixel values are only
scaled to [0, 1]; they are deliberately not standardised, so Batch Norm has work to do.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def load_digits_split(
    test_size: float = 0.25, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A stratified train/test split of the digits.

    Returns X_train (m_train, 64) and X_test (m_test, 64) as float32 in [0, 1],
    y_train (m_train,) and y_test (m_test,) as int64 class labels 0..9.
    The same seed always gives the same split.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)  # (1797, 64), pixel values 0..16 -> [0, 1]
    y = digits.target.astype(np.int64)  # (1797,)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=test_size, random_state=seed, stratify=y
    )
    return X_train, X_test, y_train, y_test


def batches(
    X: np.ndarray, y: np.ndarray, batch_size: int, seed: int = 0, shuffle: bool = True
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield mini-batches (X_b, y_b) of shape (batch_size, ...) and (batch_size,), one epoch.

    With shuffle the order is a permutation drawn from ``seed``; the last batch may be
    smaller. Pass a different seed per epoch for a fresh order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if len(X) != len(y):
        raise ValueError(f"X and y must have the same length, got {len(X)} and {len(y)}")
    order = np.random.default_rng(seed).permutation(len(X)) if shuffle else np.arange(len(X))
    for start in range(0, len(X), batch_size):
        idx = order[start : start + batch_size]
        yield X[idx], y[idx]
