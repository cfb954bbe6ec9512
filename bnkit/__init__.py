"""bnkit: Batch Normalization at test time, as code.

- ``bnkit.reference``: the five steps in NumPy, forward (train/test) and backward.
- ``bnkit.running``: exponentially weighted averages, momentum conventions and the
  estimators of test-time statistics (EMA, bias-corrected EMA, cumulative, exact).
- ``bnkit.torch_bn``: the same on tensors, drop-in BatchNorm modules,
  ``recompute_stats`` and ``fold_bn``.
"""
__version__ = "0.1.0"
