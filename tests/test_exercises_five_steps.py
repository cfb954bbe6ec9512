"""Chapter 1's exercises (the five steps): typical wrong answers and right answers written
otherwise. tests/test_exercises.py runs them (see exercise_support.ANSWERS)."""
from __future__ import annotations

import numpy as np

from bnkit import reference as ref
from bnkit.checks import ch01_five_steps


AXES = lambda z: tuple(a for a in range(z.ndim) if a != 1)  # noqa: E731
VEC = lambda v, z: v.reshape((1, -1) + (1,) * (z.ndim - 2))  # noqa: E731

WRONG = [
    # step 1
    (ch01_five_steps.batch_mean, lambda z: z.mean(axis=1), "wrong axis"),
    (ch01_five_steps.batch_mean, lambda z: z.mean(axis=0), "over the batch axis only"),  # fine for (m, n), not 4-D
    (ch01_five_steps.batch_mean, lambda z: z.mean(axis=AXES(z), keepdims=True), "drop keepdims"),
    (ch01_five_steps.batch_mean, lambda z: z.sum(axis=AXES(z)), "did not divide by m"),
    (ch01_five_steps.batch_mean, lambda z: z.mean(), "one mean of all the values"),
    # step 2
    (ch01_five_steps.center, lambda z, mu: VEC(mu, z) - z, "wrong sign"),
    (ch01_five_steps.center, lambda z, mu: z + VEC(mu, z), "you added mu"),
    (ch01_five_steps.center, lambda z, mu: z - z.mean(axis=1, keepdims=True), "each example's own mean"),
    (ch01_five_steps.center, lambda z, mu: z - mu, "your function raised ValueError: operands could not be broadcast"),
    # step 3
    (ch01_five_steps.batch_variance, lambda x: x.var(axis=AXES(x), ddof=1), "you divided by m-1: at training time BN uses the biased 1/m"),
    (ch01_five_steps.batch_variance, lambda x: x.std(axis=AXES(x)), "standard deviation"),
    (ch01_five_steps.batch_variance, lambda x: x.mean(axis=AXES(x)), "square each value"),
    (ch01_five_steps.batch_variance, lambda x: (x**2).mean(axis=1), "wrong axis"),
    # step 4
    (ch01_five_steps.normalize, lambda x, var, eps: x / (np.sqrt(VEC(var, x)) + eps), "eps belongs inside the square root"),
    (ch01_five_steps.normalize, lambda x, var, eps: x / np.sqrt(VEC(var, x)), "you left out eps"),
    (ch01_five_steps.normalize, lambda x, var, eps: x / VEC(var + eps, x), "divided by the variance"),
    # step 5
    (ch01_five_steps.scale_shift, lambda x, g, b: VEC(b, x) * x + VEC(g, x), "gamma and beta are swapped"),
    (ch01_five_steps.scale_shift, lambda x, g, b: VEC(g, x) * x, "you left out beta"),
    (ch01_five_steps.scale_shift, lambda x, g, b: VEC(g, x) * (x + VEC(b, x)), "beta is added after scaling"),
]

RIGHT: list = []


def test_forward_train_wrong_answer_is_caught():
    from exercise_support import diagnosis

    wrong = lambda z, g, b, eps: ref.forward_train(z - z.mean(axis=1, keepdims=True), g, b, eps)[0]  # noqa: E731
    assert "wrong values" in diagnosis(ch01_five_steps.forward_train, wrong)
