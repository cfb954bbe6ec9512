"""The exercise checkers' shared machinery: run a learner's function on fresh inputs and
explain what went wrong. The checkers themselves are in one module per chapter
(``bnkit.checks.ch01_five_steps``, ...).

Each checker compares the learner's function with ``bnkit.reference`` on several cases
((m, n) and (m, C, H, W) inputs, m = 2, a feature with a large offset, a constant feature,
float32). On success it prints one line and returns None. On failure it raises an
``ExerciseError`` whose message names the mistake, found by comparing the learner's output
with known wrong variants (1/(m-1), the wrong axis, eps outside the root, ...).

A new checker is a few lines: a list of ``Case``s and a list of ``(wrong_variant, message)``
pairs passed to ``check_function``.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import inspect
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


__all__ = [
    "ExerciseError", "Case", "check_function", "check_results", "call_learner", "not_implemented",
    "describe_difference", "check_unchanged", "does_not_apply",
]


class ExerciseError(AssertionError):
    """A learner's answer is wrong; the message says how. Shown without a traceback in Jupyter."""

    def _render_traceback_(self) -> list[str]:  # IPython shows these lines instead of a traceback
        return [f"ExerciseError: {self}"]


@dataclass
class Case:
    """One test input: a label for messages, the positional arguments, and a hint shown on failure."""

    label: str
    args: tuple
    hint: str = ""
    float32: bool = field(init=False)

    def __post_init__(self) -> None:
        self.float32 = any(getattr(a, "dtype", None) == np.float32 for a in self.args)


Variant = Callable[..., Any]

# ---------------------------------------------------------------- the generic machinery


def _copy(a: Any) -> Any:
    """A copy of an array, or of a tuple of arrays (a BatchStats), so that a learner's in-place
    change cannot reach the case's own arguments."""
    return copy.deepcopy(a) if isinstance(a, (np.ndarray, tuple)) else a


def _where_in_learner_code(fn: Callable, exc: BaseException) -> str:
    """', at line N: <source>' for the innermost frame of the learner's own code, if any."""
    code = getattr(inspect.unwrap(fn), "__code__", None)
    filename = getattr(code, "co_filename", None)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" (line {f.lineno}: {f.line.strip()})" if f.line else f" (line {f.lineno})"


def does_not_apply() -> Any:
    """Raised by a wrong variant on a case where its mistake cannot show (the variant is skipped)."""
    raise ValueError("this mistake does not show on this case")


def not_implemented(name: str, fn: Callable) -> ExerciseError:
    """The error for a stub that still raises NotImplementedError."""
    return ExerciseError(
        f"{name}: not implemented yet: replace the stub `raise NotImplementedError(...)` "
        f"in {getattr(fn, '__name__', 'your function')} with your code"
    )


def call_learner(
    name: str, fn: Callable, args: Sequence = (), kwargs: dict | None = None, label: str = "", hint: str = ""
) -> Any:
    """fn(*args, **kwargs), the learner's function; a stub or an exception inside it becomes an
    ExerciseError a learner can read (the line of their code that failed, the case, a hint)."""
    try:
        with np.errstate(all="ignore"):
            return fn(*args, **(kwargs or {}))
    except NotImplementedError:
        raise not_implemented(name, fn) from None
    except Exception as e:  # the learner's code failed: report it, not a traceback from bnkit
        where = _where_in_learner_code(fn, e)
        on = f", on {label}" if label else ""
        hint = f" Hint: {hint}" if hint else ""
        raise ExerciseError(
            f"{name}: your function raised {type(e).__name__}: {str(e).strip()}{where}{on}.{hint}"
        ) from None


def _same(a: Any, b: Any) -> bool:
    """a and b hold the same values (arrays, tensors, tuples and NamedTuples of them, numbers)."""
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if hasattr(a, "detach") or isinstance(a, np.ndarray):
        return bool(np.array_equal(_numpy(a), _numpy(b), equal_nan=True))
    return a is b or a == b


def argument_names(fn: Callable, count: int) -> list[str]:
    """The names of fn's first count parameters (arg1, arg2, ... where it has none)."""
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        names = []
    return (names + [f"argument {k + 1}" for k in range(len(names), count)])[:count]


def check_unchanged(name: str, fn: Callable, case: Case) -> None:
    """Call fn on deep copies of the case's arguments; raise if it changed any of them in place."""
    args = copy.deepcopy(case.args)
    call_learner(name, fn, args, label=case.label, hint=case.hint)
    changed = [k for k, (a, b) in enumerate(zip(case.args, args)) if not _same(a, b)]
    if changed:
        names = argument_names(fn, len(args))
        which = ", ".join(f"`{names[k]}`" for k in changed)
        raise ExerciseError(
            f"{name}: your function changed its input {which} in place (on {case.label}): the "
            "exercise asks you to leave the inputs as they were, so build new arrays "
            "(new = (1 - w) * old + w * x, not old *= ... or old[:] = ...)"
        )


