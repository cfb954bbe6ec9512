"""The exercise checkers of chapters 07 (backprop) and 08 (folding) are honest.

For every exercise: the solution written in the notebook passes its checker; the stub that
`make exercises` puts in its place fails with "not implemented"; typical wrong answers fail
with the message that names the mistake.
"""
from __future__ import annotations

import numpy as np
import pytest

from bnkit import reference as ref
from bnkit.checks import ch07_backprop, ch08_folding
from bnkit.checks._core import ExerciseError

pytest.register_assert_rewrite("exercise_support")
from exercise_support import (  # noqa: E402
    REPO,
    assert_exercise_layout,
    assert_one_success_line,
    assert_only_the_checks_fail,
    assert_stub_fails,
    defined_functions,
    diagnosis,
    exercise_namespace,
    exercise_prompts,
    read_notebook,
    run_learner_copy,
    stub,
)

CHAPTERS = {
    "07": REPO / "chapters" / "07_backprop.ipynb",
    "08": REPO / "chapters" / "08_folding.ipynb",
}

# Every function a learner writes in these chapters: (chapter, checker).
CHECKERS = {
    "my_backward": ("07", ch07_backprop.backward),
    "my_directional_error": ("07", ch07_backprop.directional_error),
    "my_fold_linear": ("08", ch08_folding.fold_linear),
    "my_fold_conv": ("08", ch08_folding.fold_conv),
}


# ---------------------------------------------------------------- the notebooks' exercise cells


def _notebook(chapter: str):
    return read_notebook(CHAPTERS[chapter])


def _exercise_namespace(chapter: str, transform=None) -> dict:
    """Run a chapter's imports and its exercise cells (optionally transformed) in a fresh namespace."""
    return exercise_namespace(_notebook(chapter), transform, label=f"chapter {chapter}")


@pytest.fixture(scope="module")
def solutions() -> dict:
    return {chapter: _exercise_namespace(chapter) for chapter in CHAPTERS}


@pytest.fixture(scope="module")
def stubs() -> dict:
    return {chapter: _exercise_namespace(chapter, stub()) for chapter in CHAPTERS}


@pytest.mark.parametrize("chapter", sorted(CHAPTERS))
def test_every_exercise_function_has_a_checker_here(chapter):
    defined = defined_functions(_notebook(chapter))
    assert defined == {name for name, (ch, _) in CHECKERS.items() if ch == chapter}


@pytest.mark.parametrize("chapter", sorted(CHAPTERS))
def test_each_exercise_is_followed_by_its_check_and_a_hidden_solution(chapter):
    nb = _notebook(chapter)
    exercises = exercise_prompts(nb)
    assert len(exercises) >= 2
    for i in exercises:
        assert_exercise_layout(nb, i, "check", first_line_only=True)


@pytest.mark.parametrize("name", sorted(CHECKERS))
def test_solution_in_the_notebook_passes(name, solutions, capsys):
    chapter, checker = CHECKERS[name]
    assert checker(solutions[chapter][name]) is None
    assert_one_success_line(capsys.readouterr().out, says_correct=False)


@pytest.mark.parametrize("name", sorted(CHECKERS))
def test_stub_fails_with_not_implemented(name, stubs):
    chapter, checker = CHECKERS[name]
    assert_stub_fails(checker, stubs[chapter][name], name)


@pytest.mark.parametrize("name", sorted(CHECKERS))
def test_reference_passes(name):
    reference = {
        "my_backward": ref.backward,
        "my_directional_error": __import__("bnkit.gradcheck", fromlist=["x"]).directional_error,
        "my_fold_linear": ch08_folding._fold_reference,
        "my_fold_conv": ch08_folding._fold_reference,
    }[name]
    CHECKERS[name][1](reference)


# ---------------------------------------------------------------- typical wrong answers: backward


def _axes(x):
    return tuple(a for a in range(x.ndim) if a != 1)


def _vec(v, x):
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


def _backward(mu_path=True, var_path=True, count=None, ones=False, swap=False):
    """A learner's staged backward pass, with the chosen mistake."""

    def backward(dz_tilde, cache):
        z_new, var, z_norm, gamma, eps = cache.z_new, cache.var, cache.z_norm, cache.gamma, cache.eps
        axes = _axes(dz_tilde)
        m = count(dz_tilde) if count else dz_tilde.size // dz_tilde.shape[1]
        if ones:
            dz_tilde = np.ones_like(dz_tilde)
        dbeta = dz_tilde.sum(axis=axes)
        dgamma = (dz_tilde * z_norm).sum(axis=axes)
        dz_norm = dz_tilde * _vec(gamma, dz_tilde)
        inv_std = _vec((var + eps) ** -0.5, dz_tilde)
        dz_new = dz_norm * inv_std
        if var_path:
            dvar = -0.5 * (dz_norm * z_new).sum(axis=axes, keepdims=True) * inv_std**3
            dz_new = dz_new + dvar * 2 * z_new / m
        dz = dz_new - dz_new.sum(axis=axes, keepdims=True) / m if mu_path else dz_new
        return (dz, dbeta, dgamma) if swap else (dz, dgamma, dbeta)

    return backward


