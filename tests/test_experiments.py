"""bnkit.experiments: the recorded run replays the running statistics exactly, and the helpers
do what the chapter "How robust is it?" says they do. Small networks, a few steps: fast."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import bnkit
from bnkit.course import experiments
from bnkit.course.nets import accuracy, mlp, train


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(103, 6)) * rng.uniform(0.5, 3, 6) + rng.normal(0, 2, 6)).astype(np.float32)  # (m, 6)
    y = (X[:, 0] + X[:, 1] > np.median(X[:, 0] + X[:, 1])).astype(np.int64)  # (m,), two classes
    return X, y


def _model(momentum=0.1, estimator="ema", seed=0):
    norm = lambda n: bnkit.BatchNorm1d(n, momentum=momentum, estimator=estimator)  # noqa: E731
    return mlp(hidden=(8, 8), seed=seed, in_features=6, num_classes=2, norm=norm)


def _buffers(model):
    names = {m: n for n, m in model.named_modules()}
    return {names[bn]: (bn.running_mean.clone(), bn.running_var.clone()) for bn in bnkit.bn_layers(model)}


def _assert_stats_close(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        for x, y in zip(a[name], b[name]):
            torch.testing.assert_close(x.float(), y.float(), rtol=tol, atol=tol)


TRAIN = dict(epochs=2, batch_size=16, lr=1e-2, seed=3)  # 103 = 6 * 16 + 7: uneven last batch


@pytest.mark.parametrize("estimator, momentum", [("ema", 0.1), ("ema", 0.01), ("ema_debiased", 0.05), ("cumulative", None)])
def test_replay_equals_the_layers_own_running_statistics(data, estimator, momentum):
    X, y = data
    model = _model(momentum, estimator)
    record = experiments.train_recording(model, X, y, **TRAIN)
    assert len(record.counts) == len(record.losses) == 14 and record.counts[6] == 7
    assert record.mus["1"].shape == record.variances["1"].shape == (14, 8)
    _assert_stats_close(experiments.running_from_record(record, estimator, momentum), _buffers(model))


def test_momentum_does_not_change_training(data):
    X, y = data
    a, b = _model(0.1), _model(0.001)
    record_a = experiments.train_recording(a, X, y, **TRAIN)
    record_b = experiments.train_recording(b, X, y, **TRAIN)
    assert record_a.losses == record_b.losses
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    # a's record gives b's running statistics, and the other way round
    _assert_stats_close(experiments.running_from_record(record_a, "ema", 0.001), _buffers(b))
    _assert_stats_close(experiments.running_from_record(record_b, "ema", 0.1), _buffers(a))


def test_recording_does_not_change_training(data):
    X, y = data
    plain, recorded = _model(), _model()
    losses = train(plain, X, y, **TRAIN)
    record = experiments.train_recording(recorded, X, y, **TRAIN)
    assert losses == record.losses
    assert all(torch.equal(p, q) for p, q in zip(plain.state_dict().values(), recorded.state_dict().values()))


def test_snapshots_and_partial_replay(data):
    X, y = data
    model = _model()
    record = experiments.train_recording(model, X, y, snapshot_steps=(3, 14), **TRAIN)
    assert sorted(record.snapshots) == [3, 14]
    for k, v in model.state_dict().items():
        assert torch.equal(record.snapshots[14][k], v)
    # the running statistics stored in the snapshot after 3 steps are the replay of 3 steps
    replay = experiments.running_from_record(record, "ema", 0.1, steps=3)
    for name, (mean, var) in replay.items():
        torch.testing.assert_close(record.snapshots[3][f"{name}.running_mean"], mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(record.snapshots[3][f"{name}.running_var"], var, rtol=1e-5, atol=1e-5)
    assert int(record.snapshots[3]["1.num_batches_tracked"]) == 3
    # zero steps: PyTorch's initial values
    for mean, var in experiments.running_from_record(record, "ema", 0.1, steps=0).values():
        assert torch.equal(mean, torch.zeros(8)) and torch.equal(var, torch.ones(8))


def test_evaluate_with_stats_leaves_the_model_alone(data):
    X, y = data
    model = _model()
    experiments.train_recording(model, X, y, **TRAIN)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = experiments.population_stats(model, X)
    acc = experiments.evaluate(model, X, y, stats)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert acc == accuracy(experiments.with_stats(model, stats), X, y)
    assert experiments.evaluate(model, X, y) == accuracy(model, X, y)  # None: its own statistics
    adapted = experiments.with_stats(model, stats)
    assert not adapted.training
    torch.testing.assert_close(adapted[1].running_mean, stats["1"][0])


def test_population_stats_are_the_exact_statistics_of_the_layer_inputs(data):
    X, y = data
    model = _model().eval()
    stats = experiments.population_stats(model, X, upstream="eval", batch_size=10)
    with torch.no_grad():
        z = model[0](torch.as_tensor(X)).double()  # (m, 8): the first BN layer's input
    torch.testing.assert_close(stats["1"][0].double(), z.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats["1"][1].double(), z.var(0, unbiased=True), rtol=1e-5, atol=1e-6)


def test_affine_shift_is_undone_by_re_estimated_statistics(data):
    """What the chapter shows: z = W(a x + b) + c is a positive affine map of every feature of
    z, which Batch Norm with statistics of the same data removes."""
    X, y = data
    model = _model()
    experiments.train_recording(model, X, y, **TRAIN)
    X_shifted = (0.5 * X + 3.0).astype(np.float32)
    adapted = experiments.with_stats(model, experiments.population_stats(model, X_shifted))
    reference = experiments.with_stats(model, experiments.population_stats(model, X))
    with torch.no_grad():
        out_a, out_r = adapted(torch.as_tensor(X_shifted)), reference(torch.as_tensor(X))
    torch.testing.assert_close(out_a, out_r, rtol=1e-3, atol=1e-3)


def test_batch_stats_accuracy_matches_testtime(data):
    X, y = data
    model = _model()
    experiments.train_recording(model, X, y, **TRAIN)
    acc_whole = experiments.batch_stats_accuracy(model, X, y, batch_size=len(X))
    with torch.no_grad():
        whole = copy.deepcopy(model).train()(torch.as_tensor(X)).argmax(1).numpy()  # one batch: all of X
    assert acc_whole == float(np.mean(whole == y))
    assert experiments.batch_stats_accuracy(model, X, y, 8, seed=1) == experiments.batch_stats_accuracy(model, X, y, 8, seed=1)


def test_shift():
    X = np.linspace(0, 1, 12, dtype=np.float32).reshape(2, 6)
    np.testing.assert_allclose(experiments.shift(X, contrast=0.5, brightness=0.3), 0.5 * X + 0.3, rtol=1e-6)
    bright = experiments.shift(X, brightness=0.5)
    assert bright.dtype == np.float32 and bright.max() == 1.0 and bright.min() == 0.5
    noisy = experiments.shift(X, noise=0.3, seed=4)
    assert np.array_equal(noisy, experiments.shift(X, noise=0.3, seed=4)) and not np.array_equal(noisy, X)
    assert noisy.min() >= 0 and noisy.max() <= 1


def test_works_with_torch_nn_batchnorm(data):
    X, y = data
    model = mlp(hidden=(8,), seed=0, in_features=6, num_classes=2, norm=nn.BatchNorm1d)
    record = experiments.train_recording(model, X, y, **TRAIN)
    _assert_stats_close(experiments.running_from_record(record), _buffers(model))