def _call(name: str, fn: Callable, case: Case) -> np.ndarray:
    """Call the learner's function on copies of the case's arguments; an array of numbers back."""
    out = call_learner(name, fn, [_copy(a) for a in case.args], label=case.label, hint=case.hint)
    if out is None:
        raise ExerciseError(f"{name}: your function returned None: did you forget `return`?")
    if hasattr(out, "detach"):  # a torch tensor
        out = out.detach().cpu().numpy()
    try:
        return np.asarray(out, dtype=np.float64)
    except (TypeError, ValueError):
        raise ExerciseError(
            f"{name}: your function returned {type(out).__name__}, not an array of numbers"
        ) from None


def _close(got: np.ndarray, expected: np.ndarray, case: Case) -> bool:
    """Equal shapes and values to round-off (looser for float32 inputs)."""
    if got.shape != expected.shape:
        return False
    tol = 1e-4 if case.float32 else 1e-8
    scale = max([1.0] + [float(np.max(np.abs(a))) for a in case.args if isinstance(a, np.ndarray)])
    with np.errstate(all="ignore"):
        return bool(np.allclose(got, expected, rtol=tol, atol=tol * scale, equal_nan=True))


def _matches(got: np.ndarray, variant: Variant, case: Case) -> bool | None:
    """Whether got is what the wrong variant gives on case (None: the variant does not apply)."""
    try:
        with np.errstate(all="ignore"):
            wrong = np.asarray(variant(*case.args))
    except Exception:  # a variant that does not apply to this shape
        return None
    return _close(got, wrong, case)


def _explains(name: str, fn: Callable, diagnoses: Sequence, message: str, cases: Sequence[Case]) -> bool:
    """Whether the variant(s) with this message give fn's output on every case they apply to
    (a variant that gives the right answer on a case must find fn right there too)."""
    variants = [v for v, m in diagnoses if m == message]
    for case in cases:
        try:
            got = _call(name, fn, case)
        except ExerciseError:
            continue
        if any(_matches(got, v, case) is False for v in variants):
            return False
    return True


def check_function(
    name: str,
    fn: Callable,
    reference: Callable,
    cases: Sequence[Case],
    diagnoses: Sequence[tuple[Variant, str]] = (),
    unchanged: bool = False,
) -> None:
    """Check ``fn`` against ``reference`` on every case; raise ExerciseError at the first failure.

    unchanged: the exercise forbids changing the inputs: each case also checks that fn leaves
    (deep copies of) its arguments as they were.

    A wrong output is compared with each ``wrong_variant(*case.args)`` in turn: of those it
    matches, the first that also gives the learner's outputs on the later cases names the
    mistake. Otherwise ``describe_difference`` says how the output differs (shape, NaN, a
    constant factor or sign, an offset, which axis), on which input shapes, with a hint.
    On success prints one line and returns None.
    """
    __tracebackhide__ = True  # pytest: show the learner the message, not this frame
    if not callable(fn):
        raise ExerciseError(f"{name}: expected a function, got {type(fn).__name__}")
    for k, case in enumerate(cases):
        expected = np.asarray(reference(*case.args))
        got = _call(name, fn, case)
        if _close(got, expected, case):
            if unchanged:
                check_unchanged(name, fn, case)
            continue
        matches = [message for variant, message in diagnoses if _matches(got, variant, case)]
        if matches:  # the first known mistake that also explains the learner's other outputs
            others = [c for c in cases if c is not case]
            message = next((m for m in matches if _explains(name, fn, diagnoses, m, others)), matches[0])
            raise ExerciseError(f"{name}: {message} (on {case.label})")
        raise ExerciseError(f"{name}: {describe_difference(got, expected, case)}")
    print(f"✓ {name}: correct on {len(cases)} test cases")


# ---------------------------------------------------------------- how a wrong output differs

GENERIC_HINT = (
    "work the formula of the exercise by hand on a small input of this shape and compare it "
    "with your code line by line"
)


def _input_shapes(case: Case) -> str:
    shapes = [str(tuple(a.shape)) for a in case.args if isinstance(a, np.ndarray) and a.ndim]
    return f" (input shapes {', '.join(shapes)})" if shapes and shapes[0] not in case.label else ""


