"""The PyTorch path: the drop-in BatchNorm modules vs torch.nn's, recompute_stats and fold_bn.

Everything in float64, on every device present (CUDA skipped where there is none).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnkit import running
import bnkit
from bnkit import folding, reference

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
DT = torch.float64
KINDS = {"1d": (nn.BatchNorm1d, bnkit.BatchNorm1d, (6, 4)), "2d": (nn.BatchNorm2d, bnkit.BatchNorm2d, (3, 4, 2, 3))}
CONSTRUCTOR_ARGS = [
    {},
    {"momentum": 0.3},
    {"momentum": None},
    {"affine": False},
    {"track_running_stats": False},
    {"eps": 1e-3, "momentum": 1.0},
]
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


# ---------------------------------------------------------------- helpers


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, device, seed, loc=0.0, scale=1.0):
    """A seeded standard normal, made on the CPU (the same numbers on every device), shifted/scaled."""
    return (loc + scale * torch.randn(shape, generator=_gen(seed), dtype=DT)).to(device)


def _randomise(bn: _BatchNorm, seed=0):
    """Non-default weight, bias and running statistics, so that loading them is visible."""
    with torch.no_grad():
        n = bn.num_features
        if bn.affine:
            bn.weight.copy_(_randn(n, bn.weight.device, seed, loc=1.0, scale=0.5))
            bn.bias.copy_(_randn(n, bn.bias.device, seed + 1))
        if bn.track_running_stats:
            bn.running_mean.copy_(_randn(n, bn.running_mean.device, seed + 2))
            bn.running_var.copy_(_randn(n, bn.running_var.device, seed + 3).abs() + 0.5)
            bn.num_batches_tracked.fill_(3)


def _pair(kind, device, **kwargs):
    """(torch.nn module, bnkit module) with the same arguments and the same state."""
    theirs_cls, ours_cls, _ = KINDS[kind]
    theirs = theirs_cls(4, device=device, dtype=DT, **kwargs)
    _randomise(theirs)
    ours = ours_cls(4, device=device, dtype=DT, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _state(bn):
    return {k: v.detach().clone() for k, v in bn.state_dict().items()}


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-12, atol=1e-14, msg=key)


def _assert_state_unchanged(bn, before):
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key


def _step(bn, x, dz_tilde):
    """One forward and backward with a random upstream gradient: (output, dx, dweight, dbias)."""
    x = x.clone().requires_grad_(True)
    bn.zero_grad()
    out = bn(x)
    (out * dz_tilde).sum().backward()
    grads = (bn.weight.grad, bn.bias.grad) if bn.affine else (None, None)
    return (out.detach(), x.grad) + grads


def _assert_steps_agree(theirs, ours, shape, device, steps=4, seed=0):
    for s in range(steps):
        x = _randn(shape, device, seed + 10 * s, loc=s - 1.0, scale=1.0 + s)
        dz_tilde = _randn(shape, device, seed + 10 * s + 1)
        for a, b in zip(_step(theirs, x, dz_tilde), _step(ours, x, dz_tilde)):
            if a is None:
                assert b is None
            else:
                torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
        _assert_same_state(theirs, ours)


# ---------------------------------------------------------------- the drop-in modules


@pytest.mark.parametrize("kwargs", CONSTRUCTOR_ARGS, ids=str)
@pytest.mark.parametrize("kind", ["1d", "2d"])
@pytest.mark.parametrize("device", DEVICES)
def test_module_matches_torch_nn_in_training_and_eval(kind, kwargs, device):
    theirs, ours = _pair(kind, device, **kwargs)
    shape = KINDS[kind][2]
    _assert_steps_agree(theirs, ours, shape, device)
    theirs.eval(), ours.eval()
    x = _randn(shape, device, 99, loc=0.5, scale=2.0)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)
    _assert_same_state(theirs, ours)


@pytest.mark.parametrize("device", DEVICES)
def test_module_takes_an_m_c_l_input_like_torch_nn(device):
    theirs, ours = _pair("1d", device)
    _assert_steps_agree(theirs, ours, (3, 4, 5), device, steps=2)


@pytest.mark.parametrize("kind", ["1d", "2d"])
def test_state_dict_keys_are_torch_nns(kind):
    theirs, ours = _pair(kind, "cpu")
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]


@pytest.mark.parametrize("kind", ["1d", "2d"])
@pytest.mark.parametrize("device", DEVICES)
def test_weights_load_both_ways(kind, device):
    theirs_cls, ours_cls, _ = KINDS[kind]
    source = theirs_cls(4, device=device, dtype=DT)
    _randomise(source, seed=5)
    ours = ours_cls(4, device=device, dtype=DT)
    ours.load_state_dict(source.state_dict())  # torch.nn -> bnkit
    _assert_same_state(source, ours)
    _randomise(ours, seed=7)
    back = theirs_cls(4, device=device, dtype=DT)
    back.load_state_dict(ours.state_dict())  # bnkit -> torch.nn
    _assert_same_state(ours, back)


@pytest.mark.parametrize("device", DEVICES)
def test_to_and_double_move_the_buffers(device):
    bn = bnkit.BatchNorm2d(3)
    assert bn.running_mean.dtype == torch.float32
    bn = bn.double().to(device)
    for name in ("running_mean", "running_var", "weight", "bias"):
        tensor = getattr(bn, name)
        assert tensor.dtype == DT and tensor.device.type == device, name
    assert bn.num_batches_tracked.device.type == device
    bn(_randn((2, 3, 2, 2), device, 0))  # a training step on the device
    assert bn.num_batches_tracked.item() == 1 and bn.running_mean.device.type == device


@pytest.mark.parametrize("device", DEVICES)
def test_eval_is_the_mode_switch_not_grad_mode(device):
    """Training mode updates the running statistics under no_grad too; eval mode never does."""
    bn = bnkit.BatchNorm1d(4, device=device, dtype=DT)
    x = _randn((6, 4), device, 1, loc=3.0)
    with torch.no_grad():
        bn(x)
    assert bn.num_batches_tracked.item() == 1
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    bn.eval()
    before = _state(bn)
    bn(x.clone().requires_grad_(True))
    _assert_state_unchanged(bn, before)


def _ours_over_batches(kind, device, estimator, momentum, steps, shape):
    """Train a fresh bnkit module; return it and the batches' means and biased variances (T, C)."""
    ours = KINDS[kind][1](4, momentum=momentum, estimator=estimator, device=device, dtype=DT)
    axes = (0,) if len(shape) == 2 else (0, 2, 3)
    mus, variances = [], []
    for s in range(steps):
        x = _randn(shape, device, 20 + s, loc=float(s), scale=1.0 + 0.5 * s)
        ours(x)
        mus.append(x.mean(axes).cpu().numpy())
        variances.append(x.var(axes, unbiased=False).cpu().numpy())
    return ours, np.array(mus), np.array(variances)


