"""Chapter 6 (how robust is it?): typical wrong answers and right answers written otherwise
(tests/test_exercises.py runs them), and tests of those checkers."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import bnkit
from bnkit.checks import ch06_robustness
from bnkit.checks._core import ExerciseError

# ---------------------------------------------------------------- typical wrong answers, exercise 1


def _ratio(m, f):
    return math.log(1 - f) / math.log(1 - m)


def steps_floor(momentum, fraction):
    return math.floor(_ratio(momentum, fraction))


def steps_unrounded(momentum, fraction):
    return _ratio(momentum, fraction)


def steps_rounded(momentum, fraction):
    return round(_ratio(momentum, fraction))


def steps_window(momentum, fraction):
    return round(1 / momentum)


def steps_keras_convention(momentum, fraction):
    return math.ceil(math.log(1 - fraction) / math.log(momentum))


def steps_share_of_init(momentum, fraction):
    return math.ceil(math.log(fraction) / math.log(1 - momentum))


def steps_loop_one_too_many(momentum, fraction):
    k, share = 0, 0.0
    while share < fraction:
        k += 1
        share = 1 - (1 - momentum) ** k
    return k + 1


# ---------------------------------------------------------------- typical wrong answers, exercise 2


def _batches(X, b=64):
    return [torch.as_tensor(X[s : s + b]) for s in range(0, len(X), b)]


def adabn_in_place(model, X_target):
    bnkit.recompute_stats(model, _batches(X_target), upstream="eval")
    return model


def adabn_upstream_train(model, X_target):
    adapted = copy.deepcopy(model)
    bnkit.recompute_stats(adapted, _batches(X_target), upstream="train")
    return adapted


def adabn_running_average(model, X_target):
    adapted = copy.deepcopy(model).train()  # momentum 0.1: keeps part of the old statistics
    with torch.no_grad():
        for X_b in _batches(X_target):
            adapted(X_b)
    return adapted.eval()


def adabn_cumulative_one_pass(model, X_target):
    adapted = copy.deepcopy(model).train()
    for bn in bnkit.bn_layers(adapted):
        bn.momentum = None
        bn.reset_running_stats()
    with torch.no_grad():
        adapted(torch.as_tensor(X_target))  # upstream layers use batch statistics
    return adapted.eval()


def adabn_biased_variance(model, X_target):
    adapted = copy.deepcopy(model)
    bnkit.recompute_stats(adapted, _batches(X_target), upstream="eval")
    for bn in bnkit.bn_layers(adapted):
        bn.running_var.mul_((len(X_target) - 1) / len(X_target))
    return adapted


def adabn_left_in_training_mode(model, X_target):
    adapted = copy.deepcopy(model)
    bnkit.recompute_stats(adapted, _batches(X_target), upstream="eval")
    return adapted.train()


def adabn_nothing(model, X_target):
    return copy.deepcopy(model)


def adabn_returns_stats(model, X_target):
    return bnkit.recompute_stats(copy.deepcopy(model), _batches(X_target), upstream="eval")


WRONG = [
    (ch06_robustness.steps_needed, steps_floor, "you rounded down"),
    (ch06_robustness.steps_needed, steps_unrounded, "a number of steps is a whole number"),
    (ch06_robustness.steps_needed, steps_rounded, "rounded to the nearest whole number"),
    (ch06_robustness.steps_needed, steps_window, "1 / momentum is the window"),
    (ch06_robustness.steps_needed, steps_keras_convention, "you used momentum**k"),
    (ch06_robustness.steps_needed, steps_share_of_init, "share of the initial value"),
    (ch06_robustness.steps_needed, steps_loop_one_too_many, "one step too many"),
    (ch06_robustness.adabn, adabn_in_place, "changed the model passed in"),
    (ch06_robustness.adabn, adabn_upstream_train, "the first BN layer is right"),
    (ch06_robustness.adabn, adabn_running_average, "moved only part of the way"),
    (ch06_robustness.adabn, adabn_cumulative_one_pass, "BN layers before it in training mode"),
    (ch06_robustness.adabn, adabn_biased_variance, "biased"),
    (ch06_robustness.adabn, adabn_left_in_training_mode, "is in training mode"),
    (ch06_robustness.adabn, adabn_nothing, "still holds its old statistics"),
    (ch06_robustness.adabn, adabn_returns_stats, "returned dict"),
]


# ---------------------------------------------------------------- more wrong answers, right answers


def steps_log_of_fraction(momentum, fraction):
    return math.ceil(math.log(fraction) / math.log(1 - momentum))


def steps_int_plus_one(momentum, fraction):
    return int(_ratio(momentum, fraction)) + 1  # one too many when the ratio is a whole number


def steps_small_momentum_approximation(momentum, fraction):
    return math.ceil(-math.log(1 - fraction) / momentum)  # log(1 - a) ~ -a: only for small a


def steps_upside_down(momentum, fraction):
    return math.ceil(math.log(1 - momentum) / math.log(1 - fraction))


def steps_mixed_log_bases(momentum, fraction):
    return math.ceil(math.log10(1 - fraction) / math.log(1 - momentum))


def steps_loop_strict(momentum, fraction):
    k = 0
    while 1 - (1 - momentum) ** k <= fraction:  # > instead of >=: one too many on a tie
        k += 1
    return k


def steps_by_counting(momentum, fraction):
    k, share = 0, 0.0
    while share < fraction:
        share = (1 - momentum) * share + momentum  # one EMA step on a constant statistic 1
        k += 1
    return k


def steps_numpy(momentum, fraction):
    return int(np.ceil(np.log1p(-fraction) / np.log1p(-momentum) - 1e-12))


def adabn_first_batch_only(model, X_target):
    adapted = copy.deepcopy(model)
    bnkit.recompute_stats(adapted, _batches(X_target[:256]), upstream="eval")  # the rest is dropped
    return adapted


def adabn_update_bn(model, X_target):
    adapted = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(_batches(X_target), adapted)  # upstream layers in training mode
    return adapted.eval()


def adabn_momentum_none_left(model, X_target):
    adapted = copy.deepcopy(model)
    bnkit.recompute_stats(adapted, _batches(X_target), upstream="eval")
    for bn in bnkit.bn_layers(adapted):
        bn.momentum = None  # the copy's layers no longer train like the source's
    return adapted


def adabn_float64_copy(model, X_target):
    adapted = copy.deepcopy(model).double()  # "more precise": but the copy is no longer float32
    bnkit.recompute_stats(adapted, [torch.as_tensor(X_target, dtype=torch.float64)], upstream="eval")
    return adapted


def adabn_first_layer_only(model, X_target):
    adapted = copy.deepcopy(model)
    first = bnkit.bn_layers(adapted)[0]
    x = torch.as_tensor(X_target)
    with torch.no_grad():
        for layer in adapted:
            if layer is first:
                first.running_mean.copy_(x.mean(0))
                first.running_var.copy_(x.var(0))
                break
            x = layer(x)
    return adapted


def adabn_returns_source(model, X_target):
    adapted = copy.deepcopy(model)
    bnkit.recompute_stats(adapted, _batches(X_target), upstream="eval")
    return model  # the wrong name


def adabn_by_hand(model, X_target):
    """Layer after layer: each BN layer's statistics from the adapted layers before it."""
    adapted = copy.deepcopy(model).eval()
    for bn in bnkit.bn_layers(adapted):
        inputs = []
        hook = bn.register_forward_pre_hook(lambda module, args: inputs.append(args[0].double()))
        with torch.no_grad():
            adapted(torch.as_tensor(X_target))
        hook.remove()
        z = torch.cat(inputs)
        with torch.no_grad():
            bn.running_mean.copy_(z.mean(0))
            bn.running_var.copy_(z.var(0))
    return adapted


