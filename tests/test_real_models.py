"""bnkit on the architectures practitioners use and the cases they file issues about.

Each architecture is written here, small (float64, a few channels), so the suite runs in
seconds: residual, depthwise-separable, densely connected, encoder-decoder with a
ConvTranspose decoder, Siamese (a shared backbone), Inception-style. Each test compares with
``model.eval()`` to float64 round-off and, where it applies, with PyTorch's own tools
(torch.fx.experimental.optimization.fuse, torch.nn.utils.fusion.fuse_conv_bn_eval,
torch.ao.quantization.fuse_modules, torch.optim.swa_utils.update_bn).
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn

import bnkit
from bnkit import folding

DT = torch.float64
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine parameters (so a wrong fold shows), float64, eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                n = m.num_features
                if m.track_running_stats:
                    m.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
                    m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=gen) * 2 - 1)
    return model.to(DT).eval()


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _n_bn(model: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


def _cbr(cin, cout, k=3, groups=1, bn=nn.BatchNorm2d):
    return [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups), bn(cout), nn.ReLU()]


# ---------------------------------------------------------------- architectures


class Residual(nn.Module):
    """A ResNet basic block with a projection shortcut (conv-BN on the skip path)."""

    def __init__(self, cin=3, cout=6):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.down(x))


def depthwise_separable(c=4):
    """MobileNet: depthwise 3x3 (groups = channels) + BN + ReLU, pointwise 1x1 + BN + ReLU."""
    return nn.Sequential(*_cbr(3, c), *_cbr(c, c, groups=c), *_cbr(c, 2 * c, k=1))


class Dense(nn.Module):
    """DenseNet: BN-ReLU-Conv on the concatenation of all earlier feature maps (pre-activation:
    only the first BN follows a conv; the others see a concatenation)."""

    def __init__(self, c=3, growth=2, layers=3):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(c + i * growth), nn.ReLU(), nn.Conv2d(c + i * growth, growth, 3, padding=1))
            for i in range(layers)
        )

    def forward(self, x):
        features = [self.stem_bn(self.stem(x))]
        for block in self.blocks:
            features.append(block(torch.cat(features, 1)))
        return torch.cat(features, 1)


class EncoderDecoder(nn.Module):
    """U-Net-like: conv-BN encoder, ConvTranspose-BN decoder (grouped), skip concatenation."""

    def __init__(self, c=4):
        super().__init__()
        self.enc = nn.Sequential(*_cbr(3, c))
        self.down = nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.up = nn.ConvTranspose2d(2 * c, c, 2, stride=2, groups=2)
        self.up_bn = nn.BatchNorm2d(c)
        self.head = nn.Sequential(*_cbr(2 * c, 2))

    def forward(self, x):
        e = self.enc(x)
        d = F.relu(self.up_bn(self.up(self.down(e))))
        return self.head(torch.cat([e, d], 1))


class Siamese(nn.Module):
    """One backbone (BN inside) applied to two inputs, then a head on both embeddings."""

    def __init__(self, c=4):
        super().__init__()
        self.backbone = nn.Sequential(*_cbr(3, c), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Linear(c, c), nn.BatchNorm1d(c))
        self.head = nn.Sequential(nn.Linear(2 * c, 3), nn.BatchNorm1d(3))

    def forward(self, a, b):
        return self.head(torch.cat([self.backbone(a), self.backbone(b)], 1))


class Inception(nn.Module):
    """Parallel conv-BN branches (1x1, 1x1 -> 3x3, pool -> 1x1) concatenated."""

    def __init__(self, c=3):
        super().__init__()
        self.b1 = nn.Sequential(*_cbr(c, 2, k=1))
        self.b2 = nn.Sequential(*_cbr(c, 2, k=1), *_cbr(2, 3))
        self.b3 = nn.Sequential(nn.MaxPool2d(3, 1, 1), *_cbr(c, 2, k=1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x)], 1)


class Decoder(nn.Module):
    """ConvTranspose1d/2d/3d (grouped and not) + BN, as in generators and segmentation heads."""

    def __init__(self, dim=2, groups=1):
        super().__init__()
        conv, bn = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dim - 1], \
            (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dim - 1]
        self.up1, self.bn1 = conv(4, 6, 3, stride=2, groups=groups), bn(6)
        self.up2, self.bn2 = conv(6, 2, 2, groups=2, bias=False), bn(2)

    def forward(self, x):
        return self.bn2(self.up2(F.relu(self.bn1(self.up1(x)))))


ARCHITECTURES = {  # name: (model factory, a probe input, BN layers fold_bn leaves)
    "residual": (Residual, (_x(2, 3, 6, 6),), 0),
    "depthwise-separable": (depthwise_separable, (_x(2, 3, 6, 6),), 0),
    "dense": (Dense, (_x(2, 3, 5, 5),), 3),  # pre-activation BNs see a concatenation
    "encoder-decoder": (EncoderDecoder, (_x(2, 3, 6, 6),), 0),
    "siamese": (Siamese, (_x(3, 3, 5, 5), _x(3, 3, 5, 5, seed=2)), 2),  # backbone BNs called twice
    "inception": (Inception, (_x(2, 3, 5, 5),), 0),
    "decoder-1d": (lambda: Decoder(1), (_x(2, 4, 5),), 0),
    "decoder-2d-grouped": (lambda: Decoder(2, groups=2), (_x(2, 4, 4, 4),), 0),
    "decoder-3d": (lambda: Decoder(3), (_x(2, 4, 3, 3, 3),), 0),
}


# ---------------------------------------------------------------- fold_bn


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_fold_bn_equals_eval_on_every_architecture(name):
    factory, probe, left = ARCHITECTURES[name]
    model = _randomise(factory())
    before = copy.deepcopy(model.state_dict())
    folded, report = bnkit.fold_bn(model, report=True, probe=probe)
    with torch.no_grad():
        torch.testing.assert_close(folded(*probe), model(*probe), rtol=1e-12, atol=1e-12)
    assert report.max_abs_diff < 1e-12
    assert _n_bn(folded) == left == sum(r["folded_into"] is None for r in report.rows)
    assert len(report.rows) == _n_bn(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the caller's model is not changed


@pytest.mark.parametrize("name", ["residual", "depthwise-separable", "inception"])
def test_fold_bn_agrees_with_torch_fx_fuser(name):
    factory, probe, _ = ARCHITECTURES[name]
    model = _randomise(factory())
    ours, theirs = bnkit.fold_bn(model), fuse(copy.deepcopy(model))
    assert _n_bn(ours) == _n_bn(theirs) == 0
    with torch.no_grad():
        torch.testing.assert_close(ours(*probe), theirs(*probe), rtol=1e-12, atol=1e-12)


def test_fold_bn_folds_conv_transpose_where_the_fx_fuser_does_not():
    factory, probe, _ = ARCHITECTURES["decoder-2d-grouped"]
    model = _randomise(factory())
    assert _n_bn(fuse(copy.deepcopy(model))) == 2  # torch.fx's fuser has no ConvTranspose pattern
    assert _n_bn(bnkit.fold_bn(model)) == 0


@pytest.mark.parametrize("groups", [1, 2])
def test_fold_bn_conv_transpose_agrees_with_torch_ao_fuse_modules(groups):
    from torch.ao.quantization import fuse_modules

    model = _randomise(nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=groups), nn.BatchNorm2d(6)))
    x = _x(2, 4, 4, 4)
    ours = bnkit.fold_bn(model)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), model(x), rtol=1e-12, atol=1e-12)
        if groups == 1:  # torch.ao scales the wrong axis of a grouped ConvTranspose (a crash)
            theirs = fuse_modules(copy.deepcopy(model), [["0", "1"]])
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)


def test_fold_bn_agrees_with_fuse_conv_bn_eval_on_one_pair():
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = _randomise(nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.BatchNorm2d(4)))
    x = _x(2, 3, 5, 5)
    theirs = fuse_conv_bn_eval(model[0], model[1])
    ours = bnkit.fold_bn(model)
    torch.testing.assert_close(ours.get_submodule("0").weight, theirs.weight, rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)


class SharedWeights(nn.Module):
    """Two convolutions with one weight tensor (weight tying), each followed by its own BN."""

    def __init__(self, second_bn=True):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.c2.weight = self.c1.weight
        self.b1, self.b2 = nn.BatchNorm2d(4), (nn.BatchNorm2d(4) if second_bn else nn.Identity())

    def forward(self, x):
        return self.b2(self.c2(F.relu(self.b1(self.c1(x)))))


@pytest.mark.parametrize("second_bn", [True, False])
def test_fold_bn_gives_a_shared_weight_its_own_folded_copy(second_bn):
    model = _randomise(SharedWeights(second_bn))
    x = _x(2, 4, 5, 5)
    folded, report = bnkit.fold_bn(model, report=True, probe=x)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)
    assert folded.c1.weight is not folded.c2.weight
    assert "shared with c2" in report.rows[0]["reason"] and report.rows[0]["folded_into"] == "c1"


class DirectWeightUse(nn.Module):
    """A layer whose weight is also read directly by the forward pass (tied output layer)."""

    def __init__(self):
        super().__init__()
        self.lin, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        return F.linear(self.bn(self.lin(x)), self.lin.weight)


def test_fold_bn_leaves_a_bn_whose_layer_weight_is_read_directly():
    model = _randomise(DirectWeightUse())
    x = _x(5, 4)
    folded, report = bnkit.fold_bn(model, report=True, probe=x)
    assert report.max_abs_diff < 1e-12 and _n_bn(folded) == 1
    assert "read directly" in report.rows[0]["reason"]


PARAMETRIZED = {
    "parametrizations.spectral_norm": nn.utils.parametrizations.spectral_norm,
    "parametrizations.weight_norm": nn.utils.parametrizations.weight_norm,
    "hook spectral_norm": nn.utils.spectral_norm,
    "hook weight_norm": nn.utils.weight_norm,
}


@pytest.mark.parametrize("kind", PARAMETRIZED)
@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_fold_bn_evaluates_a_parametrized_or_hooked_weight(kind, layer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        if layer == "conv":
            model, x = nn.Sequential(PARAMETRIZED[kind](nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4)), _x(2, 3, 5, 5)
        else:
            model, x = nn.Sequential(PARAMETRIZED[kind](nn.Linear(3, 4)), nn.BatchNorm1d(4)), _x(6, 3)
    model = _randomise(model).train()
    model(x)  # power iterations in training mode, and a weight computed with autograd
    model.eval()
    with torch.no_grad():
        expected = model(x)
    folded, report = bnkit.fold_bn(model, report=True, probe=x)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # the caller's model works
        torch.testing.assert_close(folded(x), folded(x), rtol=0, atol=0)  # no hook undoes the fold
    assert _n_bn(folded) == 0 and "evaluated" in report.rows[0]["reason"]
    assert not any(hasattr(m, "parametrizations") or m._forward_pre_hooks for m in folded.modules())


class KeywordBN(nn.Module):
    def __init__(self, keyword=True):
        super().__init__()
        self.conv, self.bn, self.bnk = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), bnkit.BatchNorm2d(4)
        self.keyword = keyword

    def forward(self, x):
        if self.keyword:
            return self.bnk(z=F.relu(self.bn(input=self.conv(x))))
        return self.bnk(F.relu(self.bn(self.conv(x))))


def test_fold_bn_and_recompute_stats_take_a_bn_called_with_a_keyword():
    model = _randomise(KeywordBN())
    x = _x(2, 3, 5, 5)
    folded, report = bnkit.fold_bn(model, report=True, probe=x)
    assert report.max_abs_diff < 1e-12 and report.rows[0]["folded_into"] == "conv"
    positional = copy.deepcopy(model)
    positional.keyword = False
    for upstream in ("train", "eval"):
        got = bnkit.recompute_stats(copy.deepcopy(model), [x, 2 * x], upstream=upstream)
        expected = bnkit.recompute_stats(copy.deepcopy(positional), [x, 2 * x], upstream=upstream)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-13)


def test_folded_linear_and_batchnorm1d_is_torchscriptable():
    model = _randomise(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)))
    x = _x(6, 5)
    scripted = torch.jit.script(bnkit.fold_bn(model))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(Exception, match=r"valid for input \(m, n\) only"):
        scripted(_x(6, 5, 5))


class Reasons(nn.Module):
    """One BN per reason to leave it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn_after_relu = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.conv2, self.bn_twice_used = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.conv3, self.bn_no_stats = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)
        self.aux_bn = nn.BatchNorm2d(4)  # never called

    def forward(self, x):
        h = self.bn_after_relu(F.relu(self.conv(x)))
        y = self.conv2(h)
        return self.bn_no_stats(self.conv3(self.bn_twice_used(y) + y))