WRONG_BACKWARD = [
    (_backward(mu_path=False), "you left out the path through mu"),
    (_backward(var_path=False), "you left out the path through var"),
    (_backward(mu_path=False, var_path=False), "you treated mu and var as constants"),
    (_backward(ones=True), "all-ones upstream gradient"),
    (_backward(count=lambda x: x.shape[0]), "m*H*W values"),
    (_backward(swap=True), "dgamma and dbeta are swapped"),
    (lambda dz_tilde, cache: ref.backward(dz_tilde, cache)[0], "return a tuple of 3 arrays (dz, dgamma, dbeta)"),
    (lambda dz_tilde, cache: None, "returned None"),
]


@pytest.mark.parametrize("wrong, message", WRONG_BACKWARD, ids=[m[:30] for _, m in WRONG_BACKWARD])
def test_typical_wrong_backward_is_diagnosed(wrong, message):
    assert message in diagnosis(ch07_backprop.backward, wrong)


def test_a_wrong_dz_that_does_not_sum_to_zero_gets_a_note():
    def backward(dz_tilde, cache):  # right, except for an extra constant in dz
        dz, dgamma, dbeta = ref.backward(dz_tilde, cache)
        return dz + 0.1, dgamma, dbeta

    with pytest.raises(ExerciseError, match="does not sum to 0 over the batch"):
        ch07_backprop.backward(backward)


def test_backward_checker_uses_random_upstream_gradients():
    """The trap the chapter is about: the checker's dz_tilde are not all ones, so dz != 0."""
    for case in ch07_backprop._backward_cases(0):
        dz_tilde, cache = case.args
        assert np.ptp(dz_tilde) > 1
        if dz_tilde.size // dz_tilde.shape[1] > 2:  # with 2 values per feature z_norm = +-1: dz ~ eps
            assert np.abs(ref.backward(dz_tilde, cache)[0]).max() > 1e-3
    shapes = [case.args[0].shape for case in ch07_backprop._backward_cases(0)]
    assert any(len(s) == 4 for s in shapes) and any(len(s) == 2 for s in shapes)


def test_backward_checker_does_not_let_the_learner_corrupt_the_cache():
    def in_place(dz_tilde, cache):
        out = ref.backward(dz_tilde, cache)
        cache.z_norm[...] = 0  # vandalism on the learner's copy
        return out

    ch07_backprop.backward(in_place)


# ---------------------------------------------------------------- typical wrong answers: directional check


def _directional(direction="random", centred=True, in_place=False, seeded=True):
    def directional_error(f, x, grad, h=1e-5, seed=0):
        rng = np.random.default_rng(seed if seeded else None)
        if direction == "ones":
            v = np.ones_like(x)
        elif direction == "one-hot":
            v = np.zeros_like(x)
            v.flat[0] = 1.0
        else:
            v = rng.standard_normal(x.shape)
        if in_place:
            x += h * v
            f_plus = f(x)
            numeric = (f_plus - f(x - 2 * h * v)) / (2 * h)
        elif centred:
            numeric = (f(x + h * v) - f(x - h * v)) / (2 * h)
        else:
            numeric = (f(x + h * v) - f(x)) / h
        analytic = np.sum(grad * v)
        return abs(numeric - analytic) / max(abs(numeric), abs(analytic), 1e-300)

    return directional_error


WRONG_DIRECTIONAL = [
    (_directional(direction="ones"), "all entries equal"),
    (_directional(direction="one-hot"), "one element of x at a time"),
    (_directional(centred=False), "centred difference"),
    (_directional(in_place=True), "changed x in place"),
    (_directional(seeded=False), "same seed"),
    (lambda f, x, grad, h=1e-5, seed=0: 0.0, "never evaluated away from x"),
    (lambda f, x, grad, h=1e-5, seed=0: np.zeros(3), "return one number"),
]


@pytest.mark.parametrize("wrong, message", WRONG_DIRECTIONAL, ids=[m[:30] for _, m in WRONG_DIRECTIONAL])
def test_typical_wrong_directional_check_is_diagnosed(wrong, message):
    assert message in diagnosis(ch07_backprop.directional_error, wrong)


