"""Population statistics for every Batch Norm layer of a model (``recompute_stats``).

Ioffe & Szegedy (2015, section 3.1) replace the running averages kept during training by
statistics of the training set seen through the final network. ``recompute_stats`` does that
for any model, with torch.nn's BN layers or bnkit's: "exact" (merged per-batch
(count, mean, M2) in float64) or "algorithm2" (the paper's E_B[mu_B], m/(m-1) E_B[var_B]),
with upstream layers in training mode (one pass) or already in inference mode (one partial
pass per BN layer).
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnkit import running, sync
from bnkit._validate import all_finite


_NO_BATCH = object()  # what next(iter(batches), _NO_BATCH) gives for no batches


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has been seen."""


def bn_layers(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer of ``model`` that keeps running statistics (torch.nn's or bnkit's)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def bn_names(model: nn.Module) -> dict[_BatchNorm, str]:
    """Each of ``bn_layers(model)`` with its name in ``model.named_modules()`` (e.g. "1")."""
    names = {m: name for name, m in model.named_modules()}
    return {bn: names[bn] for bn in bn_layers(model)}


def _inputs(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch  # (x, y) from a DataLoader


def _run(model: nn.Module, batch, device, forward: Callable | None):
    """One forward pass: ``forward(model, batch)``, or by default the model on the inputs."""
    if forward is None:
        return model(_inputs(batch).to(device))
    return forward(model, batch)


def _check_forward(forward) -> None:
    if forward is not None and not callable(forward):
        raise TypeError(
            f"forward must be a callable forward(model, batch) or None, got {forward!r}")


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's parameters (or of its buffers, if it has no parameters)."""
    for tensor in model.parameters():
        return tensor.device
    return next(iter(model.buffers())).device  # a model of BN layers without affine parameters


def _collect(model, layers, batches, device, stop_after=None, forward=None) -> dict:
    """Per-batch BatchStats of each layer's input, one pass over ``batches`` (no gradients)."""
    stats: dict = {bn: [] for bn in layers}

    def hook(bn, args):
        stats[bn].append(running.batch_stats(args[0]))
        if bn is stop_after:
            raise _StopForward

    handles = [bn.register_forward_pre_hook(hook) for bn in layers]
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    _run(model, batch, device, forward)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    return stats


def _estimate(per_batch: list, estimator: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not per_batch:
        raise ValueError("recompute_stats needs at least one batch")
    if estimator == "exact":
        mean, var = running.finalize(running.merge_all(per_batch))
    else:  # "algorithm2": average of batch means and of unbiased batch variances
        mean = torch.stack([s.mean for s in per_batch]).mean(0)
        var = torch.stack([running.unbiased(s.m2 / s.count, s.count) for s in per_batch]).mean(0)
    if not (all_finite(mean) and all_finite(var)):
        raise ValueError("the batches contain NaN or infinite values (non-finite layer statistics)")
    return mean, var


def recompute_stats(
    model: nn.Module,
    batches: Iterable,
    estimator: str = "exact",
    upstream: str = "train",
    *,
    forward: Callable | None = None,
    max_batches: int | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Replace every BN layer's running_mean / running_var by population statistics.

    batches: an iterable of input tensors, or of (x, y) pairs (a DataLoader).
    estimator: "exact" — the whole-set mean and unbiased variance of the layer's inputs over
        all batches, merged from per-batch (count, mean, M2) in float64 (uneven batches fine);
        "algorithm2" — Ioffe & Szegedy's E_B[mu_B] and m/(m-1) E_B[var_B], every batch weighted
        alike, as torch.nn's momentum=None does: it assumes batches of one size (drop a short
        last batch), and leaves out the spread of the batch means.
    upstream: "train" — upstream BN layers normalise with batch statistics while the
        statistics are gathered (one pass; PreciseBN, torch.optim.swa_utils.update_bn);
        "eval" — upstream BN layers already use their new statistics, as at test time (one
        pass per BN layer, each stopped at that layer).
    forward: ``forward(model, batch)`` runs the model on one batch (for batches that are not
        a tensor or (x, y), or models that take more than one input; it moves the batch to the
        device itself); by default ``model(batch[0] if tuple/list else batch)`` on the model's
        device.
    max_batches: use only the first ``max_batches`` batches (None: all).
    Other layers (dropout, ...) run in eval mode. The model's modes, momenta, parameters and
    num_batches_tracked are left as they were; no gradients are needed. If anything fails,
    the running statistics are left as they were.
    Returns {layer name: (mean, var)} as written into the buffers.
    """
    return _recompute(model, batches, estimator, upstream, _estimate, forward, max_batches)


def _recompute(model: nn.Module, batches: Iterable, estimator: str, upstream: str, estimate,
               forward: Callable | None = None, max_batches: int | None = None) -> dict:
    """recompute_stats with the step from a layer's per-batch BatchStats to its (mean, var) given
    as ``estimate(per_batch, estimator)``, called once per layer in the same order on every call
    (bn_layers order for "train", execution order for "eval"): bnkit.distributed passes one that
    merges the statistics of all processes."""
    if estimator not in ("exact", "algorithm2"):
        raise ValueError(f"estimator must be 'exact' or 'algorithm2', got {estimator!r}")
    if upstream not in ("train", "eval"):
        raise ValueError(f"upstream must be 'train' or 'eval', got {upstream!r}")
    layers = bn_layers(model)
    if not layers:
        raise ValueError("the model has no BatchNorm layer with running statistics")
    _check_forward(forward)
    if max_batches is not None:  # the first max_batches batches, kept for more than one pass
        if isinstance(max_batches, bool) or not (isinstance(max_batches, int) and max_batches >= 1):
            raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")
        batches = list(itertools.islice(batches, max_batches))
    elif iter(batches) is batches:  # a one-shot iterator: keep the batches for more than one pass
        batches = list(batches)
    device = model_device(model)
    modes = {m: m.training for m in model.modules()}
    saved = {bn: (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()) for bn in layers}
    done = False
    try:
        model.eval()
        if upstream == "train":
            for bn in layers:
                bn.train()  # batch statistics upstream (this also updates buffers: restored below)
            with sync.unsynchronised():  # each batch on its own, even in a SyncBatchNorm
                stats = _collect(model, layers, batches, device, forward=forward)
            new = {bn: estimate(stats[bn], estimator) for bn in layers}
            _restore(saved)
        else:
            first = next(iter(batches), _NO_BATCH)
            if first is _NO_BATCH:  # not a StopIteration escaping from here
                raise ValueError("recompute_stats needs at least one batch")
            order = []  # execution order of the BN layers, from the first batch
            handles = [bn.register_forward_pre_hook(lambda bn, args: order.append(bn)) for bn in layers]
            try:
                with torch.no_grad():
                    _run(model, first, device, forward)
            finally:
                for h in handles:
                    h.remove()
            new = {}
            for bn in dict.fromkeys(order):  # each layer once, upstream first
                stats = _collect(model, [bn], batches, device, stop_after=bn, forward=forward)
                new[bn] = estimate(stats[bn], estimator)
                bn.running_mean.copy_(new[bn][0]), bn.running_var.copy_(new[bn][1])
            missing = [bn for bn in layers if bn not in new]
            if missing:
                raise ValueError(f"{len(missing)} BN layer(s) were never called by the model's forward pass")
        with torch.no_grad():
            for bn, (mean, var) in new.items():
                bn.running_mean.copy_(mean), bn.running_var.copy_(var)
        done = True
    finally:
        if not done:
            _restore(saved)
        for m, mode in modes.items():
            m.training = mode  # this module's flag only: m.train(mode) would also reset its children
    return {name: (bn.running_mean.clone(), bn.running_var.clone()) for bn, name in bn_names(model).items()}


@torch.no_grad()
def _restore(saved: dict) -> None:
    """Put back each layer's (running_mean, running_var, num_batches_tracked) as saved."""
    for bn, (rm, rv, nbt) in saved.items():
        bn.running_mean.copy_(rm), bn.running_var.copy_(rv), bn.num_batches_tracked.copy_(nbt)
