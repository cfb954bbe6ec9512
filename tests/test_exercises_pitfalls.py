"""Chapter 10 (pitfalls): typical wrong answers and right answers written otherwise
(tests/test_exercises.py runs them), and tests of those checkers."""
from __future__ import annotations

import numpy as np
import pytest
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnkit.checks import ch10_pitfalls
from bnkit.checks._core import ExerciseError

pytest.register_assert_rewrite("exercise_support")
from exercise_support import diagnosis  # noqa: E402

# ---------------------------------------------------------------- typical wrong answers: BN layers


def layers_from_model_flag(model):
    return [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)] if model.training else []


def layers_any_training(model):
    return [n for n, m in model.named_modules() if n and m.training]


def layers_only_1d(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm1d) and m.training]


def layers_exact_type(model):
    return [n for n, m in model.named_modules() if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) and m.training]


def layers_ignore_track_running_stats(model):
    return [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.training]


def layers_top_level(model):
    return [n for n, m in model.named_children() if isinstance(m, _BatchNorm) and m.training]


def layers_as_modules(model):
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training]


def layers_by_calling_eval(model):
    names = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.training]
    model.eval()  # wrong: a check must not change the model
    return names


# ---------------------------------------------------------------- typical wrong answers: variance


def variance_one_pass(z):
    return (z * z).mean(axis=0) - z.mean(axis=0) ** 2  # E[x^2] - E[x]^2 in z's dtype


def variance_one_pass_float64(z):
    z = z.astype(np.float64)  # upcasting does not save the one-pass formula at 1e9
    return (z * z).mean(axis=0) - z.mean(axis=0) ** 2


def variance_one_pass_sums(z):
    m = len(z)
    return (np.sum(z * z, axis=0) - np.sum(z, axis=0) ** 2 / m) / m  # the "sum and sum of squares" kernel


def variance_unbiased(z):
    z_new = z - z.mean(axis=0)
    return (z_new * z_new).sum(axis=0) / (len(z) - 1)


def variance_std(z):
    z_new = z - z.mean(axis=0)
    return np.sqrt((z_new * z_new).mean(axis=0))


def variance_per_example(z):
    z_new = z - z.mean(axis=1, keepdims=True)
    return (z_new * z_new).mean(axis=1)


WRONG = [
    (ch10_pitfalls.batch_stat_layers, layers_from_model_flag, "you looked at model.training"),
    (ch10_pitfalls.batch_stat_layers, layers_any_training, "you listed every module in training mode"),
    (ch10_pitfalls.batch_stat_layers, layers_only_1d, "you only looked for BatchNorm1d"),
    (ch10_pitfalls.batch_stat_layers, layers_exact_type, "you compared type(m)"),
    (ch10_pitfalls.batch_stat_layers, layers_ignore_track_running_stats, "track_running_stats=False"),
    (ch10_pitfalls.batch_stat_layers, layers_top_level, "only looked at the top-level layers"),
    (ch10_pitfalls.batch_stat_layers, layers_as_modules, "not the modules themselves"),
    (ch10_pitfalls.batch_stat_layers, layers_by_calling_eval, "changed the mode of some layers"),
    (ch10_pitfalls.stable_variance, variance_one_pass, "catastrophic cancellation"),
    (ch10_pitfalls.stable_variance, variance_one_pass_sums, "catastrophic cancellation"),
    (ch10_pitfalls.stable_variance, variance_one_pass_float64, "Converting to float64 is not the cure"),
    (ch10_pitfalls.stable_variance, variance_unbiased, "you divided by m-1"),
    (ch10_pitfalls.stable_variance, variance_std, "you returned the standard deviation"),
    (ch10_pitfalls.stable_variance, variance_per_example, "the statistics are per feature"),
]


# ---------------------------------------------------------------- more wrong answers, right answers


def layers_1d_2d(model):
    kinds = (nn.BatchNorm1d, nn.BatchNorm2d)
    return [n for n, m in model.named_modules() if isinstance(m, kinds) and (m.training or not m.track_running_stats)]


def layers_by_class_name(model):
    return [n for n, m in model.named_modules()
            if "BatchNorm" in type(m).__name__ and (m.training or not getattr(m, "track_running_stats", True))]


def layers_with_running_mean(model):
    return [n for n, m in model.named_modules()
            if hasattr(m, "running_mean") and (m.training or not getattr(m, "track_running_stats", True))]


def layers_norm_base(model):
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and (m.training or not m.track_running_stats)]


def layers_in_eval_mode(model):
    return [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and not m.training and m.track_running_stats]


def layers_by_running_mean_none(model):
    return [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and (m.training or m.running_mean is None)]