@pytest.mark.parametrize("momentum", [0.1, 0.5])
@pytest.mark.parametrize("kind", ["1d", "2d"])
@pytest.mark.parametrize("device", DEVICES)
def test_ema_debiased_module_equals_running_estimates(kind, momentum, device):
    shape = KINDS[kind][2]
    ours, mus, variances = _ours_over_batches(kind, device, "ema_debiased", momentum, 5, shape)
    count = int(np.prod(shape)) // shape[1]
    means, vars_ = running.running_estimates(mus, variances, count, "ema_debiased", momentum)
    np.testing.assert_allclose(ours.running_mean.cpu().numpy(), means[-1], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ours.running_var.cpu().numpy(), vars_[-1], rtol=1e-12)
    assert ours.num_batches_tracked.item() == 5


@pytest.mark.parametrize("kind", ["1d", "2d"])
@pytest.mark.parametrize("device", DEVICES)
def test_cumulative_module_equals_torch_momentum_none(kind, device):
    theirs_cls, ours_cls, shape = KINDS[kind]
    theirs = theirs_cls(4, momentum=None, device=device, dtype=DT)
    ours = ours_cls(4, momentum=0.1, estimator="cumulative", device=device, dtype=DT)  # momentum ignored
    _assert_steps_agree(theirs, ours, shape, device, steps=5)


