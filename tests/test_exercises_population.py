"""Chapters 4 (running estimates) and 5 (population statistics): typical wrong answers and
right answers written otherwise (tests/test_exercises.py runs them), tests of those checkers,
and tests of bnkit.recording, which chapter 4 uses."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bnkit import running
from bnkit.checks import ch04_running_estimates, ch05_population_stats
from bnkit.checks._core import ExerciseError
from bnkit.course.nets import mlp
from bnkit.recording import BatchStatsRecorder


# ---------------------------------------------------------------- typical wrong answers


def infer_with_batch_stats(z, gamma, beta, mean, var, eps):
    z_new = z - z.mean(axis=0)  # training mode: the statistics of z itself
    return gamma * z_new / np.sqrt(z.var(axis=0) + eps) + beta


def update_keras(rm, rv, mu, var, count, momentum):
    return momentum * rm + (1 - momentum) * mu, momentum * rv + (1 - momentum) * var * count / (count - 1)


def update_biased(rm, rv, mu, var, count, momentum):
    return (1 - momentum) * rm + momentum * mu, (1 - momentum) * rv + momentum * var


def update_in_place(rm, rv, mu, var, count, momentum):
    rm *= 1 - momentum  # changes the checker's copies only: still the right values
    rm += momentum * mu
    return rm, (1 - momentum) * rv + momentum * var * count / (count - 1)


def merge_no_spread(a, b):
    n = a.count + b.count
    return n, (a.count * a.mean + b.count * b.mean) / n, a.m2 + b.m2


def merge_plain_mean(a, b):
    n = a.count + b.count
    delta = b.mean - a.mean
    return n, (a.mean + b.mean) / 2, a.m2 + b.m2 + delta**2 * a.count * b.count / n


def merge_no_n(a, b):
    n = a.count + b.count
    delta = b.mean - a.mean
    return n, (a.count * a.mean + b.count * b.mean) / n, a.m2 + b.m2 + delta**2 * a.count * b.count


def merge_sums_of_squares(a, b):
    """Right in exact arithmetic, through sum x and sum x**2: loses the digits for a large mean."""
    n = a.count + b.count
    s1 = a.count * a.mean + b.count * b.mean
    s2 = (a.m2 + a.count * a.mean**2) + (b.m2 + b.count * b.mean**2)
    return n, s1 / n, s2 - s1**2 / n


WRONG = [
    # chapter 4, exercise 1: test-time BN
    (ch04_running_estimates.bn_infer, infer_with_batch_stats, "you normalised with the statistics of z itself"),
    (ch04_running_estimates.bn_infer, lambda z, g, b, m, v, eps: g * (z - m) / (np.sqrt(v) + eps) + b,
     "eps belongs inside the square root"),
    (ch04_running_estimates.bn_infer, lambda z, g, b, m, v, eps: b * (z - m) / np.sqrt(v + eps) + g, "gamma and beta are swapped"),
    (ch04_running_estimates.bn_infer, lambda z, g, b, m, v, eps: (z - m) / np.sqrt(v + eps), "you returned z_norm"),
    # chapter 4, exercise 2: one running update
    (ch04_running_estimates.update_running, update_keras, "Keras's convention"),
    (ch04_running_estimates.update_running, update_biased, "you averaged the biased variance"),
    (ch04_running_estimates.update_running, lambda rm, rv, mu, var, c, mom: (mu, var * c / (c - 1)),
     "you returned the batch's statistics"),
    (ch04_running_estimates.update_running, lambda rm, rv, mu, var, c, mom: np.stack([rm, rv]),
     "return the pair (new_mean, new_var), 2 values, got ndarray"),
    # chapter 5, exercise 1: Chan et al.'s merge
    (ch05_population_stats.merge, merge_no_spread, "left out the spread between the two means"),
    (ch05_population_stats.merge, merge_plain_mean, "weight each mean by its count"),
    (ch05_population_stats.merge, merge_no_n, "you forgot to divide by n = n_a + n_b"),
    (ch05_population_stats.merge, merge_sums_of_squares, "wrong values on batches of 1000 and 20 values around 1e6"),
    (ch05_population_stats.merge, lambda a, b: (a.count + b.count, a.mean), "return (count, mean, m2), 3 values"),
    # chapter 5, exercise 2: Algorithm 2
    (ch05_population_stats.algorithm2, lambda mus, v, m: (mus.mean(0), v.mean(0)), "you forgot the m/(m-1) correction"),
    (ch05_population_stats.algorithm2, lambda mus, v, m: (mus.mean(0), m / (m - 1) * (v.mean(0) + mus.var(0))),
     "you averaged the variances but also added the spread of the batch means"),
    (ch05_population_stats.algorithm2, lambda mus, v, m: (mus.mean(0), v.mean(0) * len(v) / (len(v) - 1)),
     "not the number of batches"),
    (ch05_population_stats.algorithm2, lambda mus, v, m: (mus.mean(0), m / (m - 1) * np.sqrt(v).mean(0) ** 2),
     "you averaged standard deviations"),
    (ch05_population_stats.algorithm2, lambda mus, v, m: (mus.mean(1), m / (m - 1) * v.mean(1)), "averaged over the features"),
]

RIGHT: list = []


def test_the_right_answers_in_other_forms_pass(capsys):
    """Tensors, lists and in-place updates of the checker's copies are all accepted."""
    ch04_running_estimates.update_running(update_in_place)
    ch05_population_stats.merge(lambda a, b: list(running.merge(a, b)))  # a list, and BatchStats itself
    ch05_population_stats.algorithm2(lambda mus, v, m: [torch.as_tensor(x) for x in running.algorithm2(mus, v, m)])
    ch04_running_estimates.bn_infer(lambda *args: torch.as_tensor(running_forward_infer(*args)))
    assert capsys.readouterr().out.count("✓") == 4


