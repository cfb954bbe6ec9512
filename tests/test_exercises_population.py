"""Chapters 4 (running estimates) and 5 (population statistics): typical wrong answers and
right answers written otherwise (tests/test_exercises.py runs them), tests of those checkers,
and tests of bnkit.recording, which chapter 4 uses."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bnkit import running
from bnkit.checks import ch04_running_estimates, ch05_population_stats
from bnkit.checks._core import ExerciseError
from bnkit.course.nets import mlp
from bnkit.recording import BatchStatsRecorder


# ---------------------------------------------------------------- typical wrong answers


def infer_with_batch_stats(z, gamma, beta, mean, var, eps):
    z_new = z - z.mean(axis=0)  # training mode: the statistics of z itself
    return gamma * z_new / np.sqrt(z.var(axis=0) + eps) + beta


def update_keras(rm, rv, mu, var, count, momentum):
    return momentum * rm + (1 - momentum) * mu, momentum * rv + (1 - momentum) * var * count / (count - 1)


def update_biased(rm, rv, mu, var, count, momentum):
    return (1 - momentum) * rm + momentum * mu, (1 - momentum) * rv + momentum * var


def update_in_place(rm, rv, mu, var, count, momentum):
    rm *= 1 - momentum  # the right values, but the prompt says: do not modify the inputs
    rm += momentum * mu
    return rm, (1 - momentum) * rv + momentum * var * count / (count - 1)


def merge_no_spread(a, b):
    n = a.count + b.count
    return n, (a.count * a.mean + b.count * b.mean) / n, a.m2 + b.m2


def merge_plain_mean(a, b):
    n = a.count + b.count
    delta = b.mean - a.mean
    return n, (a.mean + b.mean) / 2, a.m2 + b.m2 + delta**2 * a.count * b.count / n


def merge_no_n(a, b):
    n = a.count + b.count
    delta = b.mean - a.mean
    return n, (a.count * a.mean + b.count * b.mean) / n, a.m2 + b.m2 + delta**2 * a.count * b.count


def merge_sums_of_squares(a, b):
    """Right in exact arithmetic, through sum x and sum x**2: loses the digits for a large mean."""
    n = a.count + b.count
    s1 = a.count * a.mean + b.count * b.mean
    s2 = (a.m2 + a.count * a.mean**2) + (b.m2 + b.count * b.mean**2)
    return n, s1 / n, s2 - s1**2 / n


WRONG = [
    # chapter 4, exercise 1: test-time BN
    (ch04_running_estimates.bn_infer, infer_with_batch_stats, "you normalised with the statistics of z itself"),
    (ch04_running_estimates.bn_infer, lambda z, g, b, m, v, eps: g * (z - m) / (np.sqrt(v) + eps) + b,
     "eps belongs inside the square root"),
    (ch04_running_estimates.bn_infer, lambda z, g, b, m, v, eps: b * (z - m) / np.sqrt(v + eps) + g, "gamma and beta are swapped"),
    (ch04_running_estimates.bn_infer, lambda z, g, b, m, v, eps: (z - m) / np.sqrt(v + eps), "you returned z_norm"),
    # chapter 4, exercise 2: one running update
    (ch04_running_estimates.update_running, update_keras, "Keras's convention"),
    (ch04_running_estimates.update_running, update_biased, "you averaged the biased variance"),
    (ch04_running_estimates.update_running, lambda rm, rv, mu, var, c, mom: (mu, var * c / (c - 1)),
     "you returned the batch's statistics"),
    (ch04_running_estimates.update_running, lambda rm, rv, mu, var, c, mom: np.stack([rm, rv]),
     "return the pair (new_mean, new_var), 2 values, got ndarray"),
    # chapter 5, exercise 1: Chan et al.'s merge
    (ch05_population_stats.merge, merge_no_spread, "left out the spread between the two means"),
    (ch05_population_stats.merge, merge_plain_mean, "weight each mean by its count"),
    (ch05_population_stats.merge, merge_no_n, "you forgot to divide by n = n_a + n_b"),
    (ch05_population_stats.merge, merge_sums_of_squares, "wrong values on batches of 1000 and 20 values around 1e6"),
    (ch05_population_stats.merge, lambda a, b: (a.count + b.count, a.mean), "return (count, mean, m2), 3 values"),
    # chapter 5, exercise 2: Algorithm 2
    (ch05_population_stats.algorithm2, lambda mus, v, m: (mus.mean(0), v.mean(0)), "you forgot the m/(m-1) correction"),
    (ch05_population_stats.algorithm2, lambda mus, v, m: (mus.mean(0), m / (m - 1) * (v.mean(0) + mus.var(0))),
     "you averaged the variances but also added the spread of the batch means"),
    (ch05_population_stats.algorithm2, lambda mus, v, m: (mus.mean(0), v.mean(0) * len(v) / (len(v) - 1)),
     "not the number of batches"),
    (ch05_population_stats.algorithm2, lambda mus, v, m: (mus.mean(0), m / (m - 1) * np.sqrt(v).mean(0) ** 2),
     "you averaged standard deviations"),
    (ch05_population_stats.algorithm2, lambda mus, v, m: (mus.mean(1), m / (m - 1) * v.mean(1)), "averaged over the features"),
]


# ---------------------------------------------------------------- more wrong answers, right answers


def infer_column_vectors(z, gamma, beta, mean, var, eps):
    col = lambda v: v.reshape(-1, 1)  # noqa: E731  (n, 1): lines up with the first axis of z
    return col(gamma) * (z - col(mean)) / np.sqrt(col(var) + eps) + col(beta)


def infer_unbiased_from_z(z, gamma, beta, mean, var, eps):
    z2 = np.atleast_2d(z)
    return (gamma * (z2 - z2.mean(0)) / np.sqrt(z2.var(0, ddof=1) + eps) + beta).reshape(z.shape)


def infer_with_torch(z, gamma, beta, mean, var, eps):
    t = lambda a: torch.as_tensor(np.atleast_2d(a))  # noqa: E731
    out = torch.nn.functional.batch_norm(t(z), t(mean)[0], t(var)[0], t(gamma)[0], t(beta)[0], False, 0.0, eps)
    return out.reshape(z.shape).numpy()


def infer_folded(z, gamma, beta, mean, var, eps):
    scale = gamma / np.sqrt(var + eps)  # test-time BN is an affine map: z * scale + shift
    return z * scale + (beta - mean * scale)


def update_lerp(rm, rv, mu, var, count, momentum):
    return rm + momentum * (mu - rm), rv + momentum * (var * count / (count - 1) - rv)


def update_torch(rm, rv, mu, var, count, momentum):
    rm, rv = torch.as_tensor(rm), torch.as_tensor(rv)
    return torch.lerp(rm, torch.as_tensor(mu), momentum), torch.lerp(rv, torch.as_tensor(var) * count / (count - 1), momentum)


def update_var_in_place(rm, rv, mu, var, count, momentum):
    rv[:] = (1 - momentum) * rv + momentum * var * count / (count - 1)  # overwrites the caller's buffer
    return (1 - momentum) * rm + momentum * mu, rv


def merge_swapped_weights(a, b):
    n = a.count + b.count
    delta = b.mean - a.mean
    return n, a.mean + delta * a.count / n, a.m2 + b.m2 + delta**2 * a.count * b.count / n


def merge_delta_sign(a, b):
    n = a.count + b.count
    delta = a.mean - b.mean  # reversed
    return n, a.mean + delta * b.count / n, a.m2 + b.m2 + delta**2 * a.count * b.count / n


def merge_returns_variance(a, b):
    n, mean, m2 = running.merge(a, b)
    return n, mean, m2 / n


def merge_n_minus_one(a, b):
    n = a.count + b.count
    delta = b.mean - a.mean
    return n, a.mean + delta * b.count / n, a.m2 + b.m2 + delta**2 * a.count * b.count / (n - 1)


def merge_in_place(a, b):
    n = a.count + b.count
    if n == 0:
        return 0, a.mean, a.m2
    delta = b.mean - a.mean
    a.m2[...] += b.m2 + delta**2 * a.count * b.count / n  # changes the caller's a
    a.mean[...] += delta * b.count / n
    return n, a.mean, a.m2


def merge_no_empty_guard(a, b):
    n = a.count + b.count
    delta = b.mean - a.mean
    return n, a.mean + delta * (b.count / n), a.m2 + b.m2 + delta**2 * (a.count * b.count / n)


def merge_from_sums_in_float64_after_centring(a, b):
    """Right: pool the raw sums around a common shift (a's mean), which avoids the cancellation."""
    n = a.count + b.count
    if n == 0:
        return 0, a.mean, a.m2
    shift = a.mean if a.count else b.mean
    s1 = a.count * (a.mean - shift) + b.count * (b.mean - shift)
    s2 = a.m2 + a.count * (a.mean - shift) ** 2 + b.m2 + b.count * (b.mean - shift) ** 2
    return n, shift + s1 / n, s2 - s1**2 / n


def merge_weighted_means(a, b):
    n = a.count + b.count
    if n == 0:
        return 0, np.zeros_like(a.mean), np.zeros_like(a.m2)
    mean = (a.count * a.mean + b.count * b.mean) / n
    return n, mean, a.m2 + a.count * (a.mean - mean) ** 2 + b.m2 + b.count * (b.mean - mean) ** 2


def algorithm2_integer_division(mus, variances, m):
    return mus.mean(axis=0), m // (m - 1) * variances.mean(axis=0)


def algorithm2_median(mus, variances, m):
    return np.median(mus, axis=0), m / (m - 1) * np.median(variances, axis=0)


def algorithm2_one_number(mus, variances, m):
    return mus.mean(), m / (m - 1) * variances.mean()


def algorithm2_mean_corrected_too(mus, variances, m):
    return m / (m - 1) * mus.mean(axis=0), m / (m - 1) * variances.mean(axis=0)


def algorithm2_in_place(mus, variances, m):
    variances *= m / (m - 1)  # changes the caller's array
    return mus.mean(axis=0), variances.mean(axis=0)


def algorithm2_swapped(mus, variances, m):
    return m / (m - 1) * variances.mean(axis=0), mus.mean(axis=0)


def algorithm2_last_batch(mus, variances, m):
    return mus[-1], m / (m - 1) * variances[-1]


def algorithm2_sums(mus, variances, m):
    T = len(mus)
    return mus.sum(axis=0) / T, variances.sum(axis=0) * m / ((m - 1) * T)


def algorithm2_unbiased_each(mus, variances, m):
    unbiased = variances * (m / (m - 1))  # a new array: PyTorch's buffers hold these
    return np.mean(mus, axis=0), np.mean(unbiased, axis=0)


WRONG += [
    (ch04_running_estimates.bn_infer, infer_column_vectors, "operands could not be broadcast together with shapes (8,5) (5,1)"),
    (ch04_running_estimates.bn_infer, infer_unbiased_from_z, "wrong values on a batch z of shape (8, 5)"),
    (ch04_running_estimates.bn_infer, lambda z, g, b, m, v, eps: g * (m - z) / np.sqrt(v + eps) + b, "wrong sign"),
    (ch04_running_estimates.bn_infer, lambda z, g, b, m, v, eps: g * (z - m) / np.sqrt(v + 1e-5) + b,
     "use the eps passed in"),
    (ch04_running_estimates.bn_infer, lambda z, g, b, m, v, eps: g * z / np.sqrt(v + eps) - m + b,
     "you subtracted running_mean after dividing"),
    (ch04_running_estimates.bn_infer, lambda z, g, b, m, v, eps: g * (z - m) * np.sqrt(v + eps) + b,
     "you multiplied by sqrt(running_var + eps)"),
    (ch04_running_estimates.bn_infer, lambda z, g, b, m, v, eps: np.abs(g) * (z - m) / np.sqrt(v + eps) + b,
     "you used |gamma|"),
    (ch04_running_estimates.bn_infer, lambda z, g, b, m, v, eps: g * (z - m) / np.sqrt(np.sqrt(v) + eps) + b,
     "you took running_var for a standard deviation"),
    (ch04_running_estimates.update_running, update_in_place, "changed its input `rm` in place"),
    (ch04_running_estimates.update_running, update_var_in_place, "changed its input `rv` in place"),
    (ch04_running_estimates.update_running,
     lambda rm, rv, mu, var, c, mom: update_lerp(rm, rv, mu, var, c, 0.1), "use the momentum passed in"),
    (ch04_running_estimates.update_running,
     lambda rm, rv, mu, var, c, mom: update_lerp(rm, rv, mu, var, c, mom)[::-1], "return them in the order (new_mean, new_var)"),
    (ch04_running_estimates.update_running,
     lambda rm, rv, mu, var, c, mom: (rm + mom * (mu - rm), rv + mom * (var * c / (c + 1) - rv)), "not count / (count + 1)"),
    (ch04_running_estimates.update_running,
     lambda rm, rv, mu, var, c, mom: (mom * rm + (1 - mom) * mu, rv + mom * (var * c / (c - 1) - rv)),
     "your running mean uses Keras's convention"),
    (ch04_running_estimates.update_running,
     lambda rm, rv, mu, var, c, mom: (rm + mom * (mu - rm), rv + mom * (var * (c // (c - 1)) - rv)), "integer division"),
    (ch05_population_stats.merge, merge_swapped_weights, "the weights are swapped"),
    (ch05_population_stats.merge, merge_delta_sign, "delta has the wrong sign"),
    (ch05_population_stats.merge, merge_returns_variance, "you returned the variance M2 / n"),
    (ch05_population_stats.merge, merge_n_minus_one, "divides by n = n_a + n_b, not n - 1"),
    (ch05_population_stats.merge, merge_in_place, "changed its input `a` in place"),
    (ch05_population_stats.merge, merge_no_empty_guard, "raised ZeroDivisionError: division by zero"),
    (ch05_population_stats.algorithm2, algorithm2_integer_division, "integer division"),
    (ch05_population_stats.algorithm2, algorithm2_median, "you took medians"),
    (ch05_population_stats.algorithm2, algorithm2_one_number, "wrong shape"),
    (ch05_population_stats.algorithm2, algorithm2_mean_corrected_too, "only the variance gets the m/(m-1) correction"),
    (ch05_population_stats.algorithm2, algorithm2_in_place, "changed its input `variances` in place"),
    (ch05_population_stats.algorithm2, algorithm2_swapped, "return them in the order (mean, var)"),
    (ch05_population_stats.algorithm2, algorithm2_last_batch, "you used only the last batch"),
]

RIGHT = [
    (ch04_running_estimates.bn_infer, infer_with_torch),
    (ch04_running_estimates.bn_infer, infer_folded),
    (ch04_running_estimates.update_running, update_lerp),
    (ch04_running_estimates.update_running, update_torch),
    (ch05_population_stats.merge, merge_from_sums_in_float64_after_centring),
    (ch05_population_stats.merge, merge_weighted_means),
    (ch05_population_stats.algorithm2, algorithm2_sums),
    (ch05_population_stats.algorithm2, algorithm2_unbiased_each),
]


def test_the_right_answers_in_other_forms_pass(capsys):
    """Tensors and lists are accepted (an update in place is not: the prompt forbids it)."""
    ch05_population_stats.merge(lambda a, b: list(running.merge(a, b)))  # a list, and BatchStats itself
    ch05_population_stats.algorithm2(lambda mus, v, m: [torch.as_tensor(x) for x in running.algorithm2(mus, v, m)])
    ch04_running_estimates.bn_infer(lambda *args: torch.as_tensor(running_forward_infer(*args)))
    assert capsys.readouterr().out.count("✓") == 3


def running_forward_infer(z, gamma, beta, mean, var, eps):
    from bnkit.reference import forward_infer

    return forward_infer(z, gamma, beta, mean, var, eps)


def test_a_learners_exception_is_reported_with_the_learners_line():
    def my_algorithm2(mus, variances, m):
        return mus.mean(axis=0), m / (m - 1) * variances.mean(axis=2)  # no axis 2

    with pytest.raises(ExerciseError) as info:
        ch05_population_stats.algorithm2(my_algorithm2)
    message = str(info.value)
    assert message.startswith("algorithm2: your function raised AxisError")
    assert "variances.mean(axis=2)" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_returning_none_is_explained():
    for checker, fn in [(ch05_population_stats.merge, lambda a, b: None),
                        (ch04_running_estimates.update_running, lambda *a: None),
                        (ch04_running_estimates.bn_infer, lambda *a: None)]:
        with pytest.raises(ExerciseError, match="forget `return`"):
            checker(fn)


# ---------------------------------------------------------------- bnkit.recording


def _train_steps(model: torch.nn.Module, steps: int, m: int = 16, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(m, 64, generator=gen) * 2 + 1 for _ in range(steps)]
    model.train()
    with torch.no_grad():
        for x in xs:
            model(x)
    return xs


def test_recorder_matches_the_layers_input_and_buffers():
    model = mlp(hidden=(8, 6), seed=1)
    with BatchStatsRecorder(model) as rec:
        xs = _train_steps(model, 5)
        model.eval()(xs[0])  # eval-mode calls are not recorded
    assert rec.names == ["1", "4"] and rec.steps == 5
    trace = rec.trace("1")
    z = model[0](xs[-1]).detach().double().numpy()  # the first BN layer's last input
    assert trace.mu.shape == (5, 8) and trace.count.tolist() == [16] * 5
    np.testing.assert_allclose(trace.mu[-1], z.mean(0), rtol=1e-12)
    np.testing.assert_allclose(trace.var[-1], z.var(0), rtol=1e-12)  # biased
    np.testing.assert_array_equal(trace.running_var[-1], model[1].running_var.double().numpy())
    means, variances = running.running_estimates(trace.mu, trace.var, 16, "ema", 0.1)
    np.testing.assert_allclose(means, trace.running_mean, atol=1e-6)
    np.testing.assert_allclose(variances, trace.running_var, rtol=1e-6)


def test_recorder_removes_its_hooks_and_rejects_unknown_layers():
    model = mlp(hidden=(8,), seed=0)
    rec = BatchStatsRecorder(model, layers=["1"])
    rec.remove()
    _train_steps(model, 2)
    with pytest.raises(ValueError, match="has not run in training mode"):
        rec.trace("1")
    with pytest.raises(KeyError):
        rec.trace("0")
    with pytest.raises(ValueError, match="not BN layers"):
        BatchStatsRecorder(model, layers=["0"])
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        BatchStatsRecorder(mlp(hidden=(8,), bn=False))


# ---------------------------------------------------------------- the capstone: a whole BN layer


def _layer(mistake="", plain_attributes=False):
    """A BN layer class, right or with one typical mistake."""

    class Layer(torch.nn.Module):
        def __init__(self, num_features, eps=1e-5, momentum=0.1):
            super().__init__()
            self.eps, self.momentum = eps, momentum
            self.weight = torch.nn.Parameter(torch.ones(num_features))
            self.bias = torch.nn.Parameter(torch.zeros(num_features))
            if plain_attributes:  # not in the state_dict, not moved by .to()
                self.running_mean, self.running_var = torch.zeros(num_features), torch.ones(num_features)
                self.num_batches_tracked = torch.tensor(0)
            else:
                self.register_buffer("running_mean", torch.zeros(num_features))
                self.register_buffer("running_var", torch.ones(num_features))
                self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

        def forward(self, x):
            axes = [0] if mistake == "2d only" else [0] + list(range(2, x.dim()))
            shape = (1, -1) + (1,) * (x.dim() - 2)
            training = torch.is_grad_enabled() if mistake == "grad mode" else self.training
            if training or mistake == "eval uses batch":
                mu, var = x.mean(dim=axes), x.var(dim=axes, unbiased=mistake == "unbiased norm")
                if mistake == "detach":
                    mu, var = mu.detach(), var.detach()
            if training or mistake == "update in eval":
                with torch.no_grad():
                    b_mu, b_var = x.mean(dim=axes), x.var(dim=axes, unbiased=False)
                    if mistake != "no count":
                        self.num_batches_tracked += 1
                    m = self.momentum
                    if m is None:
                        m = 0.1 if mistake == "none as 0.1" else 1.0 / float(self.num_batches_tracked)
                    if mistake == "keras":
                        m = 1 - m
                    count = x.shape[0] if mistake == "count m" else x.numel() // x.shape[1]
                    unbiased = b_var if mistake == "biased buffer" else b_var * count / (count - 1)
                    self.running_mean.mul_(1 - m).add_(m * b_mu)
                    self.running_var.mul_(1 - m).add_(m * unbiased)
            if not (training or mistake == "eval uses batch"):
                mu, var = self.running_mean, self.running_var
            if mistake == "eps outside":
                std = torch.sqrt(var.reshape(shape)) + self.eps
            else:
                std = torch.sqrt(var.reshape(shape) + self.eps)
            return self.weight.reshape(shape) * (x - mu.reshape(shape)) / std + self.bias.reshape(shape)

    Layer.__name__ = "MyBatchNorm"
    return Layer


class LayerWithFunctional(torch.nn.Module):
    """Right: keep the state, let F.batch_norm do the arithmetic (as torch.nn does)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = torch.nn.Parameter(torch.ones(num_features))
        self.bias = torch.nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x):
        m = 0.0 if self.momentum is None else self.momentum  # (unused in eval mode)
        if self.training:
            self.num_batches_tracked.add_(1)
            m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else m
        return torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                              self.training, m, self.eps)


class LayerWithLerp(LayerWithFunctional):
    """Right: the update written with torch.lerp, the statistics through a (C, -1) view."""

    def forward(self, x):
        C = x.shape[1]
        flat = x.transpose(0, 1).reshape(C, -1)  # (C, m*H*W)
        shape = (1, C) + (1,) * (x.dim() - 2)
        if self.training:
            mu, var = flat.mean(dim=1), flat.var(dim=1, unbiased=False)
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.copy_(torch.lerp(self.running_mean, mu, m))
                self.running_var.copy_(torch.lerp(self.running_var, flat.var(dim=1, unbiased=True), m))
        else:
            mu, var = self.running_mean, self.running_var
        inv_std = torch.rsqrt(var + self.eps)
        return (x - mu.reshape(shape)) * (self.weight * inv_std).reshape(shape) + self.bias.reshape(shape)


WRONG += [
    (ch04_running_estimates.batch_norm_layer, _layer("biased buffer"), "you mixed the biased batch variance into running_var"),
    (ch04_running_estimates.batch_norm_layer, _layer("keras"), "Keras's convention"),
    (ch04_running_estimates.batch_norm_layer, _layer("none as 0.1"), "with momentum=None PyTorch takes the cumulative average"),
    (ch04_running_estimates.batch_norm_layer, _layer("grad mode"), "the mode is self.training"),
    (ch04_running_estimates.batch_norm_layer, _layer(plain_attributes=True), "register running_mean, running_var"),
    (ch04_running_estimates.batch_norm_layer, _layer("detach"), "do not .detach() them in training mode"),
    (ch04_running_estimates.batch_norm_layer, _layer("2d only"), "(m, C, H, W) = (4, 3, 5, 6) input"),
    (ch04_running_estimates.batch_norm_layer, _layer("eval uses batch"), "in eval mode you normalised with the batch's statistics"),
    (ch04_running_estimates.batch_norm_layer, _layer("count m"), "running_var: wrong values on (m, C, H, W) = (4, 3, 5, 6) input"),
    (ch04_running_estimates.batch_norm_layer, _layer("unbiased norm"), "you normalised with the unbiased variance"),
    (ch04_running_estimates.batch_norm_layer, _layer("update in eval"), "in eval mode"),
    (ch04_running_estimates.batch_norm_layer, _layer("no count"), "num_batches_tracked"),
    (ch04_running_estimates.batch_norm_layer, _layer("eps outside"), "eps belongs inside the square root"),
]
RIGHT += [
    (ch04_running_estimates.batch_norm_layer, _layer()),
    (ch04_running_estimates.batch_norm_layer, LayerWithFunctional),
    (ch04_running_estimates.batch_norm_layer, LayerWithLerp),
]


# ---------------------------------------------------------------- chapter 5: per-layer statistics by hand


def _bns(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _stats_by_hand(upstream_updated=True, unbiased=True, restore=True, layers=None, last_only=False,
                   upstream_train=False, per_batch_average=False):
    """A learner's per-layer statistics, right or with one typical mistake."""

    def fn(model, batches):
        was = model.training
        model.train() if upstream_train else model.eval()
        todo = _bns(model)[:layers] if layers else _bns(model)
        steps = [todo] if not upstream_updated or upstream_train else [[bn] for bn in todo]
        for group in steps:
            inputs = {bn: [] for bn in group}
            hooks = [bn.register_forward_pre_hook(lambda m, a: inputs[m].append(a[0].detach().double()))
                     for bn in group]
            with torch.no_grad():
                for x in batches:
                    if last_only:
                        for bn in group:
                            inputs[bn].clear()
                    model(x)
            for h in hooks:
                h.remove()
            for bn in group:
                axes = [0] + list(range(2, inputs[bn][0].dim()))
                if per_batch_average:
                    m = inputs[bn][0].numel() // inputs[bn][0].shape[1]
                    mean = torch.stack([z.mean(dim=axes) for z in inputs[bn]]).mean(0)
                    var = torch.stack([z.var(dim=axes, unbiased=False) for z in inputs[bn]]).mean(0) * m / (m - 1)
                else:
                    z = torch.cat(inputs[bn])
                    mean, var = z.mean(dim=axes), z.var(dim=axes, unbiased=unbiased)
                with torch.no_grad():
                    bn.running_mean.copy_(mean)
                    bn.running_var.copy_(var)
        if restore:
            model.train(was)

    return fn


def stats_with_recompute(model, batches):
    import bnkit

    bnkit.recompute_stats(model, batches, upstream="eval")


def stats_by_merging(model, batches):
    """Right: per-batch (count, mean, M2) merged with Chan et al.'s formula, layer after layer."""
    was = model.training
    model.eval()
    for bn in _bns(model):
        total = None

        def hook(module, args):
            nonlocal total
            z = args[0].double()
            z2 = z.transpose(0, 1).reshape(z.shape[1], -1).T.numpy()  # (values, C)
            stats = running.batch_stats(z2)
            total = stats if total is None else running.merge(total, stats)

        handle = bn.register_forward_pre_hook(hook)
        with torch.no_grad():
            for x in batches:
                model(x)
        handle.remove()
        with torch.no_grad():
            bn.running_mean.copy_(torch.as_tensor(total.mean))
            bn.running_var.copy_(torch.as_tensor(total.m2 / (total.count - 1)))
    model.train(was)


WRONG += [
    (ch05_population_stats.layer_by_layer_stats, _stats_by_hand(upstream_train=True), "with the BN layers in training mode"),
    (ch05_population_stats.layer_by_layer_stats, _stats_by_hand(upstream_updated=False), "with the old statistics upstream"),
    (ch05_population_stats.layer_by_layer_stats, _stats_by_hand(unbiased=False), "running_var holds the unbiased variance"),
    (ch05_population_stats.layer_by_layer_stats, _stats_by_hand(per_batch_average=True), "running_mean is wrong"),
    (ch05_population_stats.layer_by_layer_stats, _stats_by_hand(restore=False), "changed the modes"),
    (ch05_population_stats.layer_by_layer_stats, _stats_by_hand(layers=1), "still holds its old statistics"),
    (ch05_population_stats.layer_by_layer_stats, _stats_by_hand(last_only=True), "running_mean is wrong"),
    (ch05_population_stats.layer_by_layer_stats, stats_with_recompute, "you called recompute_stats"),
]
RIGHT += [
    (ch05_population_stats.layer_by_layer_stats, _stats_by_hand()),
    (ch05_population_stats.layer_by_layer_stats, stats_by_merging),
]