def _fmt(x: np.ndarray | float) -> str:
    return np.array2string(np.asarray(x), precision=4, threshold=6, separator=", ")


def _shape_difference(got: tuple, expected: tuple) -> str:
    why = ""
    if got == expected[::-1]:
        why = ": transposed?"
    elif tuple(k for k in got if k != 1) == tuple(k for k in expected if k != 1):
        why = ": extra axes of size 1 (keepdims=True, or a reshape left in?)"
    elif len(got) < len(expected):
        why = ": you reduced over more axes than you should"
    elif len(got) > len(expected):
        why = ": you reduced over fewer axes than you should (or not at all)"
    return f"wrong shape: expected {expected}, got {got}{why}"


def _per(d: np.ndarray, axis: int) -> np.ndarray | None:
    """The values of d along axis, if d is constant along every other axis; else None."""
    moved = np.moveaxis(d, axis, 0).reshape(d.shape[axis], -1)
    first = moved[:, :1]
    return first[:, 0] if np.allclose(moved, first, rtol=1e-6, atol=1e-9) else None


def _value_difference(got: np.ndarray, expected: np.ndarray, case: Case) -> str:
    """How got differs from expected (same shapes): a factor, a sign, an offset, an axis."""
    d = got - expected
    e2 = float(np.sum(expected * expected))
    if got.ndim == 0 or got.size == 1:
        ratio = f" ({float(got.flat[0] / expected.flat[0]):.4g} times it)" if expected.flat[0] else ""
        return f"expected {float(expected.flat[0]):.6g}, got {float(got.flat[0]):.6g}{ratio}"
    rel = float(np.max(np.abs(d))) / max(float(np.max(np.abs(expected))), 1e-300)
    if rel < 1e-4:
        return (f"your values are close but not equal (largest relative difference {rel:.1e}, more than "
                "round-off in float64): is part of your computation in float32, or an approximation?")
    if e2 > 0:
        c = float(np.sum(got * expected)) / e2
        if np.allclose(got, c * expected, rtol=1e-6, atol=1e-9 * np.sqrt(e2)):
            if np.isclose(c, -1.0):
                return "the sign is flipped: your output is minus the expected one"
            return f"every value is {c:.6g} times the expected one (a constant factor)"
    if np.allclose(d, d.flat[0], rtol=1e-6, atol=1e-9):
        return f"every value is off by the same constant {float(d.flat[0]):.6g} (an offset)"
    if got.ndim >= 2:
        per = _per(d, 1)
        if per is not None:
            return f"each feature (axis 1) is off by its own constant: {_fmt(per)} (a per-feature offset)"
        with np.errstate(all="ignore"):
            ratio = _per(np.where(expected != 0, got / expected, 1.0), 1)
        if ratio is not None:
            return f"each feature (axis 1) is off by its own factor: {_fmt(ratio)}"
    wrong = ~np.isclose(got, expected, rtol=1e-6, atol=1e-9)
    where = ""
    if got.ndim >= 2:
        for axis, what in ((1, "feature (axis 1)"), (0, "example (axis 0)")):
            bad = np.flatnonzero(np.moveaxis(wrong, axis, 0).reshape(got.shape[axis], -1).any(axis=1))
            if 0 < len(bad) < got.shape[axis]:
                where = f"; only {what} {_fmt(bad)} of {got.shape[axis]} differ"
                break
    with np.errstate(all="ignore"):
        r = (got / expected)[wrong & (expected != 0)]
    if r.size and np.all(r > 0):
        where += f"; your values are {r.min():.3g} to {r.max():.3g} times the expected ones"
    elif r.size and np.all(r < 0):
        where += "; every differing value has the wrong sign"
    i = np.unravel_index(np.argmax(np.abs(d)), d.shape)
    return (f"{int(wrong.sum())} of {got.size} values differ{where}; the largest difference is at "
            f"index {tuple(int(k) for k in i)}: expected {expected[i]:.6g}, got {got[i]:.6g}")


def describe_difference(got: np.ndarray, expected: np.ndarray, case: Case) -> str:
    """A message for a wrong output that matches no known mistake: the case with its input shapes,
    how the output differs (shape, NaN, a constant factor or sign, an offset, the axis), a hint."""
    on = f"on {case.label}{_input_shapes(case)}"
    hint = f" Hint: {(case.hint or GENERIC_HINT).rstrip('.')}."
    if got.shape != expected.shape:
        return f"{_shape_difference(got.shape, expected.shape)}, {on}.{hint}"
    bad = ~np.isfinite(got) & np.isfinite(expected)
    if bad.any():
        i = tuple(int(k) for k in np.argwhere(bad)[0])
        return (f"your output has NaN or inf at {int(bad.sum())} of {got.size} values (first at "
                f"index {i}) where the answer is finite, {on}: a division by zero, or the square "
                f"root of a negative number?{hint}")
    return f"wrong values {on}: {_value_difference(got, expected, case)}.{hint}"


