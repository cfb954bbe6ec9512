"""Population statistics for every Batch Norm layer of a model (``recompute_stats``).

Ioffe & Szegedy (2015, section 3.1) replace the running averages kept during training by
statistics of the training set seen through the final network. ``recompute_stats`` does that
for any model, with torch.nn's BN layers or bnkit's: "exact" (merged per-batch
(count, mean, M2) in float64) or "algorithm2" (the paper's E_B[mu_B], m/(m-1) E_B[var_B]),
with upstream layers in training mode (one pass) or already in inference mode (one partial
pass per BN layer). Any batches: a ``forward(model, batch)`` function runs the model on one
(dicts, several inputs), with a cap on batches or examples and a progress bar or callback.
Every call of a layer counts (a shared backbone); layers never reached keep their statistics.
"""
from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnkit import running, sync
from bnkit._validate import all_finite
from bnkit.modules import _EstimatorBatchNorm
from bnkit.running import BatchStats

_NO_BATCH = object()  # what next(iter(batches), _NO_BATCH) gives for no batches
# BN classes whose training forward is F.batch_norm's: recompute_stats reads their batch
# statistics from the kernel (see _scratch_forward); other subclasses get a float64 pass.
_KERNEL_FORWARDS = (_BatchNorm.forward, _EstimatorBatchNorm.forward)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has been seen."""


def bn_layers(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer of ``model`` that keeps running statistics (torch.nn's or bnkit's)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def bn_names(model: nn.Module) -> dict[_BatchNorm, str]:
    """Each of ``bn_layers(model)`` with its name in ``model.named_modules()`` (e.g. "1")."""
    names = {m: name for name, m in model.named_modules()}
    return {bn: names[bn] for bn in bn_layers(model)}


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's parameters (or of its buffers, if it has no parameters)."""
    for tensor in model.parameters():
        return tensor.device
    return next(iter(model.buffers())).device  # a model of BN layers without affine parameters


def _default_forward(device: torch.device) -> Callable:
    """model(x) for a batch x or (x, y, ...) (a DataLoader's), x moved to the model's device."""

    def forward(model: nn.Module, batch) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"recompute_stats: a batch of type {type(batch).__name__} is not a tensor nor "
                "(tensor, ...): pass forward=, a function that runs the model on one batch, "
                "e.g. forward=lambda model, batch: model(**batch)"
            )
        return model(x.to(device))

    return forward


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """A BN layer's input, whether it was called as bn(z) or bn(input=z)."""
    return args[0] if args else next(iter(kwargs.values()))


def _num_samples(batch) -> int:
    """Examples in a batch: axis 0 of its first tensor (batch, batch[0] or a dict's first value)."""
    while isinstance(batch, (tuple, list, dict)) and batch:
        batch = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    if not isinstance(batch, torch.Tensor) or batch.ndim == 0:
        raise TypeError(
            f"max_samples counts axis 0 of a batch's first tensor; found {type(batch).__name__}"
        )
    return batch.shape[0]


def _take(batches: Iterable, max_batches: int | None, max_samples: int | None):
    """The batches, whole, until max_batches of them or at least max_samples examples."""
    seen, it = 0, iter(batches)
    for _ in range(sys.maxsize if max_batches is None else max_batches):
        if max_samples is not None and seen >= max_samples:
            return
        batch = next(it, _NO_BATCH)
        if batch is _NO_BATCH:
            return
        yield batch
        seen += _num_samples(batch) if max_samples is not None else 0


def _ticker(progress, total: int | None) -> tuple[Callable, Callable]:
    """(tick, close): tick() after every batch; progress is False, True (tqdm) or f(i, n)."""
    if progress is False or progress is None:
        return (lambda: None), (lambda: None)
    count = [0]
    if callable(progress):

        def tick():
            count[0] += 1
            progress(count[0], total)

        return tick, (lambda: None)
    try:
        from tqdm.auto import tqdm  # optional dependency
    except ImportError:  # a plain line on stderr instead

        def tick():
            count[0] += 1
            print(f"\rrecompute_stats: {count[0]}/{total or '?'} batches", end="", file=sys.stderr)

        return tick, (lambda: print(file=sys.stderr))
    bar = tqdm(total=total, desc="recompute_stats", unit="batch")
    return (lambda: bar.update(1)), bar.close


