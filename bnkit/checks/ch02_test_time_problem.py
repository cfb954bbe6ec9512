"""Exercise checkers for chapter 2, the test-time problem (batch statistics at test time).

    predict_with_batch_stats(fn)   fn(model, X, batch_size) -> labels (m,)
    fraction_changed(fn)           fn(model, X, batch_size, order_a, order_b) -> float

Each compares the learner's function with bnkit on fresh inputs and names the typical
mistake when the output matches a known wrong variant.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Callable

import numpy as np
import torch

from bnkit.course import testtime
from bnkit.checks._core import Case, ExerciseError, check_function
from bnkit.course.nets import mlp

__all__ = ["predict_with_batch_stats", "fraction_changed"]


def _model(seed: int, in_features: int = 6, num_classes: int = 4) -> torch.nn.Module:
    """A small BN classifier in eval mode, with running statistics far from any test batch's."""
    model = mlp(hidden=(8, 8), seed=seed, in_features=in_features, num_classes=num_classes)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, torch.nn.BatchNorm1d):
                layer.running_mean.copy_(torch.randn(layer.num_features, generator=gen))
                layer.running_var.copy_(torch.rand(layer.num_features, generator=gen) * 2 + 0.5)
                layer.num_batches_tracked.fill_(100)
    return model.eval()


def _inputs(rng: np.random.Generator, m: int, in_features: int = 6) -> np.ndarray:
    """X (m, in_features), float32, features with different offsets and spreads."""
    X = rng.normal(size=(m, in_features)) * rng.uniform(0.5, 3, in_features) + rng.normal(0, 2, in_features)
    return X.astype(np.float32)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _settings(model: torch.nn.Module) -> list[tuple]:
    """Every module's mode and every BN layer's hyperparameters (not in the state_dict)."""
    return [(name, m.training, getattr(m, "momentum", None), getattr(m, "eps", None),
             getattr(m, "track_running_stats", None)) for name, m in model.named_modules()]


def _check_untouched(name: str, fn: Callable, args: tuple) -> None:
    """Run fn once on a fresh model: it must leave the running statistics, the BN layers'
    settings and the mode alone (the model may come in eval or in training mode)."""
    model = args[0]
    before, mode, settings = _state(model), model.training, _settings(model)
    try:
        with torch.no_grad(), np.errstate(all="ignore"):
            fn(*args)
    except Exception:  # reported with its message by check_function
        return
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    if changed:
        stats = ", ".join(k for k in changed if "running" in k or "num_batches" in k) or ", ".join(changed)
        raise ExerciseError(
            f"{name}: your function changed the model ({stats}). Putting the model itself in training "
            "mode updates its running statistics with every test batch; run the batches through a "
            "copy (copy.deepcopy(model).train()) so the model stays as it was"
        )
    if model.training != mode:
        now = "training" if model.training else "eval"
        raise ExerciseError(
            f"{name}: your function left the model in {now} mode; it must leave the model's mode "
            f"as it found it ({'training' if mode else 'eval'} mode here: work on a copy, or "
            "remember model.training and restore it)"
        )
    changed = [b[0] for a, b in zip(_settings(model), settings) if a != b]
    if changed:
        raise ExerciseError(
            f"{name}: your function changed the settings of layer(s) {', '.join(changed)} (momentum, "
            "eps or a submodule's mode): leave the model as it was; work on a copy"
        )


def _eval_predictions(model: torch.nn.Module, X: np.ndarray, batch_size: int) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.as_tensor(X)).argmax(dim=1).numpy()


def _logits(model: torch.nn.Module, X: np.ndarray, batch_size: int) -> np.ndarray:
    import copy

    with torch.no_grad():
        m = copy.deepcopy(model).train()
        return torch.cat([m(torch.as_tensor(X[s : s + batch_size])) for s in range(0, len(X), batch_size)]).numpy()


def _head(model: torch.nn.Module, X: np.ndarray, batch_size: int, head: str) -> np.ndarray:
    """Batch-statistics outputs passed through a wrong head: softmax, or argmax over dim 0."""
    import copy

    m = copy.deepcopy(model).train()
    with torch.no_grad():
        outs = [m(torch.as_tensor(X[s : s + batch_size])) for s in range(0, len(X), batch_size)]
    if head == "softmax":
        return torch.cat([o.softmax(dim=1) for o in outs]).numpy()
    return torch.cat([o.argmax(dim=0) for o in outs]).numpy()


def _dropped_last(model: torch.nn.Module, X: np.ndarray, batch_size: int) -> np.ndarray:
    full = len(X) - len(X) % batch_size
    if full == len(X):
        raise ValueError("no partial batch to drop")
    return testtime.predict_with_batch_stats(model, X[:full], batch_size)


