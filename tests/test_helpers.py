"""The chapters' shared helpers: data, the tiny network, the training loop, the plots."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from bnkit.course.data import batches, load_digits_split  # noqa: E402
from bnkit.course.nets import accuracy, mlp, train  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from bnkit.course.plotting import power_of_ten_above, style, unit_histograms  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(seed=0)


def test_digits_split_shapes_types_and_range(digits):
    X_train, X_test, y_train, y_test = digits
    assert X_train.shape == (1347, 64) and X_test.shape == (450, 64)
    assert X_train.dtype == np.float32 and y_train.dtype == np.int64
    assert X_train.min() == 0.0 and X_train.max() == 1.0  # scaled, not standardised
    assert set(np.unique(y_test)) == set(range(10))
    again = load_digits_split(seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(digits, again))


def test_batches_cover_every_example_once():
    X, y = np.arange(10.0).reshape(10, 1), np.arange(10)
    seen = [b for _, yb in batches(X, y, batch_size=4, seed=3) for b in yb]
    assert sorted(seen) == list(range(10)) and seen != list(range(10))  # shuffled
    sizes = [len(yb) for _, yb in batches(X, y, batch_size=4, shuffle=False)]
    assert sizes == [4, 4, 2]
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(X, y, batch_size=0))


def test_mlp_layers_and_norm_argument():
    model = mlp(hidden=(32, 16), bn=True, seed=0)
    kinds = [type(layer).__name__ for layer in model]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert model(torch.zeros(5, 64)).shape == (5, 10)
    assert "BatchNorm1d" not in [type(layer).__name__ for layer in mlp(bn=False)]
    custom = mlp(hidden=(8,), norm=torch.nn.LayerNorm)
    assert isinstance(custom[1], torch.nn.LayerNorm)
    same = mlp(hidden=(32, 16), seed=0)
    assert torch.equal(model[0].weight, same[0].weight)


def test_train_is_deterministic_and_learns(digits):
    X_train, X_test, y_train, y_test = digits
    runs = []
    for _ in range(2):
        model = mlp(seed=1)
        runs.append((train(model, X_train, y_train, epochs=2, seed=1), model))
    (losses, model), (losses_again, _) = runs
    assert losses == losses_again and len(losses) == 2 * 22
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert accuracy(model, X_test, y_test) > 0.8


def test_accuracy_uses_eval_mode_and_changes_nothing(digits):
    X_train, _, y_train, _ = digits
    model = mlp(seed=0).train()
    before = model[1].running_mean.clone()
    accuracy(model, X_train[:50], y_train[:50])
    assert model.training and torch.equal(model[1].running_mean, before)


def test_unit_histograms_one_panel_per_stage():
    style()
    z = np.random.default_rng(0).normal(size=(64, 5))
    fig, axes = unit_histograms({"a": z, "b": 2 * z}, units=[0, 3])
    assert len(axes) == 2 and [ax.get_title() for ax in axes] == ["a", "b"]
    assert len(axes[0].patches) == 2 * 20  # two units, 20 bins each
    top, bottom = (ax.get_position() for ax in axes)  # stacked, for phones: same column
    assert bottom.y1 <= top.y0 and bottom.x0 == pytest.approx(top.x0)
    matplotlib.pyplot.close(fig)


def test_power_of_ten_above():
    assert power_of_ten_above(3.3e-16) == power_of_ten_above(3.6e-16) == pytest.approx(1e-15)
    assert power_of_ten_above(1e-3) == pytest.approx(1e-3)
    assert power_of_ten_above(0.5) == 1.0 and power_of_ten_above(250.0) == 1000.0
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive finite"):
            power_of_ten_above(bad)


def test_unit_stages_draws_every_value_and_every_unit():
    from bnkit.course.plotting import unit_stages

    z = np.random.default_rng(0).normal(size=(16, 5))
    fig, axes = unit_stages({"a": z, "b": 2 * z}, units=[0, 3])
    # left: 2 units x 2 stages, each a dot series and a mean bar; right: one series per stage
    assert len(axes[0].get_lines()) == 2 * 2 * 2 and len(axes[1].get_lines()) == 2
    x_dots = axes[0].get_lines()[0].get_xdata()
    assert np.array_equal(x_dots, z[:, 0])
    assert np.allclose(axes[1].get_lines()[1].get_ydata(), (2 * z).std(axis=0))
    plt.close(fig)


def test_conv_net_shapes_and_batchnorm2d_statistics_per_channel():
    from bnkit.course.nets import conv_net

    net = conv_net(seed=0)
    x = torch.randn(5, 1, 8, 8)
    assert net(x).shape == (5, 10)
    bns = [m for m in net if isinstance(m, torch.nn.BatchNorm2d)]
    assert [b.num_features for b in bns] == [8, 16]
    # the first BN layer's running mean: 0.1 * the per-channel mean over m*H*W
    with torch.no_grad():
        z = net[0](x)  # (5, 8, 8, 8)
    assert torch.allclose(bns[0].running_mean, 0.1 * z.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.equal(conv_net(seed=0)[0].weight, conv_net(seed=0)[0].weight)