def layers_by_recursion(model, prefix=""):
    found = []
    for name, child in model.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(child, _BatchNorm) and (child.training or not child.track_running_stats):
            found.append(full)
        found += layers_by_recursion(child, full)
    return found


def variance_np_var(z):
    return np.var(z, axis=0)


def variance_std_squared(z):
    return z.std(axis=0) ** 2


def variance_in_float64(z):
    z = z.astype(np.float64)  # accurate, but not in the dtype of z
    z_new = z - z.mean(axis=0)
    return (z_new * z_new).mean(axis=0)


def variance_median_centre(z):
    z_new = z - np.median(z, axis=0)
    return (z_new * z_new).mean(axis=0)


def variance_welford_wrong_update(z):
    mean, m2 = np.zeros(z.shape[1], z.dtype), np.zeros(z.shape[1], z.dtype)
    for k, x in enumerate(z, start=1):
        mean = mean + (x - mean) / k
        m2 = m2 + (x - mean) ** 2
    return m2 / len(z)


def variance_welford_from_zero(z):
    mean, m2 = np.zeros(z.shape[1], z.dtype), np.zeros(z.shape[1], z.dtype)
    for k, x in enumerate(z):  # k from 0: the first update divides by 0
        delta = x - mean
        mean = mean + delta / k
        m2 = m2 + delta * (x - mean)
    return m2 / len(z)


def variance_shifted_one_pass(z):
    shifted = z - z[0]  # values of the size of the spread: the one-pass formula is safe now
    return (shifted * shifted).mean(axis=0) - shifted.mean(axis=0) ** 2


def variance_centred_twice(z):
    z_new = z - z.mean(axis=0)
    return (z_new * z_new).mean(axis=0) - z_new.mean(axis=0) ** 2


WRONG += [
    (ch10_pitfalls.batch_stat_layers, layers_1d_2d, "you only looked for BatchNorm1d and BatchNorm2d"),
    (ch10_pitfalls.batch_stat_layers, layers_by_class_name, "you matched the class name"),
    (ch10_pitfalls.batch_stat_layers, layers_with_running_mean, "you looked for a running_mean attribute"),
    (ch10_pitfalls.batch_stat_layers, layers_norm_base, "you tested isinstance(m, _NormBase)"),
    (ch10_pitfalls.batch_stat_layers, layers_in_eval_mode, "the question is the other way round"),
    (ch10_pitfalls.stable_variance, variance_np_var, "you called var()"),
    (ch10_pitfalls.stable_variance, variance_std_squared, "you called std()"),
    (ch10_pitfalls.stable_variance, variance_in_float64, "is float64: compute it in the dtype of z"),
    (ch10_pitfalls.stable_variance, variance_median_centre, "you centred with the median"),
    (ch10_pitfalls.stable_variance, variance_welford_wrong_update, "Welford's update multiplies the deviations"),
    (ch10_pitfalls.stable_variance, variance_welford_from_zero, "your output contains NaN or inf"),
]

RIGHT = [
    (ch10_pitfalls.batch_stat_layers, layers_by_running_mean_none),
    (ch10_pitfalls.batch_stat_layers, layers_by_recursion),
    (ch10_pitfalls.stable_variance, variance_shifted_one_pass),
    (ch10_pitfalls.stable_variance, variance_centred_twice),
]


def test_float32_cancellation_message_names_dtype_offset_and_error():
    message = diagnosis(ch10_pitfalls.stable_variance, variance_one_pass)
    assert "float32" in message and "near 1e4" in message and "relative error" in message


def test_welford_and_numpy_pass(capsys):
    def welford(z):
        mean, m2 = np.zeros(z.shape[1], z.dtype), np.zeros(z.shape[1], z.dtype)
        for k, x in enumerate(z, start=1):  # one pass, row by row, in z's dtype
            delta = x - mean
            mean = mean + delta / k
            m2 = m2 + delta * (x - mean)
        return m2 / len(z)

    ch10_pitfalls.stable_variance(welford)
    assert capsys.readouterr().out.count("✓") == 1
    # np.var would pass on the values, but the prompt forbids it: the check says so
    assert "you called var()" in diagnosis(ch10_pitfalls.stable_variance, lambda z: z.var(axis=0))


def test_errors_in_learner_code_are_reported():
    with pytest.raises(ExerciseError, match="your function raised"):
        ch10_pitfalls.stable_variance(lambda z: z @ np.ones(7))
    with pytest.raises(ExerciseError, match="your function raised AttributeError"):
        ch10_pitfalls.batch_stat_layers(lambda model: model.bn_layers())
    with pytest.raises(ExerciseError, match="returned None"):
        ch10_pitfalls.batch_stat_layers(lambda model: None)
    with pytest.raises(ExerciseError, match="expected a function"):
        ch10_pitfalls.stable_variance(3.0)