def predict_with_batch_stats(fn: Callable, seed: int = 0) -> None:
    """Check ``fn(model, X, batch_size) -> labels (m,)``, BN normalising each batch with its own statistics."""
    name = "predict_with_batch_stats"
    rng = np.random.default_rng(seed)
    _check_untouched(name, fn, (_model(seed + 100), _inputs(rng, 20), 5))
    hint = ("every example of X needs a prediction: the batches start at range(0, len(X), batch_size) "
            "and the last one, X[s:], may be smaller")
    cases = [
        Case("X of shape (23, 6) in batches of 5 (the last batch holds 3)", (_model(seed), _inputs(rng, 23), 5), hint),
        Case("X of shape (20, 6) in batches of 4", (_model(seed + 1), _inputs(rng, 20), 4)),
        Case("X of shape (12, 6) in batches of 2, the smallest possible", (_model(seed + 2), _inputs(rng, 12), 2)),
        Case("X of shape (10, 6) in one batch of 10", (_model(seed + 3), _inputs(rng, 10), 10)),
        Case("X of shape (9, 6) with batch_size 32 > m: one batch of 9", (_model(seed + 4), _inputs(rng, 9), 32)),
    ]
    diagnoses = [
        (_eval_predictions,
         "your predictions are the eval-mode ones, made with the running statistics: here every "
         "batch must be normalised with its own mean and variance (BN in training mode)"),
        (lambda model, X, b: testtime.predict_with_batch_stats(model, X, len(X)),
         "you normalised all of X as one batch: cut X into consecutive batches X[0:b], X[b:2b], ... "
         "and normalise each with its own statistics"),
        (_logits, "you returned the logits: return the predicted labels, logits.argmax(dim=1), shape (m,)"),
        (_dropped_last, "you left out the last, smaller batch: every example of X needs a prediction (does your "
         "loop run over range(0, len(X), batch_size)?)"),
        (lambda model, X, b: _head(model, X, b, "softmax"),
         "you returned class probabilities or scores, shape (m, classes): return the predicted "
         "labels, their argmax over the classes (dim=1), shape (m,)"),
        (lambda model, X, b: _head(model, X, b, "argmax0"),
         "you took the argmax over the wrong axis (dim=0, the examples): the classes are dim=1"),
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        check_function(name, fn, testtime.predict_with_batch_stats, cases, diagnoses)
    _check_untouched(name, fn, (_model(seed + 101).train(), _inputs(rng, 20), 5))  # in training mode
    print(f"✓ {name}: correct on {len(cases)} test cases, and the model is left unchanged")


def _orders(rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.permutation(m), rng.permutation(m)


def _changed_without_unpermuting(model, X, b, order_a, order_b) -> float:
    pred_a = testtime.predict_with_batch_stats(model, X[order_a], b)
    pred_b = testtime.predict_with_batch_stats(model, X[order_b], b)
    return float(np.mean(pred_a != pred_b))


def _changed_permuted_twice(model, X, b, order_a, order_b) -> float:
    pred_a = testtime.predict_with_batch_stats(model, X[order_a], b)[order_a]
    pred_b = testtime.predict_with_batch_stats(model, X[order_b], b)[order_b]
    return float(np.mean(pred_a != pred_b))


def _in_x_order(model, X, b, order) -> np.ndarray:
    out = np.empty(len(X), dtype=np.int64)
    out[order] = testtime.predict_with_batch_stats(model, X[order], b)
    return out


def _changed_one_undone(model, X, b, order_a, order_b) -> float:
    pred_b = testtime.predict_with_batch_stats(model, X[order_b], b)
    return float(np.mean(_in_x_order(model, X, b, order_a) != pred_b))


def _changed_per_example(model, X, b, order_a, order_b) -> np.ndarray:
    return _in_x_order(model, X, b, order_a) != _in_x_order(model, X, b, order_b)


def fraction_changed(fn: Callable, seed: int = 0) -> None:
    """Check ``fn(model, X, batch_size, order_a, order_b) -> float``, the fraction of changed predictions."""
    rng = np.random.default_rng(seed + 1)
    cases = []
    for k, (m, b) in enumerate([(40, 4), (60, 6), (32, 5), (24, 8)]):
        X = _inputs(rng, m)
        cases.append(Case(f"X of shape {X.shape} in batches of {b}, two random orders",
                          (_model(seed + 10 + k), X, b, *_orders(rng, m))))
    ref = testtime.fraction_changed
    diagnoses = [
        (_changed_without_unpermuting,
         "you compared the two lists of predictions without putting them back in X's order: "
         "prediction i of X[order_a] belongs to example order_a[i] (undo it with out[order_a] = pred)"),
        (_changed_permuted_twice,
         "you reordered with pred[order], which applies the permutation a second time: undo it with "
         "pred[np.argsort(order)], or out = np.empty_like(pred); out[order] = pred"),
        (lambda *a: 1.0 - ref(*a), "you returned the fraction of predictions that stay the same"),
        (lambda *a: ref(*a) * len(a[1]), "you returned how many predictions changed: return a fraction, divide by len(X)"),
        (lambda *a: 100.0 * ref(*a), "you returned a percentage: return a fraction between 0 and 1"),
        (lambda *a: 0.0,
         "your fraction is 0: nothing changed, so the predictions did not depend on the batch. Did you "
         "predict in eval mode (running statistics), or batch the same order twice?"),
        (_changed_one_undone,
         "you put only one of the two lists of predictions back in X's order: undo both "
         "permutations, out[order_a] = pred_a and out[order_b] = pred_b"),
        (lambda *a: ref(*a) * len(a[1]) / (len(a[1]) - 1),
         "you divided by m - 1: the fraction of the m examples is (number changed) / m; divide by m = len(X), not m - 1"),
        (lambda model, X, b, oa, ob: _changed_per_example(model, X, b, oa, ob),
         "you returned one comparison per example: return one number, the fraction of them that "
         "changed (their mean)"),
    ]
    check_function("fraction_changed", fn, ref, cases, diagnoses)


