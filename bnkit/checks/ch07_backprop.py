"""Exercise checkers for chapter 7, backprop through Batch Norm.

- ``backward(fn)``: ``fn(dz_tilde, cache) -> (dz, dgamma, dbeta)`` against
  ``bnkit.reference.backward``, with *random* upstream gradients.
- ``directional_error(fn)``: a gradient check along a random direction, judged by what it
  catches and by where it evaluates f.

One line on success, an ``ExerciseError`` naming the mistake otherwise.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from bnkit import reference as ref
from bnkit._validate import stat_axes, values_per_feature
from bnkit.checks._core import Case, ExerciseError, Variant, call_learner, check_results

__all__ = ["backward", "directional_error"]


HINT_4D = (
    "for z of shape (m, C, H, W) sum over axes (0, 2, 3), reshape per-channel vectors to "
    "(1, C, 1, 1), and let m be the number of values per channel, m*H*W."
)


def _backward_cases(seed: int) -> list[Case]:
    """(dz_tilde, cache) pairs: random z, gamma of both signs, RANDOM upstream gradients."""
    rng = np.random.default_rng(seed)
    shapes = [  # (shape, eps, extra offset on feature 1, float32, hint)
        ((8, 5), 1e-5, 0.0, False, ""),
        ((2, 3), 1e-3, 0.0, False, ""),
        ((16, 4), 1e-5, 1e4, False, ""),
        ((4, 3, 5, 6), 0.1, 0.0, False, HINT_4D),
        ((2, 4, 3, 5), 1e-3, 0.0, False, HINT_4D),
        ((10, 7), 1e-5, 0.0, True, ""),
    ]
    cases = []
    for shape, eps, offset, f32, hint in shapes:
        n, nd = shape[1], len(shape)
        spread = rng.uniform(0.5, 3.0, n).reshape((1, n) + (1,) * (nd - 2))
        z = rng.normal(size=shape) * spread + rng.normal(0, 3, n).reshape(spread.shape)
        z[:, 1] += offset
        gamma = rng.uniform(0.5, 2.0, n) * rng.choice([-1.0, 1.0], n)
        beta = rng.normal(0, 2, n)
        dz_tilde = rng.normal(size=shape)  # random upstream gradient: all-ones would give dz = 0
        dtype = np.float32 if f32 else np.float64
        z, gamma, beta, dz_tilde = (a.astype(dtype) for a in (z, gamma, beta, dz_tilde))
        _, cache = ref.forward_train(z, gamma, beta, eps)
        label = f"z of shape {shape}{', float32' if f32 else ''}, eps = {eps:g}"
        if offset:
            label += f", feature 1 offset by {offset:g}"
        cases.append(Case(label, (dz_tilde, cache), hint))
    return cases


def _wrong_backward(
    mu_path: bool = True,
    var_path: bool = True,
    gamma: bool = True,
    ones: bool = False,
    eps_outside: str = "",
    batch_count: bool = False,
    no_eps: bool = False,
    ddof: int = 0,
) -> Variant:
    """A backward pass with one typical mistake (staged form, like bnkit.reference.backward_staged)."""

    def f(dz_tilde: np.ndarray, cache: ref.Cache) -> tuple:
        z_new, var, z_norm, g, eps = cache.z_new, cache.var, cache.z_norm, cache.gamma, cache.eps
        axes, nd = stat_axes(z_new.ndim), z_new.ndim
        vec = lambda v: v.reshape((1, -1) + (1,) * (nd - 2))  # noqa: E731
        m = z_new.shape[0] if batch_count else values_per_feature(z_new.shape)
        if ones:
            dz_tilde = np.ones_like(dz_tilde)
        std = np.sqrt(var) + eps if eps_outside else np.sqrt(var + (0.0 if no_eps else eps))
        dbeta = dz_tilde.sum(axis=axes)
        dgamma = (dz_tilde * z_norm).sum(axis=axes)
        dz_norm = dz_tilde * vec(g) if gamma else dz_tilde
        if eps_outside == "closed":  # closed form with k = gamma / (m (sqrt(var) + eps))
            mean = lambda x: x.sum(axis=axes) / m  # noqa: E731
            return (dz_norm - vec(mean(dz_norm)) - z_norm * vec(mean(dz_norm * z_norm))) / vec(std), dgamma, dbeta
        dz_new = dz_norm / vec(std)
        if var_path:
            dvar = -0.5 * (dz_norm * z_new).sum(axis=axes) / std**3
            dz_new = dz_new + vec(dvar) * 2.0 * z_new / (m - ddof)
        dz = dz_new - vec(dz_new.sum(axis=axes)) / m if mu_path else dz_new
        return dz, dgamma, dbeta

    return f


_BACKWARD_DIAGNOSES = [
    (_wrong_backward(ones=True), "dz",
     "your dz is 0 everywhere. That is what an all-ones upstream gradient gives (dz = 0 exactly), "
     "so did you use np.ones_like(...) instead of dz_tilde? Use the dz_tilde you are given"),
    (_wrong_backward(mu_path=False, var_path=False), "dz",
     "you treated mu and var as constants (as at test time), dz = gamma dz_tilde / sqrt(var + eps): "
     "during training every z_i also moves mu and var, so dz has two more terms"),
    (_wrong_backward(mu_path=False), "dz",
     "you left out the path through mu (step 1): your dz does not sum to 0 over the batch. Every z_i "
     "moves mu, so add dmu / m with dmu = -sum_i dz_new_i"),
    (_wrong_backward(var_path=False), "dz",
     "you left out the path through var (step 3): z_new reaches z_norm directly and through var, so "
     "add dvar * 2 z_new / m with dvar = -1/2 sum_i dz_norm_i z_new_i (var + eps)^(-3/2)"),
    (_wrong_backward(gamma=False), "dz",
     "you forgot gamma: step 5 multiplies by gamma, so dz_norm = gamma * dz_tilde"),
    (_wrong_backward(eps_outside="staged"), "dz", "eps belongs inside the square root: sqrt(var + eps)"),
    (_wrong_backward(eps_outside="closed"), "dz", "eps belongs inside the square root: sqrt(var + eps)"),
    (_wrong_backward(batch_count=True), "dz",
     "for (m, C, H, W) input each channel's statistics are over m*H*W values: use that count, not "
     "z.shape[0], as m in the backward pass"),
    (lambda dz_tilde, c: (None,) + ref.backward(dz_tilde, c)[:0:-1], "dgamma",
     "dgamma and dbeta are swapped: dgamma = sum_i dz_tilde_i z_norm_i, dbeta = sum_i dz_tilde_i"),
    (lambda dz_tilde, c: (None, (dz_tilde * c.z_new).sum(axis=stat_axes(c.z_new.ndim)), None), "dgamma",
     "dgamma multiplies dz_tilde by z_norm (what gamma scales), not by z_new"),
    (lambda dz_tilde, c: (None, None, dz_tilde.mean(axis=stat_axes(dz_tilde.ndim))), "dbeta",
     "dbeta is a sum over the batch, not a mean: dbeta = sum_i dz_tilde_i"),
    (_wrong_backward(no_eps=True), "dz",
     "you left out eps: the forward pass divided by sqrt(var + eps), so the backward pass does too"),
    (_wrong_backward(ddof=1), "dz",
     "you divided by m-1 in the path through var: the forward pass used the biased 1/m variance, "
     "so d var / d z_i = 2 z_new_i / m"),
    (lambda dz_tilde, c: (-ref.backward(dz_tilde, c)[0], None, None), "dz",
     "the sign of dz is flipped: dz = gamma / (m sqrt(var + eps)) * (m dz_tilde - dbeta - z_norm dgamma)"),
]


def _sum_note(result: str, error: ExerciseError, case: Case, got: np.ndarray) -> str:
    """For a wrong dz: say whether it sums to 0 over the batch, as the true dz always does."""
    if result != "dz" or "wrong values" not in str(error):
        return ""
    dz_tilde = case.args[0]
    if got.shape != dz_tilde.shape:
        return ""
    total = np.abs(got.sum(axis=stat_axes(got.ndim)))
    size = np.abs(got).sum(axis=stat_axes(got.ndim)) + 1e-30
    if np.max(total / size) > 1e-6:
        return (" Also, your dz does not sum to 0 over the batch, which the true dz always does (BN's "
                "output does not change when every z_i of a feature moves by the same amount): check "
                "the path through mu.")
    return ""


def backward(fn: Callable, seed: int = 0) -> None:
    """Check ``fn(dz_tilde, cache) -> (dz, dgamma, dbeta)`` with random upstream gradients.

    cache is the ``bnkit.reference.Cache`` of forward_train (cache.z_norm, .var, .gamma, .eps, .z_new).
    """
    __tracebackhide__ = True
    check_results("backward", fn, ref.backward, _backward_cases(seed), ("dz", "dgamma", "dbeta"),
                  _BACKWARD_DIAGNOSES, extra=_sum_note)


# ---------------------------------------------------------------- a gradient check along a direction


class _Spy:
    """A scalar function that remembers every point it was evaluated at."""

    def __init__(self, f: Callable[[np.ndarray], float]) -> None:
        self.f, self.points = f, []

    def __call__(self, x: np.ndarray) -> float:
        self.points.append(np.array(x, dtype=np.float64))
        return self.f(x)


def _bn_loss(seed: int) -> tuple[Callable, np.ndarray, np.ndarray, np.ndarray]:
    """L(z) = sum(dz_tilde * BN(z)) with a random dz_tilde: z, its true gradient and a wrong one."""
    rng = np.random.default_rng(seed + 1000)  # not the learner's direction stream: v must not be parallel to z
    z = rng.normal(size=(6, 4)) * 2 + 1
    gamma, beta = rng.uniform(0.5, 2, 4), rng.normal(size=4)
    dz_tilde = rng.normal(size=(6, 4))
    loss = lambda x: float(np.sum(dz_tilde * ref.forward_train(x, gamma, beta)[0]))  # noqa: E731
    _, cache = ref.forward_train(z, gamma, beta)
    no_var_path = _wrong_backward(var_path=False)(dz_tilde, cache)[0]
    return loss, z, ref.backward(dz_tilde, cache)[0], no_var_path


def _run_check(name: str, fn: Callable, f: Callable, x: np.ndarray, grad: np.ndarray, h: float, seed: int):
    """Call the learner's check; return (its result as a float, the spy)."""
    spy, x_in = _Spy(f), x.copy()
    out = call_learner(name, fn, (spy, x_in, grad.copy()), dict(h=h, seed=seed))
    if out is None:
        raise ExerciseError(f"{name}: your function returned None: did you forget `return`?")
    try:
        value = float(out)
    except (TypeError, ValueError):
        raise ExerciseError(f"{name}: return one number (the relative error), got {type(out).__name__}") from None
    if not np.array_equal(x_in, x):
        raise ExerciseError(f"{name}: your function changed x in place: evaluate f at new arrays x + h*v and x - h*v")
    return value, spy


