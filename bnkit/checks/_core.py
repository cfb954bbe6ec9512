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


__all__ = ["ExerciseError", "Case", "check_function", "call_learner", "not_implemented"]


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
    return a.copy() if isinstance(a, np.ndarray) else a


def _where_in_learner_code(fn: Callable, exc: BaseException) -> str:
    """', at line N: <source>' for the innermost frame of the learner's own code, if any."""
    code = getattr(inspect.unwrap(fn), "__code__", None)
    filename = getattr(code, "co_filename", None)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" (line {f.lineno}: {f.line.strip()})" if f.line else f" (line {f.lineno})"


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


def check_function(
    name: str,
    fn: Callable,
    reference: Callable,
    cases: Sequence[Case],
    diagnoses: Sequence[tuple[Variant, str]] = (),
) -> None:
    """Check ``fn`` against ``reference`` on every case; raise ExerciseError at the first failure.

    A wrong output is compared with each ``wrong_variant(*case.args)`` in turn: the first that
    it matches gives the message. Otherwise the message reports the shape or the largest error.
    On success prints one line and returns None.
    """
    __tracebackhide__ = True  # pytest: show the learner the message, not this frame
    if not callable(fn):
        raise ExerciseError(f"{name}: expected a function, got {type(fn).__name__}")
    for case in cases:
        expected = np.asarray(reference(*case.args))
        got = _call(name, fn, case)
        if _close(got, expected, case):
            continue
        for variant, message in diagnoses:
            try:
                with np.errstate(all="ignore"):
                    wrong = np.asarray(variant(*case.args))
            except Exception:  # a variant that does not apply to this shape
                continue
            if _close(got, wrong, case):
                raise ExerciseError(f"{name}: {message} (on {case.label})")
        hint = f" Hint: {case.hint}" if case.hint else ""
        if got.shape != expected.shape:
            raise ExerciseError(
                f"{name}: wrong shape on {case.label}: expected {expected.shape}, got {got.shape}.{hint}"
            )
        if not np.all(np.isfinite(got)):
            raise ExerciseError(f"{name}: your output contains NaN or inf on {case.label}.{hint}")
        err = np.abs(got.astype(np.float64) - expected)
        i = np.unravel_index(np.argmax(err), err.shape)
        raise ExerciseError(
            f"{name}: wrong values on {case.label}: at index {tuple(int(k) for k in i)} "
            f"expected {expected[i]:.6g}, got {got[i]:.6g}.{hint}"
        )
    print(f"✓ {name}: correct on {len(cases)} test cases")


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
) -> None:
    """``check_function`` for a function that returns a tuple: each result is checked in turn.

    diagnoses: (wrong_variant returning the whole tuple, the result it is about, message).
    extra(result, error, case, got) may add a sentence to a failure message.
    Every call gets deep copies of the arguments (a learner may change the cache in place).
    One line is printed on success.
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
