"""Exercise checkers for the chapter "Pitfalls, and what to do" (chapter 10).

    batch_stat_layers(fn)   fn(model) -> names of the BN layers that normalise with batch statistics
    stable_variance(fn)     fn(z) -> var (n,), the biased per-feature variance, stable in float32

Each runs the learner's function on fresh inputs, prints one line on success and raises an
``ExerciseError`` that names the mistake otherwise (``bnkit.checks._core``'s conventions).
"""
from __future__ import annotations

import ast
import contextlib
import inspect
import re
import textwrap
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import bnkit
from bnkit import running
from bnkit.checks._core import Case, ExerciseError, _call, call_learner

__all__ = ["ExerciseError", "batch_stat_layers", "stable_variance"]


# ---------------------------------------------------------------- BN layers that use batch statistics


def _uses_batch_stats(m: nn.Module) -> bool:
    """A BN layer normalises with the batch's statistics in training mode, and always when it
    keeps no running statistics (track_running_stats=False)."""
    return isinstance(m, _BatchNorm) and (m.training or not m.track_running_stats)


def _reference_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if _uses_batch_stats(m)]


def _mlp(norm: Callable[[int], nn.Module] = nn.BatchNorm1d) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), norm(8), nn.ReLU(), nn.Linear(8, 8), norm(8), nn.ReLU(), nn.Linear(8, 3))


def _convnet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.BatchNorm1d(8)
    )