def test_fold_report_names_every_bn_with_its_reason_as_a_table_and_as_data():
    model = _randomise(Reasons())
    x = _x(2, 3, 5, 5)
    folded, report = bnkit.fold_bn(model, report=True, probe=x)
    reasons = {r["bn"]: r["reason"] for r in report.rows}
    assert list(reasons) == ["bn_after_relu", "bn_twice_used", "bn_no_stats", "aux_bn"]  # execution order
    assert "not the output of a layer" in reasons["bn_after_relu"]
    assert "also used elsewhere" in reasons["bn_twice_used"]
    assert "track_running_stats=False" in reasons["bn_no_stats"]
    assert "never called" in reasons["aux_bn"]
    assert all(r["folded_into"] is None for r in report.rows)
    text = str(report)
    assert text.splitlines()[0].startswith("fold_bn: folded 0 of 4") and "bn_twice_used" in text
    assert json.loads(json.dumps(report.to_dict()))["layers"][0]["bn"] == "bn_after_relu"
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=0, atol=0)


def test_fold_bn_leaves_a_bn_called_twice_where_the_fx_fuser_folds_it_twice():
    model = _randomise(Siamese())
    a, b = ARCHITECTURES["siamese"][1]
    folded, report = bnkit.fold_bn(model, report=True, probe=(a, b))
    assert "called 2 times" in report.rows[0]["reason"] and report.max_abs_diff < 1e-12
    with torch.no_grad():  # PyTorch's fuser folds the shared conv+BN on each call: BN applied twice
        assert (fuse(copy.deepcopy(model))(a, b) - model(a, b)).abs().max() > 1e-3


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) if x.sum() > 0 else -x  # control flow on a value


