"""Batch Norm at test time in PyTorch: the same algorithms on tensors, on any device.

- The five steps, ``forward_train``, ``forward_infer`` and ``backward`` are the functions of
  ``bnkit.reference``: they use only operations NumPy arrays and tensors share, so the same
  lines run here on tensors (CPU or CUDA, with autograd).
- ``BatchNorm1d`` / ``BatchNorm2d``: drop-in for ``torch.nn``'s (same arguments, same
  state_dict keys), plus the choice of running estimator ("ema", "ema_debiased",
  "cumulative"; see ``bnkit.running``).
- ``recompute_stats(model, batches)``: population statistics for every BN layer of a model.
- ``fold_bn(model)``: a copy of a model for inference with BN folded into Linear/Conv layers.
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnkit import running
from bnkit._validate import all_finite, check_batch_size, check_eps, check_finite_batch, check_momentum
from bnkit.reference import (  # noqa: F401  (re-exported: they work on tensors)
    Cache,
    backward,
    backward_staged,
    batch_mean,
    batch_variance,
    center,
    forward_infer,
    forward_infer_affine,
    forward_train,
    inference_affine,
    normalize,
    scale_shift,
)

# ---------------------------------------------------------------- drop-in modules


class _EstimatorBatchNorm(_BatchNorm):
    """torch.nn's BatchNorm with a choice of how the running statistics are estimated.

    In training mode the layer normalises with the batch mean and the *biased* batch
    variance, and updates, per feature/channel,

        running <- (1 - w_t) * running + w_t * batch,   t = num_batches_tracked

    with the *unbiased* batch variance, as torch.nn does. w_t depends on ``estimator``:
    "ema": w_t = momentum (torch.nn's rule, default 0.1; momentum=None is "cumulative"),
    "ema_debiased": the bias-corrected EWA with beta = 1 - momentum, "cumulative": 1 / t.
    In eval mode it normalises with running_mean and running_var. ``self.training`` is the
    only mode switch. A refused batch (ValueError) leaves the running statistics unchanged.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        estimator: str = "ema",
    ) -> None:
        check_eps(eps)
        check_momentum(momentum)
        if estimator not in running.ESTIMATORS:
            raise ValueError(f"estimator must be one of {running.ESTIMATORS}, got {estimator!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.estimator = estimator

    def extra_repr(self) -> str:
        return super().extra_repr() + f", estimator={self.estimator!r}"

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(z)  # ValueError for a wrong number of dimensions
        if z.shape[1] != self.num_features:
            raise ValueError(
                f"expected {self.num_features} features/channels on axis 1, got input of shape {tuple(z.shape)}"
            )
        check_eps(self.eps)
        check_momentum(self.momentum)
        if not self.training and self.track_running_stats:  # test time: fixed statistics
            return F.batch_norm(z, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        count = check_batch_size(z)  # values per feature/channel, more than one
        # The batch statistics land in fresh buffers: with momentum 1 the kernel writes the batch
        # mean and the unbiased batch variance there, and nothing of ours changes before the checks.
        dtype = self.running_mean.dtype if self.running_mean is not None else z.dtype
        mu = torch.zeros(self.num_features, device=z.device, dtype=dtype)
        var_unbiased = torch.ones(self.num_features, device=z.device, dtype=dtype)
        z_tilde = F.batch_norm(z, mu, var_unbiased, self.weight, self.bias, True, 1.0, self.eps)
        check_finite_batch(mu)  # a NaN or inf in z shows in mu ...
        check_finite_batch(var_unbiased)  # ... and squares that overflow show in the variance
        if self.training and self.track_running_stats:
            self._update_running(mu, var_unbiased * ((count - 1) / count), count)
        return z_tilde

    @torch.no_grad()
    def _update_running(self, mu: torch.Tensor, var: torch.Tensor, count: int) -> None:
        self.num_batches_tracked.add_(1)
        needs_t = self.estimator != "ema" or self.momentum is None
        t = int(self.num_batches_tracked) if needs_t else 1  # "ema" does not depend on t
        mean, var = running.update_running(
            self.running_mean, self.running_var, mu, var, count, t, self.estimator, self.momentum
        )
        self.running_mean.copy_(mean)
        self.running_var.copy_(var)


class BatchNorm1d(_EstimatorBatchNorm, nn.BatchNorm1d):
    """Drop-in for torch.nn.BatchNorm1d: input (m, n) or (m, C, L). See _EstimatorBatchNorm."""


class BatchNorm2d(_EstimatorBatchNorm, nn.BatchNorm2d):
    """Drop-in for torch.nn.BatchNorm2d: input (m, C, H, W). See _EstimatorBatchNorm."""


# ---------------------------------------------------------------- population statistics


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


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's parameters (or of its buffers, if it has no parameters)."""
    for tensor in model.parameters():
        return tensor.device
    return next(iter(model.buffers())).device  # a model of BN layers without affine parameters


def _collect(model, layers, batches, device, stop_after=None) -> dict:
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
                    model(_inputs(batch).to(device))
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
    Other layers (dropout, ...) run in eval mode. The model's modes, momenta, parameters and
    num_batches_tracked are left as they were; no gradients are needed. If anything fails,
    the running statistics are left as they were.
    Returns {layer name: (mean, var)} as written into the buffers.
    """
    return _recompute(model, batches, estimator, upstream, _estimate)


def _recompute(model: nn.Module, batches: Iterable, estimator: str, upstream: str, estimate) -> dict:
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
    if iter(batches) is batches:  # a one-shot iterator: keep the batches for more than one pass
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
            stats = _collect(model, layers, batches, device)
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
                    model(_inputs(first).to(device))
            finally:
                for h in handles:
                    h.remove()
            new = {}
            for bn in dict.fromkeys(order):  # each layer once, upstream first
                stats = _collect(model, [bn], batches, device, stop_after=bn)
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


# ---------------------------------------------------------------- folding for deployment

_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, keeping bnkit's BN modules whole as it does torch.nn's."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, qualname)


class FoldedLinear(nn.Linear):
    """A Linear layer with the BatchNorm1d that followed it folded in (``fold_bn``).

    Only for input of shape (m, n): Linear acts on the last axis and BatchNorm1d on axis 1,
    which are the same axis only for 2-D input, so for (m, C, L) the pair is not one affine map.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2:
            raise ValueError(
                f"this Linear layer has a BatchNorm1d folded into it, which is valid for input (m, n) "
                f"only (Linear acts on the last axis, BatchNorm1d on axis 1), got shape {tuple(x.shape)}"
            )
        return F.linear(x, self.weight, self.bias)


def _as_folded_linear(layer: nn.Linear) -> FoldedLinear:
    folded = FoldedLinear(layer.in_features, layer.out_features, bias=True, device=layer.weight.device,
                          dtype=layer.weight.dtype)
    folded.weight, folded.bias = layer.weight, layer.bias  # the folded parameters themselves
    return folded


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: _BatchNorm) -> None:
    """W' = diag(s) W, b' = (b - mu) s + beta with s = gamma / sqrt(var + eps), in float64."""
    ones = torch.ones_like(bn.running_mean, dtype=torch.float64)
    gamma = bn.weight.double() if bn.weight is not None else ones
    beta = bn.bias.double() if bn.bias is not None else 0 * ones
    scale, shift = inference_affine(gamma, beta, bn.running_mean.double(), bn.running_var.double(), bn.eps)
    w = layer.weight.double() * scale.reshape((-1,) + (1,) * (layer.weight.ndim - 1))
    b = (layer.bias.double() * scale if layer.bias is not None else 0) + shift
    layer.weight.copy_(w.to(layer.weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(b.to(layer.weight.dtype))
    else:
        layer.bias.copy_(b.to(layer.bias.dtype))


def fold_bn(model: nn.Module) -> torch.fx.GraphModule:
    """A new model for inference: every BN (with running statistics) whose input is the output
    of a Linear or Conv layer, used by nothing else, is folded into that layer.

    At test time BN is the affine map z -> s z + (beta - mu s), s = gamma / sqrt(var + eps), so
    Linear/Conv followed by BN equals one Linear/Conv with weight diag(s) W and bias
    (b - mu) s + beta. BN layers that cannot be folded stay, in eval mode. The result equals
    ``model.eval()`` up to round-off; ``model`` itself is not changed. A Linear with a BN folded
    into it becomes a ``FoldedLinear``, which refuses input that is not (m, n) (for (m, C, L) the
    pair is not one affine map).
    Uses torch.fx to find the pairs, so the model must be symbolically traceable.
    """
    model = copy.deepcopy(model).eval()
    gm = torch.fx.GraphModule(model, _Tracer().trace(model))
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not (isinstance(bn, _BatchNorm) and bn.track_running_stats):
            continue
        prev = node.args[0]
        layer = modules.get(prev.target) if isinstance(prev, torch.fx.Node) and prev.op == "call_module" else None
        if not isinstance(layer, _FOLDABLE) or len(prev.users) != 1 or calls[prev.target] != 1 or calls[node.target] != 1:
            continue
        if layer.weight.shape[0] != bn.num_features:
            continue
        _fold_into(layer, bn)
        if isinstance(layer, nn.Linear):
            parent, _, attr = prev.target.rpartition(".")
            setattr(gm.get_submodule(parent), attr, _as_folded_linear(layer))
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval()
