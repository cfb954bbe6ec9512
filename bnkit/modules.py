"""Drop-in Batch Norm modules for ``torch.nn``'s, with a choice of running estimator.

``BatchNorm1d`` / ``BatchNorm2d`` / ``BatchNorm3d`` take the same constructor arguments and
keep the same state_dict keys as ``torch.nn``'s (weights load both ways), plus
``estimator``: how the running statistics are estimated ("ema", "ema_debiased",
"cumulative"; see ``bnkit.running``). The mathematics is ``F.batch_norm``'s (the same as
``bnkit.reference``); the module keeps the state.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnkit import running
from bnkit._validate import check_batch_size, check_eps, check_finite_batch, check_momentum


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

    A non-finite training batch never reaches the running statistics. On the CPU it is refused
    (ValueError). On an accelerator, refusing it would need a host-device synchronisation per
    layer per step (and a graph break under torch.compile), so there the forward runs (its
    output is NaN/inf, which the loss shows) and the update keeps the old running statistics
    and counter (torch.where on the device).
    Traceable by torch.fx as a leaf module, like torch.nn's (so torch.fx's fuser and FX
    quantization take models with it); torch.jit.script scripts torch.nn's class in its place
    (see ``__prepare_scriptable__``).
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
        # torch.fx's tracers keep modules whose __module__ starts with "torch.nn" whole (leaf
        # modules, like torch.nn's BN); this instance says so, the class stays bnkit's (pickling)
        self.__dict__["__module__"] = "torch.nn.modules.batchnorm"

    def extra_repr(self) -> str:
        return super().extra_repr() + f", estimator={self.estimator!r}"

    def _check_input(self, z: torch.Tensor) -> None:
        """The input's dimensions and channels, and eps and momentum (which a user may reassign)."""
        self._check_input_dim(z)  # ValueError for a wrong number of dimensions
        if z.shape[1] != self.num_features:
            raise ValueError(
                f"expected {self.num_features} features/channels on axis 1, got input of shape {tuple(z.shape)}"
            )
        check_eps(self.eps)
        check_momentum(self.momentum)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self._check_input(z)
        if not self.training and self.track_running_stats:  # test time: fixed statistics
            return F.batch_norm(z, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        check_batch_size(z)  # more than one value per feature/channel
        if self.track_running_stats and z.device.type == "cpu":
            return self._forward_train_cpu(z)
        # The batch statistics land in fresh buffers: with momentum 1 the kernel writes the batch
        # mean and the unbiased batch variance there, and nothing of ours changes before the checks.
        dtype = self.running_mean.dtype if self.running_mean is not None else z.dtype
        mu = torch.zeros(self.num_features, device=z.device, dtype=dtype)
        var_unbiased = torch.ones(self.num_features, device=z.device, dtype=dtype)
        z_tilde = F.batch_norm(z, mu, var_unbiased, self.weight, self.bias, True, 1.0, self.eps)
        if z.device.type == "cpu":  # a check costs no synchronisation here
            check_finite_batch(mu)  # a NaN or inf in z shows in mu ...
            check_finite_batch(var_unbiased)  # ... and squares that overflow show in the variance
        if self.track_running_stats:
            self._update_running(mu, var_unbiased)
        return z_tilde

    def _forward_train_cpu(self, z: torch.Tensor) -> torch.Tensor:
        """On the CPU the kernel itself updates the buffers, with momentum w_t (the estimator's
        weight of this batch); a non-finite batch makes them non-finite: they are put back."""
        t = int(self.num_batches_tracked) + 1  # no synchronisation on the CPU
        w = running.update_weight(self.estimator, t, self.momentum)
        saved = self.running_mean.clone(), self.running_var.clone()
        z_tilde = F.batch_norm(z, self.running_mean, self.running_var, self.weight, self.bias, True, w,
                               self.eps)
        total = self.running_mean.sum(dtype=torch.float64) + self.running_var.sum(dtype=torch.float64)
        if not math.isfinite(total):  # one NaN or inf makes the float64 sum non-finite
            with torch.no_grad():
                self.running_mean.copy_(saved[0]), self.running_var.copy_(saved[1])
            check_finite_batch(torch.tensor(float("nan")))  # its ValueError for a non-finite z
        self.num_batches_tracked.add_(1)
        return z_tilde

    @torch.no_grad()
    def _update_running(self, mu: torch.Tensor, var_unbiased: torch.Tensor) -> None:
        """running <- (1 - w_t) running + w_t batch, all on the device (no .item()): on an
        accelerator, a non-finite batch leaves the statistics and the counter as they were."""
        finite = torch.isfinite(mu).all() & torch.isfinite(var_unbiased).all()  # () bool
        self.num_batches_tracked.add_(finite.to(self.num_batches_tracked.dtype))
        if self.estimator == "ema" and self.momentum is not None:
            w = float(self.momentum)
        else:  # w_t from t = num_batches_tracked, a tensor on the device
            t = self.num_batches_tracked.to(mu.dtype).clamp(min=1)
            if self.estimator == "cumulative" or self.momentum is None or self.momentum == 0:
                w = 1 / t  # beta = 1 - momentum = 1 has no EWA either: the average over t
            else:  # "ema_debiased": (1 - beta) / (1 - beta^t), running.update_weight's formula
                w = self.momentum / (1 - (1 - self.momentum) ** t)
        new_mean = (1 - w) * self.running_mean + w * mu  # torch.nn's kernel's order of terms
        new_var = (1 - w) * self.running_var + w * var_unbiased
        self.running_mean.copy_(torch.where(finite, new_mean, self.running_mean))
        self.running_var.copy_(torch.where(finite, new_var, self.running_var))

    def __prepare_scriptable__(self) -> nn.Module:
        """torch.jit.script scripts torch.nn's class in place of this one (same parameters and
        buffers): it has torch.nn's training behaviour, which is this estimator's for "ema" and
        "cumulative", without the refusal of non-finite batches."""
        if self.estimator == "ema_debiased":
            raise TypeError(
                "bnkit BatchNorm with estimator='ema_debiased' cannot be TorchScripted (torch.nn "
                "has no such estimator): use estimator='ema' or 'cumulative', or load its "
                "state_dict into torch.nn's BatchNorm for an inference-only model"
            )
        base = next(c for c in type(self).__mro__ if c.__module__ == "torch.nn.modules.batchnorm")
        momentum = None if self.estimator == "cumulative" else self.momentum
        twin = base(self.num_features, self.eps, momentum, self.affine, self.track_running_stats)
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(twin, name, getattr(self, name))  # the same tensors, not copies
        return twin.train(self.training)


class BatchNorm1d(_EstimatorBatchNorm, nn.BatchNorm1d):
    """Drop-in for torch.nn.BatchNorm1d: input (m, n) or (m, C, L). See _EstimatorBatchNorm."""


class BatchNorm2d(_EstimatorBatchNorm, nn.BatchNorm2d):
    """Drop-in for torch.nn.BatchNorm2d: input (m, C, H, W). See _EstimatorBatchNorm."""


class BatchNorm3d(_EstimatorBatchNorm, nn.BatchNorm3d):
    """Drop-in for torch.nn.BatchNorm3d: input (m, C, D, H, W). See _EstimatorBatchNorm."""
