"""bnkit.doctor: each flag on exactly the layers where its fault is planted, none on healthy
models, the model never changed, and clear errors for bad input."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import bnkit
from bnkit import doctor
from bnkit.doctor import FLAGS, FLOAT16_MAX


def _batches(shape=(32, 8), n=6, seed=0, loc=1.0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return [loc + scale * torch.randn(shape, generator=g) for _ in range(n)]


def _mlp(bias=False, norm=nn.BatchNorm1d, dropout=False, seed=0):
    """Linear -> BN ("1") -> ReLU [-> Dropout] -> Linear -> BN ("4" or "5") -> ReLU -> Linear."""
    torch.manual_seed(seed)
    layers = [nn.Linear(8, 16, bias=bias), norm(16), nn.ReLU()]
    layers += [nn.Dropout(0.5)] if dropout else []
    layers += [nn.Linear(16, 16, bias=False), norm(16), nn.ReLU(), nn.Linear(16, 3)]
    return nn.Sequential(*layers)


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def _resnet(seed=0, c=8):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                         _Block(c), _Block(c),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 5))


def _healthy(model, batches):
    """Trained a few steps, then population statistics of the final network, in eval mode."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for x in batches:
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    bnkit.recompute_stats(model, batches, upstream="eval")
    return model.eval()


def _flags(report) -> set[tuple[str, str]]:
    return {(layer.name, f.name) for layer in report.layers for f in layer.flags}


def _state(model):
    """Everything doctor must leave alone: tensors (bytes), requires_grad, modes, momenta."""
    tensors = {k: (v.detach().clone(), v.requires_grad)
               for k, v in model.state_dict(keep_vars=True).items()}
    modes = {name: (m.training, getattr(m, "momentum", None)) for name, m in model.named_modules()}
    return tensors, modes


def _assert_same_state(a, b):
    assert a[1] == b[1]
    assert a[0].keys() == b[0].keys()
    for k in a[0]:
        (ta, ga), (tb, gb) = a[0][k], b[0][k]
        assert ga == gb and ta.dtype == tb.dtype and torch.equal(ta, tb), k


# ---------------------------------------------------------------- healthy models


@pytest.mark.parametrize("build, shape", [(_mlp, (32, 8)), (_resnet, (8, 3, 8, 8))])
def test_a_healthy_recalibrated_model_raises_no_flag(build, shape):
    batches = _batches(shape)
    report = doctor(_healthy(build(), batches), batches)
    assert _flags(report) == set()
    assert report.verdict.startswith("healthy")
    assert report.max_output_gap < 1e-4 and report.argmax_agreement == 1.0
    for layer in report.layers:
        assert layer.mean_shift < 1e-3
        assert abs(layer.var_ratio_min - 1) < 1e-3 and abs(layer.var_ratio_max - 1) < 1e-3


def test_a_healthy_model_left_in_training_mode_is_not_called_healthy():
    batches = _batches()
    report = doctor(_healthy(_mlp(), batches).train(), batches)
    assert _flags(report) == set() and report.model_mode == "train"
    assert report.verdict.startswith("no flag on 2 BN layer(s)")
    assert "call model.eval()" in report.verdict
    assert report.max_output_gap > 0.01  # batch statistics, not the population's


def test_layers_come_in_execution_order_with_their_facts():
    class Swapped(nn.Module):  # registered b, a; called a, b
        def __init__(self):
            super().__init__()
            self.b, self.a = nn.BatchNorm1d(8), nn.BatchNorm1d(8)
            self.lin = nn.Linear(8, 8, bias=False)

        def forward(self, x):
            return self.b(self.lin(self.a(x)))

    batches = _batches()
    model = _healthy(Swapped(), batches)
    report = doctor(model, batches)
    assert [layer.name for layer in report.layers] == ["a", "b"]
    a = report.layers[0]
    assert a.kind == "BatchNorm1d" and a.mode == "eval" and a.momentum == 0.1
    assert a.num_batches_tracked == 6 and a.affine_trainable is True
    assert a.min_values_per_channel == 32
    assert a.max_abs_input == max(float(x.abs().max()) for x in batches)


