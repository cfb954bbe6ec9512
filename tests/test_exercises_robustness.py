"""Chapter 6 (how robust is it?): typical wrong answers and right answers written otherwise
(tests/test_exercises.py runs them), and tests of those checkers."""
from __future__ import annotations

import copy
import math

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

RIGHT: list = []


def test_error_inside_learner_code_is_reported_not_raised():
    def broken(model, X_target):
        return model(X_target)  # a NumPy array where a tensor is needed

    with pytest.raises(ExerciseError, match="your function raised TypeError"):
        ch06_robustness.adabn(broken)
