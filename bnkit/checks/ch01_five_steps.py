"""Exercise checkers for chapter 1, the five steps of Batch Norm.

    batch_mean(fn)      fn(z) -> mu                               step 1
    center(fn)          fn(z, mu) -> z_new                        step 2
    batch_variance(fn)  fn(z_new) -> var                          step 3
    normalize(fn)       fn(z_new, var, eps) -> z_norm             step 4
    scale_shift(fn)     fn(z_norm, gamma, beta) -> z_tilde        step 5
    forward_train(fn)   fn(z, gamma, beta, eps) -> (z_tilde, cache)
    is_batch_normalized(fn)  fn(z_tilde, gamma, beta) -> bool: a property test of BN's output

Each compares the learner's function with ``bnkit.reference`` on several cases ((m, n) and
(m, C, H, W) inputs, m = 2, a feature with a large offset, a constant feature, float32) and
names the mistake when the output matches a known wrong variant (1/(m-1), the wrong axis,
eps outside the root, ...).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from bnkit import reference as ref
from bnkit._validate import stat_axes, values_per_feature
from bnkit.checks._core import Case, ExerciseError, Variant, call_learner, check_function

__all__ = ["batch_mean", "center", "batch_variance", "normalize", "scale_shift", "forward_train",
           "is_batch_normalized"]


def _vec(v: np.ndarray, ndim: int) -> np.ndarray:
    """A per-feature vector (n,) reshaped to broadcast against z: (1, n) or (1, C, 1, 1)."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _wrong_axes(ndim: int) -> tuple[int, ...]:
    """The axes a learner mixes up with the batch axes: the feature axes (per-example statistics)."""
    return (1,) if ndim == 2 else (1, 2, 3)


HINT_4D = (
    "for z of shape (m, C, H, W) the statistics are per channel, over axes (0, 2, 3), and a "
    "per-channel vector of shape (C,) must be reshaped to (1, C, 1, 1) to broadcast against z."
)


def _batches(seed: int) -> list[tuple[str, np.ndarray, str]]:
    """(label, z, hint) for every kind of input: features with different means and spreads."""
    rng = np.random.default_rng(seed)

    def z2(m: int, n: int) -> np.ndarray:  # (m, n), feature j has mean ~ N(0, 3), spread in [0.5, 3]
        return rng.normal(size=(m, n)) * rng.uniform(0.5, 3, n) + rng.normal(0, 3, n)

    offset = z2(16, 4)
    offset[:, 2] += 1e4  # one feature sitting far from 0
    constant = z2(6, 5)
    constant[:, 1] = 2.5  # one feature with the same value in every example: var = 0
    z4 = rng.normal(size=(4, 3, 5, 6)) * rng.uniform(0.5, 3, (1, 3, 1, 1)) + rng.normal(0, 3, (1, 3, 1, 1))
    z4_32 = rng.normal(size=(2, 4, 3, 5)) + rng.normal(0, 3, (1, 4, 1, 1))
    return [
        ("z of shape (8, 5), (m, n)", z2(8, 5), ""),
        ("z of shape (2, 3): m = 2, the smallest batch", z2(2, 3), ""),
        ("z of shape (16, 4) with feature 2 offset by 10000", offset, ""),
        ("z of shape (6, 5) with feature 1 constant (var = 0)", constant, ""),
        ("z of shape (10, 7), float32", z2(10, 7).astype(np.float32), ""),
        ("z of shape (4, 3, 5, 6), (m, C, H, W)", z4, HINT_4D),
        ("z of shape (2, 4, 3, 5), (m, C, H, W) float32", z4_32.astype(np.float32), HINT_4D),
    ]