@pytest.mark.parametrize("norm, dims", [
    (bnkit.BatchNorm1d, 1), (bnkit.BatchNorm2d, 2), (bnkit.BatchNorm3d, 3),
    (nn.BatchNorm3d, 3), (nn.SyncBatchNorm, 2)])
def test_bnkit_3d_and_sync_batch_norm_layers_are_audited(norm, dims):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    torch.manual_seed(0)
    model = nn.Sequential(conv(2, 4, 3, bias=False), norm(4), nn.ReLU(),
                          conv(4, 4, 1, bias=True), norm(4))
    batches = _batches((4, 2) + (5,) * dims)
    model = _healthy(model, batches)
    report = doctor(model, batches)
    assert [(layer.name, layer.kind) for layer in report.layers] == [
        ("1", norm.__name__), ("4", norm.__name__)]
    assert _flags(report) == {("4", "redundant_bias")}


# ---------------------------------------------------------------- each flag, planted


def test_stale_statistics_on_the_layers_whose_buffers_were_moved():
    batches = _batches()
    model = _healthy(_mlp(), batches)
    with torch.no_grad():
        model[4].running_mean += 2 * model[4].running_var.sqrt()  # 2 std away
        model[1].running_var[0] *= 3  # one channel's variance 3 times too large
    report = doctor(model, batches)
    assert _flags(report) == {("1", "stale_statistics"), ("4", "stale_statistics")}
    assert report.layers[1].mean_shift == pytest.approx(2.0, rel=1e-3)
    assert report.layers[0].var_ratio_max == pytest.approx(3.0, rel=1e-3)
    assert report.max_output_gap > 0.1 and not report.verdict.startswith("healthy")


def test_stale_statistics_after_a_domain_shift():
    model = _healthy(_mlp(), _batches())
    report = doctor(model, _batches(loc=4.0, seed=1))  # the test data moved: AdaBN's case
    assert report.flagged("stale_statistics") == ["1"]  # the next layer sees normalised inputs


def test_training_mode_at_eval_for_a_layer_in_training_mode_or_without_running_stats():
    batches = _batches()
    model = _healthy(_mlp(), batches)
    model[4].train()
    assert _flags(doctor(model, batches)) == {("4", "training_mode_at_eval")}
    untracked = _mlp()
    untracked[4] = nn.BatchNorm1d(16, track_running_stats=False)
    untracked = _healthy(untracked, batches)
    report = doctor(untracked, batches)
    assert _flags(report) == {("4", "training_mode_at_eval")}
    assert report.layers[1].mean_shift is None and report.layers[1].num_batches_tracked is None


def test_frozen_weights_moving_stats_when_fine_tuning_with_bn_in_training_mode():
    batches = _batches()
    model = _healthy(_mlp(), batches)
    model.train()  # fine-tuning: only the head trains
    for p in list(model[1].parameters()) + list(model[4].parameters()):
        p.requires_grad_(False)
    model[4].eval()  # this one is frozen properly
    report = doctor(model, batches)
    assert _flags(report) == {("1", "frozen_weights_moving_stats")}
    assert report.model_mode == "train" and "training mode" in report.verdict
    assert report.layers[0].affine_trainable is False


def test_near_zero_variance_on_a_dead_channel():
    batches = _batches()
    model = _mlp()
    with torch.no_grad():
        model[0].weight[3] = 0  # channel 3 of the first BN gets a constant 0
    report = doctor(_healthy(model, batches), batches)
    assert _flags(report) == {("1", "near_zero_variance")}
    assert report.layers[0].near_zero_channels == [3]


def test_float16_overflow_of_a_large_variance_or_buffer():
    batches = _batches()
    model = _mlp()
    with torch.no_grad():
        model[0].weight *= 1000  # inputs of BN "1" with a variance far beyond 65504
    model = _healthy(model, batches)
    report = doctor(model, batches)
    assert _flags(report) == {("1", "float16_overflow")}
    assert float(model[1].running_var.max()) > FLOAT16_MAX
    small = _healthy(_mlp(), batches)
    with torch.no_grad():
        small[4].running_var[0] = 1e5  # a buffer that would be inf in half precision
    assert _flags(doctor(small, batches)) == {("4", "stale_statistics"), ("4", "float16_overflow")}


