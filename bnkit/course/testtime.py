"""Why test time needs other statistics: batch-statistics predictions, and a synthetic series.

- ``predict_with_batch_stats``: what a model predicts when every test batch is normalised
  with its own mean and variance (training-mode BN), without touching the model.
- ``fraction_changed``: how many of those predictions change when the test set is cut
  into batches in another order.
- ``temperature_series``: a noisy seasonal series for the chapter on running averages.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def predict_with_batch_stats(model: nn.Module, X: np.ndarray, batch_size: int) -> np.ndarray:
    """Predicted labels (m,) for X (m, features), in the order of X.

    X is cut into consecutive batches X[0:b], X[b:2b], ... (the last may be smaller), and
    every BN layer normalises each batch with that batch's own mean and variance, as in
    training mode. Runs on a copy of the model: its running statistics and mode are
    unchanged. A batch of one example is refused (ValueError), as in training mode.
    """
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = next(model.parameters()).device
    batch_mode = copy.deepcopy(model).train()  # a copy: its running statistics may change, the model's do not
    labels = []
    for start in range(0, len(X), batch_size):
        X_b = torch.as_tensor(X[start : start + batch_size], device=device)  # (b, features)
        labels.append(batch_mode(X_b).argmax(dim=1).cpu().numpy())  # (b,)
    return np.concatenate(labels)


def predict_in_order(model: nn.Module, X: np.ndarray, batch_size: int, order: np.ndarray) -> np.ndarray:
    """Batch-statistics predictions (m,) for X, the batches cut from X[order]; in X's order."""
    labels = np.empty(len(X), dtype=np.int64)
    labels[order] = predict_with_batch_stats(model, X[order], batch_size)  # undo the permutation
    return labels


def fraction_changed(
    model: nn.Module, X: np.ndarray, batch_size: int, order_a: np.ndarray, order_b: np.ndarray
) -> float:
    """Fraction of the m examples of X whose batch-statistics prediction differs between the
    batching of X[order_a] and that of X[order_b] (order_a, order_b: permutations of m)."""
    pred_a = predict_in_order(model, X, batch_size, order_a)  # (m,)
    pred_b = predict_in_order(model, X, batch_size, order_b)  # (m,)
    return float(np.mean(pred_a != pred_b))


def temperature_series(days: int = 365, seed: int = 0) -> np.ndarray:
    """A temperature-like daily series (days,) in °C, starting in midsummer (about 22 °C):
    a seasonal cycle, weather that lasts a few days, and day-to-day noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(days)
    season = 12.0 + 10.0 * np.cos(2 * np.pi * t / 365.0)  # warm at day 0, cold half a year later
    weather = np.convolve(rng.normal(0, 2.0, days + 6), np.ones(7) / 7 ** 0.5, mode="valid")  # a few days' memory
    return season + weather + rng.normal(0, 1.5, days)