def test_fold_bn_returns_an_untraceable_model_unfolded_with_its_reason():
    model = _randomise(Untraceable())
    x = _x(2, 3, 5, 5).abs()
    folded, report = bnkit.fold_bn(model, report=True, probe=x)
    assert "not traceable" in report.rows[0]["reason"] and report.max_abs_diff == 0
    with pytest.warns(UserWarning, match="folded nothing"):
        bnkit.fold_bn(model)


def test_fold_bn_refuses_a_non_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        bnkit.fold_bn(lambda x: x)


# ---------------------------------------------------------------- recompute_stats


def _loader(n=4, m=8, seed=3, shape=(3, 5, 5)):
    return [_x(m, *shape, seed=seed + i) for i in range(n)]


def test_recompute_algorithm2_equals_update_bn_on_a_residual_net():
    """update_bn: momentum=None (the average of batch means and unbiased variances) with the
    upstream layers normalising with batch statistics, as upstream="train"."""
    model = _randomise(Residual())
    batches = _loader()
    theirs = copy.deepcopy(model)
    update_bn(batches, theirs)
    bnkit.recompute_stats(model, batches, estimator="algorithm2")
    for a, b in zip(bnkit.bn_layers(model), bnkit.bn_layers(theirs)):
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", ["residual", "depthwise-separable", "dense", "encoder-decoder", "inception"])
def test_recompute_exact_equals_the_whole_set_statistics_of_each_layer_input(name):
    """upstream="train" reads the kernel's batch statistics; the float64 reference concatenates
    each layer's inputs (recorded by hooks in a training-mode pass) and reduces them at once."""
    factory, probe, _ = ARCHITECTURES[name]
    model = _randomise(factory())
    batches = _loader(shape=probe[0].shape[1:])
    inputs = {bn: [] for bn in bnkit.bn_layers(model)}
    reference = copy.deepcopy(model).train()
    hooks = [bn.register_forward_pre_hook(lambda m, a, key=key: inputs[key].append(a[0]))
             for bn, key in zip(bnkit.bn_layers(reference), inputs)]
    with torch.no_grad():
        for x in batches:
            reference(x)
    for h in hooks:
        h.remove()
    got = bnkit.recompute_stats(model, batches)
    for bn, name in bnkit.bn_names(model).items():
        whole = torch.cat([z.transpose(0, 1).reshape(z.shape[1], -1) for z in inputs[bn]], 1)
        torch.testing.assert_close(got[name][0], whole.mean(1), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(got[name][1], whole.var(1), rtol=1e-11, atol=1e-13)


def _siamese_expected(model, pairs, upstream):
    """Per BN layer, the whole-set mean and variance of the inputs of all its calls, by hand."""
    bb = model.backbone
    conv, bn1, lin, bn2 = bb[0], bb[1], bb[5], bb[6]

    def embed(x, stats1, stats2):
        h1 = conv(x)
        if stats1 is None:
            z = F.batch_norm(h1, None, None, bn1.weight, bn1.bias, True, eps=bn1.eps)
        else:
            z = F.batch_norm(h1, *stats1, bn1.weight, bn1.bias, False, eps=bn1.eps)
        h2 = lin(F.relu(z).mean((2, 3)))
        return h1, h2

    def whole(zs):
        z = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in zs], 1)
        return z.mean(1), z.var(1)

    with torch.no_grad():
        h1 = [conv(x) for p in pairs for x in p]
        s1 = whole(h1)
        h2 = [embed(x, None if upstream == "train" else s1, None)[1] for p in pairs for x in p]
        s2 = whole(h2)
    return s1, s2