def _directions(spy: _Spy, x: np.ndarray, h: float) -> list[np.ndarray]:
    """The steps (p - x) / h of the points f was evaluated at, other than x itself."""
    steps = [(p - x) / h for p in spy.points if p.shape == x.shape]
    return [d for d in steps if np.max(np.abs(d)) > 1e-9]


_DEFINITIONS = {  # relative-error definitions learners write, as functions of (numeric, analytic)
    "max(|numeric|, |analytic|)": lambda n, a: abs(n - a) / max(abs(n), abs(a)),
    "|numeric|": lambda n, a: abs(n - a) / abs(n),
    "|analytic|": lambda n, a: abs(n - a) / abs(a),
    "|numeric| + |analytic|": lambda n, a: abs(n - a) / (abs(n) + abs(a)),
    "min(|numeric|, |analytic|)": lambda n, a: abs(n - a) / min(abs(n), abs(a)),
    "max(|numeric|, |analytic|), without the absolute value on top": lambda n, a: (n - a) / max(abs(n), abs(a)),
    "nothing (the absolute error)": lambda n, a: abs(n - a),
}


def _check_relative_errors(name: str, values: list[float], factors: tuple) -> None:
    """values must be the relative errors of gradients `factors` times the true one: say which
    definition the learner used when it is a known other one."""
    right = _DEFINITIONS["max(|numeric|, |analytic|)"]
    if all(math.isfinite(v) and math.isclose(v, right(1.0, f), rel_tol=1e-5) for v, f in zip(values, factors)):
        return
    for what, define in list(_DEFINITIONS.items())[1:]:
        if all(math.isfinite(v) and math.isclose(v, define(1.0, f), rel_tol=1e-3) for v, f in zip(values, factors)):
            break
    else:
        what = ""
    v, f = next((v, f) for v, f in zip(values, factors)
                if not (math.isfinite(v) and math.isclose(v, right(1.0, f), rel_tol=1e-5)))
    which = {1.5: "1.5 times too large", 0.5: "half the true one", -1.0: "of the wrong sign"}.get(f, f"{f:g} times the true one")
    said = (f"for a gradient {which} you returned {v:.4g}, expected "
            f"|numeric - analytic| / max(|numeric|, |analytic|) = {right(1.0, f):.4g}")
    if what and not what.startswith("nothing"):
        raise ExerciseError(f"{name}: you divided by {what}: {said}")
    raise ExerciseError(f"{name}: {said} (numeric is the centred difference, analytic = np.sum(grad * v))")