def test_estimator_shows_in_repr_and_a_bad_one_is_refused():
    assert "estimator='cumulative'" in repr(bnkit.BatchNorm1d(3, estimator="cumulative"))
    with pytest.raises(ValueError, match="estimator must be one of"):
        bnkit.BatchNorm1d(3, estimator="exact")


# ---------------------------------------------------------------- the five steps on tensors, any device


@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 2, 3)], ids=["(m, n)", "(m, C, H, W)"])
@pytest.mark.parametrize("device", DEVICES)
def test_reference_functions_on_tensors_match_torch_on_the_device(shape, device):
    """forward_train, both backward passes and forward_infer on tensors of the device, against
    F.batch_norm and its autograd on the same device (float64, random upstream gradient)."""
    z = _randn(shape, device, 0, loc=2.0, scale=3.0)
    gamma, beta = _randn(4, device, 1, loc=1.0), _randn(4, device, 2)
    dz_tilde = _randn(shape, device, 3)
    z_tilde, cache = reference.forward_train(z, gamma, beta)
    assert z_tilde.device == z.device
    zr, gr, br = (t.clone().requires_grad_() for t in (z, gamma, beta))
    expected = F.batch_norm(zr, None, None, gr, br, training=True)
    torch.testing.assert_close(z_tilde, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(expected, (zr, gr, br), dz_tilde)
    for backward in (reference.backward, reference.backward_staged):
        for ours, theirs in zip(backward(dz_tilde, cache), grads):
            assert ours.device == z.device
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    mean, var = _randn(4, device, 4), _randn(4, device, 5).abs() + 0.5
    torch.testing.assert_close(
        reference.forward_infer(z, gamma, beta, mean, var), F.batch_norm(z, mean, var, gamma, beta, training=False),
        rtol=1e-12, atol=1e-12,
    )
    scale, shift = reference.inference_affine(gamma, beta, mean, var)
    torch.testing.assert_close(reference.forward_infer_affine(z, scale, shift), reference.forward_infer(z, gamma, beta, mean, var))


# ---------------------------------------------------------------- modules: bad input


@pytest.mark.parametrize("eps", [0.0, -1e-5, True])
def test_module_refuses_eps_not_positive(eps):
    with pytest.raises(ValueError, match="eps must be a positive number"):
        bnkit.BatchNorm1d(3, eps=eps)


@pytest.mark.parametrize("momentum", [-0.1, 1.5, True])
def test_module_refuses_momentum_outside_0_1(momentum):
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        bnkit.BatchNorm2d(3, momentum=momentum)


def test_module_accepts_numpy_scalars_as_torch_nn_does():
    """eps and momentum as NumPy scalars (e.g. read from a config array): same as torch.nn."""
    ours = bnkit.BatchNorm1d(3, eps=np.float32(1e-3), momentum=np.float64(0.2)).double()
    theirs = nn.BatchNorm1d(3, eps=np.float32(1e-3), momentum=np.float64(0.2)).double()
    x = _randn((6, 3), "cpu", 0)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def _assert_refused(bn, x, match):
    """x raises a ValueError naming the problem, and the module's state does not change."""
    before = _state(bn)
    with pytest.raises(ValueError, match=match):
        bn(x)
    _assert_state_unchanged(bn, before)


@pytest.mark.parametrize("estimator", ["ema", "ema_debiased", "cumulative"])
@pytest.mark.parametrize("kind, shape", [("1d", (1, 4)), ("1d", (1, 4, 1)), ("2d", (1, 4, 1, 1))])
@pytest.mark.parametrize("device", DEVICES)
def test_module_refuses_one_value_per_feature(kind, shape, estimator, device):
    _, ours = _pair(kind, device)
    ours.estimator = estimator
    _assert_refused(ours, _randn(shape, device, 0), "more than one value per feature")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("kind", ["1d", "2d"])
@pytest.mark.parametrize("device", DEVICES)
def test_module_refuses_a_non_finite_training_batch(kind, bad, device):
    _, ours = _pair(kind, device)
    x = _randn(KINDS[kind][2], device, 0)
    x[1, 2] = bad
    _assert_refused(ours, x, "NaN or infinite")


@pytest.mark.parametrize("device", DEVICES)
def test_module_refuses_a_wrong_number_of_dimensions(device):
    _, ours = _pair("2d", device)
    _assert_refused(ours, _randn((6, 4), device, 0), "expected 4D input")
    _, ours = _pair("1d", device)
    _assert_refused(ours, _randn((2, 4, 2, 2), device, 0), "expected 2D or 3D input")


@pytest.mark.parametrize("kind", ["1d", "2d"])
@pytest.mark.parametrize("device", DEVICES)
def test_module_refuses_the_wrong_number_of_features(kind, device):
    _, ours = _pair(kind, device)
    shape = list(KINDS[kind][2])
    shape[1] = 5
    _assert_refused(ours, _randn(tuple(shape), device, 0), "expected 4 features/channels")


def test_module_refuses_a_momentum_set_after_construction():
    _, ours = _pair("1d", "cpu")
    ours.momentum = 2.0
    _assert_refused(ours, _randn((6, 4), "cpu", 0), r"momentum must be in \[0, 1\]")


# ---------------------------------------------------------------- recompute_stats


def _model(device, seed=0):
    """Linear, torch.nn BatchNorm1d, ReLU, Linear, bnkit BatchNorm1d, ReLU, Linear (float64)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4), bnkit.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)
    ).to(device=device, dtype=DT)
    _randomise(model[1], seed=1)
    _randomise(model[4], seed=2)
    return model


def _data(sizes, device, seed=0):
    return [_randn((m, 3), device, seed + i, loc=1.5, scale=2.0) for i, m in enumerate(sizes)]


UNEVEN = [5, 9, 2, 13]
EQUAL = [8, 8, 8, 8]


def _mean_var(values):
    whole = torch.cat(values)
    return whole.mean(0), whole.var(0, unbiased=True)


def _expected_train_upstream(model, batches):
    """By hand: the first BN normalises each batch with that batch's statistics."""
    lin1, bn1, _, lin2 = model[0], model[1], model[2], model[3]
    with torch.no_grad():
        h1 = [lin1(x) for x in batches]
        h2 = [lin2(F.relu(F.batch_norm(h, None, None, bn1.weight, bn1.bias, True, eps=bn1.eps))) for h in h1]
    return _mean_var(h1), _mean_var(h2)


def _expected_eval_upstream(model, batches):
    """By hand: the first BN already uses its new (whole-set) statistics."""
    lin1, bn1, _, lin2 = model[0], model[1], model[2], model[3]
    with torch.no_grad():
        h1 = [lin1(x) for x in batches]
        mean1, var1 = _mean_var(h1)
        h2 = [lin2(F.relu(F.batch_norm(h, mean1, var1, bn1.weight, bn1.bias, False, eps=bn1.eps))) for h in h1]
    return (mean1, var1), _mean_var(h2)


def _assert_stats(model, expected, returned=None):
    for index, (mean, var) in zip((1, 4), expected):
        bn = model[index]
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-13)
        if returned is not None:
            torch.testing.assert_close(returned[str(index)][0], mean, rtol=1e-12, atol=1e-13)
            torch.testing.assert_close(returned[str(index)][1], var, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("sizes", [UNEVEN, EQUAL], ids=["uneven", "equal"])
@pytest.mark.parametrize("device", DEVICES)
def test_recompute_exact_with_upstream_in_training_mode(sizes, device):
    model, batches = _model(device), _data(sizes, device)
    returned = bnkit.recompute_stats(model, batches)
    assert set(returned) == {"1", "4"}
    _assert_stats(model, _expected_train_upstream(model, batches), returned)


@pytest.mark.parametrize("sizes", [UNEVEN, EQUAL], ids=["uneven", "equal"])
@pytest.mark.parametrize("device", DEVICES)
def test_recompute_exact_with_upstream_in_eval_mode(sizes, device):
    model, batches = _model(device), _data(sizes, device)
    returned = bnkit.recompute_stats(model, batches, upstream="eval")
    _assert_stats(model, _expected_eval_upstream(model, batches), returned)


def test_the_two_upstream_modes_differ_after_the_first_layer():
    model, batches = _model("cpu"), _data(UNEVEN, "cpu")
    (m1, v1), (m2, v2) = _expected_train_upstream(model, batches)
    (e1, w1), (e2, w2) = _expected_eval_upstream(model, batches)
    torch.testing.assert_close(m1, e1)
    assert not torch.allclose(m2, e2, rtol=1e-3) or not torch.allclose(v2, w2, rtol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_recompute_algorithm2_equals_torch_momentum_none_passes(device):
    model, batches = _model(device), _data(EQUAL, device)
    reference = copy.deepcopy(model)
    for bn in (reference[1], reference[4]):
        bn.momentum = None  # cumulative average, torch.nn's and bnkit's
        bn.reset_running_stats()
    reference.train()
    with torch.no_grad():
        for x in batches:
            reference(x)
    bnkit.recompute_stats(model, batches, estimator="algorithm2")
    for index in (1, 4):
        torch.testing.assert_close(model[index].running_mean, reference[index].running_mean, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(model[index].running_var, reference[index].running_var, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("upstream", ["train", "eval"])
def test_recompute_accepts_a_generator_of_x_y_pairs(upstream):
    model, batches = _model("cpu"), _data(UNEVEN, "cpu")
    expected = bnkit.recompute_stats(copy.deepcopy(model), batches, upstream=upstream)
    pairs = ((x, torch.zeros(len(x), dtype=torch.long)) for x in batches)  # one-shot, like a DataLoader's
    got = bnkit.recompute_stats(model, pairs, upstream=upstream)
    for name in expected:
        for a, b in zip(got[name], expected[name]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("upstream", ["train", "eval"])
@pytest.mark.parametrize("device", DEVICES)
def test_recompute_leaves_modes_momenta_parameters_and_counters_alone(upstream, device):
    model, batches = _model(device), _data(UNEVEN, device)
    model.train()
    model[1].eval()  # a mixed state, to be kept exactly
    model[4].momentum = None
    modes = [m.training for m in model.modules()]
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    counters = [model[i].num_batches_tracked.clone() for i in (1, 4)]
    bnkit.recompute_stats(model, batches, upstream=upstream)
    assert [m.training for m in model.modules()] == modes
    assert model[1].momentum == 0.1 and model[4].momentum is None
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]), k
        assert v.grad is None, k
    assert [model[i].num_batches_tracked for i in (1, 4)] == counters


@pytest.mark.parametrize("upstream", ["train", "eval"])
def test_recompute_works_under_no_grad_and_with_trainable_parameters(upstream):
    model, batches = _model("cpu"), _data(UNEVEN, "cpu")
    assert all(p.requires_grad for p in model.parameters())
    with torch.enable_grad():
        expected = bnkit.recompute_stats(copy.deepcopy(model), batches, upstream=upstream)
    with torch.no_grad():
        got = bnkit.recompute_stats(model, batches, upstream=upstream)
    for name in expected:
        torch.testing.assert_close(got[name][0], expected[name][0], rtol=0, atol=0)
        torch.testing.assert_close(got[name][1], expected[name][1], rtol=0, atol=0)
    assert not torch.allclose(model[4].running_var, torch.ones(4, dtype=DT))  # statistics were written


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("upstream", ["train", "eval"])
@pytest.mark.parametrize("device", DEVICES)
def test_recompute_refuses_non_finite_batches_and_changes_nothing(upstream, bad, device):
    model, batches = _model(device), _data(UNEVEN, device)
    batches[-1][0, 1] = bad  # the last batch: the earlier ones have already passed through
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="NaN or infinite"):
        bnkit.recompute_stats(model, batches, upstream=upstream)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_recompute_refuses_bad_arguments():
    model, batches = _model("cpu"), _data(EQUAL, "cpu")
    with pytest.raises(ValueError, match="estimator must be 'exact' or 'algorithm2'"):
        bnkit.recompute_stats(model, batches, estimator="ema")
    with pytest.raises(ValueError, match="upstream must be 'train' or 'eval'"):
        bnkit.recompute_stats(model, batches, upstream="test")
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        bnkit.recompute_stats(nn.Sequential(nn.Linear(3, 2)).to(DT), batches)
    with pytest.raises(ValueError, match="no BatchNorm layer"):  # no running statistics to replace
        bnkit.recompute_stats(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)), batches)