@pytest.mark.parametrize("upstream", ["train", "eval"])
def test_recompute_counts_every_call_of_a_shared_backbone_with_dict_batches(upstream):
    model = _randomise(Siamese())
    pairs = [(_x(6, 3, 5, 5, seed=10 + i), _x(6, 3, 5, 5, seed=20 + i)) for i in range(3)]
    batches = [{"a": a, "b": b} for a, b in pairs]
    got = bnkit.recompute_stats(copy.deepcopy(model), batches, upstream=upstream,
                                forward=lambda m, batch: m(**batch))
    (m1, v1), (m2, v2) = _siamese_expected(model, pairs, upstream)
    torch.testing.assert_close(got["backbone.1"], (m1, v1), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(got["backbone.6"], (m2, v2), rtol=1e-11, atol=1e-13)


def test_recompute_refuses_a_dict_batch_without_forward_and_changes_nothing():
    model = _randomise(Siamese())
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match="forward="):
        bnkit.recompute_stats(model, [{"a": _x(4, 3, 5, 5), "b": _x(4, 3, 5, 5)}])
    with pytest.raises(TypeError, match="missing 1 required"):  # update_bn passes the dict on
        update_bn([{"a": _x(4, 3, 5, 5)}], copy.deepcopy(model))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class AuxHead(nn.Module):
    """An auxiliary classifier used only in training mode (GoogLeNet, PSPNet)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*_cbr(3, 4))
        self.aux = nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))

    def forward(self, x):
        h = self.body(x)
        return (h, self.aux(h)) if self.training else h


@pytest.mark.parametrize("upstream", ["train", "eval"])
def test_recompute_keeps_and_names_a_layer_never_reached(upstream):
    model = _randomise(AuxHead())
    aux_before = model.aux[1].running_mean.clone()
    with pytest.warns(UserWarning, match=r"1 BN layer\(s\) never called .*aux\.1"):
        got = bnkit.recompute_stats(model, _loader(), upstream=upstream)
    assert torch.equal(model.aux[1].running_mean, aux_before) and set(got) == {"body.1", "aux.1"}
    assert not torch.allclose(model.body[1].running_var, torch.ones(4, dtype=DT))


def test_recompute_caps_batches_and_samples_and_reports_progress():
    model = _randomise(Residual())
    batches = _loader(n=5)
    expected = bnkit.recompute_stats(copy.deepcopy(model), batches[:2])
    calls = []
    for kwargs in ({"max_batches": 2}, {"max_samples": 9}, {"max_samples": 16}):
        got = bnkit.recompute_stats(copy.deepcopy(model), iter(batches), progress=lambda i, n: calls.append((i, n)),
                                    **kwargs)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    assert calls == [(1, None), (2, None)] * 3  # a one-shot iterator has no length
    calls.clear()
    bnkit.recompute_stats(copy.deepcopy(model), batches, max_batches=3, progress=lambda i, n: calls.append((i, n)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    calls.clear()
    bnkit.recompute_stats(copy.deepcopy(model), batches, upstream="eval", max_batches=2,
                          progress=lambda i, n: calls.append((i, n)))
    layers = len(bnkit.bn_layers(model))
    assert calls[-1] == (2 * layers, 2 * layers)  # one pass of 2 batches per layer


def test_recompute_refuses_bad_arguments_by_name():
    model, batches = _randomise(Residual()), _loader()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        bnkit.recompute_stats(lambda x: x, batches)
    with pytest.raises(TypeError, match="batches must be an iterable"):
        bnkit.recompute_stats(model, 3)
    with pytest.raises(TypeError, match="forward must be a callable"):
        bnkit.recompute_stats(model, batches, forward="model")
    for cap in ("max_batches", "max_samples"):
        for bad in (0, -1, 2.5, True):
            with pytest.raises(ValueError, match=f"{cap} must be a positive integer"):
                bnkit.recompute_stats(model, batches, **{cap: bad})
    with pytest.raises(TypeError, match="progress must be"):
        bnkit.recompute_stats(model, batches, progress="yes")


def test_recompute_keyword_names_used_by_other_bnkit_tools():
    """bnkit's doctor calls recompute_stats(copy, batches, upstream=..., forward=..., max_batches=...)."""
    model = _randomise(Residual())
    got = bnkit.recompute_stats(copy.deepcopy(model), _loader(), upstream="eval",
                                forward=lambda m, b: m(b), max_batches=2)
    assert set(got) == set(bnkit.bn_names(model).values())


