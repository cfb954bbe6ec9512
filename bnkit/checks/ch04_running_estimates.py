"""Exercise checkers for chapter 4, running estimates across mini-batches.

    bn_infer(fn)          fn(z, gamma, beta, running_mean, running_var, eps) -> z_tilde
    update_running(fn)    fn(running_mean, running_var, mu, var, count, momentum) -> (mean, var)
    batch_norm_layer(cls) cls(num_features, eps=1e-5, momentum=0.1): a whole BN layer (nn.Module)

Each compares the learner's function with bnkit on fresh inputs and names the typical
mistake when the output matches a known wrong variant.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from bnkit import reference as ref
from bnkit import running
from bnkit.checks._core import (
    Case, ExerciseError, _check_returns, _features, _pair, call_learner, check_function, describe_difference,
)

__all__ = ["bn_infer", "update_running", "batch_norm_layer"]

HINT_4D_LAYER = ("for (m, C, H, W) input the statistics are per channel over axes (0, 2, 3); reshape "
                 "(C,) vectors to (1, C, 1, 1) and count m*H*W values per channel")


def bn_infer(fn: Callable, seed: int = 0) -> None:
    """Check ``fn(z, gamma, beta, running_mean, running_var, eps) -> z_tilde``, the shape of z."""
    rng = np.random.default_rng(seed)
    cases = []
    for label, shape, eps, dtype in [
        ("a batch z of shape (8, 5)", (8, 5), 1e-3, np.float64),
        ("one example z of shape (6,)", (6,), 1e-5, np.float64),
        ("one example z of shape (4,), eps = 0.5", (4,), 0.5, np.float64),
        ("a batch z of shape (2, 7), float32", (2, 7), 1e-5, np.float32),
        ("one example z of shape (3,), float32, eps = 0.1", (3,), 0.1, np.float32),
    ]:
        n = shape[-1]
        mean, var = _features(rng, n)
        z = mean + np.sqrt(var) * rng.normal(size=shape) + rng.normal(0, 1, n)  # not centred on mean
        gamma = rng.uniform(0.5, 2.0, n) * rng.choice([-1.0, 1.0], n)
        beta = rng.normal(0, 2, n) + 5.0
        args = tuple(a.astype(dtype) for a in (z, gamma, beta, mean, var)) + (eps,)
        cases.append(Case(label, args))

    def batch_stats(z, gamma, beta, mean, var, eps):  # training mode: the statistics of z itself
        z2 = z.reshape(1, -1) if z.ndim == 1 else z
        out = gamma * (z2 - z2.mean(axis=0)) / np.sqrt(z2.var(axis=0) + eps) + beta
        return out.reshape(z.shape)

    def own_stats(z, gamma, beta, mean, var, eps):  # a single example normalised over its features
        return gamma * (z - z.mean(axis=-1, keepdims=True)) / np.sqrt(z.var(axis=-1, keepdims=True) + eps) + beta

    diagnoses = [
        (batch_stats, "you normalised with the statistics of z itself, as in training: at test time "
         "use running_mean and running_var (one example has no batch statistics: its variance is 0)"),
        (own_stats, "you normalised each example over its own features: at test time centre with "
         "running_mean and divide by sqrt(running_var + eps), per feature"),
        (lambda z, g, b, mean, var, eps: g * (z - mean) / (np.sqrt(var) + eps) + b,
         "eps belongs inside the square root: divide by sqrt(running_var + eps)"),
        (lambda z, g, b, mean, var, eps: g * (z - mean) / np.sqrt(var) + b,
         "you left out eps: divide by sqrt(running_var + eps), as in training"),
        (lambda z, g, b, mean, var, eps: g * (z - mean) / (var + eps) + b,
         "you divided by the variance: divide by the standard deviation sqrt(running_var + eps)"),
        (lambda z, g, b, mean, var, eps: b * (z - mean) / np.sqrt(var + eps) + g,
         "gamma and beta are swapped: gamma scales and beta shifts"),
        (lambda z, g, b, mean, var, eps: g * ((z - mean) / np.sqrt(var + eps) + b),
         "beta is added after scaling: gamma * z_norm + beta, not gamma * (z_norm + beta)"),
        (lambda z, g, b, mean, var, eps: (z - mean) / np.sqrt(var + eps),
         "you returned z_norm: finish with step 5, gamma * z_norm + beta"),
        (lambda z, g, b, mean, var, eps: g * (z + mean) / np.sqrt(var + eps) + b,
         "you added running_mean: centre with z - running_mean"),
        (lambda z, g, b, mean, var, eps: g * (mean - z) / np.sqrt(var + eps) + b,
         "wrong sign: centre with z - running_mean, not running_mean - z"),
        (lambda z, g, b, mean, var, eps: g * (z - mean) / np.sqrt(var + 1e-5) + b,
         "you used eps = 1e-5 whatever the argument: use the eps passed in"),
        (lambda z, g, b, mean, var, eps: g * z / np.sqrt(var + eps) - mean + b,
         "you subtracted running_mean after dividing: centre first, (z - running_mean) / sqrt(running_var + eps)"),
        (lambda z, g, b, mean, var, eps: g * (z - mean) * np.sqrt(var + eps) + b,
         "you multiplied by sqrt(running_var + eps): divide by it"),
        (lambda z, g, b, mean, var, eps: np.abs(g) * (z - mean) / np.sqrt(var + eps) + b,
         "you used |gamma|: gamma may be negative"),
        (lambda z, g, b, mean, var, eps: g * (z - mean) / np.sqrt(np.sqrt(var) + eps) + b,
         "you took running_var for a standard deviation: it is a variance, divide by sqrt(running_var + eps)"),
    ]
    check_function("bn_infer", fn, ref.forward_infer, cases, diagnoses)


def update_running(fn: Callable, seed: int = 0) -> None:
    """Check ``fn(running_mean, running_var, mu, var, count, momentum) -> (new_mean, new_var)``."""
    rng = np.random.default_rng(seed)
    cases = []
    for label, n, count, momentum, fresh, dtype in [
        ("5 features, a batch of 64, momentum 0.1", 5, 64, 0.1, False, np.float64),
        ("3 features, a batch of 2 (the smallest), momentum 0.1", 3, 2, 0.1, False, np.float64),
        ("PyTorch's starting buffers (0 and 1), a batch of 8, momentum 0.1", 4, 8, 0.1, True, np.float64),
        ("6 features, a batch of 3, momentum 0.3", 6, 3, 0.3, False, np.float64),
        ("a conv layer: count = m*H*W = 8*4*4 = 128 values per channel, momentum 0.01", 4, 128, 0.01, False,
         np.float64),
        ("momentum 1 (the buffers become the batch's statistics), a batch of 5", 3, 5, 1.0, False, np.float64),
        ("float32 vectors of 7 features, a batch of 16, momentum 0.1", 7, 16, 0.1, False, np.float32),
    ]:
        if fresh:
            running_mean, running_var = np.zeros(n), np.ones(n)
        else:
            running_mean, running_var = _features(rng, n)
        mu, var = _features(rng, n)
        vectors = tuple(a.astype(dtype) for a in (running_mean, running_var, mu, var))
        cases.append(Case(label, vectors + (count, momentum)))

    def reference(rm, rv, mu, var, count, momentum):
        return np.stack(running.update_running(rm, rv, mu, var, count, 1, "ema", momentum))

    def variant(keras=False, biased=False, inverse=False, after=False, mean_too=False):
        def f(rm, rv, mu, var, count, momentum):
            w = 1 - momentum if keras else momentum
            factor = (count - 1) / count if inverse else (1.0 if biased or after else count / (count - 1))
            new_mean = (1 - w) * rm + w * mu * (count / (count - 1) if mean_too else 1.0)
            new_var = (1 - w) * rv + w * var * factor
            return np.stack([new_mean, new_var * (count / (count - 1) if after else 1.0)])

        return f

    diagnoses = [
        (variant(keras=True), "your momentum weights the old average (Keras's convention): in PyTorch "
         "momentum is the weight of the new batch, running = (1 - momentum) * running + momentum * batch"),
        (variant(biased=True), "you averaged the biased variance: PyTorch mixes the unbiased "
         "count / (count - 1) * var into running_var (it normalises with the biased one)"),
        (variant(inverse=True), "the correction is upside down: the unbiased variance is "
         "count / (count - 1) * var, larger than var"),
        (variant(after=True), "you applied count / (count - 1) to the whole new running_var: only the "
         "batch's variance is corrected, the old running_var is already unbiased"),
        (variant(mean_too=True), "only the variance gets the count / (count - 1) correction, not the mean"),
        (lambda rm, rv, mu, var, count, momentum: np.stack([mu, var * count / (count - 1)]),
         "you returned the batch's statistics: mix them into the running ones with weight momentum"),
        (lambda rm, rv, mu, var, count, momentum: np.stack([rm, rv]),
         "you returned the running statistics unchanged: mix in the batch with weight momentum"),
        (lambda rm, rv, mu, var, count, momentum: reference(rm, rv, mu, var, count, 0.1),
         "you used momentum = 0.1 whatever the argument: use the momentum passed in"),
        (lambda rm, rv, mu, var, count, momentum: reference(rm, rv, mu, var, count, momentum)[::-1],
         "you returned (new_var, new_mean): return them in the order (new_mean, new_var)"),
        (lambda rm, rv, mu, var, count, momentum: np.stack(
            [(1 - momentum) * rm + momentum * mu, (1 - momentum) * rv + momentum * var * count / (count + 1)]),
         "the correction is count / (count - 1), not count / (count + 1)"),
        (lambda rm, rv, mu, var, count, momentum: np.stack(
            [momentum * rm + (1 - momentum) * mu, (1 - momentum) * rv + momentum * var * count / (count - 1)]),
         "your running mean uses Keras's convention (momentum weights the old average) while the "
         "variance uses PyTorch's: in PyTorch, momentum weights the new batch in both"),
        (lambda rm, rv, mu, var, count, momentum: np.stack(
            [(1 - momentum) * rm + momentum * mu, (1 - momentum) * rv + momentum * var * (count // (count - 1))]),
         "count // (count - 1) is an integer division (1 for count > 2): write count / (count - 1)"),
    ]
    _check_returns("update_running", fn, cases[0], 2, "the pair (new_mean, new_var)")
    check_function("update_running", _pair(fn), reference, cases, diagnoses, unchanged=True)




# ---------------------------------------------------------------- the capstone: a whole BN layer

_KEYS = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def _layer_cases(seed: int) -> list[tuple[str, int, dict, tuple]]:
    """(label, num_features, constructor kwargs, input shape) of every configuration tried."""
    return [
        ("(m, n) = (16, 5) input, default arguments", 5, {}, (16, 5)),
        ("(m, C, H, W) = (4, 3, 5, 6) input, eps=1e-3, momentum=0.3", 3, dict(eps=1e-3, momentum=0.3), (4, 3, 5, 6)),
        ("(m, n) = (6, 4) input, momentum=None (the cumulative average)", 4, dict(momentum=None), (6, 4)),
        ("(m, C, H, W) = (2, 4, 3, 3) input, momentum=None, eps=0.1", 4, dict(momentum=None, eps=0.1), (2, 4, 3, 3)),
    ]


def _torch_bn(num_features: int, ndim: int, **kwargs: Any) -> torch.nn.Module:
    kind = torch.nn.BatchNorm1d if ndim == 2 else torch.nn.BatchNorm2d
    return kind(num_features, **kwargs).double()


def _construct(name: str, cls: Callable, num_features: int, kwargs: dict, label: str) -> torch.nn.Module:
    layer = call_learner(name, cls, (num_features,), kwargs, label=f"{cls.__name__}({num_features}"
                         + "".join(f", {k}={v}" for k, v in kwargs.items()) + ")")
    if not isinstance(layer, torch.nn.Module):
        raise ExerciseError(f"{name}: {getattr(cls, '__name__', 'your class')}(...) gave a "
                            f"{type(layer).__name__}: write a class that derives from torch.nn.Module")
    keys = list(layer.state_dict())
    if sorted(keys) != sorted(_KEYS):
        missing = [k for k in _KEYS if k not in keys]
        extra = [k for k in keys if k not in _KEYS]
        raise ExerciseError(
            f"{name}: your layer's state_dict has {keys}, torch.nn.BatchNorm's has {_KEYS}"
            + (f"; missing {missing}" if missing else "") + (f"; extra {extra}" if extra else "")
            + ". Make weight and bias nn.Parameters, and register running_mean, running_var and "
            "num_batches_tracked with self.register_buffer(...), so they move with .to() and are saved"
        )
    params = {n for n, _ in layer.named_parameters()}
    if params != {"weight", "bias"}:
        raise ExerciseError(f"{name}: the layer's parameters are {sorted(params)}: weight and bias must be "
                            "nn.Parameters (learnt), the running statistics buffers (not learnt)")
    return layer.double()


def _compare(name: str, what: str, got: torch.Tensor, expected: torch.Tensor, label: str, hint: str = "",
             mistakes: Sequence[tuple[torch.Tensor, str]] = ()) -> None:
    """got must equal expected; else the first of mistakes (what a known mistake gives, its
    message) that got equals names it, or describe_difference says how it differs."""
    got_np, exp_np = _tensor(got), _tensor(expected)
    if got_np.shape == exp_np.shape and np.allclose(got_np, exp_np, rtol=1e-7, atol=1e-9):
        return
    for wrong, message in mistakes:
        w = _tensor(wrong)
        if w.shape == got_np.shape and np.allclose(got_np, w, rtol=1e-7, atol=1e-9):
            raise ExerciseError(f"{name}: {message} (on {label})")
    raise ExerciseError(f"{name}: {what}: {describe_difference(got_np, exp_np, Case(label, (exp_np,), hint))}")


def _output_mistakes(x: torch.Tensor, layer: torch.nn.Module, training: bool) -> list[tuple[torch.Tensor, str]]:
    """What typical mistakes give as the output of ``layer`` (a torch BN in the state before the call)."""
    axes = [0] + list(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    w, b, eps = layer.weight.detach().reshape(shape), layer.bias.detach().reshape(shape), layer.eps
    mu, var = x.mean(dim=axes).reshape(shape), x.var(dim=axes, unbiased=False).reshape(shape)
    rm, rv = layer.running_mean.reshape(shape), layer.running_var.reshape(shape)
    if training:
        return [
            (w * (x - rm) / torch.sqrt(rv + eps) + b,
             "in training mode you normalised with the running statistics: the mode is self.training "
             "(set by .train() and .eval()), not whether gradients are on: under torch.no_grad() a "
             "layer in training mode still uses, and updates, the batch statistics"),
            (w * (x - mu) / torch.sqrt(x.var(dim=axes, unbiased=True).reshape(shape) + eps) + b,
             "you normalised with the unbiased variance: in training mode BN divides by the biased "
             "(1/m) one; the unbiased one goes into running_var only"),
            (w * (x - mu) / (torch.sqrt(var) + eps) + b, "eps belongs inside the square root: sqrt(var + eps)"),
        ]
    return [
        (w * (x - mu) / torch.sqrt(var + eps) + b,
         "in eval mode you normalised with the batch's statistics: use running_mean and running_var"),
        (w * (x - rm) / (torch.sqrt(rv) + eps) + b, "eps belongs inside the square root: sqrt(running_var + eps)"),
    ]


def _tensor(t: Any) -> np.ndarray:
    return np.asarray(t.detach().cpu().double().numpy() if hasattr(t, "detach") else t, dtype=np.float64)


def _buffer_mistake(mine: torch.nn.Module, before: dict, x: torch.Tensor, momentum: float | None) -> str:
    """Name a known mistake in the running buffers after one training step, or ''."""
    axes = [0] + list(range(2, x.dim()))
    count = x.numel() // x.shape[1]
    mu, var = x.mean(dim=axes), x.var(dim=axes, unbiased=False)
    t = int(before["num_batches_tracked"]) + 1
    m = 1.0 / t if momentum is None else momentum
    rm, rv = before["running_mean"], before["running_var"]
    got_m, got_v = mine.running_mean.detach(), mine.running_var.detach()
    close = lambda a, b: bool(torch.allclose(a.double(), b.double(), rtol=1e-7, atol=1e-9))  # noqa: E731
    if close(got_m, rm) and close(got_v, rv):
        return ("your running statistics did not change in a training step: update them in forward "
                "when self.training is True (not only under torch.enable_grad(): the check also "
                "trains under torch.no_grad())")
    if close(got_v, (1 - m) * rv + m * var):
        return ("you mixed the biased batch variance into running_var: PyTorch stores the unbiased one, "
                "count / (count - 1) * var, while it normalises with the biased one")
    if momentum is not None and close(got_m, m * rm + (1 - m) * mu):
        return ("your momentum weights the old average (Keras's convention): in PyTorch, running = "
                "(1 - momentum) * running + momentum * batch")
    if momentum is None and close(got_m, 0.9 * rm + 0.1 * mu):
        return ("with momentum=None PyTorch takes the cumulative average: the weight of batch t is "
                "1 / t, with t = num_batches_tracked after the step (you used 0.1)")
    if momentum is None and close(got_m, (1 - 1 / max(t - 1, 1)) * rm + mu / max(t - 1, 1)):
        return ("with momentum=None the weight of batch t is 1 / t, t counted after incrementing "
                "num_batches_tracked (off by one)")
    if close(got_m, mu) and close(got_v, var * count / (count - 1)) and momentum not in (None, 1.0):
        return "you replaced the running statistics by the batch's: mix them in with weight momentum"
    return ""


def batch_norm_layer(cls: Callable, seed: int = 0) -> None:
    """Check a whole BN layer class ``cls(num_features, eps=1e-5, momentum=0.1)`` against
    torch.nn.BatchNorm1d (2-D input) and BatchNorm2d (4-D input): the state_dict's keys and
    initial values, training-mode outputs, input gradients and running buffers over several
    steps (momentum=None included, under torch.no_grad() too), eval-mode outputs (a single
    example included) with the buffers left alone, and state_dict in both directions."""
    __tracebackhide__ = True
    name = "batch_norm_layer"
    if not callable(cls):
        raise ExerciseError(f"{name}: expected a class, got {type(cls).__name__}")
    gen = torch.Generator().manual_seed(seed)
    for label, n, kwargs, shape in _layer_cases(seed):
        hint = HINT_4D_LAYER if len(shape) == 4 else ""
        mine = _construct(name, cls, n, kwargs, label)
        ref = _torch_bn(n, len(shape), **kwargs)
        for key in _KEYS:
            _compare(name, f"the initial {key}", mine.state_dict()[key], ref.state_dict()[key], label,
                     "PyTorch starts weight at 1, bias at 0, running_mean at 0, running_var at 1, "
                     "num_batches_tracked at 0")
        with torch.no_grad():
            ref.weight.copy_(torch.rand(n, generator=gen, dtype=torch.float64) + 0.5)
            ref.bias.copy_(torch.randn(n, generator=gen, dtype=torch.float64))
        call_learner(name, mine.load_state_dict, (ref.state_dict(),), label=label)
        mine.train(), ref.train()
        offset = torch.randn((1, n) + (1,) * (len(shape) - 2), generator=gen, dtype=torch.float64) * 3
        for step in range(1, 5):
            x = torch.randn(shape, generator=gen, dtype=torch.float64) * (1 + step) + offset
            no_grad = step == 3  # the mode is self.training, not whether gradients are on
            where = f"{label}, training step {step}" + (" (under torch.no_grad())" if no_grad else "")
            before = {k: v.clone() for k, v in mine.state_dict().items()}
            x_mine, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
            mistakes = _output_mistakes(x, ref, training=True)
            with torch.no_grad() if no_grad else contextlib.nullcontext():
                out = call_learner(name, mine, (x_mine,), label=where, hint=hint)
                expected = ref(x_ref)
            if not torch.equal(x_mine.detach(), x):
                raise ExerciseError(f"{name}: your forward changed its input x in place ({where}): "
                                    "compute new tensors")
            _compare(name, "the training-mode output", out, expected, where,
                     "in training mode normalise with the batch's mean and biased variance", mistakes)
            if not no_grad:
                upstream = torch.randn(shape, generator=gen, dtype=torch.float64)
                (expected * upstream).sum().backward()
                call_learner(name, lambda: (out * upstream).sum().backward(), label=where)
                if x_mine.grad is None:
                    raise ExerciseError(f"{name}: no gradient reaches x through your layer ({where}): "
                                        "do not detach or use torch.no_grad() in the training-mode forward")
                _compare(name, "the gradient with respect to x", x_mine.grad, x_ref.grad, where,
                         "the batch mean and variance depend on x: do not .detach() them in training mode")
            right = all(torch.allclose(mine.state_dict()[k].double(), ref.state_dict()[k].double(), rtol=1e-7,
                                       atol=1e-9) for k in ("running_mean", "running_var", "num_batches_tracked"))
            mistake = "" if right else _buffer_mistake(mine, before, x, kwargs.get("momentum", 0.1))
            if mistake:
                raise ExerciseError(f"{name}: {mistake} ({where})")
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                _compare(name, key, mine.state_dict()[key], ref.state_dict()[key], where,
                         "running = (1 - momentum) * running + momentum * batch, with the unbiased batch "
                         "variance; momentum=None: the weight is 1 / num_batches_tracked")
        mine.eval(), ref.eval()
        before = {k: v.clone() for k, v in mine.state_dict().items()}
        for what, x in [("a new batch", torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + offset),
                        ("a single example", torch.randn((1,) + shape[1:], generator=gen, dtype=torch.float64))]:
            where = f"{label}, eval mode, {what}"
            with torch.enable_grad():
                out = call_learner(name, mine, (x,), label=where, hint=hint)
            with torch.no_grad():
                expected = ref(x)
            _compare(name, "the eval-mode output", out, expected, where,
                     "in eval mode normalise with running_mean and running_var, not the batch's statistics",
                     _output_mistakes(x, ref, training=False))
        changed = [k for k, v in mine.state_dict().items() if not torch.equal(v, before[k])]
        if changed:
            raise ExerciseError(f"{name}: your layer changed {changed} in eval mode ({label}): at test time "
                                "the running statistics are used, never updated")
        fresh = _torch_bn(n, len(shape), **kwargs)
        fresh.load_state_dict(mine.state_dict())
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        _compare(name, "torch's BN loaded with your state_dict", fresh.eval()(x), ref(x), label)
    print(f"✓ {name}: matches torch.nn.BatchNorm1d/2d on {len(_layer_cases(seed))} configurations "
          "(training steps, gradients, buffers, eval mode, state_dict)")
