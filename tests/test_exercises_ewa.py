"""Chapters 2 (the test-time problem) and 3 (EWA): typical wrong answers and right answers
written otherwise (tests/test_exercises.py runs them), and tests of those checkers."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from bnkit.checks import ch02_test_time_problem, ch03_ewa
from bnkit.checks._core import ExerciseError

# ---------------------------------------------------------------- typical wrong answers, chapter 2


def predict_on_the_model_itself(model, X, batch_size):
    model.train()  # wrong: updates the model's running statistics with every test batch
    with torch.no_grad():
        logits = [model(torch.as_tensor(X[s : s + batch_size])) for s in range(0, len(X), batch_size)]
    model.eval()
    return torch.cat(logits).argmax(dim=1).numpy()


def predict_in_eval_mode(model, X, batch_size):
    with torch.no_grad():
        return model.eval()(torch.as_tensor(X)).argmax(dim=1).numpy()  # running statistics


def predict_logits(model, X, batch_size):
    batch_mode = copy.deepcopy(model).train()
    with torch.no_grad():
        return torch.cat([batch_mode(torch.as_tensor(X[s : s + batch_size])) for s in range(0, len(X), batch_size)]).numpy()


def predict_whole_set(model, X, batch_size):
    with torch.no_grad():
        return copy.deepcopy(model).train()(torch.as_tensor(X)).argmax(dim=1).numpy()


def _predict(model, X, batch_size):
    from bnkit.course.testtime import predict_with_batch_stats

    return predict_with_batch_stats(model, X, batch_size)


def changed_without_unpermuting(model, X, batch_size, order_a, order_b):
    return float(np.mean(_predict(model, X[order_a], batch_size) != _predict(model, X[order_b], batch_size)))


def changed_permuted_twice(model, X, batch_size, order_a, order_b):
    pred_a = _predict(model, X[order_a], batch_size)[order_a]
    pred_b = _predict(model, X[order_b], batch_size)[order_b]
    return float(np.mean(pred_a != pred_b))


def changed_count(model, X, batch_size, order_a, order_b):
    pred_a, pred_b = np.empty(len(X), int), np.empty(len(X), int)
    pred_a[order_a] = _predict(model, X[order_a], batch_size)
    pred_b[order_b] = _predict(model, X[order_b], batch_size)
    return int(np.sum(pred_a != pred_b))


# ---------------------------------------------------------------- typical wrong answers, chapter 3


def ema_fed_back(values, beta, bias_correction=False):
    values = np.asarray(values, dtype=float)
    v, out = np.zeros(values.shape[1:]), []
    for t, theta in enumerate(values, start=1):
        v = beta * v + (1 - beta) * theta
        if bias_correction:
            v = v / (1 - beta**t)  # wrong: the corrected value goes back into the recursion
        out.append(v)
    return np.array(out)


def ema_swapped(values, beta, bias_correction=False):
    values = np.asarray(values, dtype=float)
    v, out = np.zeros(values.shape[1:]), []
    for t, theta in enumerate(values, start=1):
        v = (1 - beta) * v + beta * theta  # wrong: beta weights the new value
        out.append(v / (1 - beta**t) if bias_correction else v)
    return np.array(out)


def ema_starts_at_first_value(values, beta, bias_correction=False):
    values = np.asarray(values, dtype=float)
    v, out = values[0], []
    for t, theta in enumerate(values, start=1):
        v = beta * v + (1 - beta) * theta
        out.append(v / (1 - beta**t) if bias_correction else v)
    return np.array(out)


def convert_unchanged(momentum, source, target):
    return momentum


def convert_always_flip(momentum, source, target):
    return momentum if source == target else 1 - momentum


def weight_uncorrected(t, momentum):
    return momentum


def weight_keras_beta(t, momentum):
    beta = momentum  # wrong: Keras's meaning
    return (1 - beta) / (1 - beta**t)


def weight_cumulative(t, momentum):
    return 1 / t


WRONG = [
    (ch02_test_time_problem.predict_with_batch_stats, predict_on_the_model_itself, "changed the model"),
    (ch02_test_time_problem.predict_with_batch_stats, predict_in_eval_mode, "eval-mode ones, made with the running statistics"),
    (ch02_test_time_problem.predict_with_batch_stats, predict_logits, "you returned the logits"),
    (ch02_test_time_problem.predict_with_batch_stats, predict_whole_set, "all of X as one batch"),
    (ch02_test_time_problem.fraction_changed, changed_without_unpermuting, "without putting them back in X's order"),
    (ch02_test_time_problem.fraction_changed, changed_permuted_twice, "applies the permutation a second time"),
    (ch02_test_time_problem.fraction_changed, changed_count, "how many predictions changed"),
    (ch03_ewa.ema, ema_fed_back, "fed the corrected value back into the recursion"),
    (ch03_ewa.ema, ema_swapped, "your beta weights the new value"),
    (ch03_ewa.ema, ema_starts_at_first_value, "v_0 = theta_1"),
    (ch03_ewa.convert_momentum, convert_unchanged, "returned the momentum unchanged"),
    (ch03_ewa.convert_momentum, convert_always_flip, "between them nothing changes"),
    (ch03_ewa.debiased_weight, weight_uncorrected, "uncorrected weight"),
    (ch03_ewa.debiased_weight, weight_keras_beta, "Keras's convention"),
    (ch03_ewa.debiased_weight, weight_cumulative, "cumulative average"),
]

RIGHT: list = []


def test_error_inside_learner_code_is_reported_not_raised():
    def broken(values, beta, bias_correction=False):
        return values @ np.ones(7)  # a shape error in the learner's own code

    with pytest.raises(ExerciseError, match="your function raised ValueError"):
        ch03_ewa.ema(broken)