def test_recompute_with_bnkit_modules_of_every_estimator_leaves_them_as_they_were():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bnkit.BatchNorm2d(4, estimator="cumulative"), nn.ReLU(),
                          nn.Conv2d(4, 4, 1), bnkit.BatchNorm2d(4, estimator="ema_debiased", momentum=0.3))
    model = _randomise(model)
    reference = copy.deepcopy(model)
    for bn in bnkit.bn_layers(reference):  # torch.nn's classes: the same statistics expected
        bn.__class__ = nn.BatchNorm2d
    batches = _loader()
    got, expected = bnkit.recompute_stats(model, batches), bnkit.recompute_stats(reference, batches)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    assert [bn.estimator for bn in bnkit.bn_layers(model)] == ["cumulative", "ema_debiased"]
    assert all("forward" not in bn.__dict__ for bn in bnkit.bn_layers(model))


# ---------------------------------------------------------------- the drop-in modules


def _bnkit_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), bnkit.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 5), bnkit.BatchNorm1d(5))


def test_bnkit_modules_are_fx_leaf_modules_and_pytorch_fx_tools_take_them():
    model = _randomise(_bnkit_net())
    x = _x(4, 3, 5, 5)
    gm = torch.fx.symbolic_trace(model)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["0", "1", "2", "3", "4", "5"]  # one node per module: BN kept whole
    assert type(gm.get_submodule("1")) is bnkit.BatchNorm2d
    gm.train()  # the mode still switches inside the traced model
    gm(x)
    assert int(gm.get_submodule("1").num_batches_tracked) == 1
    gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(fuse(copy.deepcopy(model))(x), model(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bnkit.fold_bn(model)(x), model(x), rtol=1e-12, atol=1e-12)
    assert type(copy.deepcopy(model)[1]).__module__ == "bnkit.modules"  # pickling finds the class


def test_fx_quantization_takes_a_model_with_bnkit_modules():
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    model = _randomise(_bnkit_net()).float()
    x = _x(8, 3, 5, 5).float()
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping(), (x,))
    prepared(x)
    quantized = convert_fx(prepared)
    with torch.no_grad():
        assert (quantized(x) - model(x)).abs().max() < 0.1  # int8 round-off


