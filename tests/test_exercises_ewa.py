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


# ---------------------------------------------------------------- more wrong answers, chapter 2


def _batched(model, X, batch_size, head=lambda logits: logits.argmax(dim=1)):
    batch_mode = copy.deepcopy(model).train()
    with torch.no_grad():
        return torch.cat([head(batch_mode(torch.as_tensor(X[s : s + batch_size])))
                          for s in range(0, len(X), batch_size)]).numpy()


def predict_train_then_eval(model, X, batch_size):
    model.train()  # the model itself: its running statistics move with every test batch
    with torch.no_grad():
        labels = [model(torch.as_tensor(X[s : s + batch_size])).argmax(dim=1) for s in range(0, len(X), batch_size)]
    model.eval()
    return torch.cat(labels).numpy()


def predict_momentum_zero(model, X, batch_size):
    for layer in model.modules():
        if isinstance(layer, torch.nn.BatchNorm1d):
            layer.momentum = 0.0  # "running statistics stay": but num_batches_tracked moves, momentum stays 0
    was = model.training
    with torch.no_grad():
        model.train()
        labels = [model(torch.as_tensor(X[s : s + batch_size])).argmax(dim=1) for s in range(0, len(X), batch_size)]
    model.train(was)
    return torch.cat(labels).numpy()


def predict_always_eval_afterwards(model, X, batch_size):
    labels = _batched(model, X, batch_size)
    model.eval()  # assumes the model came in eval mode
    return labels


def predict_drops_last_batch(model, X, batch_size):
    full = len(X) - len(X) % batch_size
    return _batched(model, X[:full], batch_size)


def predict_range_off_by_one(model, X, batch_size):
    batch_mode = copy.deepcopy(model).train()
    with torch.no_grad():
        return torch.cat([batch_mode(torch.as_tensor(X[s : s + batch_size])).argmax(dim=1)
                          for s in range(0, len(X) - batch_size, batch_size)]).numpy()


def predict_probabilities(model, X, batch_size):
    return _batched(model, X, batch_size, head=lambda logits: logits.softmax(dim=1))


def predict_argmax_wrong_dim(model, X, batch_size):
    return np.concatenate([_batched(model, X[s : s + batch_size], batch_size, head=lambda l: l.argmax(dim=0))
                           for s in range(0, len(X), batch_size)])


def predict_save_and_restore(model, X, batch_size):
    state, was = copy.deepcopy(model.state_dict()), model.training
    model.train()
    with torch.no_grad():
        labels = [model(torch.as_tensor(X[s : s + batch_size])).argmax(dim=1) for s in range(0, len(X), batch_size)]
    model.load_state_dict(state)  # running statistics and num_batches_tracked back as they were
    model.train(was)
    return torch.cat(labels).numpy()


