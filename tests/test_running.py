"""bnkit.running: EWA and bias correction, momentum conventions, the running estimators (vs
torch.nn's buffers) and the exact mergeable statistics (vs np.var(ddof=1) of the whole set)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bnkit import running


# ---------------------------------------------------------------- helpers


def _ema_by_hand(values, beta, bias_correction=False):
    v, out = 0.0, []
    for t, theta in enumerate(values, start=1):
        v = beta * v + (1 - beta) * theta
        out.append(v / (1 - beta**t) if bias_correction else v)
    return np.array(out)


def _batches(sizes, n=3, seed=0, offset=0.0):
    """Batches (m_b, n) of a shifted, scaled normal, one per size."""
    rng = np.random.default_rng(seed)
    return [offset + rng.normal(loc=rng.uniform(-2, 2, n), scale=rng.uniform(0.5, 3, n), size=(m, n)) for m in sizes]


def _batch_moments(batches):
    """(T, n) batch means and *biased* variances: what a BN layer normalises with."""
    return np.stack([b.mean(axis=0) for b in batches]), np.stack([b.var(axis=0) for b in batches])


def _torch_running(batches, **bn_args):
    """Train a torch.nn.BatchNorm1d (float64) on the batches; its running_mean and running_var."""
    bn = torch.nn.BatchNorm1d(batches[0].shape[1], dtype=torch.float64, **bn_args).train()
    with torch.no_grad():
        for b in batches:
            bn(torch.from_numpy(b))
    return bn.running_mean.numpy(), bn.running_var.numpy()


# ---------------------------------------------------------------- exponentially weighted averages


@pytest.mark.parametrize("bias_correction", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.99])
def test_ema_matches_a_hand_loop(beta, bias_correction):
    values = np.random.default_rng(0).normal(size=(40, 3))
    expected = _ema_by_hand(values, beta, bias_correction)
    np.testing.assert_allclose(running.ema(values, beta, bias_correction), expected, rtol=1e-13)


def test_ema_closed_form_is_a_weighted_sum():
    """v_T = (1 - beta) sum_t beta**(T - t) theta_t."""
    beta, values = 0.8, np.random.default_rng(1).normal(size=25)
    T = len(values)
    weights = (1 - beta) * beta ** (T - np.arange(1, T + 1))
    assert running.ema(values, beta)[-1] == pytest.approx(np.sum(weights * values), rel=1e-13)


@pytest.mark.parametrize("beta", [0.5, 0.9, 0.98])
def test_ema_of_a_constant_and_its_bias_correction(beta):
    c, T = 3.5, 30
    t = np.arange(1, T + 1)
    np.testing.assert_allclose(running.ema(np.full(T, c), beta), c * (1 - beta**t), rtol=1e-13)
    np.testing.assert_allclose(running.ema(np.full(T, c), beta, bias_correction=True), c, rtol=1e-13)


@pytest.mark.parametrize("beta", [0.5, 0.9, 0.98])
def test_ema_window_is_about_one_over_one_minus_beta(beta):
    """The weight of each past value in v_T (the EWA of unit impulses) sums to 1 - beta**T -> 1,
    and the mean age of what v_T averages is 1 / (1 - beta) steps."""
    T = 2000
    weights = running.ema(np.eye(T), beta)[-1][::-1]  # weights[k]: the value k steps before the last
    assert weights.sum() == pytest.approx(1 - beta**T, rel=1e-12)
    assert np.sum(np.arange(1, T + 1) * weights) == pytest.approx(1 / (1 - beta), rel=1e-9)
    # the most recent 1 / (1 - beta) values hold about 1 - 1/e of the weight
    window = int(round(1 / (1 - beta)))
    assert weights[:window].sum() == pytest.approx(1 - beta**window)
    assert 0.6 < weights[:window].sum() < 0.8


def test_ema_returns_float64_and_leaves_its_input_alone():
    values = np.arange(6, dtype=np.float32).reshape(3, 2)
    out = running.ema(values, 0.9)
    assert out.dtype == np.float64 and out.shape == (3, 2)
    np.testing.assert_array_equal(values, np.arange(6).reshape(3, 2))


@pytest.mark.parametrize("beta", [1.0, -0.1, 1.5, True, "0.9"])
def test_ema_refuses_a_beta_outside_0_1(beta):
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\)"):
        running.ema(np.ones(3), beta)


# ---------------------------------------------------------------- momentum conventions


@pytest.mark.parametrize(
    "momentum, convention, beta",
    [(0.1, "pytorch", 0.9), (0.01, "pytorch", 0.99), (0.9, "keras", 0.9), (0.99, "keras", 0.99),
     (0.9, "cs231n", 0.9), (0.7, "beta", 0.7)],
)
def test_to_beta_and_from_beta(momentum, convention, beta):
    assert running.to_beta(momentum, convention) == pytest.approx(beta, abs=1e-15)
    assert running.from_beta(beta, convention) == pytest.approx(momentum, abs=1e-15)


@pytest.mark.parametrize("convention", ["pytorch", "keras", "cs231n", "beta"])
@pytest.mark.parametrize("momentum", [0.0, 0.01, 0.1, 0.5, 0.9, 0.999])
def test_to_beta_from_beta_round_trip(momentum, convention):
    assert running.from_beta(running.to_beta(momentum, convention), convention) == pytest.approx(momentum, abs=1e-15)


def test_convert_momentum_between_pytorch_and_keras():
    assert running.convert_momentum(0.1, "pytorch", "keras") == pytest.approx(0.9, abs=1e-15)
    assert running.convert_momentum(0.99, "keras", "pytorch") == pytest.approx(0.01, abs=1e-15)
    assert running.convert_momentum(0.9, "cs231n", "keras") == pytest.approx(0.9, abs=1e-15)
    there = running.convert_momentum(0.3, "pytorch", "keras")
    assert running.convert_momentum(there, "keras", "pytorch") == pytest.approx(0.3, abs=1e-15)


def test_pytorch_momentum_gives_the_same_average_as_its_beta():
    """A torch.nn running mean with momentum m, started at 0, is the EWA with beta = to_beta(m)."""
    batches = _batches([6] * 12, seed=2)
    mus, _ = _batch_moments(batches)
    torch_mean, _ = _torch_running(batches, momentum=0.3)
    np.testing.assert_allclose(torch_mean, running.ema(mus, running.to_beta(0.3, "pytorch"))[-1], rtol=1e-12)


@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan"), None, True])
def test_to_beta_refuses_a_momentum_outside_0_1(momentum):
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        running.to_beta(momentum, "pytorch")


@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan"), None, False])
def test_from_beta_refuses_a_beta_outside_0_1_and_says_beta(beta):
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\] \(the EWA weight"):
        running.from_beta(beta, "keras")


def test_numpy_scalars_are_accepted_as_beta_and_momentum():
    values = np.arange(5.0)
    np.testing.assert_array_equal(running.ema(values, np.float32(0.5)), running.ema(values, 0.5))
    assert running.to_beta(np.float64(0.1), "pytorch") == pytest.approx(0.9)
    assert running.from_beta(np.float32(0.9), "keras") == pytest.approx(0.9)


def test_an_unknown_convention_is_refused():
    with pytest.raises(ValueError, match="convention must be one of"):
        running.to_beta(0.1, "tensorflow")
    with pytest.raises(ValueError, match="convention must be one of"):
        running.from_beta(0.9, "tensorflow")


# ---------------------------------------------------------------- update weights


def test_update_weight_ema_is_the_momentum():
    assert [running.update_weight("ema", t, 0.1) for t in (1, 2, 50)] == [0.1, 0.1, 0.1]


def test_update_weight_ema_debiased_starts_at_one_and_tends_to_one_minus_beta():
    momentum = 0.1  # beta = 0.9
    w = [running.update_weight("ema_debiased", t, momentum) for t in range(1, 301)]
    assert w[0] == pytest.approx(1.0, abs=1e-15)
    assert w[1] == pytest.approx(0.1 / (1 - 0.81))
    assert all(a > b for a, b in zip(w, w[1:]))  # decreasing
    assert w[-1] == pytest.approx(momentum, rel=1e-12)


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_update_weight_cumulative_is_one_over_t(momentum):
    for t in (1, 2, 3, 10, 1000):
        assert running.update_weight("cumulative", t, momentum) == pytest.approx(1 / t, abs=1e-15)


def test_update_weight_with_momentum_none_is_cumulative():
    assert running.update_weight("ema", 4, None) == pytest.approx(0.25, abs=1e-15)


def test_ema_debiased_updates_give_the_bias_corrected_ema():
    """running <- (1 - w_t) running + w_t theta_t with the ema_debiased w_t is v_t / (1 - beta**t)."""
    values, momentum = np.random.default_rng(4).normal(size=20), 0.2
    r, out = 123.0, []  # any start: w_1 = 1 forgets it
    for t, theta in enumerate(values, start=1):
        w = running.update_weight("ema_debiased", t, momentum)
        r = (1 - w) * r + w * theta
        out.append(r)
    np.testing.assert_allclose(out, running.ema(values, 1 - momentum, bias_correction=True), rtol=1e-12)


@pytest.mark.parametrize("estimator", ["ema", "ema_debiased"])
@pytest.mark.parametrize("momentum", [-0.01, 1.01, 2.0])
def test_update_weight_refuses_a_momentum_outside_0_1(estimator, momentum):
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        running.update_weight(estimator, 1, momentum)


def test_update_weight_refuses_bad_estimators_and_steps():
    with pytest.raises(ValueError, match="estimator must be one of"):
        running.update_weight("exact", 1)
    for t in (0, -1, 1.5):
        with pytest.raises(ValueError, match="t counts batches from 1"):
            running.update_weight("ema", t)


# ---------------------------------------------------------------- running estimators vs torch.nn


@pytest.mark.parametrize("momentum", [0.1, 0.3, 1.0])
def test_running_estimates_ema_reproduces_torch_batchnorm(momentum):
    batches = _batches([8] * 7, seed=5)
    mus, variances = _batch_moments(batches)
    means, vars_ = running.running_estimates(mus, variances, 8, "ema", momentum)
    torch_mean, torch_var = _torch_running(batches, momentum=momentum)
    np.testing.assert_allclose(means[-1], torch_mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(vars_[-1], torch_var, rtol=1e-12)  # the unbiased batch variance is averaged


def test_running_estimates_ema_after_each_step():
    batches = _batches([5] * 4, seed=6)
    mus, variances = _batch_moments(batches)
    means, vars_ = running.running_estimates(mus, variances, 5, "ema", 0.1)
    for t in range(1, 5):
        torch_mean, torch_var = _torch_running(batches[:t], momentum=0.1)
        np.testing.assert_allclose(means[t - 1], torch_mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(vars_[t - 1], torch_var, rtol=1e-12)


@pytest.mark.parametrize("estimator, momentum", [("cumulative", 0.1), ("ema", None)])
def test_running_estimates_cumulative_reproduces_torch_momentum_none(estimator, momentum):
    batches = _batches([6] * 9, seed=7)
    mus, variances = _batch_moments(batches)
    means, vars_ = running.running_estimates(mus, variances, 6, estimator, momentum)
    torch_mean, torch_var = _torch_running(batches, momentum=None)
    np.testing.assert_allclose(means[-1], torch_mean, rtol=1e-12)
    np.testing.assert_allclose(vars_[-1], torch_var, rtol=1e-12)


def test_running_estimates_ema_debiased_is_the_corrected_ema_of_the_batch_statistics():
    batches = _batches([6] * 9, seed=8)
    mus, variances = _batch_moments(batches)
    means, vars_ = running.running_estimates(mus, variances, 6, "ema_debiased", 0.2)
    np.testing.assert_allclose(means, running.ema(mus, 0.8, bias_correction=True), rtol=1e-12)
    np.testing.assert_allclose(vars_, running.ema(variances * 6 / 5, 0.8, bias_correction=True), rtol=1e-12)


def test_plain_ema_starts_from_torchs_initial_values():
    """Only "ema" remembers the start (0, 1): after one batch with momentum m, m * batch + (1 - m) * start."""
    mus, variances = np.array([[2.0]]), np.array([[4.0]])
    means, vars_ = running.running_estimates(mus, variances, 5, "ema", 0.1)
    assert means[0, 0] == pytest.approx(0.2) and vars_[0, 0] == pytest.approx(0.9 + 0.1 * 5.0)


def test_algorithm2_equals_cumulative_for_equal_batches():
    batches = _batches([10] * 6, seed=9)
    mus, variances = _batch_moments(batches)
    mean, var = running.algorithm2(mus, variances, 10)
    means, vars_ = running.running_estimates(mus, variances, 10, "cumulative")
    np.testing.assert_allclose(mean, means[-1], rtol=1e-12)
    np.testing.assert_allclose(var, vars_[-1], rtol=1e-12)
    np.testing.assert_allclose(var, 10 / 9 * variances.mean(axis=0), rtol=1e-14)


def test_update_running_returns_new_arrays_and_refuses_non_finite_statistics():
    rm, rv = np.zeros(3), np.ones(3)
    new_mean, new_var = running.update_running(rm, rv, np.full(3, 2.0), np.full(3, 4.0), 5, 1, "ema", 0.5)
    np.testing.assert_allclose(new_mean, 1.0)
    np.testing.assert_allclose(new_var, 0.5 + 0.5 * 5.0)
    np.testing.assert_array_equal(rm, 0.0)  # not modified in place
    np.testing.assert_array_equal(rv, 1.0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        running.update_running(rm, rv, np.array([0.0, np.nan, 0.0]), np.ones(3), 5, 1)
    with pytest.raises(ValueError, match="NaN or infinite"):
        running.update_running(rm, rv, np.zeros(3), np.array([1.0, np.inf, 1.0]), 5, 1)


def test_unbiased_needs_two_values():
    assert running.unbiased(np.array([2.0]), 5)[0] == pytest.approx(2.5)
    with pytest.raises(ValueError, match="count >= 2"):
        running.unbiased(np.array([2.0]), 1)


# ---------------------------------------------------------------- exact, mergeable statistics


UNEVEN = [7, 1, 12, 3, 30]


@pytest.mark.parametrize("trailing", [(), (2, 3)], ids=["(m, n)", "(m, C, H, W)"])
def test_merged_batch_stats_give_the_whole_set_mean_and_unbiased_variance(trailing):
    rng = np.random.default_rng(10)
    batches = [rng.normal(loc=5.0, scale=2.0, size=(m, 3) + trailing) for m in UNEVEN]
    mean, var = running.finalize(running.merge_all(running.batch_stats(b) for b in batches))
    whole = np.moveaxis(np.concatenate(batches), 1, -1).reshape(-1, 3)  # (values, features)
    np.testing.assert_allclose(mean, whole.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(var, np.var(whole, axis=0, ddof=1), rtol=1e-12)


def test_merged_batch_stats_on_tensors():
    batches = [torch.from_numpy(b) for b in _batches(UNEVEN, seed=11)]
    stats = running.merge_all(running.batch_stats(b) for b in batches)
    assert stats.count == sum(UNEVEN)
    mean, var = running.finalize(stats)
    whole = torch.cat(batches)
    assert mean.dtype == torch.float64
    np.testing.assert_allclose(mean.numpy(), whole.mean(0).numpy(), rtol=1e-13)
    np.testing.assert_allclose(var.numpy(), np.var(whole.numpy(), axis=0, ddof=1), rtol=1e-12)


def test_batch_stats_of_float32_data_are_float64_and_exact():
    """Far from 0 in float32: the float64 two-pass M2 keeps the digits E[x^2] - E[x]^2 would lose."""
    batches = [b.astype(np.float32) for b in _batches(UNEVEN, seed=12, offset=1e4)]
    stats = [running.batch_stats(b) for b in batches]
    assert stats[0].mean.dtype == np.float64
    mean, var = running.finalize(running.merge_all(stats))
    whole = np.concatenate(batches).astype(np.float64)
    np.testing.assert_allclose(mean, whole.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(var, np.var(whole, axis=0, ddof=1), rtol=1e-9)


def test_merge_is_symmetric_and_ignores_empty_statistics():
    a, b = (running.batch_stats(x) for x in _batches([4, 9], seed=13))
    ab, ba = running.merge(a, b), running.merge(b, a)
    assert ab.count == ba.count == 13
    np.testing.assert_allclose(ab.mean, ba.mean, rtol=1e-14)
    np.testing.assert_allclose(ab.m2, ba.m2, rtol=1e-13)
    empty = running.BatchStats(0, 0.0, 0.0)
    assert running.merge(empty, a) is a and running.merge(a, empty) is a


@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "torch"])
def test_merge_all_equals_merge_folded_over_the_sets(as_tensor):
    """merge_all merges in one step; merge, one pair at a time, is the textbook formula."""
    batches = _batches(UNEVEN, seed=15, offset=50.0)
    stats = [running.batch_stats(torch.from_numpy(b) if as_tensor else b) for b in batches]
    stats.insert(2, running.BatchStats(0, 0.0, 0.0))  # an empty set changes nothing
    folded = running.BatchStats(0, 0.0, 0.0)
    for s in stats:
        folded = running.merge(folded, s)
    merged = running.merge_all(stats)
    assert merged.count == folded.count == sum(UNEVEN)
    assert isinstance(merged.mean, torch.Tensor) == as_tensor
    np.testing.assert_allclose(np.asarray(merged.mean), np.asarray(folded.mean), rtol=1e-14)
    np.testing.assert_allclose(np.asarray(merged.m2), np.asarray(folded.m2), rtol=1e-12)
    assert running.merge_all(stats[:1]) is stats[0]


def test_merge_all_of_nothing_is_refused():
    with pytest.raises(ValueError, match="no statistics to merge"):
        running.merge_all([])


def test_algorithm2_misses_the_spread_of_sorted_batch_means():
    """Sorted data: each batch sees a narrow slice, so E_B[var_B] is far below the whole-set
    variance; shuffled batches are close to it. The exact merge is right either way."""
    rng = np.random.default_rng(14)
    data = rng.normal(size=(600, 2)) * [1.0, 3.0] + [0.5, -2.0]
    exact_var = np.var(data, axis=0, ddof=1)
    for order, close in [(np.argsort(data[:, 0]), False), (rng.permutation(600), True)]:
        batches = np.split(data[order], 20)  # 20 batches of 30
        mus, variances = _batch_moments(batches)
        mean, var = running.algorithm2(mus, variances, 30)
        exact = running.finalize(running.merge_all(running.batch_stats(b) for b in batches))
        np.testing.assert_allclose(exact[1], exact_var, rtol=1e-12)
        np.testing.assert_allclose(mean, data.mean(axis=0), rtol=1e-12)  # equal batches: the mean is exact
        if close:
            np.testing.assert_allclose(var, exact_var, rtol=0.1)
        else:
            assert var[0] < 0.1 * exact_var[0]  # the sorted feature: most of the variance is missed


def test_running_estimates_takes_one_count_per_batch():
    """A training loop's last batch is often smaller: its unbiased correction uses its own count."""
    rng = np.random.default_rng(7)
    mus, variances = rng.normal(size=(3, 4)), rng.uniform(0.5, 2.0, size=(3, 4))
    counts = [64, 64, 3]
    means, vars_ = running.running_estimates(mus, variances, counts)
    mean, var = np.zeros(4), np.ones(4)
    for t, (mu, v, c) in enumerate(zip(mus, variances, counts), start=1):
        mean, var = running.update_running(mean, var, mu, v, c, t)
    np.testing.assert_allclose(means[-1], mean, rtol=1e-15)
    np.testing.assert_allclose(vars_[-1], var, rtol=1e-15)
    _, vars_same = running.running_estimates(mus, variances, 64)
    assert not np.allclose(vars_same[-1], var)  # the count of the last batch matters