@pytest.mark.parametrize("estimator", ["ema", "cumulative"])
def test_bnkit_modules_script_as_torch_nns(estimator):
    model = _randomise(nn.Sequential(nn.Conv2d(3, 4, 3), bnkit.BatchNorm2d(4, estimator=estimator)))
    twin = copy.deepcopy(model)
    twin[1].__class__ = nn.BatchNorm2d
    twin[1].momentum = None if estimator == "cumulative" else 0.1
    scripted = torch.jit.script(copy.deepcopy(model))
    x = _x(4, 3, 5, 5)
    with torch.no_grad():
        for mode in (True, False, True):
            scripted.train(mode), twin.train(mode)
            torch.testing.assert_close(scripted(x), twin(x), rtol=0, atol=0)
    torch.testing.assert_close(scripted[1].running_var, twin[1].running_var, rtol=0, atol=0)


def test_bnkit_ema_debiased_refuses_torchscript_with_a_reason():
    with pytest.raises(TypeError, match="ema_debiased.*cannot be TorchScripted"):
        torch.jit.script(bnkit.BatchNorm1d(3, estimator="ema_debiased"))


@CUDA
@pytest.mark.parametrize("estimator", ["ema", "ema_debiased", "cumulative"])
def test_bnkit_training_forward_does_not_synchronise_on_cuda_and_skips_non_finite(estimator):
    bn = bnkit.BatchNorm2d(4, estimator=estimator).cuda().train()
    z = torch.randn(8, 4, 3, 3, device="cuda")
    bn(z)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    bad = z.clone()
    bad[0, 1, 0, 0] = float("nan")
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation raises
    try:
        out = bn(bad)
        out.sum().backward() if out.requires_grad else None
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isnan(out).any()
    for k, v in bn.state_dict().items():
        assert torch.equal(v, state[k]), k  # statistics and counter as they were
    reference = nn.BatchNorm2d(4).cuda().train()
    reference.load_state_dict(state)
    if estimator == "ema":
        bn(z), reference(z)
        torch.testing.assert_close(bn.running_var, reference.running_var)