# ---------------------------------------------------------------- test inputs and helpers


# ---------------------------------------------------------------- functions with several results


def _first_call(name: str, fn: Callable, case: Case, results: Sequence[str]) -> None:
    """Call fn once to check that it is implemented and returns a tuple of ``results``."""
    try:
        with np.errstate(all="ignore"):
            out = fn(*copy.deepcopy(case.args))
    except NotImplementedError:
        raise not_implemented(name, fn) from None
    except Exception:  # check_function reports it, with the line of the learner's code
        return
    wanted = "(" + ", ".join(results) + ")"
    if out is None:
        raise ExerciseError(f"{name}: your function returned None: did you forget `return {wanted[1:-1]}`?")
    if not isinstance(out, (tuple, list)) or len(out) != len(results):
        raise ExerciseError(f"{name}: return a tuple of {len(results)} arrays {wanted}, got {type(out).__name__}")


def check_results(
    name: str,
    fn: Callable,
    reference: Callable[..., tuple],
    cases: Sequence[Case],
    results: Sequence[str],
    diagnoses: Sequence[tuple[Variant, str, str]] = (),
    extra: Callable[[str, ExerciseError, Case, np.ndarray], str] | None = None,
    unchanged: bool = False,
) -> None:
    """``check_function`` for a function that returns a tuple: each result is checked in turn.

    diagnoses: (wrong_variant returning the whole tuple, the result it is about, message).
    extra(result, error, case, got) may add a sentence to a failure message.
    Every call gets deep copies of the arguments (a learner may change the cache in place).
    unchanged: the exercise forbids changing the inputs; checked on every case once the values
    are right. One line is printed on success.
    """
    __tracebackhide__ = True
    if not callable(fn):
        raise ExerciseError(f"{name}: expected a function, got {type(fn).__name__}")
    _first_call(name, fn, cases[0], results)
    for k, result in enumerate(results):

        @functools.wraps(fn)
        def pick(*args: Any, k: int = k) -> Any:
            return fn(*copy.deepcopy(args))[k]

        own = [(lambda *a, v=v, k=k: v(*a)[k], msg) for v, r, msg in diagnoses if r == result]
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # one success line for the whole tuple
                check_function(f"{name}, {result}", pick, lambda *a, k=k: reference(*a)[k], cases, own)
        except ExerciseError as e:
            note = ""
            if extra is not None:
                for case in cases:  # the first case the learner's result gets wrong
                    try:
                        got = np.asarray(pick(*case.args), dtype=np.float64)
                    except Exception:
                        break
                    expected = np.asarray(reference(*case.args)[k], dtype=np.float64)
                    if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-4, atol=1e-6):
                        note = extra(result, e, case, got)
                        break
            raise ExerciseError(str(e) + note) from None
    for case in cases if unchanged else ():
        check_unchanged(name, fn, case)
    print(f"✓ {name}: correct on {len(cases)} test cases")


# ---------------------------------------------------------------- results that are pairs or triples

def _features(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A per-feature mean (n,) and variance (n,), different for every feature."""
    return rng.normal(0, 3, n), rng.uniform(0.2, 4.0, n)


def _pair(fn: Callable) -> Callable:
    """Wrap a function that returns (mean, var) so that the checker sees one (2, n) array."""

    @functools.wraps(fn)
    def wrapped(*args: Any) -> Any:
        out = fn(*args)
        if isinstance(out, (tuple, list)) and len(out) == 2:
            return np.stack([_numpy(v) for v in out])
        return out  # None, or the wrong kind of result: check_function explains

    return wrapped


def _check_returns(name: str, fn: Callable, case: Case, size: int, what: str) -> None:
    """Call fn once: if it returns something other than a tuple of ``size`` values, say so.

    Exceptions (a stub's NotImplementedError included) are left to check_function, which
    explains them on the same case.
    """
    try:
        with np.errstate(all="ignore"):
            out = fn(*case.args)
    except Exception:
        return
    if out is not None and not (isinstance(out, (tuple, list)) and len(out) == size):
        got = f"a {type(out).__name__} of length {len(out)}" if isinstance(out, (tuple, list)) else type(out).__name__
        raise ExerciseError(f"{name}: return {what}, {size} values, got {got}")


def _numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor
        v = v.detach().cpu().numpy()
    return np.asarray(v, dtype=np.float64)
