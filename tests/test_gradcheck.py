"""bnkit.gradcheck: centred differences, elementwise and along a random direction."""
from __future__ import annotations

import numpy as np
import pytest

from bnkit import gradcheck
from bnkit import reference as ref


def test_rel_error():
    assert gradcheck.rel_error(0.0, 0.0) == 0.0
    assert gradcheck.rel_error([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert gradcheck.rel_error([1.0, 2.0], [1.0, 3.0]) == pytest.approx(1 / 3)


def test_numerical_gradient_of_a_known_function_leaves_x_alone():
    x = np.array([[0.5, -1.0], [2.0, 0.1]])
    before = x.copy()
    grad = gradcheck.numerical_gradient(lambda y: np.sum(np.sin(y) * y), x)
    np.testing.assert_allclose(grad, np.cos(x) * x + np.sin(x), rtol=1e-8)
    np.testing.assert_array_equal(x, before)


def _bn_problem(shape, seed=0):
    rng = np.random.default_rng(seed + 100)  # not the direction's stream (v parallel to z - 1 is invisible to BN)
    z = rng.normal(size=shape) * 2 + 1
    n = shape[1]
    gamma, beta = rng.uniform(0.5, 2, n) * rng.choice([-1.0, 1.0], n), rng.normal(size=n)
    dz_tilde = rng.normal(size=shape)  # random upstream gradient
    loss = lambda x: np.sum(dz_tilde * ref.forward_train(x, gamma, beta)[0])  # noqa: E731
    return loss, z, ref.backward(dz_tilde, ref.forward_train(z, gamma, beta)[1])


@pytest.mark.parametrize("shape", [(7, 3), (3, 2, 4, 4)])
def test_backward_agrees_with_centred_differences(shape):
    loss, z, (dz, _, _) = _bn_problem(shape)
    assert gradcheck.rel_error(dz, gradcheck.numerical_gradient(loss, z)) < 1e-8


@pytest.mark.parametrize("seed", range(3))
def test_directional_error_passes_right_and_catches_wrong_gradients(seed):
    loss, z, (dz, _, _) = _bn_problem((4, 3, 5, 5), seed)
    assert gradcheck.directional_error(loss, z, dz, seed=seed) < 1e-7
    wrong = dz.copy()
    wrong.flat[seed] += 0.5 * np.abs(dz).max()  # one entry wrong
    assert gradcheck.directional_error(loss, z, wrong, seed=seed) > 1e-3
    assert gradcheck.directional_error(loss, z, 0 * dz, seed=seed) == pytest.approx(1.0)


def test_directional_error_is_deterministic_and_leaves_x_alone():
    loss, z, (dz, _, _) = _bn_problem((6, 4))
    before = z.copy()
    a = gradcheck.directional_error(loss, z, 1.1 * dz, seed=5)
    assert a == gradcheck.directional_error(loss, z, 1.1 * dz, seed=5)
    np.testing.assert_array_equal(z, before)