# ---------------------------------------------------------------- distributed merging


@pytest.fixture
def group(request):
    """A one-process group of the given backend, in this process (HashStore: no port)."""
    import torch.distributed as dist

    dist.init_process_group(request.param, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield request.param
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "group, device",
    [("gloo", "cpu"), pytest.param("gloo", "cuda", marks=CUDA), pytest.param("nccl", "cuda", marks=CUDA)],
    indirect=["group"],
)
@pytest.mark.parametrize("upstream", ["train", "eval"])
def test_distributed_merge_runs_on_the_backends_device(group, device, upstream):
    from bnkit.distributed import all_reduce_stats, comm_device, recompute_stats_distributed

    assert comm_device().type == ("cuda" if group == "nccl" else "cpu")
    model = _randomise(AuxHead()).to(device)
    batches = [x.to(device) for x in _loader()]
    with pytest.warns(UserWarning, match="aux.1"):  # a layer no rank reaches keeps its statistics
        expected = bnkit.recompute_stats(copy.deepcopy(model), batches, upstream=upstream)
    with pytest.warns(UserWarning, match="aux.1"):
        got = recompute_stats_distributed(model, batches, upstream=upstream)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-13)
        assert got[name][0].device.type == device
    stats = bnkit.running.batch_stats(batches[0])
    merged = all_reduce_stats(stats)
    assert merged.mean.device == stats.mean.device and torch.equal(merged.m2, stats.m2)