class FrozenBatchNorm2d(nn.Module):
    """Like torchvision's: BN's buffers, but a fixed affine map (never batch statistics)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        for k, v in dict(weight=torch.ones(n), bias=torch.zeros(n), running_mean=torch.zeros(n),
                         running_var=torch.ones(n)).items():
            self.register_buffer(k, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        return x * scale[:, None, None] + (self.bias - self.running_mean * scale)[:, None, None]


class ChannelNorm(nn.BatchNorm2d):
    """A BatchNorm2d subclass whose class name does not say BatchNorm."""


def _layer_cases() -> list[Case]:
    """(label, (model,)): models in every state a learner meets; each case builds a fresh model."""
    train_mode = _mlp().train()
    eval_mode = _mlp().eval()
    one_back = _mlp().eval()
    one_back[4].train()  # e.g. a helper called .train() on one block
    one_frozen = _mlp().train()
    one_frozen[1].eval()  # the model says training, one BN is frozen
    nested = nn.Sequential(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8)), nn.ReLU(), nn.Linear(8, 3)).train()
    no_running = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.ReLU()).eval()
    other_norms = nn.Sequential(
        nn.Linear(6, 8), nn.LayerNorm(8), nn.Dropout(0.1), nn.Linear(8, 8), nn.GroupNorm(2, 8), nn.BatchNorm1d(8)
    ).train()
    other_norms[5].eval()
    torch.manual_seed(0)
    video = nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2), nn.ReLU(), nn.Conv3d(2, 2, 1),
                          bnkit.BatchNorm3d(2)).train()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(_mlp()).train()  # listing needs no process group
    named = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), nn.Conv2d(4, 4, 3), ChannelNorm(4),
                          nn.Conv2d(4, 4, 3), nn.InstanceNorm2d(4, track_running_stats=True)).train()
    return [
        Case("an MLP with two BatchNorm1d layers, after model.train()", (train_mode,)),
        Case("the same MLP after model.eval()", (eval_mode,)),
        Case("model.eval(), then model[4].train(): the model itself says eval", (one_back,)),
        Case("model.train(), then model[1].eval(): the model itself says train", (one_frozen,)),
        Case("a conv net with BatchNorm2d and BatchNorm1d, in training mode", (_convnet().train(),)),
        Case("an MLP of bnkit.bnkit.BatchNorm1d layers (a subclass), in training mode", (_mlp(bnkit.BatchNorm1d).train(),)),
        Case("a BN layer inside a nested Sequential, in training mode", (nested,)),
        Case("model.eval() with a BatchNorm1d(track_running_stats=False)", (no_running,)),
        Case("LayerNorm, Dropout and GroupNorm in training mode, the only BN in eval mode", (other_norms,)),
        Case("a 3-D conv net with nn.BatchNorm3d and bnkit.BatchNorm3d, in training mode", (video,)),
        Case("an MLP converted to SyncBatchNorm, in training mode", (synced,)),
        Case("a conv net in training mode with a FrozenBatchNorm2d (torchvision's: a fixed affine "
             "map), a BatchNorm2d subclass named ChannelNorm and an InstanceNorm2d", (named,)),
    ]


def _any_training(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if name and m.training]


def _model_flag(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)] if model.training else []


def _only_1d(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm1d) and _uses_batch_stats(m)]


def _exact_type(model: nn.Module) -> list[str]:
    types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    return [name for name, m in model.named_modules() if type(m) in types and _uses_batch_stats(m)]


def _training_only(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.training]


def _only_1d_2d(model: nn.Module) -> list[str]:
    kinds = (nn.BatchNorm1d, nn.BatchNorm2d)
    return [name for name, m in model.named_modules() if isinstance(m, kinds) and _uses_batch_stats(m)]


def _class_name(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules()
            if "BatchNorm" in type(m).__name__ and (m.training or not getattr(m, "track_running_stats", True))]


def _has_running_mean(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules()
            if hasattr(m, "running_mean") and (m.training or not getattr(m, "track_running_stats", True))]


def _norm_base(model: nn.Module) -> list[str]:
    base = nn.modules.batchnorm._NormBase
    return [name for name, m in model.named_modules() if isinstance(m, base) and (m.training or not m.track_running_stats)]


def _eval_ones(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, _BatchNorm) and not _uses_batch_stats(m)]


def _top_level(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_children() if _uses_batch_stats(m)]


_LAYER_DIAGNOSES: list[tuple[Callable[[nn.Module], list[str]], str]] = [  # the first that matches names it
    (_training_only,
     "you missed a BN layer with track_running_stats=False: it keeps no running statistics, so it "
     "normalises with the batch's statistics even in eval mode"),
    (_model_flag,
     "you looked at model.training, the flag of the model as a whole: every layer has its own "
     "flag, and model[i].train() or .eval() changes one layer only. Check each BN layer's own .training"),
    (_any_training,
     "you listed every module in training mode: only Batch Norm layers use batch statistics "
     "(LayerNorm and GroupNorm do not depend on the batch, Dropout is another matter)"),
    (_only_1d,
     "you only looked for BatchNorm1d: BatchNorm2d (and 3d, SyncBatchNorm) share the base class "
     "torch.nn.modules.batchnorm._BatchNorm; test isinstance(m, _BatchNorm)"),
    (_exact_type,
     "you compared type(m) with the BatchNorm classes: that misses subclasses such as bnkit's "
     "drop-in BatchNorm1d or SyncBatchNorm; use isinstance(m, _BatchNorm)"),
    (_only_1d_2d,
     "you only looked for BatchNorm1d and BatchNorm2d: BatchNorm3d and SyncBatchNorm normalise with "
     "batch statistics too; they all derive from torch.nn.modules.batchnorm._BatchNorm, so test "
     "isinstance(m, _BatchNorm)"),
    (_class_name,
     "you matched the class name: FrozenBatchNorm2d is named BatchNorm but is a fixed affine map, "
     "and a subclass may be named anything (ChannelNorm here); test isinstance(m, _BatchNorm)"),
    (_has_running_mean,
     "you looked for a running_mean attribute: FrozenBatchNorm2d and InstanceNorm have one too, "
     "and a BN layer with track_running_stats=False has it set to None; test isinstance(m, _BatchNorm)"),
    (_norm_base,
     "you tested isinstance(m, _NormBase): InstanceNorm shares that base class but normalises each "
     "example on its own, never with the batch; test _BatchNorm"),
    (_top_level,
     "you only looked at the top-level layers (model.children() or iterating over the model): "
     "BN layers can sit inside nested blocks; model.named_modules() visits them all"),
    (_eval_ones,
     "you listed the BN layers that would use their running statistics: the question is the other "
     "way round, the layers in training mode (or without running statistics)"),
]


def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def _names(name: str, fn: Callable, case: Case) -> list[str]:
    """The learner's answer on the case, as a sorted list of names; explains wrong types."""
    model = case.args[0]
    modes = _modes(model)
    out = call_learner(name, fn, (model,), label=case.label)
    if _modes(model) != modes:
        raise ExerciseError(
            f"{name}: your function changed the mode of some layers (on {case.label}): it must only "
            "look, e.g. never call model.eval() or model.train() inside it"
        )
    if out is None:
        raise ExerciseError(f"{name}: your function returned None: did you forget `return`?")
    if isinstance(out, str) or not hasattr(out, "__iter__"):
        raise ExerciseError(f"{name}: return a list of names (str), got {type(out).__name__}")
    out = list(out)
    if any(isinstance(x, nn.Module) for x in out):
        raise ExerciseError(
            f"{name}: return the layers' names (the first item of each pair from "
            "model.named_modules()), not the modules themselves"
        )
    if not all(isinstance(x, str) for x in out):
        raise ExerciseError(f"{name}: return a list of names (str), got items of type {type(out[0]).__name__}")
    return sorted(out)