def _params(z: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """gamma (some negative) and beta, shape (n,) or (C,), in z's dtype, never equal to each other."""
    rng = np.random.default_rng(seed)
    n = z.shape[1]
    gamma = rng.uniform(0.5, 2.0, n) * rng.choice([-1.0, 1.0], n)
    beta = rng.normal(0, 2, n) + 5.0  # shifted away from gamma's range
    return gamma.astype(z.dtype), beta.astype(z.dtype)


_EPS = (1e-5, 1e-3, 0.5, 1e-5, 0.1, 1e-5, 0.2)  # one per batch: large eps makes eps mistakes visible


def _stages(seed: int) -> list[tuple[str, dict[str, Any], str]]:
    """Every intermediate of the five steps for each batch, computed with bnkit.reference."""
    out = []
    for k, (label, z, hint) in enumerate(_batches(seed)):
        gamma, beta = _params(z, seed + k)
        eps = _EPS[k % len(_EPS)]
        mu = ref.batch_mean(z)
        z_new = ref.center(z, mu)
        var = ref.batch_variance(z_new)
        z_norm = ref.normalize(z_new, var, eps)
        s = dict(z=z, mu=mu, z_new=z_new, var=var, eps=eps, z_norm=z_norm, gamma=gamma, beta=beta)
        out.append((label, s, hint))
    return out


def _cases(seed: int, *names: str) -> list[Case]:
    """Cases whose arguments are the named stages, e.g. _cases(0, "z_new", "var", "eps")."""
    cases = []
    for label, s, hint in _stages(seed):
        if "eps" in names:
            label = f"{label}, eps = {s['eps']:g}"
        cases.append(Case(label, tuple(s[k] for k in names), hint))
    return cases


def _given(seed: int, what: str) -> list[Case]:
    """Cases where mu or var is given, not z's own (at test time: the running statistics)."""
    rng = np.random.default_rng(seed + 100)
    out = []
    for label, s, hint in _stages(seed)[::3]:
        z, eps = s["z"], s["eps"]
        n = z.shape[1]
        if what == "mu":
            mu = (s["mu"] + rng.normal(0, 1, n)).astype(z.dtype)
            out.append(Case(f"{label}, mu given (a running mean, not z's own)", (z, mu), hint))
        else:
            var = (s["var"] * rng.uniform(0.5, 2, n)).astype(z.dtype)
            out.append(Case(f"{label}, eps = {eps:g}, var given (a running variance, not "
                            "z_new's own)", (s["z_new"], var, eps), hint))
    return out


def _mean(x: np.ndarray, axes: tuple[int, ...] | None = None, **kw: Any) -> np.ndarray:
    return x.mean(axis=stat_axes(x.ndim) if axes is None else axes, **kw)


def _only_4d(z: np.ndarray, axes: tuple[int, ...]) -> tuple[int, ...]:
    """The axes, for a mistake only possible with (m, C, H, W) input; else not applicable."""
    if z.ndim != 4:
        raise ValueError("this mistake needs (m, C, H, W) input")
    return axes


def _count_mistakes(total: Callable, what: str) -> list[tuple[Variant, str]]:
    """Dividing a channel's sum by the wrong count (for (m, C, H, W) input)."""
    return [
        (lambda z: total(z, _only_4d(z, (0, 2, 3))) / z.shape[0],
         f"you divided by m, not by m*H*W: for (m, C, H, W) input a channel's {what} is over "
         "all m*H*W values, so divide by z.size // C"),
    ]


def _reduction_mistakes(reduce: Callable[..., np.ndarray], what: str) -> list[tuple[Variant, str]]:
    """Axis and shape mistakes shared by every per-feature statistic (step 1 and step 3)."""
    return [
        (lambda z: reduce(z, _wrong_axes(z.ndim)),
         f"you took the {what} over the wrong axis: statistics are per feature, over the batch "
         "axis 0 (axes (0, 2, 3) for (m, C, H, W)), so the result has one value per feature, shape (n,)"),
        (lambda z: reduce(z, _only_4d(z, (0,))),
         f"for (m, C, H, W) input you took the {what} over the batch axis only: a channel's "
         "statistics are over all m*H*W values, axes (0, 2, 3), giving shape (C,)"),
        (lambda z: reduce(z, tuple(range(z.ndim))),
         f"you took one {what} of all the values: Batch Norm keeps one per feature, shape (n,)"),
        (lambda z: reduce(z, stat_axes(z.ndim), keepdims=True),
         f"the {what} should have shape (n,) or (C,), one value per feature: drop keepdims=True"),
    ]


# ---------------------------------------------------------------- the checkers, one per step


def batch_mean(fn: Callable, seed: int = 0) -> None:
    """Step 1: check ``fn(z) -> mu``, shape (n,) or (C,)."""
    diagnoses = _reduction_mistakes(lambda z, axes, **kw: _mean(z, axes, **kw), "mean") + [
        (lambda z: z.sum(axis=stat_axes(z.ndim)),
         "you summed but did not divide by m: mu = 1/m sum_i z_i"),
        (lambda z: z.sum(axis=stat_axes(z.ndim)) / (values_per_feature(z.shape) - 1),
         "you divided by m-1: the mean is 1/m sum_i z_i"),
        (lambda z: np.median(z, axis=stat_axes(z.ndim)),
         "you took the median: step 1 is the mean, mu = 1/m sum_i z_i"),
        (lambda z: _mean(z[:-1]), "you left out the last example (an off-by-one in the range "
         "of examples): average all m of them"),
        (lambda z: _mean(z[1:]), "you left out the first example (an off-by-one in the range "
         "of examples): average all m of them"),
        (lambda z: z.reshape(-1, z.shape[1]).mean(axis=0) if z.ndim == 4 else _only_4d(z, ()),
         "for (m, C, H, W) input, z.reshape(-1, C) mixes the channels (it cuts the memory "
         "order m, C, H, W into rows of C values): move the channel axis last first, or "
         "average over axes (0, 2, 3)"),
    ] + _count_mistakes(lambda z, axes: z.sum(axis=axes), "mean")
    check_function("batch_mean", fn, ref.batch_mean, _cases(seed, "z"), diagnoses)


def center(fn: Callable, seed: int = 0) -> None:
    """Step 2: check ``fn(z, mu) -> z_new``, the shape of z."""
    diagnoses = [
        (lambda z, mu: _vec(mu, z.ndim) - z, "wrong sign: z_new = z - mu, not mu - z"),
        (lambda z, mu: z + _vec(mu, z.ndim), "you added mu: centring subtracts it, z_new = z - mu"),
        (lambda z, mu: z - z.mean(axis=_wrong_axes(z.ndim), keepdims=True),
         "you subtracted each example's own mean (the wrong axis): subtract mu, the per-feature "
         "mean over the batch"),
        (lambda z, mu: z - mu.mean(), "you subtracted one number from everything: subtract each feature's own mu"),
        (lambda z, mu: z, "you returned z unchanged: subtract mu"),
        (lambda z, mu: z - z.mean(axis=stat_axes(z.ndim), keepdims=True),
         "you ignored the mu passed in and subtracted z's own batch mean: subtract the mu you "
         "are given (at test time it is the running mean, not z's mean)"),
        (lambda z, mu: z - mu.flat[0], "you subtracted one number from everything (mu[0]): "
         "subtract each feature's own mu"),
        (lambda z, mu: z / _vec(mu, z.ndim), "you divided by mu: centring subtracts it, z_new = z - mu"),
        (lambda z, mu: z - 2 * _vec(mu, z.ndim), "you subtracted mu twice: z_new = z - mu"),
    ]
    check_function("center", fn, ref.center, _cases(seed, "z", "mu") + _given(seed, "mu"), diagnoses)


def batch_variance(fn: Callable, seed: int = 0) -> None:
    """Step 3: check ``fn(z_new) -> var``, shape (n,) or (C,), the biased (1/m) variance."""
    sq_mean = lambda x, axes, **kw: _mean(x * x, axes, **kw)  # noqa: E731
    diagnoses = _reduction_mistakes(sq_mean, "variance") + [
        (lambda x: (x * x).sum(axis=stat_axes(x.ndim)) / (values_per_feature(x.shape) - 1),
         "you divided by m-1: at training time BN uses the biased 1/m (the batch's own variance), "
         "not the unbiased 1/(m-1)"),
        (lambda x: _mean(x * x) ** 0.5,
         "you returned the standard deviation: step 3 is the variance sigma^2, no square root "
         "yet (that comes in step 4)"),
        (lambda x: 0.0 * _mean(x),
         "your variance is 0 for every feature: square each value, then average, "
         "var = 1/m sum_i (z_new_i)^2 (not 1/m sum_i z_new_i, nor its square: z_new has mean 0)"),
        (lambda x: _mean(np.abs(x)), "you averaged |z_new|: square each value instead, 1/m sum_i (z_new_i)^2"),
        (lambda x: (x * x).sum(axis=stat_axes(x.ndim)), "you summed the squares but did not divide by m"),
        (lambda x: _mean(x * x) ** 2, "you squared the variance: var = 1/m sum_i (z_new_i)^2, "
         "the mean of the squares, not its square"),
    ] + _count_mistakes(lambda x, axes: (x * x).sum(axis=axes), "variance")
    check_function("batch_variance", fn, ref.batch_variance, _cases(seed, "z_new"), diagnoses)


def normalize(fn: Callable, seed: int = 0) -> None:
    """Step 4: check ``fn(z_new, var, eps) -> z_norm``, the shape of z_new."""
    diagnoses = [
        (lambda x, var, eps: x / _vec(var**0.5 + eps, x.ndim),
         "eps belongs inside the square root: divide by sqrt(var + eps), not sqrt(var) + eps"),
        (lambda x, var, eps: x / _vec(var**0.5, x.ndim),
         "you left out eps: divide by sqrt(var + eps), so that a feature with var = 0 gives 0, not 0/0"),
        (lambda x, var, eps: x / _vec(var + eps, x.ndim),
         "you divided by the variance: divide by the standard deviation sqrt(var + eps)"),
        (lambda x, var, eps: x * _vec((var + eps) ** 0.5, x.ndim),
         "you multiplied by sqrt(var + eps): divide by it"),
        (lambda x, var, eps: x / np.sqrt(np.mean(var) + eps),
         "you divided by one number for all features: each feature uses its own var"),
        (lambda x, var, eps: x / _vec(np.sqrt(var + eps**2), x.ndim),
         "you added eps**2: eps is added as it is, sqrt(var + eps)"),
        (lambda x, var, eps: x / _vec(np.sqrt(var + 1e-5), x.ndim),
         "you used eps = 1e-5 whatever the argument: use the eps passed in"),
        (lambda x, var, eps: x / _vec(np.sqrt(_mean(x * x) + eps), x.ndim),
         "you recomputed the variance from z_new: use the var passed in (at test time it is the "
         "running variance, not z_new's own)"),
        (lambda x, var, eps: x / _vec(np.sqrt(_mean(x * x) * len(x) / (len(x) - 1)) + eps, x.ndim),
         "you divided by z_new's own standard deviation (unbiased, with eps outside the root): "
         "use the var passed in, sqrt(var + eps)"),
    ]
    cases = _cases(seed, "z_new", "var", "eps") + _given(seed, "var")
    check_function("normalize", fn, ref.normalize, cases, diagnoses)


def scale_shift(fn: Callable, seed: int = 0) -> None:
    """Step 5: check ``fn(z_norm, gamma, beta) -> z_tilde``, the shape of z_norm."""
    diagnoses = [
        (lambda x, g, b: _vec(b, x.ndim) * x + _vec(g, x.ndim),
         "gamma and beta are swapped: gamma scales and beta shifts, z_tilde = gamma * z_norm + beta"),
        (lambda x, g, b: _vec(g, x.ndim) * x, "you left out beta: z_tilde = gamma * z_norm + beta"),
        (lambda x, g, b: x + _vec(b, x.ndim), "you left out gamma: z_tilde = gamma * z_norm + beta"),
        (lambda x, g, b: _vec(g, x.ndim) * (x + _vec(b, x.ndim)),
         "beta is added after scaling: gamma * z_norm + beta, not gamma * (z_norm + beta)"),
        (lambda x, g, b: x, "you returned z_norm unchanged: scale by gamma and shift by beta"),
        (lambda x, g, b: _vec(np.abs(g), x.ndim) * x + _vec(b, x.ndim),
         "you used |gamma|: gamma may be negative, and then it flips the feature's sign"),
        (lambda x, g, b: _vec(g, x.ndim) * x - _vec(b, x.ndim), "you subtracted beta: z_tilde = gamma * z_norm + beta"),
        (lambda x, g, b: x / _vec(g, x.ndim) + _vec(b, x.ndim), "you divided by gamma: gamma multiplies, z_tilde = gamma * z_norm + beta"),
        (lambda x, g, b: g.flat[0] * x + _vec(b, x.ndim),
         "you used gamma[0] for every feature: each feature has its own gamma"),
    ]
    check_function("scale_shift", fn, ref.scale_shift, _cases(seed, "z_norm", "gamma", "beta"), diagnoses)


def forward_train(fn: Callable, seed: int = 0) -> None:
    """Steps 1-5 at once: check ``fn(z, gamma, beta, eps) -> z_tilde`` (or ``(z_tilde, cache)``)."""

    @functools.wraps(fn)
    def z_tilde_of(*args: Any) -> Any:  # accept functions that return (z_tilde, cache) too
        out = fn(*args)
        return out[0] if isinstance(out, tuple) else out

    def variant(axes: Callable = stat_axes, ddof: int = 0, eps_inside: bool = True, swap: bool = False) -> Variant:
        def f(z: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
            ax = axes(z.ndim)
            z_new = z - z.mean(axis=ax, keepdims=True)
            count = math.prod(z.shape[a] for a in ax)
            var = (z_new * z_new).sum(axis=ax, keepdims=True) / (count - ddof)
            std = np.sqrt(var + eps) if eps_inside else np.sqrt(var) + eps
            g, b = (b, g) if swap else (g, b)
            return _vec(g, z.ndim) * (z_new / std) + _vec(b, z.ndim)

        return f

    diagnoses = [
        (variant(axes=_wrong_axes), "you normalised over the wrong axis: statistics are per feature, "
         "over the batch axis 0 (axes (0, 2, 3) for (m, C, H, W))"),
        (variant(ddof=1), "you divided by m-1: at training time BN uses the biased 1/m variance"),
        (variant(eps_inside=False), "eps belongs inside the square root: sqrt(var + eps)"),
        (variant(swap=True), "gamma and beta are swapped: z_tilde = gamma * z_norm + beta"),
    ]
    reference = lambda z, g, b, eps: ref.forward_train(z, g, b, eps)[0]  # noqa: E731
    cases = _cases(seed, "z", "gamma", "beta", "eps")
    check_function("forward_train", z_tilde_of, reference, cases, diagnoses)


# ---------------------------------------------------------------- a property test of BN's output


def _outputs(seed: int) -> list[tuple[str, tuple, bool, str]]:
    """(label, (z_tilde, gamma, beta), whether it is a right BN output, what was done)."""
    out = []
    for k, (label, s, _) in enumerate(_stages(seed)):
        z, gamma, beta, eps = s["z"], s["gamma"], s["beta"], s["eps"]
        if "constant" in label:
            continue  # a constant feature has spread 0, not |gamma|: left out of this exercise
        eps = 1e-5
        right = ref.forward_train(z, gamma, beta, eps)[0]
        std = right.astype(np.float64).std(axis=stat_axes(z.ndim))
        if not np.allclose(std, np.abs(gamma), rtol=1e-4):  # a feature with a tiny spread: eps shows
            continue
        out.append((f"the right output for {label}", (right, gamma, beta), True, ""))
        m = values_per_feature(z.shape)
        z_new = z - _vec(_mean(z), z.ndim)
        wrong = {
            "normalised with the unbiased (1/(m-1)) variance":
                z_new / _vec(np.sqrt(_mean(z_new**2) * m / (m - 1) + eps), z.ndim),
            "with eps outside the square root (eps = 0.5)":
                z_new / _vec(np.sqrt(_mean(z_new**2)) + 0.5, z.ndim),
        }
        for what, z_norm in wrong.items():
            out.append((f"an output {what}, for {label}", (_vec(gamma, z.ndim) * z_norm + _vec(beta, z.ndim),
                                                            gamma, beta), False, what))
        norm = ref.forward_train(z, np.ones_like(gamma), np.zeros_like(beta), eps)[0]
        per_example = (z - z.mean(axis=_wrong_axes(z.ndim), keepdims=True)) / np.sqrt(
            z.var(axis=_wrong_axes(z.ndim), keepdims=True) + eps)
        for what, z_tilde in [
            ("normalised over the wrong axis (each example over its features)",
             _vec(gamma, z.ndim) * per_example + _vec(beta, z.ndim)),
            ("with gamma and beta swapped", _vec(beta, z.ndim) * norm + _vec(gamma, z.ndim)),
            ("with beta left out", _vec(gamma, z.ndim) * norm),
        ]:
            out.append((f"an output {what}, for {label}", (z_tilde.astype(z.dtype), gamma, beta), False, what))
    return out


def is_batch_normalized(fn: Callable, seed: int = 0) -> None:
    """Check ``fn(z_tilde, gamma, beta) -> bool``: True for every right training-mode BN output
    (per feature: mean beta, biased standard deviation |gamma|, to a relative 1e-3), False for
    the outputs of typical wrong implementations."""
    __tracebackhide__ = True
    name = "is_batch_normalized"
    if not callable(fn):
        raise ExerciseError(f"{name}: expected a function, got {type(fn).__name__}")
    for label, args, right, what in _outputs(seed):
        verdict = call_learner(name, fn, [a.copy() for a in args], label=label)
        if not isinstance(verdict, (bool, np.bool_)):
            shape = getattr(verdict, "shape", None)
            raise ExerciseError(
                f"{name}: return one bool (True or False), got {type(verdict).__name__}"
                + (f" of shape {shape}: combine the per-feature tests with np.all(...)" if shape else "")
            )
        if right and not verdict:
            raise ExerciseError(
                f"{name}: you rejected {label}. Hint: per feature (axis 0, or axes (0, 2, 3) for 4-D), the "
                "mean is beta and the biased standard deviation (ddof=0) is |gamma| (gamma may be negative); "
                "eps makes the spread a little smaller, so compare with a relative tolerance such as 1e-3, "
                "not with =="
            )
        if not right and verdict:
            raise ExerciseError(
                f"{name}: you accepted {label}: your test must fail on it. Hint: test both properties, "
                "the mean beta and the standard deviation |gamma|, per feature, to a relative 1e-3 "
                "(a tolerance of 0.1 lets the 1/(m-1) variance through)"
            )
    print(f"✓ {name}: accepts the right outputs and rejects the wrong ones ({len(_outputs(seed))} outputs)")