def test_float16_model_with_overflowing_inputs_gets_an_error_that_says_so():
    batches = _batches()
    model = _healthy(_mlp(), batches).half()
    with torch.no_grad():
        model[0].weight *= 1e5  # float16 Linear outputs overflow to inf
    with pytest.raises(ValueError, match=r"NaN or infinite.*torch.float16.*float16_overflow"):
        doctor(model, [x.half() for x in batches])
    with torch.no_grad():
        model[0].weight /= 1e5
        model[4].running_var[2] = float("inf")  # 7e4 cast to float16
    report = doctor(model, [x.half() for x in batches])
    assert report.flagged("float16_overflow") == ["4"]


def test_suspicious_momentum_for_keras_convention_and_zero_not_none():
    batches = _batches()
    model = _healthy(_mlp(), batches)
    model[1].momentum, model[4].momentum = 0.99, 0.0
    want = {("1", "suspicious_momentum"), ("4", "suspicious_momentum")}
    assert _flags(doctor(model, batches)) == want
    model[1].momentum, model[4].momentum = None, 0.5  # cumulative; the largest accepted
    assert _flags(doctor(model, batches)) == set()


def test_tiny_batch_per_layer_values_per_channel():
    batches = _batches()
    model = _healthy(_mlp(), batches)
    report = doctor(model, batches + [_batches((1, 8), n=1)[0]])  # a last batch of one
    assert _flags(report) == {("1", "tiny_batch"), ("4", "tiny_batch")}
    assert report.layers[0].min_values_per_channel == 1
    conv_batches = _batches((8, 3, 8, 8))
    conv = _healthy(_resnet(), conv_batches)  # one image is 64 values per channel: enough
    assert _flags(doctor(conv, conv_batches + [_batches((1, 3, 8, 8), n=1)[0]])) == set()