def batch_stat_layers(fn: Callable, seed: int = 0) -> None:
    """Check ``fn(model) -> list of names`` of the BN layers that normalise with batch statistics.

    The names are those of ``model.named_modules()``; any order. A BN layer counts when it is in
    training mode or keeps no running statistics. ``seed`` is unused (the models are fixed).
    """
    __tracebackhide__ = True
    name = "batch_stat_layers"
    if not callable(fn):
        raise ExerciseError(f"{name}: expected a function, got {type(fn).__name__}")
    cases = _layer_cases()
    for case in cases:
        expected = sorted(_reference_layers(case.args[0]))
        got = _names(name, fn, case)
        if got == expected:
            continue
        answers = {}  # the learner's answer on every case, for a diagnosis that explains them all
        for other in cases:
            try:
                answers[other.label] = _names(name, fn, other)
            except ExerciseError:
                pass
        matches = [(v, m) for v, m in _LAYER_DIAGNOSES if sorted(v(case.args[0])) == got]
        for variant, message in matches:
            if all(sorted(variant(c.args[0])) == answers[c.label] for c in cases if c.label in answers):
                raise ExerciseError(f"{name}: {message} (on {case.label})")
        if matches:
            raise ExerciseError(f"{name}: {matches[0][1]} (on {case.label})")
        missed, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        model = dict(case.args[0].named_modules())
        what = lambda names: ", ".join(  # noqa: E731
            f"{n!r} ({type(model[n]).__name__ if n in model else 'no such module'}, "
            f"{'training' if n in model and model[n].training else 'eval'} mode)" for n in names)
        said = (f"you missed {what(missed)}" if missed else "") + ("; " if missed and extra else "") + (
            f"you listed {what(extra)}, which would not use batch statistics" if extra else "")
        raise ExerciseError(
            f"{name}: on {case.label}: {said}. Hint: a layer uses batch statistics when it is a "
            "_BatchNorm and is in training mode or has track_running_stats=False"
        )
    print(f"✓ {name}: correct on {len(cases)} test cases")


# ---------------------------------------------------------------- a numerically stable variance


def _variance_cases(seed: int) -> list[tuple[Case, bool]]:
    """(case, offset): small offset-free batches, then batches far from 0 (offset True)."""
    rng = np.random.default_rng(seed)

    def z2(m: int, n: int, offset: float = 0.0) -> np.ndarray:
        # (m, n): feature j has mean ~ N(0, 3) + offset and a spread in [0.5, 2]
        return rng.normal(size=(m, n)) * rng.uniform(0.5, 2, n) + rng.normal(0, 3, n) + offset

    constant = z2(6, 4)
    constant[:, 2] = 2.5  # var = 0
    return [
        (Case("z of shape (8, 5)", (z2(8, 5),)), False),
        (Case("z of shape (2, 3): m = 2", (z2(2, 3),)), False),
        (Case("z of shape (6, 4) with feature 2 constant (var = 0)", (constant,)), False),
        (Case("z of shape (10, 3), float32", (z2(10, 3).astype(np.float32),)), False),
        (Case("z of shape (256, 4), float32, every feature near 1e4", (z2(256, 4, 1e4).astype(np.float32),)), True),
        (Case("z of shape (1000, 3), float32, every feature near 3e3", (z2(1000, 3, 3e3).astype(np.float32),)), True),
        (Case("z of shape (256, 4), float64, every feature near 1e9", (z2(256, 4, 1e9),)), True),
    ]


