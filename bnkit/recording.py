"""Record what every Batch Norm layer sees and keeps, at every training step (forward hooks).

    with BatchStatsRecorder(model) as rec:
        train(model, X, y)                    # any loop that calls the model in training mode
    trace = rec.trace("1")                    # the BN layer called "1" in model.named_modules()
    trace.mu, trace.var                       # (T, n): batch mean and biased batch variance
    trace.running_mean, trace.running_var     # (T, n): the layer's buffers after each step

Only training-mode calls are recorded (eval-mode calls do not change the running statistics).
A forward pre-hook reads the layer's input z, before the layer normalises it; a forward hook
reads the buffers after the layer has updated them.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from bnkit import running
from bnkit.population import bn_names


class Trace(NamedTuple):
    """One BN layer's record over T training steps, as float64 NumPy arrays."""

    count: np.ndarray  # (T,), values per feature in each batch (the batch size for (m, n) input)
    mu: np.ndarray  # (T, n), batch mean, step 1
    var: np.ndarray  # (T, n), biased batch variance, step 3 (what the layer normalised with)
    running_mean: np.ndarray  # (T, n), running_mean after step t's update
    running_var: np.ndarray  # (T, n), running_var after step t's update (PyTorch: unbiased)


class BatchStatsRecorder:
    """Records the batch statistics and running statistics of every BN layer of ``model``.

    ``layers`` are the names (as in ``model.named_modules()``) of the layers to record;
    by default every BN layer with running statistics. Use as a context manager, or call
    ``remove()`` to take the hooks off.
    """

    def __init__(self, model: nn.Module, layers: list[str] | None = None) -> None:
        found = {name: bn for bn, name in bn_names(model).items()}
        if layers is None:
            layers = list(found)
        unknown = [name for name in layers if name not in found]
        if unknown:
            raise ValueError(f"not BN layers with running statistics: {unknown}; the model's are {list(found)}")
        if not layers:
            raise ValueError("the model has no BatchNorm layer with running statistics")
        self.names = list(layers)
        self._records: dict[str, dict[str, list]] = {
            name: {field: [] for field in Trace._fields} for name in self.names
        }
        self._handles = []
        for name in self.names:
            bn = found[name]
            self._handles.append(bn.register_forward_pre_hook(self._before(name)))
            self._handles.append(bn.register_forward_hook(self._after(name)))

    def _before(self, name: str):
        record = self._records[name]

        def hook(bn: nn.Module, args: tuple) -> None:
            if not bn.training:
                return
            stats = running.batch_stats(args[0].detach())  # float64 (count, mean, M2) per feature
            record["count"].append(stats.count)
            record["mu"].append(stats.mean.cpu().numpy())
            record["var"].append((stats.m2 / stats.count).cpu().numpy())

        return hook

    def _after(self, name: str):
        record = self._records[name]

        def hook(bn: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not bn.training:
                return
            record["running_mean"].append(bn.running_mean.detach().double().cpu().numpy().copy())
            record["running_var"].append(bn.running_var.detach().double().cpu().numpy().copy())

        return hook

    def trace(self, name: str) -> Trace:
        """The record of layer ``name`` so far: count (T,), the other fields (T, n)."""
        if name not in self._records:
            raise KeyError(f"layer {name!r} is not recorded; recorded: {self.names}")
        record = self._records[name]
        if not record["count"]:
            raise ValueError(f"layer {name!r} has not run in training mode since recording began")
        return Trace(np.array(record["count"]), *(np.array(record[f]) for f in Trace._fields[1:]))

    @property
    def steps(self) -> int:
        """The number of training-mode calls recorded (of the first recorded layer)."""
        return len(self._records[self.names[0]]["count"])

    def remove(self) -> None:
        """Take the hooks off the model; what was recorded stays available."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> BatchStatsRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