def running_forward_infer(z, gamma, beta, mean, var, eps):
    from bnkit.reference import forward_infer

    return forward_infer(z, gamma, beta, mean, var, eps)


def test_a_learners_exception_is_reported_with_the_learners_line():
    def my_algorithm2(mus, variances, m):
        return mus.mean(axis=0), m / (m - 1) * variances.mean(axis=2)  # no axis 2

    with pytest.raises(ExerciseError) as info:
        ch05_population_stats.algorithm2(my_algorithm2)
    message = str(info.value)
    assert message.startswith("algorithm2: your function raised AxisError")
    assert "variances.mean(axis=2)" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_returning_none_is_explained():
    for checker, fn in [(ch05_population_stats.merge, lambda a, b: None),
                        (ch04_running_estimates.update_running, lambda *a: None),
                        (ch04_running_estimates.bn_infer, lambda *a: None)]:
        with pytest.raises(ExerciseError, match="forget `return`"):
            checker(fn)


# ---------------------------------------------------------------- bnkit.recording


def _train_steps(model: torch.nn.Module, steps: int, m: int = 16, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(m, 64, generator=gen) * 2 + 1 for _ in range(steps)]
    model.train()
    with torch.no_grad():
        for x in xs:
            model(x)
    return xs


def test_recorder_matches_the_layers_input_and_buffers():
    model = mlp(hidden=(8, 6), seed=1)
    with BatchStatsRecorder(model) as rec:
        xs = _train_steps(model, 5)
        model.eval()(xs[0])  # eval-mode calls are not recorded
    assert rec.names == ["1", "4"] and rec.steps == 5
    trace = rec.trace("1")
    z = model[0](xs[-1]).detach().double().numpy()  # the first BN layer's last input
    assert trace.mu.shape == (5, 8) and trace.count.tolist() == [16] * 5
    np.testing.assert_allclose(trace.mu[-1], z.mean(0), rtol=1e-12)
    np.testing.assert_allclose(trace.var[-1], z.var(0), rtol=1e-12)  # biased
    np.testing.assert_array_equal(trace.running_var[-1], model[1].running_var.double().numpy())
    means, variances = running.running_estimates(trace.mu, trace.var, 16, "ema", 0.1)
    np.testing.assert_allclose(means, trace.running_mean, atol=1e-6)
    np.testing.assert_allclose(variances, trace.running_var, rtol=1e-6)


def test_recorder_removes_its_hooks_and_rejects_unknown_layers():
    model = mlp(hidden=(8,), seed=0)
    rec = BatchStatsRecorder(model, layers=["1"])
    rec.remove()
    _train_steps(model, 2)
    with pytest.raises(ValueError, match="has not run in training mode"):
        rec.trace("1")
    with pytest.raises(KeyError):
        rec.trace("0")
    with pytest.raises(ValueError, match="not BN layers"):
        BatchStatsRecorder(model, layers=["0"])
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        BatchStatsRecorder(mlp(hidden=(8,), bn=False))
