"""A tiny classifier for the digits and a deterministic training loop, shared by the chapters."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from bnkit.course.data import batches
from bnkit.population import model_device


def mlp(
    hidden: Sequence[int] = (64, 64),
    bn: bool = True,
    seed: int = 0,
    norm: Callable[[int], nn.Module] = nn.BatchNorm1d,
    in_features: int = 64,
    num_classes: int = 10,
) -> nn.Sequential:
    """Linear -> norm -> ReLU for each hidden width, then Linear(hidden[-1], num_classes).

    Input (m, in_features), output logits (m, num_classes). ``norm`` is any class or
    factory called as ``norm(width)``: ``torch.nn.BatchNorm1d`` by default, or a drop-in
    such as ``bnkit.BatchNorm1d``. With ``bn=False`` there is no norm layer.
    The weights are drawn from ``seed``, so the same arguments give the same network.
    """
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers.append(nn.Linear(width, h))  # (m, width) -> (m, h): the pre-activation z
        if bn:
            layers.append(norm(h))  # (m, h), the five steps per feature
        layers.append(nn.ReLU())
        width = h
    layers.append(nn.Linear(width, num_classes))  # (m, num_classes) logits
    return nn.Sequential(*layers)


def conv_net(
    seed: int = 0, channels: Sequence[int] = (8, 16), num_classes: int = 10
) -> nn.Sequential:
    """Conv(3x3) -> BatchNorm2d -> ReLU for each width in ``channels``, then Flatten, Linear.

    Input (m, 1, 8, 8) images (the digits reshaped), output logits (m, num_classes). Each
    BatchNorm2d normalises a channel over the m * 8 * 8 values of the batch. The
    convolutions keep bias=True like ``mlp``'s Linear layers (redundant before BN).
    The weights are drawn from ``seed``.
    """
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = 1
    for c in channels:
        layers += [nn.Conv2d(width, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]  # (m, c, 8, 8)
        width = c
    layers += [nn.Flatten(), nn.Linear(width * 8 * 8, num_classes)]  # (m, num_classes)
    return nn.Sequential(*layers)


def train(
    model: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-2,
    seed: int = 0,
) -> list[float]:
    """Train with Adam and cross-entropy on shuffled mini-batches; return the loss of every step.

    X: (m, 64) float32, y: (m,) int64 (NumPy). The batch order of epoch e is drawn from
    ``seed + e``, so the same seed gives the same losses and weights. The model runs in
    training mode (BN uses batch statistics and updates its running ones) and is left in
    training mode. Runs on the device of the model's parameters.
    """
    torch.manual_seed(seed)
    device = model_device(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses: list[float] = []
    for epoch in range(epochs):
        for X_b, y_b in batches(X, y, batch_size, seed=seed + epoch):
            logits = model(torch.as_tensor(X_b, device=device))  # (b, 10)
            loss = nn.functional.cross_entropy(logits, torch.as_tensor(y_b, device=device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, X: np.ndarray, y: np.ndarray) -> float:
    """Fraction of X (m, 64) classified as y (m,), with the model in eval mode (test-time BN).

    The model's previous mode is restored afterwards; no running statistic changes.
    """
    was_training = model.training
    model.eval()
    try:
        logits = model(torch.as_tensor(X, device=model_device(model)))  # (m, 10)
        predicted = logits.argmax(dim=1).cpu().numpy()
    finally:
        model.train(was_training)
    return float((predicted == y).mean())
