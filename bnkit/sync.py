"""Synchronised Batch Norm on any ``torch.distributed`` backend: gloo (CPU) as NCCL (GPU).

``SyncBatchNorm`` is a drop-in for ``torch.nn.SyncBatchNorm`` (same constructor arguments,
``process_group`` included, same state_dict keys, weights load both ways), built on bnkit's
BatchNorm, so it takes an ``estimator`` too. In training mode, in a process group of more
than one process, every rank normalises its part of the batch with the statistics of the
*global* batch, the union of all ranks' parts:

- forward, one all-gather: each rank sends (count, mean, M2) of its part per channel, in
  float64; every rank merges them in rank order (Chan et al., ``running.merge_all``), so all
  get the same bits; z_hat = (z - mu) / sqrt(var + eps) with the global mu and biased var;
  the running buffers are updated with the global unbiased variance N / (N - 1) var;
- backward, one all-reduce of the two per-channel sums the input gradient needs,
  sum dy and sum dy * z_hat, over the global batch of N values per channel:

      dz = gamma / sqrt(var + eps) * (dy - sum dy / N - z_hat * sum(dy * z_hat) / N)

  dgamma = sum dy * z_hat and dbeta = sum dy stay local, as in torch: DDP adds them up.

Parts may be uneven or empty. A batch refused on one rank (wrong shape, NaN, too few values
in the whole global batch) makes every rank raise, in the same collective: nobody hangs.
In eval mode, without an initialised group, with one process or inside ``unsynchronised()``
(which ``bnkit.recompute_stats`` uses), it is bnkit's BatchNorm.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from bnkit import running
from bnkit._validate import all_finite, feature_axes, values_per_feature
from bnkit.distributed import _gather, comm_device
from bnkit.modules import _EstimatorBatchNorm
from bnkit.running import BatchStats

_OK, _REFUSED = 0.0, 1.0  # the flag each rank sends with its statistics
_unsynchronised = 0  # > 0 inside ``unsynchronised()``


@contextlib.contextmanager
def unsynchronised() -> Iterator[None]:
    """Within it, every SyncBatchNorm normalises each process's batch on its own, with no
    communication: for passes that are not training steps and that processes need not make
    in step (``recompute_stats`` with upstream layers in training mode, for instance)."""
    global _unsynchronised
    _unsynchronised += 1
    try:
        yield
    finally:
        _unsynchronised -= 1


class SyncBatchNorm(_EstimatorBatchNorm):
    """Drop-in for torch.nn.SyncBatchNorm that runs on any backend; input (m, C, ...).

    Arguments as torch.nn.SyncBatchNorm's (``process_group``: the group whose ranks share
    the batch, None for the default group; ``bias=False``: gamma without beta), plus
    ``estimator`` as bnkit.BatchNorm1d's.
    See the module docstring for what is synchronised and how.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        estimator: str = "ema",
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats,
            device=device, dtype=dtype, estimator=estimator,
        )
        if affine and not bias:  # torch's bias=False: a scale gamma, no shift beta
            self.register_parameter("bias", None)
        self.process_group = process_group

    def _check_input_dim(self, z: torch.Tensor) -> None:
        if z.dim() < 2:
            raise ValueError(f"expected at least 2D input (m, C, ...), got {z.dim()}D input")

    def _world_size(self) -> int:
        """How many ranks share the batch (1: no synchronisation)."""
        if _unsynchronised or not (self.training and dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self._world_size() == 1:  # eval mode, no group, one process: plain BatchNorm
            return super().forward(z)
        refused = None
        try:
            self._check_input(z)  # not the local batch size: a part may be empty
            local = _local_stats(z.detach(), self.num_features)  # (2C + 2,) float64
        except ValueError as e:  # still take part in the gather, so the other ranks raise too
            refused = e
            local = torch.zeros(2 * self.num_features + 2, dtype=torch.float64)
            local[0] = _REFUSED
        total = self._gather_and_merge(local, z.device, refused)
        var = total.m2 / total.count  # (C,) biased: it normalises
        invstd = torch.rsqrt(var + self.eps)  # (C,) float64
        if self.track_running_stats:
            self._update_running(total.mean, total.m2 / (total.count - 1))  # global unbiased var
        shape = (1, -1) + (1,) * (z.dim() - 2)
        return _SyncNorm.apply(
            z, self.weight, self.bias, total.mean.to(z.dtype).reshape(shape),
            invstd.to(z.dtype).reshape(shape), total.count, self.process_group,
        )

    def _gather_and_merge(self, local: torch.Tensor, device, refused) -> BatchStats:
        """All-gather every rank's (flag, count, mean, M2) and merge; raise on every rank alike."""
        group = self.process_group
        # the forward's one collective
        parts = _gather(local.to(comm_device(group, device)), group)
        packed = torch.stack(parts)  # (K, 2C + 2): flag, count, mean (C), M2 (C) per rank
        head = packed[:, :2].tolist()  # one host sync: flags and counts
        if refused is not None:
            raise refused
        bad = [k for k, (flag, _) in enumerate(head) if flag != _OK]
        if bad:
            raise ValueError(f"SyncBatchNorm: rank {bad[0]} refused its batch (see its error)")
        c = self.num_features
        per_rank = [
            BatchStats(int(count), p[2 : 2 + c], p[2 + c :]) for (_, count), p in zip(head, packed)
        ]
        count = sum(s.count for s in per_rank)
        if count < 2:
            raise ValueError(
                f"a training batch needs more than one value per feature/channel, got {count} "
                f"in the global batch (local counts {[s.count for s in per_rank]})"
            )
        total = running.merge_all(per_rank)
        if not (all_finite(total.mean) and all_finite(total.m2)):
            raise ValueError(
                "the training batch z contains NaN or infinite values "
                "(or values whose sum overflows)"
            )
        return BatchStats(total.count, total.mean.to(device), total.m2.to(device))

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """As torch.nn.SyncBatchNorm.convert_sync_batchnorm: see ``convert_sync_batchnorm``."""
        return convert_sync_batchnorm(module, process_group)


def _local_stats(z: torch.Tensor, num_features: int) -> torch.Tensor:
    """(flag, count, mean (C), M2 (C)) of this rank's part, float64; zeros for an empty part."""
    count = values_per_feature(tuple(z.shape))
    if count == 0:
        mean = m2 = torch.zeros(num_features, dtype=torch.float64, device=z.device)
    else:
        _, mean, m2 = running.batch_stats(z)  # (C,) each, float64, two passes
    head = torch.tensor([_OK, float(count)], dtype=torch.float64, device=z.device)
    return torch.cat([head, mean, m2])  # (2C + 2,)


class _SyncNorm(torch.autograd.Function):
    """y = gamma * (z - mu) * invstd + beta, with mu, invstd those of the global batch.

    mu and invstd are constants to autograd; backward adds the terms through them with the
    two per-channel sums all-reduced over the global batch of ``count`` values per channel.
    """

    @staticmethod
    def forward(ctx, z, weight, bias, mu, invstd, count, group):
        z_hat = (z - mu) * invstd  # (m, C, ...)
        ctx.save_for_backward(z_hat, weight, invstd)
        ctx.count, ctx.group = count, group
        if weight is None:
            return z_hat
        y = z_hat * weight.reshape(mu.shape)
        return y if bias is None else y + bias.reshape(mu.shape)

    @staticmethod
    @once_differentiable  # the all-reduce is not recorded: no gradient of the gradient
    def backward(ctx, dy):
        z_hat, weight, invstd = ctx.saved_tensors
        axes = feature_axes(dy.dim())
        sum_dy = dy.sum(axes)  # (C,) local: dbeta
        sum_dy_xhat = (dy * z_hat).sum(axes)  # (C,) local: dgamma
        dz = None
        if ctx.needs_input_grad[0]:  # the same on every rank: all take part or none
            sums = torch.cat([sum_dy, sum_dy_xhat]).to(torch.float64)  # (2C,)
            sums = sums.to(comm_device(ctx.group, dy.device))
            dist.all_reduce(sums, group=ctx.group)  # the backward's one collective
            sum_dy_g, sum_dy_xhat_g = (sums.to(dy.device) / ctx.count).to(dy.dtype).chunk(2)
            shape = invstd.shape
            scale = invstd if weight is None else invstd * weight.reshape(shape)
            dz = scale * (dy - sum_dy_g.reshape(shape) - z_hat * sum_dy_xhat_g.reshape(shape))
        dgamma = sum_dy_xhat if weight is not None and ctx.needs_input_grad[1] else None
        dbeta = sum_dy if ctx.needs_input_grad[2] else None
        return dz, dgamma, dbeta, None, None, None, None


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Every BatchNorm layer of ``module`` (torch.nn's, bnkit's, torch.nn.SyncBatchNorm)
    replaced by a ``bnkit.SyncBatchNorm`` with the same arguments, parameters (the same
    Parameter objects, so an optimizer built before still updates them) and buffers.

    Returns the converted module: ``module`` itself with its children replaced, or a new
    SyncBatchNorm when ``module`` is itself a BatchNorm layer (as torch's does).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if isinstance(module, _BatchNorm):
        return _converted(module, process_group)
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, process_group)
        if converted is not child:
            module.add_module(name, converted)
    return module


def _converted(bn: _BatchNorm, process_group) -> SyncBatchNorm:
    out = SyncBatchNorm(
        bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, process_group,
        estimator=getattr(bn, "estimator", "ema"), bias=bn.bias is not None,
    )
    if bn.affine:
        out.weight, out.bias = bn.weight, bn.bias  # the same Parameters
    out.running_mean, out.running_var = bn.running_mean, bn.running_var
    out.num_batches_tracked = bn.num_batches_tracked
    out.train(bn.training)
    if hasattr(bn, "qconfig"):
        out.qconfig = bn.qconfig
    return out