def _scratch_forward(bn: _BatchNorm, records: list) -> Callable:
    """bn's training forward with momentum 1 into fresh buffers: F.batch_norm writes the batch
    mean and unbiased variance there (the numbers it normalises with), nothing of bn changes."""

    def forward(*args, **kwargs) -> torch.Tensor:
        z = _first_input(args, kwargs)
        bn._check_input_dim(z)
        mean = torch.zeros(bn.num_features, device=z.device, dtype=bn.running_mean.dtype)
        var = torch.ones_like(mean)
        out = F.batch_norm(z, mean, var, bn.weight, bn.bias, True, 1.0, bn.eps)
        records.append((z.numel() // z.shape[1], mean, var))
        return out

    return forward


def _float64_hook(records: dict, stop_after=None) -> Callable:
    """A pre-hook that records a layer's input as exact float64 (count, mean, unbiased var)."""

    def hook(bn, args, kwargs):
        s = running.batch_stats(_first_input(args, kwargs))
        records[bn].append((s.count, s.mean, s.m2 / max(s.count - 1, 1)))
        if bn is stop_after:
            raise _StopForward

    return hook


def _as_stats(records: list) -> list[BatchStats]:
    """[(count, mean, unbiased var)] -> [BatchStats] in float64 (M2 = var * (count - 1))."""
    if not records:
        return []
    counts = [c for c, _, _ in records]
    means = torch.stack([m for _, m, _ in records]).double()  # (B, n)
    factor = torch.tensor(counts, dtype=torch.float64, device=means.device).sub_(1).unsqueeze(1)
    m2s = torch.stack([v for _, _, v in records]).double().mul_(factor)  # (B, n)
    return [BatchStats(c, m, m2) for c, m, m2 in zip(counts, means, m2s)]


def _estimate(per_batch: list, estimator: str, bn: _BatchNorm):
    """(mean, unbiased var) of one layer from its per-batch BatchStats; None for no batch."""
    if not per_batch:
        return None
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
    max_samples: int | None = None,
    progress=False,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Replace every BN layer's running_mean / running_var by population statistics.

    batches: an iterable of batches: input tensors, (x, y, ...) pairs (a DataLoader), or
        anything ``forward`` accepts.
    estimator: "exact" — the whole-set mean and unbiased variance of the layer's inputs over
        all batches, merged from per-batch (count, mean, M2) in float64 (uneven batches fine);
        "algorithm2" — Ioffe & Szegedy's E_B[mu_B] and m/(m-1) E_B[var_B], every batch weighted
        alike, as torch.nn's momentum=None does: it assumes batches of one size (drop a short
        last batch), and leaves out the spread of the batch means.
    upstream: "train" — upstream BN layers normalise with batch statistics while the
        statistics are gathered (one pass; PreciseBN, torch.optim.swa_utils.update_bn);
        "eval" — upstream BN layers already use their new statistics, as at test time (one
        pass per BN layer, each stopped at that layer unless the layer is called more than
        once per forward pass).
    forward: ``forward(model, batch)`` runs the model on one batch (dict batches, keyword
        inputs, several tensors); moving the batch to the model's device is then its job.
        Default: ``model(x)`` with x the batch or batch[0], moved to the model's device.
    max_batches, max_samples: stop after that many batches, or once at least that many
        examples (axis 0 of a batch's first tensor) have run; batches are taken whole. With
        upstream "eval" and a cap, the capped batches are kept in memory so that every layer
        sees the same ones.
    progress: True for a tqdm progress bar (a line on stderr if tqdm is not installed), or a
        callable ``progress(i, n)`` called after the i-th batch (n: the total, or None).

    Every call of a BN layer counts: a layer called twice per forward pass (a shared backbone)
    gets the statistics of all its inputs. Layers the forward pass never reaches keep their
    statistics and are named in a warning (with upstream "eval", the layers the first batch
    does not reach). Other layers (dropout, ...) run in eval mode.
    The model's modes, momenta, parameters and num_batches_tracked are left as they were; no
    gradients are needed. If anything fails, the running statistics are left as they were.

    Precision: with upstream "train", the mean and unbiased variance of each batch are the ones
    the BN kernel computes anyway to normalise it (no second pass over the activations), in
    the activations' dtype (float32: measured on CPU, variance within about 1e-7 relative and
    mean within about 5e-7 standard deviations of a float64 reduction, for channel means up
    to 1000 standard deviations from 0; float64: round-off), merged exactly across batches in
    float64. With upstream "eval" each layer's input is reduced in float64 (two passes), as
    are the layers of BN subclasses with their own forward in both modes.
    A layer applied to its own output (the same block twice in a row) is measured, with
    upstream "eval", while it still normalises with its old statistics.
    Returns {layer name: (mean, var)} as written into the buffers.
    """
    return _recompute(model, batches, estimator, upstream, _estimate, forward=forward,
                      max_batches=max_batches, max_samples=max_samples, progress=progress)


def _check_arguments(model, batches, estimator, upstream, forward, max_batches, max_samples,
                     progress) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(batches, Iterable):
        raise TypeError(f"batches must be an iterable of batches, got {type(batches).__name__}")
    if estimator not in ("exact", "algorithm2"):
        raise ValueError(f"estimator must be 'exact' or 'algorithm2', got {estimator!r}")
    if upstream not in ("train", "eval"):
        raise ValueError(f"upstream must be 'train' or 'eval', got {upstream!r}")
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be a callable forward(model, batch), got {forward!r}")
    for name, cap in (("max_batches", max_batches), ("max_samples", max_samples)):
        positive = isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1
        if cap is not None and not positive:
            raise ValueError(f"{name} must be a positive integer or None, got {cap!r}")
    if not (progress in (True, False, None) or callable(progress)):
        raise TypeError(f"progress must be True, False or a callable f(i, n), got {progress!r}")


def _recompute(model: nn.Module, batches: Iterable, estimator: str, upstream: str, estimate,
               forward=None, max_batches=None, max_samples=None, progress=False) -> dict:
    """recompute_stats with the step from a layer's per-batch BatchStats to its (mean, var) given
    as ``estimate(per_batch, estimator, bn)`` (None if per_batch is empty everywhere), called
    once per layer in the same order on every call (bn_layers order for "train", execution
    order then the layers never reached for "eval"): bnkit.distributed passes one that merges
    the statistics of all processes."""
    caps = (max_batches, max_samples)
    _check_arguments(model, batches, estimator, upstream, forward, *caps, progress)
    layers = bn_layers(model)
    if not layers:
        raise ValueError("the model has no BatchNorm layer with running statistics")
    capped = max_batches is not None or max_samples is not None
    if upstream == "eval" and (capped or iter(batches) is batches):  # several passes, same batches
        batches = list(_take(batches, max_batches, max_samples))
    run = forward if forward is not None else _default_forward(model_device(model))
    modes = {m: m.training for m in model.modules()}
    saved = {bn: (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
             for bn in layers}
    done = False
    try:
        model.eval()
        fit = _fit_train if upstream == "train" else _fit_eval
        new = fit(model, layers, batches, run, estimator, estimate, caps, progress)
        _restore(saved)  # counters, and the buffers of layers that ran their own training forward
        with torch.no_grad():
            for bn, (mean, var) in new.items():
                bn.running_mean.copy_(mean), bn.running_var.copy_(var)
        done = True
    finally:
        if not done:
            _restore(saved)
        for m, mode in modes.items():
            m.training = mode  # this module's flag only: m.train(mode) would reset its children
    missing = [name for bn, name in bn_names(model).items() if bn not in new]
    if missing:
        warnings.warn(f"recompute_stats: {len(missing)} BN layer(s) never called by the forward "
                      f"pass kept their statistics: {', '.join(missing)}", stacklevel=3)
    names = bn_names(model)
    return {name: (bn.running_mean.clone(), bn.running_var.clone()) for bn, name in names.items()}


def _total(batches, caps) -> int | None:
    n = len(batches) if hasattr(batches, "__len__") else None
    return n if caps[0] is None or n is None else min(n, caps[0])


def _fit_train(model, layers, batches, run, estimator, estimate, caps, progress) -> dict:
    """One pass, upstream layers normalising with batch statistics."""
    records: dict = {bn: [] for bn in layers}
    undo = []
    for bn in layers:
        if type(bn).forward in _KERNEL_FORWARDS:
            own = bn.__dict__.get("forward")
            bn.forward = _scratch_forward(bn, records[bn])
            undo.append(lambda bn=bn, own=own: _set_forward(bn, own))
        else:  # its own forward in training mode (buffers restored below), float64 statistics
            bn.train()
            hook = bn.register_forward_pre_hook(_float64_hook(records), with_kwargs=True)
            undo.append(hook.remove)
    tick, close = _ticker(progress, _total(batches, caps))
    n = 0
    try:  # each process's batches on their own, even through a SyncBatchNorm
        with torch.no_grad(), sync.unsynchronised():
            for batch in _take(batches, *caps):
                run(model, batch)
                n += 1
                tick()
    finally:
        close()
        for u in undo:
            u()
    if n == 0:
        raise ValueError("recompute_stats needs at least one batch")
    stats = {bn: estimate(_as_stats(records[bn]), estimator, bn) for bn in layers}
    return {bn: s for bn, s in stats.items() if s is not None}


def _fit_eval(model, layers, batches, run, estimator, estimate, caps, progress) -> dict:
    """One pass per layer, upstream first; each layer written before the next one is measured."""
    first = next(iter(_take(batches, *caps)), _NO_BATCH)
    if first is _NO_BATCH:  # not a StopIteration escaping from here
        raise ValueError("recompute_stats needs at least one batch")
    calls: dict = {}  # execution order of the BN layers and calls per layer, from the first batch

    def count(bn, args):
        calls[bn] = calls.get(bn, 0) + 1

    handles = [bn.register_forward_pre_hook(count) for bn in layers]
    try:
        with torch.no_grad():
            run(model, first)
    finally:
        for h in handles:
            h.remove()
    total = _total(batches, caps)
    tick, close = _ticker(progress, None if total is None else total * len(calls))
    new = {}
    try:
        for bn in calls:  # upstream first
            records: dict = {bn: []}
            stop = bn if calls.get(bn) == 1 else None  # a layer called twice: the whole pass
            handle = bn.register_forward_pre_hook(_float64_hook(records, stop), with_kwargs=True)
            try:
                with torch.no_grad():
                    for batch in _take(batches, *caps):
                        try:
                            run(model, batch)
                        except _StopForward:
                            pass
                        tick()
            finally:
                handle.remove()
            stats = estimate(_as_stats(records[bn]), estimator, bn)
            if stats is not None:
                new[bn] = stats
                with torch.no_grad():
                    bn.running_mean.copy_(stats[0]), bn.running_var.copy_(stats[1])
    finally:
        close()
    for bn in (bn for bn in layers if bn not in calls):  # never reached here; every process
        stats = estimate([], estimator, bn)  # still takes part in estimate (bnkit.distributed)
        if stats is not None:
            new[bn] = stats
    return new


def _set_forward(bn: nn.Module, own) -> None:
    del bn.forward
    if own is not None:
        bn.forward = own


@torch.no_grad()
def _restore(saved: dict) -> None:
    """Put back each layer's (running_mean, running_var, num_batches_tracked) as saved."""
    for bn, (rm, rv, nbt) in saved.items():
        bn.running_mean.copy_(rm), bn.running_var.copy_(rv), bn.num_batches_tracked.copy_(nbt)