def _check_direction(name: str, steps: list[np.ndarray], x: np.ndarray, h: float, seed: int) -> None:
    """The points are x + h v and x - h v with v = np.random.default_rng(seed).standard_normal(x.shape)."""
    v = np.random.default_rng(seed).standard_normal(x.shape)
    if any(np.allclose(d, v, rtol=1e-6, atol=1e-9) for d in steps):
        return
    for d in steps:
        c = float(np.sum(d * v) / np.sum(v * v))
        if np.allclose(d, c * v, rtol=1e-6, atol=1e-9):
            raise ExerciseError(
                f"{name}: your step is {c:.4g} * h * v, not h * v: use the h you are given "
                "(f at x + h*v and x - h*v)"
            )
    raise ExerciseError(
        f"{name}: your direction is not v = np.random.default_rng(seed).standard_normal(x.shape): "
        "draw v exactly so (a standard normal, from the seed you are given), so that the same seed "
        "gives the same test"
    )


def directional_error(fn: Callable, seed: int = 0) -> None:
    """Check ``fn(f, x, grad, h=1e-5, seed=0) -> float``: the relative error of grad along a random direction.

    A correct answer evaluates f at x + h v and x - h v for one random v (all of x moves),
    returns |numeric - <grad, v>| / max(|numeric|, |<grad, v>|), is small for right gradients
    and large for wrong ones, and leaves x unchanged.
    """
    __tracebackhide__ = True
    name = "directional_error"
    if not callable(fn):
        raise ExerciseError(f"{name}: expected a function, got {type(fn).__name__}")
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(5, 4))
    x = rng.normal(size=(5, 4)) + 2.0
    quadratic = lambda y: float(np.sum(a * y * y))  # noqa: E731  a quadratic: centred differences are exact
    grad = 2 * a * x
    h = 1e-3

    value, spy = _run_check(name, fn, quadratic, x, grad, h, seed)
    steps = _directions(spy, x, h)
    if not steps:
        raise ExerciseError(f"{name}: f was never evaluated away from x: evaluate f(x + h*v) and f(x - h*v)")
    if any(np.ptp(d) < 1e-9 for d in steps):
        raise ExerciseError(
            f"{name}: your direction v has all entries equal (all ones?). Along it BN's output does "
            "not change, and the part of a wrong gradient that sums to 0 goes unseen: draw v at "
            "random, v = np.random.default_rng(seed).standard_normal(x.shape)"
        )
    if any(np.count_nonzero(np.abs(d) > 1e-9) == 1 for d in steps):
        raise ExerciseError(
            f"{name}: you moved one element of x at a time: that checks one partial derivative. "
            "Move all of x at once along a random direction v, x + h*v"
        )
    if not any(np.allclose(d, -e, atol=1e-6) for i, d in enumerate(steps) for e in steps[i + 1:]):
        raise ExerciseError(
            f"{name}: use the centred difference (f(x + h v) - f(x - h v)) / (2h), evaluated on both "
            "sides of x: a one-sided difference has an error of order h"
        )
    if math.isfinite(value) and value < 0:
        raise ExerciseError(
            f"{name}: your relative error is negative ({value:.3g}) for a correct gradient: take the "
            "absolute value, |numeric - analytic| / max(|numeric|, |analytic|)"
        )
    if not math.isfinite(value) or not 0 <= value < 1e-6:
        raise ExerciseError(
            f"{name}: for a correct gradient of a quadratic you returned {value:.3g}; the centred "
            "difference is exact there, so expect round-off (< 1e-6). Return "
            "|numeric - <grad, v>| / max(|numeric|, |<grad, v>|), with <grad, v> = np.sum(grad * v)"
        )
    _check_direction(name, steps, x, h, seed)
    factors = (1.5, 0.5, -1.0)  # too large, too small, the wrong sign
    _check_relative_errors(name, [_run_check(name, fn, quadratic, x, f * grad, h, seed)[0] for f in factors], factors)
    zero, _ = _run_check(name, fn, lambda y: 3.0, x, np.zeros_like(x), h, seed)
    if zero != 0.0:
        raise ExerciseError(
            f"{name}: for a constant f and a zero gradient (numeric = analytic = 0) you returned "
            f"{zero:.3g}: return 0 when both are 0 (0/0 is not an error of the gradient)"
        )
    loss, z, dz, dz_no_var = _bn_loss(seed)
    right, _ = _run_check(name, fn, loss, z, dz, 1e-5, seed)
    if not math.isfinite(right) or not 0 <= right < 1e-5:
        raise ExerciseError(
            f"{name}: for the correct gradient of a Batch Norm loss you returned {right:.3g}, expected "
            "< 1e-5 (with h = 1e-5)"
        )
    caught, _ = _run_check(name, fn, loss, z, dz_no_var, 1e-5, seed)
    if not math.isfinite(caught) or caught < 1e-3:
        raise ExerciseError(
            f"{name}: your check passed ({caught:.3g}) a backward pass that leaves out the path "
            "through var: draw a fresh random direction from the seed you are given"
        )
    again, _ = _run_check(name, fn, loss, z, dz_no_var, 1e-5, seed)
    if again != caught:
        raise ExerciseError(f"{name}: two calls with the same seed gave different results: draw v from `seed`")
    print(f"✓ {name}: exact on a quadratic, catches wrong gradients, leaves x alone (5 checks)")