def _reference_variance(z: np.ndarray) -> np.ndarray:
    stats = running.batch_stats(z)  # two passes, in float64
    return stats.m2 / stats.count


def _close_variance(got: np.ndarray, expected: np.ndarray, case: Case) -> bool:
    """Relative to the variance itself (not to the size of z: that would hide cancellation)."""
    rtol = 1e-3 if case.float32 else 1e-6
    return got.shape == expected.shape and bool(np.allclose(got, expected, rtol=rtol, atol=1e-12))


_VARIANCE_DIAGNOSES: list[tuple[Callable[[np.ndarray], np.ndarray], str]] = [
    (lambda z: z.var(axis=0, ddof=1),
     "you divided by m-1: Batch Norm normalises with the biased 1/m variance of the batch"),
    (lambda z: z.std(axis=0),
     "you returned the standard deviation: return the variance, without the square root"),
    (lambda z: z.var(axis=1),
     "you took the variance of each example (axis 1): the statistics are per feature, over the batch axis 0"),
    (lambda z: z.var(axis=0, keepdims=True),
     "the result should have shape (n,), one value per feature: drop keepdims=True"),
    (lambda z: ((z - z.mean(axis=0)) ** 2).sum(axis=0),
     "you summed the squared deviations but did not divide by m"),
    (lambda z: z.var(),
     "you took one variance of all the values: Batch Norm keeps one per feature, shape (n,)"),
]


def _welford_wrong_update(z: np.ndarray) -> np.ndarray:
    mean, m2 = np.zeros(z.shape[1]), np.zeros(z.shape[1])
    for k, x in enumerate(z, start=1):
        mean = mean + (x - mean) / k
        m2 = m2 + (x - mean) ** 2  # (x - new mean)^2, not (x - old mean)(x - new mean)
    return m2 / len(z)


_MORE_VARIANCE_DIAGNOSES: list[tuple[Callable[[np.ndarray], np.ndarray], str]] = [
    (lambda z: ((z - np.median(z, axis=0)) ** 2).mean(axis=0),
     "you centred with the median: subtract the mean, mu = 1/m sum_i z_i"),
    (_welford_wrong_update,
     "Welford's update multiplies the deviations from the old and the new mean: "
     "M_k = M_{k-1} + (x_k - mu_{k-1}) (x_k - mu_k), not (x_k - mu_k)^2"),
]


def _cancellation_message(name: str, case: Case, got: np.ndarray, expected: np.ndarray) -> str:
    z = case.args[0]
    offset = f"1e{int(round(np.log10(float(np.abs(z.mean())))))}"  # e.g. "1e4"
    rel = float(np.max(np.abs(got - expected) / expected))
    negative = " (it even gave a negative variance)" if np.any(got < 0) else ""
    dtype = "float32" if case.float32 else "float64"
    upcast = (
        " Converting to float64 is not the cure either: with values near 1e9, E[z^2] is near 1e18 and "
        "float64 stores it to within about 100."
        if not case.float32 else ""
    )
    return (
        f"{name}: right on small centred data but wrong on "
        f"{case.label}: relative error {rel:.3g}{negative}. That is what E[z^2] - E[z]^2 (the one-pass formula) does: in {dtype} "
        f"with values near {offset}, E[z^2] and E[z]^2 are two huge, nearly equal numbers and their "
        "difference is mostly round-off (catastrophic cancellation)." + upcast + " Subtract the mean "
        "first and average the squares of z - mu (two passes), or use Welford's update"
    )