def test_directional_check_with_absolute_error_is_caught():
    def absolute(f, x, grad, h=1e-5, seed=0):
        v = np.random.default_rng(seed).standard_normal(x.shape)
        return abs((f(x + h * v) - f(x - h * v)) / (2 * h) - np.sum(grad * v))  # not relative

    with pytest.raises(ExerciseError, match="1.5 times too large"):
        ch07_backprop.directional_error(absolute)


# ---------------------------------------------------------------- typical wrong answers: folding


def _fold(eps_outside=False, subtract_mean=True, rows=True, scale_b=True):
    def fold(W, b, gamma, beta, mean, var, eps):
        s = gamma / (np.sqrt(var) + eps if eps_outside else np.sqrt(var + eps))
        shape = [1] * W.ndim
        shape[0 if rows else 1] = -1
        W_folded = W * s.reshape(shape)
        b_scaled = b * s if scale_b else b
        b_folded = b_scaled - (mean * s if subtract_mean else 0) + beta
        return W_folded, b_folded

    return fold


WRONG_FOLD = [
    (ch08_folding.fold_linear, _fold(eps_outside=True), "eps belongs inside the square root"),
    (ch08_folding.fold_linear, _fold(subtract_mean=False), "you forgot to subtract the mean from the bias"),
    (ch08_folding.fold_linear, _fold(rows=False), "you scaled the columns (inputs) instead of the rows"),
    (ch08_folding.fold_linear, _fold(scale_b=False), "the layer's own bias b passes through BN too"),
    (ch08_folding.fold_linear, lambda W, b, g, be, mu, var, eps: W, "return a tuple of 2 arrays"),
    (ch08_folding.fold_conv, _fold(rows=False), "you scaled the input channels (axis 1) instead of the output channels"),
    (ch08_folding.fold_conv, _fold(eps_outside=True), "eps belongs inside the square root"),
    (ch08_folding.fold_conv, _fold(subtract_mean=False), "you forgot to subtract the mean from the bias"),
    (ch08_folding.fold_conv,
     lambda W, b, g, be, mu, var, eps: (g / np.sqrt(var + eps) * W, (b - mu) * g / np.sqrt(var + eps) + be),
     "your function raised ValueError"),  # s lined up with the last axis: broadcasting fails on (8, 1, 5, 5)
]


@pytest.mark.parametrize("checker, wrong, message", WRONG_FOLD,
                         ids=[f"{c.__name__}-{m[:30]}" for c, _, m in WRONG_FOLD])
def test_typical_wrong_fold_is_diagnosed(checker, wrong, message):
    assert message in diagnosis(checker, wrong)


def test_every_checker_has_at_least_two_diagnosed_mistakes():
    counts = {
        ch07_backprop.backward: len(WRONG_BACKWARD),
        ch07_backprop.directional_error: len(WRONG_DIRECTIONAL),
        ch08_folding.fold_linear: sum(c is ch08_folding.fold_linear for c, _, _ in WRONG_FOLD),
        ch08_folding.fold_conv: sum(c is ch08_folding.fold_conv for c, _, _ in WRONG_FOLD),
    }
    assert all(n >= 2 for n in counts.values())


def test_fold_reference_agrees_with_torch_fold_bn():
    """The checkers' reference fold is what bnkit.fold_bn does to a Linear + BN pair."""
    torch = pytest.importorskip("torch")
    from bnkit.folding import fold_bn

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4)).double()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.normal_()
        model[1].bias.normal_()
    folded = fold_bn(model)
    lin, bn = model
    W, b = ch08_folding._fold_reference(
        lin.weight.detach().numpy(), lin.bias.detach().numpy(), bn.weight.detach().numpy(),
        bn.bias.detach().numpy(), bn.running_mean.numpy(), bn.running_var.numpy(), bn.eps,
    )
    layer = folded.get_submodule("0")
    np.testing.assert_allclose(layer.weight.detach().numpy(), W, rtol=1e-12)
    np.testing.assert_allclose(layer.bias.detach().numpy(), b, rtol=1e-12)


# ---------------------------------------------------------------- the learners' copies


@pytest.mark.parametrize("chapter", sorted(CHAPTERS))
def test_learners_copy_runs_and_only_the_checks_fail(chapter):
    """In the learners' copy every cell runs except the check cells, which say 'not implemented'."""
    copy = run_learner_copy(_notebook(chapter), str(int(chapter)), CHAPTERS[chapter].parent)
    assert_only_the_checks_fail(copy, "check.")