@pytest.mark.parametrize("upstream", ["train", "eval"])
@pytest.mark.parametrize("batches", [[], iter([])], ids=["list", "iterator"])
def test_recompute_refuses_no_batches(upstream, batches):
    model = _model("cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="at least one batch"):
        bnkit.recompute_stats(model, batches, upstream=upstream)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------- fold_bn


def _conv_model(bn_cls, conv_bias, affine, device):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=conv_bias), bn_cls(4, affine=affine), nn.ReLU(),
        nn.Conv2d(4, 5, 3, bias=conv_bias), bn_cls(5, affine=affine), nn.ReLU(),
    )
    return model.to(device=device, dtype=DT)


def _linear_model(bn_cls, bias, affine, device):
    model = nn.Sequential(nn.Linear(6, 5, bias=bias), bn_cls(5, affine=affine), nn.ReLU(), nn.Linear(5, 3))
    return model.to(device=device, dtype=DT)


def _prepare(model, seed=0):
    """Random weights and running statistics, the model left in training mode."""
    torch.manual_seed(seed)
    for i, m in enumerate(model.modules()):
        if isinstance(m, _BatchNorm):
            _randomise(m, seed=10 * i)
    return model.train()


def _assert_folds(model, x, bn_left=0):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = bnkit.fold_bn(model)
    assert model.training and all(m.training for m in model.modules())  # the original's mode
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the original's parameters and buffers
    assert sum(isinstance(m, _BatchNorm) for m in folded.modules()) == bn_left
    expected = copy.deepcopy(model).eval()(x)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("bn_cls", [nn.BatchNorm1d, bnkit.BatchNorm1d], ids=["torch.nn", "bnkit"])