class _Untraceable(nn.Module):
    """A model torch.fx cannot trace (control flow on a tensor's value)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.sum() > float("-inf"):
            return self.inner(x)
        return x


@pytest.mark.parametrize("wrap", [False, True])  # traced by torch.fx, or not traceable
@pytest.mark.parametrize("kwargs, flag, layer", [
    ({"bias": True}, "redundant_bias", "1"), ({"dropout": True}, "dropout_before_bn", "5")])
def test_what_feeds_a_layer_from_the_graph_or_the_execution_order(kwargs, flag, layer, wrap):
    batches = _batches()
    model = _healthy(_mlp(**kwargs), batches)
    model = _Untraceable(model) if wrap else model
    report = doctor(model, batches)
    assert _flags(report) == {("inner." + layer if wrap else layer, flag)}
    assert report.graph == ("execution order" if wrap else "torch.fx")


def test_functional_dropout_found_by_the_trace():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bn = nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8)

        def forward(self, x):
            return self.bn(self.lin(nn.functional.dropout(x, 0.2, self.training)))

    batches = _batches()
    report = doctor(_healthy(Net(), batches), batches)
    assert _flags(report) == {("bn", "dropout_before_bn")} and report.graph == "torch.fx"


# ---------------------------------------------------------------- the report


def test_report_prints_as_a_table_converts_to_json_and_plots():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    batches = _batches()
    model = _healthy(_mlp(bias=True), batches)
    model[4].momentum = 0.9
    report = doctor(model, batches)
    text = str(report).splitlines()
    assert text[0] == report.verdict and "suspicious_momentum (1)" in report.verdict
    rows = [line for line in text if line.startswith(("1 ", "4 "))]
    assert [r.split()[0] for r in rows[:2]] == ["1", "4"] and "redundant_bias" in rows[0]
    assert "See chapter 10, pitfall 3." in " ".join(str(report).split())
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert [layer["name"] for layer in data["layers"]] == ["1", "4"]
    assert data["layers"][1]["flags"][0]["name"] == "suspicious_momentum"
    ax = report.plot()
    assert len(ax[0].patches) == 2 and len(ax[1].lines) == 2 + 2  # two layers, two thresholds
    with pytest.raises(ValueError, match="flag must be one of"):
        report.flagged("stale")
    assert set(FLAGS) == {"stale_statistics", "training_mode_at_eval",
                          "frozen_weights_moving_stats",
                          "near_zero_variance", "float16_overflow", "suspicious_momentum",
                          "tiny_batch", "redundant_bias", "dropout_before_bn"}


def test_forward_and_max_batches():
    batches = _batches()
    model = _healthy(_mlp(), batches[:2])
    dicts = [{"x": x} for x in batches]
    calls = []

    def forward(m, batch):
        calls.append(1)
        return m(batch["x"])

    report = doctor(model, dicts, forward=forward, max_batches=2)
    assert report.num_batches == 2 and _flags(report) == set()
    assert report.layers[0].mean_shift < 1e-4
    assert len(calls) == 1 + 2 * 4  # order; first layer, second layer, observed, as it is
    assert doctor(model, iter(batches), max_batches=2).num_batches == 2  # a one-shot iterator
    assert doctor(model, ((x, 0) for x in batches)).num_batches == 6  # (x, y) pairs
    assert doctor(model, batches).layers[0].mean_shift > 1e-3  # all six batches


def test_recompute_stats_forward_and_max_batches():
    batches = _batches()
    a, b = _mlp(), _mlp()
    want = bnkit.recompute_stats(a, batches[:3], upstream="eval")
    got = bnkit.recompute_stats(b, [{"x": x} for x in batches], upstream="eval",
                                forward=lambda m, batch: m(batch["x"]), max_batches=3)
    for name in want:
        assert torch.equal(want[name][0], got[name][0]) and torch.equal(want[name][1], got[name][1])
    with pytest.raises(ValueError, match="max_batches"):
        bnkit.recompute_stats(b, batches, max_batches=0)
    with pytest.raises(TypeError, match="forward"):
        bnkit.recompute_stats(b, batches, forward="model")


# ---------------------------------------------------------------- never changes the model


def _faulty_model(batches):
    model = _healthy(_mlp(bias=True, dropout=True), batches)
    model.train()
    model[1].momentum = 0.99
    for p in model[5].parameters():
        p.requires_grad_(False)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    return model


def test_the_model_is_unchanged_afterwards():
    batches = _batches()
    model = _faulty_model(batches)
    before = _state(model)
    rng = torch.get_rng_state()
    report = doctor(model, batches + [batches[0][:1]])
    assert len(_flags(report)) >= 4 and "refuses batch 6" in report.verdict
    _assert_same_state(before, _state(model))
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert torch.equal(rng, torch.get_rng_state())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("fail_at", [1, 12, 14, 15])  # recompute (order, layers); watched; as is
def test_the_model_is_unchanged_when_forward_fails(fail_at):
    batches = _batches()
    model = _faulty_model(batches)
    before = _state(model)
    calls = []

    def forward(m, x):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("the forward failed")
        return m(x)

    with pytest.raises(RuntimeError, match="the forward failed"):
        doctor(model, batches, forward=forward)
    _assert_same_state(before, _state(model))


# ---------------------------------------------------------------- bad input


def test_bad_input_gets_a_clear_error_and_changes_nothing():
    batches = _batches()
    model = _healthy(_mlp(), batches)
    before = _state(model)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got OrderedDict"):
        doctor(model.state_dict(), batches)
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        doctor(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)), batches)
    for empty in ([], iter([])):
        with pytest.raises(ValueError, match="at least one batch"):
            doctor(model, empty)
    bad = [b.clone() for b in batches]
    bad[2][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        doctor(model, bad)
    with pytest.raises(TypeError, match="forward must be a callable"):
        doctor(model, batches, forward=1)
    with pytest.raises(ValueError, match="max_batches must be a positive integer"):
        doctor(model, batches, max_batches=0)
    _assert_same_state(before, _state(model))
    assert all(isinstance(m, _BatchNorm) for m in (model[1], model[4]))