def adabn_one_batch(model, X_target):
    adapted = copy.deepcopy(model)
    bnkit.recompute_stats(adapted, [torch.as_tensor(X_target)], estimator="exact", upstream="eval")
    return adapted


WRONG += [
    (ch06_robustness.steps_needed, steps_log_of_fraction, "you solved (1 - momentum)**k = fraction"),
    (ch06_robustness.steps_needed, steps_int_plus_one, "int(x) + 1 is one step too many"),
    (ch06_robustness.steps_needed, steps_small_momentum_approximation, "approximation"),
    (ch06_robustness.steps_needed, steps_upside_down, "upside down"),
    (ch06_robustness.steps_needed, steps_mixed_log_bases, "same base"),
    (ch06_robustness.steps_needed, steps_loop_strict, "int(x) + 1 is one step too many"),
    (ch06_robustness.adabn, adabn_first_batch_only, "wrong statistics in layer '1' on case 1: X_target of shape (300, 6)"),
    (ch06_robustness.adabn, adabn_update_bn, "wrong statistics in layer '1' on case 1"),
    (ch06_robustness.adabn, adabn_momentum_none_left, "changed the settings of the returned copy"),
    (ch06_robustness.adabn, adabn_float64_copy, "float64"),
    (ch06_robustness.adabn, adabn_first_layer_only, "still holds its old statistics"),
    (ch06_robustness.adabn, adabn_returns_source, "it returned the model itself"),
]

RIGHT = [
    (ch06_robustness.steps_needed, steps_by_counting),
    (ch06_robustness.steps_needed, steps_numpy),
    (ch06_robustness.adabn, adabn_by_hand),
    (ch06_robustness.adabn, adabn_one_batch),
]


def test_error_inside_learner_code_is_reported_not_raised():
    def broken(model, X_target):
        return model(X_target)  # a NumPy array where a tensor is needed

    with pytest.raises(ExerciseError, match="your function raised TypeError"):
        ch06_robustness.adabn(broken)