@pytest.mark.parametrize("device", DEVICES)
def test_fold_linear_and_batchnorm1d(bn_cls, bias, affine, device):
    model = _prepare(_linear_model(bn_cls, bias, affine, device))
    _assert_folds(model, _randn((7, 6), device, 3, loc=1.0, scale=2.0))


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("bn_cls", [nn.BatchNorm2d, bnkit.BatchNorm2d], ids=["torch.nn", "bnkit"])
@pytest.mark.parametrize("device", DEVICES)
def test_fold_conv2d_and_batchnorm2d(bn_cls, bias, affine, device):
    model = _prepare(_conv_model(bn_cls, bias, affine, device))
    _assert_folds(model, _randn((2, 3, 6, 6), device, 4, loc=1.0, scale=2.0))


def test_a_folded_linear_refuses_input_that_is_not_2d():
    """Linear acts on the last axis, BatchNorm1d on axis 1: for (m, C, L) input with L equal to the
    Linear's output size the pair runs, but it is not one affine map, so the folded layer refuses it."""
    model = _prepare(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).to(DT))
    folded = bnkit.fold_bn(model)
    linear = folded.get_submodule("0")
    assert isinstance(linear, folding.FoldedLinear) and isinstance(linear, nn.Linear)
    x3 = _randn((5, 4, 4), "cpu", 6)
    copy.deepcopy(model).eval()(x3)  # the original model accepts it
    with pytest.raises(ValueError, match=r"valid for input \(m, n\) only"):
        folded(x3)
    x2 = _randn((5, 4), "cpu", 7)
    with torch.no_grad():
        torch.testing.assert_close(folded(x2), copy.deepcopy(model).eval()(x2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm1d, bnkit.BatchNorm1d], ids=["torch.nn", "bnkit"])
def test_a_batchnorm_after_relu_is_not_folded(bn_cls):
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), bn_cls(5), nn.Linear(5, 3)).to(DT)
    _assert_folds(_prepare(model), _randn((7, 6), "cpu", 5), bn_left=1)
    folded = bnkit.fold_bn(model)
    assert not any(m.training for m in folded.modules())  # the BN that stays is in eval mode