def test_recompute_from_the_kernels_float32_statistics_is_close_to_a_float64_reduction():
    """upstream="train" reads float32 batch statistics from the BN kernel, merged in float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
    batches = [100 + torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    got = bnkit.recompute_stats(copy.deepcopy(model), batches)["1"]
    with torch.no_grad():
        z = torch.cat([model[0](x) for x in batches]).double()  # the float32 activations
    mean, var = z.mean((0, 2, 3)), z.var((0, 2, 3))
    assert ((got[0].double() - mean).abs() / var.sqrt()).max() < 1e-5
    assert ((got[1].double() - var) / var).abs().max() < 1e-5


def test_fold_bn_with_a_probe_leaves_linear_and_batchnorm1d_on_3d_input():
    """Linear on the last axis of (m, C, L) then BatchNorm1d on axis C: with L = C it runs, but
    the pair is not one affine map. With a probe fold_bn sees the shape and leaves it."""
    model = _randomise(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    x3 = _x(5, 4, 4)
    folded, report = bnkit.fold_bn(model, report=True, probe=x3)
    assert report.max_abs_diff < 1e-12 and _n_bn(folded) == 1 and "(5, 4, 4)" in report.rows[0]["reason"]
    folded2d, report2d = bnkit.fold_bn(model, report=True, probe=_x(5, 4))
    assert _n_bn(folded2d) == 0 and report2d.max_abs_diff < 1e-12


@pytest.mark.parametrize("estimator, momentum", [("ema", 0.1), ("ema", None), ("ema_debiased", 0.3),
                                                 ("cumulative", 0.1)])
def test_the_accelerator_update_equals_the_cpu_update_and_skips_non_finite_batches(estimator, momentum):
    """The update an accelerator runs (tensors only, torch.where) checked on the CPU against the
    CPU path (the kernel's own update with w_t), batch by batch, a non-finite batch in between."""
    cpu = bnkit.BatchNorm2d(3, estimator=estimator, momentum=momentum).to(DT).train()
    device_path = copy.deepcopy(cpu)
    for i in range(4):
        z = _x(5, 3, 2, 2, seed=40 + i) * (i + 1) + i
        cpu(z)
        mu, var = torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT)
        F.batch_norm(z, mu, var, None, None, True, 1.0)  # what the accelerator path computes
        device_path._update_running(mu, var)
        state = {k: v.clone() for k, v in device_path.state_dict().items()}
        device_path._update_running(mu * float("nan"), var)  # a non-finite batch: nothing changes
        for k, v in device_path.state_dict().items():
            assert torch.equal(v, state[k]), k
        for k, v in cpu.state_dict().items():
            torch.testing.assert_close(device_path.state_dict()[k], v, rtol=1e-14, atol=1e-15)


def _dict_forward(model, batch):
    return model(batch["image"])


def _distributed_worker(rank: int, world_size: int, model: nn.Module, shards: list) -> dict:
    from bnkit.distributed import recompute_stats_distributed

    out = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for estimator, upstream in [("exact", "train"), ("exact", "eval"), ("algorithm2", "train")]:
            out[estimator, upstream] = recompute_stats_distributed(
                copy.deepcopy(model), shards[rank], estimator, upstream, forward=_dict_forward)
    out["warnings"] = [str(w.message) for w in caught]
    return out


def test_distributed_merge_with_dict_batches_and_a_layer_no_rank_reaches():
    """Two gloo processes, uneven shards of dict batches through forward=, an auxiliary head no
    rank calls: every rank writes what recompute_stats gives on the union, and keeps aux."""
    from bnkit.distributed import spawn

    model = _randomise(AuxHead())
    shards = [[{"image": x} for x in _loader(n=2, m=6, seed=60)], [{"image": x} for x in _loader(n=3, m=6, seed=70)]]
    results = spawn(_distributed_worker, 2, model, shards, timeout=120)
    union = [b for shard in shards for b in shard]
    for estimator, upstream in [("exact", "train"), ("exact", "eval"), ("algorithm2", "train")]:
        with pytest.warns(UserWarning, match="aux.1"):
            expected = bnkit.recompute_stats(copy.deepcopy(model), union, estimator, upstream, forward=_dict_forward)
        for r in results:
            for name in expected:
                torch.testing.assert_close(r[estimator, upstream][name], expected[name], rtol=1e-12, atol=1e-13)
            assert torch.equal(r[estimator, upstream]["aux.1"][0], model.aux[1].running_mean)
    assert all(any("aux.1" in w for w in r["warnings"]) for r in results)


def test_folded_parameters_are_parameters_that_train_like_the_originals():
    model = _randomise(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 2),
                                     nn.BatchNorm1d(2)))
    folded = bnkit.fold_bn(model)
    params = dict(folded.named_parameters())
    assert set(params) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    assert all(p.requires_grad for p in params.values())
    folded(_x(2, 3, 5, 5)).sum().backward()
    assert all(p.grad is not None for p in params.values())