def predict_functional(model, X, batch_size):
    """Batch statistics without touching any mode: each BN layer called through F.batch_norm."""
    out = []
    for s in range(0, len(X), batch_size):
        h = torch.as_tensor(X[s : s + batch_size])
        with torch.no_grad():
            for layer in model:
                if isinstance(layer, torch.nn.BatchNorm1d):
                    h = torch.nn.functional.batch_norm(h, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
                else:
                    h = layer(h)
        out.append(h.argmax(dim=1).numpy())
    return np.concatenate(out)


def changed_eval_mode(model, X, batch_size, order_a, order_b):
    with torch.no_grad():
        pred = model.eval()(torch.as_tensor(X)).argmax(dim=1).numpy()
    return float(np.mean(pred[order_a][np.argsort(order_a)] != pred[order_b][np.argsort(order_b)]))


def changed_only_one_undone(model, X, batch_size, order_a, order_b):
    pred_a = np.empty(len(X), int)
    pred_a[order_a] = _predict(model, X[order_a], batch_size)
    return float(np.mean(pred_a != _predict(model, X[order_b], batch_size)))


def changed_same_order_twice(model, X, batch_size, order_a, order_b):
    pred_a, pred_b = np.empty(len(X), int), np.empty(len(X), int)
    pred_a[order_a] = _predict(model, X[order_a], batch_size)
    pred_b[order_a] = _predict(model, X[order_a], batch_size)  # copy-paste: order_a twice
    return float(np.mean(pred_a != pred_b))


def changed_divided_by_m_minus_1(model, X, batch_size, order_a, order_b):
    return changed_count(model, X, batch_size, order_a, order_b) / (len(X) - 1)


def changed_per_example(model, X, batch_size, order_a, order_b):
    pred_a, pred_b = np.empty(len(X), int), np.empty(len(X), int)
    pred_a[order_a] = _predict(model, X[order_a], batch_size)
    pred_b[order_b] = _predict(model, X[order_b], batch_size)
    return pred_a != pred_b  # not reduced to a fraction


def changed_percentage(model, X, batch_size, order_a, order_b):
    return 100 * changed_count(model, X, batch_size, order_a, order_b) / len(X)


def changed_with_argsort(model, X, batch_size, order_a, order_b):
    pred_a = _predict(model, X[order_a], batch_size)[np.argsort(order_a)]
    pred_b = _predict(model, X[order_b], batch_size)[np.argsort(order_b)]
    return np.count_nonzero(pred_a != pred_b) / len(X)


def changed_with_a_dict(model, X, batch_size, order_a, order_b):
    a = dict(zip(order_a.tolist(), _predict(model, X[order_a], batch_size).tolist()))
    b = dict(zip(order_b.tolist(), _predict(model, X[order_b], batch_size).tolist()))
    return sum(a[i] != b[i] for i in range(len(X))) / len(X)


# ---------------------------------------------------------------- more wrong answers, chapter 3


def _ema_loop(values, beta, store=lambda v, t, beta, T: v, out_dtype=None, shape=None):
    values = np.asarray(values)
    v = np.zeros(values.shape[1:])
    out = np.zeros(shape or values.shape, dtype=out_dtype or np.float64)
    for t, theta in enumerate(values, start=1):
        v = beta * v + (1 - beta) * theta
        out[t - 1] = store(v, t, beta, len(values))
    return out


def ema_integer_output(values, beta, bias_correction=False):
    values = np.asarray(values)
    out, v = np.zeros_like(values), 0.0  # takes the dtype of integer values: every average truncated
    for t, theta in enumerate(values, start=1):
        v = beta * v + (1 - beta) * theta
        out[t - 1] = v / (1 - beta**t) if bias_correction else v
    return out


def ema_corrects_with_one_minus_beta_power(values, beta, bias_correction=False):
    return _ema_loop(values, beta, (lambda v, t, b, T: v / (1 - b) ** t) if bias_correction else (lambda v, *a: v))


def ema_corrects_with_last_t(values, beta, bias_correction=False):
    return _ema_loop(values, beta, (lambda v, t, b, T: v / (1 - b**T)) if bias_correction else (lambda v, *a: v))


def ema_only_1d(values, beta, bias_correction=False):
    return _ema_loop(values, beta, (lambda v, t, b, T: v / (1 - b**t)) if bias_correction else (lambda v, *a: v),
                     shape=(len(values),))


def ema_stores_before_update(values, beta, bias_correction=False):
    values = np.asarray(values, dtype=float)
    v, out = np.zeros(values.shape[1:]), np.empty_like(values)
    for t, theta in enumerate(values, start=1):
        out[t - 1] = v / (1 - beta ** max(t - 1, 1)) if bias_correction else v  # v_{t-1}: one step behind
        v = beta * v + (1 - beta) * theta
    return out


def ema_ignores_flag_always_corrects(values, beta, bias_correction=False):
    return _ema_loop(values, beta, lambda v, t, b, T: v / (1 - b**t))


def ema_t_from_zero(values, beta, bias_correction=False):
    return _ema_loop(values, beta, (lambda v, t, b, T: v / (1 - b ** (t - 1))) if bias_correction else (lambda v, *a: v))


def ema_vectorised(values, beta, bias_correction=False):
    """v_t = sum_k (1 - beta) beta^(t-k) theta_k, as a matrix product (T, T) @ (T, ...)."""
    values = np.asarray(values, dtype=float)
    t = np.arange(1, len(values) + 1)
    weights = np.tril((1 - beta) * beta ** (t[:, None] - t[None, :]).clip(0))  # (T, T)
    v = np.tensordot(weights, values, axes=1)
    return v / (1 - beta**t).reshape((-1,) + (1,) * (values.ndim - 1)) if bias_correction else v


def ema_list(values, beta, bias_correction=False):
    v, out = 0.0, []
    for t, theta in enumerate(np.asarray(values, dtype=float), start=1):
        v = v * beta + theta * (1 - beta)
        out.append(v / (1 - beta**t) if bias_correction else v)
    return out


def convert_flip_always(momentum, source, target):
    return 1 - momentum


def convert_cs231n_like_pytorch(momentum, source, target):
    flip = ("pytorch", "cs231n")
    beta = 1 - momentum if source in flip else momentum
    return 1 - beta if target in flip else beta


def convert_beta_like_pytorch(momentum, source, target):
    flip = ("pytorch", "beta")
    beta = 1 - momentum if source in flip else momentum
    return 1 - beta if target in flip else beta


def convert_rounded(momentum, source, target):
    beta = 1 - momentum if source == "pytorch" else momentum
    return round(1 - beta if target == "pytorch" else beta, 2)


def convert_only_to_pytorch(momentum, source, target):
    return 1 - momentum if target == "pytorch" else momentum  # forgets a PyTorch source


def convert_table(momentum, source, target):
    flips = {"pytorch": True, "keras": False, "cs231n": False, "beta": False}
    return 1 - momentum if flips[source] != flips[target] else momentum


def convert_through_bnkit_style(momentum, source, target):
    to_beta = {"pytorch": lambda m: 1 - m}.get(source, lambda m: m)
    from_beta = {"pytorch": lambda b: 1 - b}.get(target, lambda b: b)
    return from_beta(to_beta(momentum))


def weight_t_from_zero(t, momentum):
    beta = 1 - momentum
    return (1 - beta) / (1 - beta ** (t + 1))


def weight_beta_on_top(t, momentum):
    beta = 1 - momentum
    return beta / (1 - beta**t)


def weight_power_of_one_minus_beta(t, momentum):
    beta = 1 - momentum
    return (1 - beta) / (1 - beta) ** t


def weight_t_minus_one(t, momentum):
    beta = 1 - momentum
    return (1 - beta) / (1 - beta ** (t - 1))


def weight_correction_factor(t, momentum):
    return 1 - (1 - momentum) ** t


def weight_by_recursion(t, momentum):
    total = 0.0  # the total weight 1 - beta**t, built up one batch at a time
    for _ in range(t):
        total = (1 - momentum) * total + momentum
    return momentum / total


def weight_with_numpy(t, momentum):
    return momentum / -np.expm1(t * np.log1p(-momentum))


WRONG += [
    (ch02_test_time_problem.predict_with_batch_stats, predict_train_then_eval, "your function changed the model (1.running_mean"),
    (ch02_test_time_problem.predict_with_batch_stats, predict_momentum_zero, "changed the model"),
    (ch02_test_time_problem.predict_with_batch_stats, predict_always_eval_afterwards, "left the model in eval mode"),
    (ch02_test_time_problem.predict_with_batch_stats, predict_drops_last_batch, "you left out the last, smaller batch"),
    (ch02_test_time_problem.predict_with_batch_stats, predict_range_off_by_one, "does your loop run over range(0, len(X), batch_size)?"),
    (ch02_test_time_problem.predict_with_batch_stats, predict_probabilities, "class probabilities or scores"),
    (ch02_test_time_problem.predict_with_batch_stats, predict_argmax_wrong_dim, "argmax over the wrong axis"),
    (ch02_test_time_problem.fraction_changed, changed_eval_mode, "your fraction is 0"),
    (ch02_test_time_problem.fraction_changed, changed_only_one_undone, "only one of the two"),
    (ch02_test_time_problem.fraction_changed, changed_same_order_twice, "your fraction is 0"),
    (ch02_test_time_problem.fraction_changed, changed_divided_by_m_minus_1, "divide by m = len(X), not m - 1"),
    (ch02_test_time_problem.fraction_changed, changed_per_example, "return one number"),
    (ch02_test_time_problem.fraction_changed, changed_percentage, "you returned a percentage"),
    (ch03_ewa.ema, ema_integer_output, "rounded to whole numbers"),
    (ch03_ewa.ema, ema_corrects_with_one_minus_beta_power, "(1 - beta)**t"),
    (ch03_ewa.ema, ema_corrects_with_last_t, "the same factor 1 - beta**T"),
    (ch03_ewa.ema, ema_only_1d, "on values of shape (30, 3)"),
    (ch03_ewa.ema, ema_stores_before_update, "one step behind"),
    (ch03_ewa.ema, ema_ignores_flag_always_corrects, "with bias_correction=False return the raw v_t"),
    (ch03_ewa.ema, ema_t_from_zero, "t counts from 1"),
    (ch03_ewa.convert_momentum, convert_flip_always, "you flipped the momentum whatever the conventions"),
    (ch03_ewa.convert_momentum, convert_cs231n_like_pytorch, "CS231n's momentum is Keras-style"),
    (ch03_ewa.convert_momentum, convert_beta_like_pytorch, '"beta" is beta itself'),
    (ch03_ewa.convert_momentum, convert_rounded, "expected 0.999, got 1 "),
    (ch03_ewa.convert_momentum, convert_only_to_pytorch, "you only converted when the target is PyTorch"),
    (ch03_ewa.debiased_weight, weight_t_from_zero, "t counts batches from 1"),
    (ch03_ewa.debiased_weight, weight_beta_on_top, "the numerator is 1 - beta"),
    (ch03_ewa.debiased_weight, weight_power_of_one_minus_beta, "you divided by (1 - beta)**t"),
    (ch03_ewa.debiased_weight, weight_t_minus_one, "raised ZeroDivisionError: float division by zero"),
    (ch03_ewa.debiased_weight, weight_correction_factor, "1 - beta**t is the correction factor"),
]

RIGHT = [
    (ch02_test_time_problem.predict_with_batch_stats, predict_save_and_restore),
    (ch02_test_time_problem.predict_with_batch_stats, predict_functional),
    (ch02_test_time_problem.fraction_changed, changed_with_argsort),
    (ch02_test_time_problem.fraction_changed, changed_with_a_dict),
    (ch03_ewa.ema, ema_vectorised),
    (ch03_ewa.ema, ema_list),
    (ch03_ewa.convert_momentum, convert_table),
    (ch03_ewa.convert_momentum, convert_through_bnkit_style),
    (ch03_ewa.debiased_weight, weight_by_recursion),
    (ch03_ewa.debiased_weight, weight_with_numpy),
]


def test_error_inside_learner_code_is_reported_not_raised():
    def broken(values, beta, bias_correction=False):
        return values @ np.ones(7)  # a shape error in the learner's own code

    with pytest.raises(ExerciseError, match="your function raised ValueError"):
        ch03_ewa.ema(broken)
