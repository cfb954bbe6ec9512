"""The experiments of the chapter "How robust is it?": one training run, many test-time statistics.

How much does test accuracy depend on the way mu and var are estimated? Every running
estimator (EMA with any momentum, bias-corrected EMA, cumulative) is a function of the
sequence of batch statistics seen in training, and training itself never reads the running
statistics. So one run that records each BN layer's batch mean and variance at every step
gives all of them exactly, post hoc:

    record = train_recording(model, X, y, snapshot_steps=(20, 50))   # bnkit.course.nets.train + hooks
    stats = running_from_record(record, "ema", momentum=0.01)          # {layer: (mean, var)}
    evaluate(model, X_test, y_test, stats)                              # accuracy with them

- ``train_recording``: ``bnkit.course.nets.train`` with ``bnkit.recording.BatchStatsRecorder``, which records,
  per BN layer and step, the batch mean and the biased batch variance, plus the batch size and
  copies of the model's state after chosen steps.
- ``running_from_record``: the running estimate after the first k steps, replayed with
  ``bnkit.running.running_estimates`` (exactly what the layer would have stored).
- ``with_stats`` / ``evaluate``: a copy of the model with other BN statistics, and its accuracy.
- ``batch_stats_accuracy``: accuracy when every test batch is normalised with its own statistics.
- ``population_stats``: exact statistics over a data set with ``recompute_stats`` (PreciseBN,
  or AdaBN when the data are unlabelled inputs from the test domain).
- ``shift``: a synthetic change of the input images (contrast, brightness, noise).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

import bnkit
from bnkit import running
from bnkit.course import testtime
from bnkit.course.nets import accuracy, train
from bnkit.recording import BatchStatsRecorder

Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]  # BN layer name -> (mean (n,), var (n,))


@dataclass
class Record:
    """What one recorded training run leaves behind."""

    mus: dict[str, np.ndarray]  # layer name -> (T, n) batch means, one row per training step
    variances: dict[str, np.ndarray]  # layer name -> (T, n) biased batch variances
    counts: np.ndarray  # (T,) values per feature in each step's batch (the batch size)
    losses: list[float]  # (T,) training loss of every step
    snapshots: dict[int, dict] = field(default_factory=dict)  # step k -> state_dict after k steps


def train_recording(
    model: nn.Module, X: np.ndarray, y: np.ndarray, snapshot_steps=(), **train_kwargs
) -> Record:
    """``bnkit.course.nets.train(model, X, y, **train_kwargs)``, recording every BN layer's batch statistics
    (with ``bnkit.recording.BatchStatsRecorder``).

    snapshot_steps: steps k after which a copy of the model's state_dict is kept (k = 1 is
    after the first optimizer step). The training is exactly that of ``train``: the hooks
    only read the activations.
    """
    counts: list[int] = []
    snapshots: dict[int, dict] = {}
    wanted = set(snapshot_steps)

    def on_model(module, args):  # before forward pass k + 1 the weights are those after k steps
        k = len(counts)
        if k in wanted:
            snapshots[k] = copy.deepcopy(module.state_dict())
        counts.append(args[0].shape[0])

    handle = model.register_forward_pre_hook(on_model)
    try:
        with BatchStatsRecorder(model) as recorder:
            losses = train(model, X, y, **train_kwargs)
    finally:
        handle.remove()
    if len(counts) in wanted:  # the state after the last step
        snapshots[len(counts)] = copy.deepcopy(model.state_dict())
    traces = {name: recorder.trace(name) for name in recorder.names}
    mus = {name: trace.mu for name, trace in traces.items()}
    variances = {name: trace.var for name, trace in traces.items()}
    return Record(mus, variances, np.array(counts), losses, snapshots)


def running_from_record(
    record: Record, estimator: str = "ema", momentum: float | None = 0.1, steps: int | None = None
) -> Stats:
    """The running statistics every BN layer would hold after the first ``steps`` training steps
    (all of them by default), had it used ``estimator`` with ``momentum`` (PyTorch convention;
    see ``bnkit.running``). Starts from PyTorch's (0, 1); returns float32 tensors."""
    steps = len(record.counts) if steps is None else steps
    stats = {}
    for name, mus in record.mus.items():
        mean, var = np.zeros(mus.shape[1]), np.ones(mus.shape[1])  # after 0 steps: PyTorch's start
        if steps > 0:
            means, vars_ = running.running_estimates(
                mus[:steps], record.variances[name][:steps], record.counts[:steps], estimator, momentum
            )
            mean, var = means[-1], vars_[-1]
        stats[name] = (torch.tensor(mean, dtype=torch.float32), torch.tensor(var, dtype=torch.float32))
    return stats


@torch.no_grad()
def with_stats(model: nn.Module, stats: Stats | None = None) -> nn.Module:
    """A copy of ``model`` in eval mode whose BN layers hold ``stats`` (or their own, if None)."""
    model = copy.deepcopy(model).eval()
    for bn, name in bnkit.bn_names(model).items() if stats is not None else ():
        bn.running_mean.copy_(stats[name][0])
        bn.running_var.copy_(stats[name][1])
    return model


def evaluate(model: nn.Module, X: np.ndarray, y: np.ndarray, stats: Stats | None = None) -> float:
    """Test accuracy of ``model`` with the BN statistics ``stats`` (the model is not changed)."""
    return accuracy(with_stats(model, stats), X, y)


def population_stats(model: nn.Module, X: np.ndarray, upstream: str = "eval", batch_size: int = 256) -> Stats:
    """Exact per-layer statistics of the inputs X (m, features), no labels needed, with
    ``bnkit.bnkit.recompute_stats`` on a copy of the model (the model is not changed)."""
    model = copy.deepcopy(model)
    batches = [torch.as_tensor(X[s : s + batch_size]) for s in range(0, len(X), batch_size)]
    return bnkit.recompute_stats(model, batches, estimator="exact", upstream=upstream)


def batch_stats_accuracy(model: nn.Module, X: np.ndarray, y: np.ndarray, batch_size: int, seed: int = 0) -> float:
    """Accuracy when X, in a random order drawn from ``seed``, is cut into batches of
    ``batch_size`` and each is normalised with its own statistics (no running statistics)."""
    order = np.random.default_rng(seed).permutation(len(X))
    return float(np.mean(testtime.predict_in_order(model, X, batch_size, order) == y))


def shift(X: np.ndarray, contrast: float = 1.0, brightness: float = 0.0, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """Synthetic test-domain images: clip(contrast * X + brightness + N(0, noise^2), 0, 1), float32.

    X: (m, 64) pixel values in [0, 1]. The noise is drawn from ``seed``.
    """
    rng = np.random.default_rng(seed)
    X_new = contrast * X + brightness + (rng.normal(0.0, noise, X.shape) if noise > 0 else 0.0)
    return np.clip(X_new, 0.0, 1.0).astype(np.float32)