_FORBIDDEN = ("var", "nanvar", "std", "nanstd", "variance", "pvariance")


def _forbidden_call(fn: Callable) -> str | None:
    """The name of a library variance the learner's code calls (np.var, z.var(), np.std, ...)."""
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return None
    try:
        nodes = list(ast.walk(ast.parse(source)))
    except SyntaxError:  # a lambda cut out of a larger expression: look at the text
        found = re.search(r"\.(" + "|".join(_FORBIDDEN) + r")\(", source)
        return found[1] if found else None
    for node in nodes:
        if isinstance(node, ast.Call):
            f = node.func
            called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if called in _FORBIDDEN:
                return called
    return None


@contextlib.contextmanager
def _no_library_variance():
    """np.var, np.std (and their nan versions) raise while the learner's function runs."""
    saved = {k: getattr(np, k) for k in ("var", "nanvar", "std", "nanstd")}

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("np.var and np.std are not allowed in this exercise")

    try:
        for k in saved:
            setattr(np, k, refuse)
        yield
    finally:
        for k, v in saved.items():
            setattr(np, k, v)


def stable_variance(fn: Callable, seed: int = 0) -> None:
    """Check ``fn(z) -> var``: z (m, n), var (n,) the biased per-feature variance, which must stay
    accurate (relative error < 1e-3 in float32) when every feature sits far from 0."""
    __tracebackhide__ = True
    name = "stable_variance"
    if not callable(fn):
        raise ExerciseError(f"{name}: expected a function, got {type(fn).__name__}")
    called = _forbidden_call(fn)
    if called:
        raise ExerciseError(
            f"{name}: you called {called}(): the exercise asks you to compute the variance yourself, "
            "without np.var (or std), to see what makes it accurate: subtract the mean first and "
            "average the squares, or use Welford's update"
        )
    cases = _variance_cases(seed)
    for case, offset in cases:
        expected = _reference_variance(case.args[0])
        with _no_library_variance():
            got = _call(name, fn, case)
        if _close_variance(got, expected, case):
            continue
        if offset and got.shape == expected.shape and np.all(np.isfinite(got)):
            raise ExerciseError(_cancellation_message(name, case, got, expected))
        z64 = case.args[0].astype(np.float64)
        for variant, message in _VARIANCE_DIAGNOSES + _MORE_VARIANCE_DIAGNOSES:
            wrong = np.asarray(variant(z64), dtype=np.float64)
            if wrong.shape == got.shape and np.allclose(got, wrong, rtol=1e-6 if not case.float32 else 1e-3, atol=1e-12):
                raise ExerciseError(f"{name}: {message} (on {case.label})")
        if got.shape != expected.shape:
            raise ExerciseError(f"{name}: wrong shape on {case.label}: expected {expected.shape}, got {got.shape}")
        if not np.all(np.isfinite(got)):
            raise ExerciseError(f"{name}: your output contains NaN or inf on {case.label}")
        j = int(np.argmax(np.abs(got - expected)))
        raise ExerciseError(
            f"{name}: wrong values on {case.label}: feature {j}: expected {expected[j]:.6g}, got {got[j]:.6g}"
            f" ({got[j] / expected[j]:.4g} times it). Hint: var = 1/m sum_i (z_i - mu)^2 per feature"
            if expected[j] else
            f"{name}: wrong values on {case.label}: feature {j}: expected 0 (a constant feature), got {got[j]:.6g}"
        )
    for case, _ in cases:
        z = case.args[0]
        with _no_library_variance():
            out = call_learner(name, fn, (z.copy(),), label=case.label)
        dtype = getattr(out, "dtype", None)
        if z.dtype == np.float32 and dtype is not None and str(dtype).endswith("float64"):
            raise ExerciseError(
                f"{name}: your variance of float32 data (on {case.label}) is float64: compute it in the "
                "dtype of z, as the exercise asks; two passes are accurate in float32 too, which is the point"
            )
    print(f"✓ {name}: correct on {len(cases)} test cases")
