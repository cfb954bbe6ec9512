"""bnkit: Batch Normalization at test time, as code (NumPy and PyTorch only).

The main entry points, importable from ``bnkit`` itself:

- ``BatchNorm1d``, ``BatchNorm2d``, ``BatchNorm3d``: drop-in for ``torch.nn``'s, with a choice
  of running estimator ("ema", "ema_debiased", "cumulative").
- ``recompute_stats(model, batches)``: population statistics for every BN layer of a model
  (``bn_layers(model)`` lists those layers, ``bn_names(model)`` names them).
- ``recompute_stats(model, batches, forward=..., max_batches=..., progress=...)``: any batches
  (dicts, several inputs) through a forward function; every call of a shared layer counted.
- ``fold_bn(model)``: a copy of a model for inference with BN folded into Linear/Conv/ConvTranspose
  layers where that is exact; ``fold_bn(model, report=True, probe=x)`` also returns a
  ``FoldReport``: for every BN layer, folded into which layer or left and why.
- ``doctor(model, batches)``: a per-layer audit of a model's BN (which layer is wrong, and why).
- ``SyncBatchNorm``, ``convert_sync_batchnorm(model)``: Batch Norm over the global batch of
  all processes of a ``torch.distributed`` group, on any backend (gloo on CPU, NCCL on GPU).

The modules, one job each:

- ``bnkit.reference``: the five steps in NumPy, forward (train/test) and backward; the same
  lines run on tensors.
- ``bnkit.running``: exponentially weighted averages, momentum conventions and the
  estimators of test-time statistics, mergeable (count, mean, M2).
- ``bnkit.modules``, ``bnkit.population``, ``bnkit.folding``: the three above.
- ``bnkit.doctor``: the audit above, its Report and the thresholds of its flags.
- ``bnkit.distributed``: statistics merged exactly across processes (``torch.distributed``).
- ``bnkit.sync``: ``SyncBatchNorm``, synchronised across processes in training.
- ``bnkit.recording``: what every BN layer sees and keeps at each training step.
- ``bnkit.gradcheck``: gradient checks by finite differences.

The course's helpers (``bnkit.course``: data, networks, plots, experiments) and the exercise
checkers (``bnkit.checks``, one module per chapter) are not imported here; they need the
``course`` extra (scikit-learn, matplotlib).
"""
from bnkit.doctor import doctor
from bnkit.folding import FoldReport, fold_bn
from bnkit.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnkit.population import bn_layers, bn_names, recompute_stats
from bnkit.sync import SyncBatchNorm, convert_sync_batchnorm

__version__ = "0.1.0"
__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "convert_sync_batchnorm",
    "recompute_stats", "bn_layers", "bn_names", "fold_bn", "FoldReport", "doctor",
]
