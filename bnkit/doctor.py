"""A per-layer audit of a model's Batch Norm (``doctor``): which layer is wrong, and why.

``doctor(model, batches)`` measures, for every BN layer in execution order, how far its running
statistics are from the population statistics (mean, var) of its inputs over ``batches``
(upstream layers in inference mode, as at test time: ``recompute_stats(..., upstream="eval")``
on a copy), looks at its mode, momentum, parameters, inputs and what feeds it, and raises these
flags (the thresholds are the constants below):

    stale_statistics             max_c |running_mean - mean| / sqrt(var + eps) > STALE_SHIFT, or
                                 running_var / var outside [1/STALE_RATIO, STALE_RATIO] on a
                                 channel with var >= NEAR_ZERO_FACTOR * eps
    training_mode_at_eval        model in eval mode, layer in training mode or untracked
    frozen_weights_moving_stats  gamma and beta do not require gradients, layer in training mode
    near_zero_variance           a channel with var < NEAR_ZERO_FACTOR * eps
    float16_overflow             running_mean, running_var, var or an input beyond FLOAT16_MAX
    suspicious_momentum          momentum > MOMENTUM_MAX or momentum == 0
    tiny_batch                   a batch with fewer than TINY_BATCH values per channel
    redundant_bias               its input is the output of a Linear/Conv with a bias
    dropout_before_bn            a dropout between it and the BN layers (or inputs) upstream

What feeds a layer comes from a torch.fx trace, or from the order of execution on the first
batch when the model cannot be traced (the report says which). The model is never changed:
everything runs on deep copies.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import textwrap
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd

from bnkit import population
from bnkit._validate import values_per_feature
from bnkit.folding import _Tracer

# Thresholds of the flags (see above).
STALE_SHIFT = 0.5  # stale: some |running_mean - mean| > 0.5 population standard deviations ...
STALE_RATIO = 2.0  # ... or running_var / var outside [1/2, 2] on some channel
NEAR_ZERO_FACTOR = 10.0  # near_zero_variance: population variance < 10 * eps
FLOAT16_MAX = 65504.0  # float16_overflow: a buffer, the population variance or an input beyond it
MOMENTUM_MAX = 0.5  # suspicious_momentum: momentum > 0.5 (or == 0)
TINY_BATCH = 5  # tiny_batch: a batch with fewer than 5 values per channel

_DROPOUT_FUNCTIONS = {torch.nn.functional.dropout, torch.nn.functional.dropout1d,
                      torch.nn.functional.dropout2d, torch.nn.functional.dropout3d,
                      torch.nn.functional.alpha_dropout, torch.nn.functional.feature_alpha_dropout,
                      torch.dropout}
_BIASED = (nn.Linear, _ConvNd)  # layers whose bias a BN right after them cancels

# name -> (what it means, what to do, where the book explains it)
FLAGS = {
    "stale_statistics": (
        "the running statistics are far from the population statistics of the inputs this "
        "layer gets at test time, so it normalises with the wrong mean or scale",
        "recompute them: bnkit.recompute_stats(model, batches, upstream=\"eval\")",
        "chapter 5, population statistics"),
    "training_mode_at_eval": (
        "the model is in eval mode but this layer normalises with batch statistics (training "
        "mode or track_running_stats=False), so a prediction depends on the rest of its batch",
        "call model.eval() after every model.train(), and keep running statistics",
        "chapter 10, pitfall 1"),
    "frozen_weights_moving_stats": (
        "gamma and beta do not require gradients but the layer is in training mode, so its "
        "running statistics keep moving while its weights stay frozen",
        "put the layer in eval mode after every model.train()",
        "chapter 10, pitfall 6"),
    "near_zero_variance": (
        "some channels have (almost) no variance, so the layer multiplies whatever deviation "
        "they get at test time by up to gamma / sqrt(eps)",
        "look for dead or constant inputs upstream; such channels carry no information",
        "chapter 8, folding: the scale gamma / sqrt(var + eps)"),
    "float16_overflow": (
        "a running buffer, the population variance or an input is beyond float16's largest "
        f"value {FLOAT16_MAX:g}, so in half precision it becomes inf",
        "keep BN (its buffers and its input) in float32, or rescale the layers before it",
        "chapter 10, pitfall 5"),
    "suspicious_momentum": (
        f"momentum above {MOMENTUM_MAX} is likely Keras' convention (the weight of the old "
        "average) typed into PyTorch's (the weight of the new batch); momentum 0 never updates",
        "convert it with bnkit.running.convert_momentum (Keras 0.99 = PyTorch 0.01)",
        "chapter 10, pitfall 3"),
    "tiny_batch": (
        "a batch gives this layer fewer than a handful of values per channel, so in training its "
        "statistics are noise (PyTorch refuses one value)",
        "drop or merge the last batch (DataLoader(drop_last=True))",
        "chapter 10, pitfall 2"),
    "redundant_bias": (
        "the layer before it adds a bias that this layer's mean subtraction cancels",
        "build that layer with bias=False (beta plays its role)",
        "chapter 8, folding"),
    "dropout_before_bn": (
        "dropout feeds this layer, so the variance of its input differs between training "
        "(dropout on) and test (dropout off) and the running variance does not fit at test time",
        "put dropout after the last BN layer, or recompute statistics with dropout off",
        "chapter 10, the doctor"),
}


@dataclasses.dataclass
class Flag:
    """One problem of one layer: ``name`` (a key of FLAGS) and the numbers behind it."""

    name: str
    detail: str  # what was measured, e.g. "running_mean 3.1 population std away"
    explanation: str
    action: str
    chapter: str


@dataclasses.dataclass
class LayerReport:
    """What ``doctor`` found for one BN layer."""

    name: str  # as in model.named_modules()
    kind: str  # the class name, e.g. "BatchNorm1d"
    mode: str  # "train" or "eval" (the layer's own flag)
    momentum: float | None
    num_batches_tracked: int | None
    track_running_stats: bool
    affine_trainable: bool | None  # do gamma and beta require gradients (None: affine=False)
    mean_shift: float | None  # max over channels |running_mean - mean| / sqrt(var + eps)
    var_ratio_min: float | None  # running_var / var over channels with var above the floor
    var_ratio_max: float | None
    near_zero_channels: list[int]  # channels whose population variance < NEAR_ZERO_FACTOR * eps
    max_abs_input: float  # largest |input| over all batches (as at test time)
    min_values_per_channel: int  # over all batches
    flags: list[Flag]


@dataclasses.dataclass
class Report:
    """``doctor``'s findings: ``print(report)`` for people, ``report.to_dict()`` for code."""

    verdict: str
    layers: list[LayerReport]  # in execution order
    model_mode: str  # "train" or "eval"
    num_batches: int
    max_output_gap: float | None  # largest |output as is - output with population statistics|
    argmax_agreement: float | None  # fraction of rows whose argmax agrees (None: no classes)
    graph: str  # how dropout and biases were found: "torch.fx" or "execution order"
    as_is_error: str | None = None  # a batch the model as it is refuses (e.g. one, in training)

    def flagged(self, name: str) -> list[str]:
        """The names of the layers that carry flag ``name``."""
        if name not in FLAGS:
            raise ValueError(f"flag must be one of {list(FLAGS)}, got {name!r}")
        return [layer.name for layer in self.layers if any(f.name == name for f in layer.flags)]

    def to_dict(self) -> dict:
        """Plain data (dicts, lists, str, numbers, None): json.dumps takes it."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        header = ["layer", "type", "mode", "momentum", "steps", "trainable", "shift (std)",
                  "var ratio", "near-0 ch", "flags"]
        rows = [header] + [_row(layer) for layer in self.layers]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [self.verdict, ""]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows[:1]]
        lines += ["  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows[1:]]
        gap = "n/a" if self.max_output_gap is None else f"{self.max_output_gap:.3g}"
        agree = "n/a" if self.argmax_agreement is None else f"{100 * self.argmax_agreement:.1f}%"
        lines += [textwrap.fill(
            "steps: num_batches_tracked; trainable: gamma and beta require gradients; shift: "
            "max over channels of |running_mean - mean| / population std; var ratio: "
            "running_var / population var, min..max over channels; near-0 ch: channels with "
            f"population var < {NEAR_ZERO_FACTOR:g} eps.", 100)]
        lines += ["", textwrap.fill(
            f"{self.num_batches} batches; model in {self.model_mode} mode; with population "
            f"statistics the outputs change by up to {gap}, argmax agrees on {agree}; what feeds "
            f"each layer (dropout, bias) found by {self.graph}.", 100), ""]
        details = [f"  {layer.name}  {f.name}: {f.detail}"
                   for layer in self.layers for f in layer.flags]
        if details:
            lines += ["Flags:"] + details + [""]
        for key, (explanation, action, chapter) in FLAGS.items():
            names = self.flagged(key)
            if names:
                text = (f"{key} ({', '.join(names)}): {explanation[0].upper()}{explanation[1:]}. "
                        f"Do: {action}. See {chapter}.")
                lines.append(textwrap.fill(text, 100, subsequent_indent="    "))
        return "\n".join(lines).rstrip()

    def plot(self, ax=None):
        """Per layer: the mean shift and the running/population variance ratio (two panels)."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(1, 2, figsize=(10, 3.5))
        names = [layer.name for layer in self.layers]
        x = range(len(names))
        ax[0].bar(x, [layer.mean_shift or 0.0 for layer in self.layers], color="C0")
        ax[0].axhline(STALE_SHIFT, color="C3", ls="--", label=f"threshold {STALE_SHIFT}")
        ax[0].set_ylabel("max |running_mean - mean| / std")
        for i, layer in enumerate(self.layers):
            if layer.var_ratio_min is not None:
                ax[1].plot([i, i], [layer.var_ratio_min, layer.var_ratio_max], "o-", color="C0")
        for bound in (1 / STALE_RATIO, STALE_RATIO):
            ax[1].axhline(bound, color="C3", ls="--")
        ax[1].set_yscale("log")
        ax[1].set_ylabel("running_var / population var (min, max)")
        for a in ax:
            a.set_xticks(list(x), names, rotation=45 if len(names) > 6 else 0)
            a.set_xlabel("BN layer (execution order)")
        ax[0].legend()
        return ax


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _row(layer: LayerReport) -> list[str]:
    ratio = "-"
    if layer.var_ratio_min is not None:
        ratio = f"{layer.var_ratio_min:.2f}..{layer.var_ratio_max:.2f}"
    return [layer.name, layer.kind, layer.mode, _fmt(layer.momentum, "g"),
            _fmt(layer.num_batches_tracked, "d"), _fmt(layer.affine_trainable, ""),
            _fmt(layer.mean_shift, ".2f"), ratio, str(len(layer.near_zero_channels)),
            ", ".join(f.name for f in layer.flags) or "-"]


def doctor(
    model: nn.Module,
    batches: Iterable,
    *,
    forward: Callable | None = None,
    max_batches: int | None = None,
) -> Report:
    """Audit every BN layer of ``model`` against the population statistics over ``batches``.

    batches: an iterable of input tensors, or of (x, y) pairs (a DataLoader), as for
        ``recompute_stats``; forward: ``forward(model, batch) -> output`` for any other batch
        (default ``model(batch[0] if tuple/list else batch)`` on the model's device);
        max_batches: use only the first ``max_batches`` batches.
    Returns a Report: one LayerReport per BN layer (torch.nn's and bnkit's, 1d/2d/3d,
    SyncBatchNorm) in execution order with its flags (see FLAGS and the thresholds at the top of
    this module), the output gap between the model as it is and the model in eval mode with
    population statistics, and a one-line verdict. ``model`` is not changed (copies only).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if forward is not None and not callable(forward):
        raise TypeError(
            f"forward must be a callable forward(model, batch) or None, got {forward!r}")
    if not any(isinstance(m, _BatchNorm) for m in model.modules()):
        raise ValueError(f"the model has no BatchNorm layer to audit ({type(model).__name__})")
    forward = forward or population._default_forward(population.model_device(model))
    batches = _first_batches(batches, max_batches)
    if next(iter(batches), _NO_BATCH) is _NO_BATCH:
        raise ValueError("doctor needs at least one batch, got an empty iterable")

    with torch.random.fork_rng(devices=[]):  # dropout left on in the model: the same draws
        torch.manual_seed(0)
        fixed = copy.deepcopy(model)  # with population statistics, in eval mode
        if population.bn_layers(fixed):
            try:
                population.recompute_stats(fixed, batches, estimator="exact", upstream="eval",
                                           forward=forward)
            except ValueError as e:
                raise ValueError(f"{e}{_half_hint(model)}") from e
        watch, gap = _Watch(fixed.eval()), _Gap()
        as_is = copy.deepcopy(model)
        with torch.no_grad(), watch:
            for num_batches, batch in enumerate(batches, start=1):
                watch.first = num_batches == 1
                outputs_fixed = _tensors(forward(fixed, batch))
                watch.first = False
                gap.add(num_batches - 1, lambda: _tensors(forward(as_is, batch)), outputs_fixed)
    watch.check()
    graph, feeds = _graph_facts(fixed, watch.order)
    if graph is None:
        graph, feeds = "execution order", watch.feeds

    originals, fixed_modules = dict(model.named_modules()), dict(fixed.named_modules())
    layers = [_layer_report(name, originals[name], fixed_modules[name], model.training,
                            watch.facts[name], feeds[name]) for name in watch.order]
    agreement = gap.agree / gap.rows if gap.rows else None
    return Report(_verdict(layers, model.training, gap.max, agreement, gap.error), layers,
                  "train" if model.training else "eval", num_batches, gap.max, agreement,
                  graph, gap.error)


_NO_BATCH = object()  # what next(iter(batches), _NO_BATCH) gives for no batches


class _FirstBatches:
    """The first ``n`` batches of a re-iterable (a list, a DataLoader), on every pass."""

    def __init__(self, batches: Iterable, n: int) -> None:
        self.batches, self.n = batches, n

    def __iter__(self):
        return itertools.islice(iter(self.batches), self.n)


def _first_batches(batches: Iterable, max_batches: int | None) -> Iterable:
    """``batches`` (the first ``max_batches`` of them), iterable more than once."""
    if max_batches is not None and not (isinstance(max_batches, int)
                                        and not isinstance(max_batches, bool) and max_batches >= 1):
        raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")
    if iter(batches) is batches:  # a one-shot iterator: keep the batches for more than one pass
        return list(itertools.islice(batches, max_batches))
    return batches if max_batches is None else _FirstBatches(batches, max_batches)


class _Watch:
    """Forward hooks on a model (a context manager): per BN layer the largest |input| and the
    fewest values per channel over all batches; on the first batch (``first``), the execution
    order of the BN layers and what feeds each (a dropout since the last BN layer; the output
    of a Linear/Conv with a bias as its very input)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.first = model, False
        self.names = {m: name for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
        self.facts = {name: {"max_abs": 0.0, "min_count": None} for name in self.names.values()}
        self.order: list[str] = []
        self.feeds: dict = {}
        self.calls: list = []  # (module, output) of every leaf module, first batch only

    def _pre_hook(self, bn, args):
        z, name = args[0], self.names[bn]
        facts = self.facts[name]
        largest = float(z.detach().abs().max()) if z.numel() else 0.0
        facts["max_abs"] = max(facts["max_abs"], largest)
        count = values_per_feature(tuple(z.shape))
        facts["min_count"] = count if facts["min_count"] is None else min(facts["min_count"], count)
        if self.first and name not in self.feeds:
            self.order.append(name)
            since = [m for m, _ in self.calls[_last_bn(self.calls) + 1:]]
            before = self.calls[-1] if self.calls else (None, None)
            self.feeds[name] = {"dropout": any(isinstance(m, _DropoutNd) for m in since),
                                "bias": before[1] is z and _has_bias(before[0], bn)}

    def _leaf_hook(self, m, args, out):
        if self.first:
            self.calls.append((m, out))

    def __enter__(self):
        leaves = [m for m in self.model.modules() if not list(m.children())]
        self.handles = [bn.register_forward_pre_hook(self._pre_hook) for bn in self.names]
        self.handles += [m.register_forward_hook(self._leaf_hook) for m in leaves]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.calls.clear()  # no tensors kept

    def check(self) -> None:
        """Every BN layer was called, on finite inputs."""
        never = [name for name in self.facts if name not in self.feeds]
        if never:
            raise ValueError(f"BN layer(s) {never} were never called by the model's forward pass")
        for name, facts in self.facts.items():
            if not math.isfinite(facts["max_abs"]):
                raise ValueError(f"the input of BN layer {name!r} has NaN or infinite values")


class _Gap:
    """The largest |difference| and the argmax agreement between the outputs of the model as it
    is and with population statistics, batch by batch; the first batch the model refuses."""

    def __init__(self) -> None:
        self.max, self.agree, self.rows, self.error = 0.0, 0, 0, None

    def add(self, i: int, run_as_is: Callable, fixed: list) -> None:
        try:
            outputs = run_as_is()
        except ValueError as e:  # e.g. a batch of one for a layer in training mode
            self.error = self.error or f"the model as it is refuses batch {i}: {e}"
            return
        for a, b in zip(outputs, fixed):
            if a.shape == b.shape and a.numel():
                self.max = max(self.max, float((a.double() - b.double()).abs().max()))
        a, b = (outputs[0], fixed[0]) if outputs and fixed else (None, None)
        if a is not None and a.ndim >= 2 and a.shape[1] > 1 and a.shape == b.shape:
            self.agree += int((a.argmax(1) == b.argmax(1)).sum())
            self.rows += a.argmax(1).numel()


def _half_hint(model: nn.Module) -> str:
    """A hint for non-finite activations in a half-precision model (float16_overflow)."""
    dtypes = {t.dtype for t in model.parameters()} & {torch.float16, torch.bfloat16}
    if not dtypes:
        return ""
    return (f"; the model runs in {sorted(map(str, dtypes))[0]}, where values beyond "
            f"{FLOAT16_MAX:g} (float16) overflow: run doctor on a float32 copy (model.float()) to "
            "see which layer gets inputs that large (float16_overflow)")


def _last_bn(calls: list) -> int:
    """The index in ``calls`` of the last BN layer's call (-1 if none)."""
    return max((i for i, (m, _) in enumerate(calls) if isinstance(m, _BatchNorm)), default=-1)


def _has_bias(layer: nn.Module | None, bn: _BatchNorm) -> bool:
    return (isinstance(layer, _BIASED) and layer.bias is not None
            and layer.weight.shape[0] == bn.num_features)


def _tensors(out) -> list[torch.Tensor]:
    """Every tensor in a model's output (a tensor, or tuples, lists, dicts of them)."""
    if isinstance(out, torch.Tensor):
        return [out.detach()]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _graph_facts(model: nn.Module, order: list[str]) -> tuple[str | None, dict]:
    """From a torch.fx trace: does dropout feed each BN layer (between it and the BN layers
    upstream), and is its input the output of a Linear/Conv with a bias? (None if untraceable.)"""
    try:
        graph = _Tracer().trace(model)
    except Exception:  # data-dependent control flow, ...: fall back to the execution order
        return None, {}
    modules = dict(model.named_modules())
    feeds = {name: {"dropout": False, "bias": False} for name in order}
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, _BatchNorm) or node.target not in feeds:
            continue
        prev = node.args[0]
        if isinstance(prev, torch.fx.Node) and prev.op == "call_module" and len(prev.users) == 1:
            feeds[node.target]["bias"] |= _has_bias(modules.get(prev.target), bn)
        feeds[node.target]["dropout"] |= _dropout_upstream(node, modules)
    return "torch.fx", feeds


def _dropout_upstream(node: torch.fx.Node, modules: dict) -> bool:
    """Is there a dropout between ``node`` and the BN layers (or inputs) upstream of it?"""
    todo, visited = list(node.all_input_nodes), set()
    while todo:
        n = todo.pop()
        if n in visited:
            continue
        visited.add(n)
        m = modules.get(n.target) if n.op == "call_module" else None
        functional = n.op == "call_function" and n.target in _DROPOUT_FUNCTIONS
        if isinstance(m, _DropoutNd) or functional:
            return True
        if not isinstance(m, _BatchNorm):
            todo.extend(n.all_input_nodes)
    return False


def _layer_report(name: str, bn: _BatchNorm, fixed: _BatchNorm, model_training: bool,
                  seen: dict, feeds: dict) -> LayerReport:
    """The measurements and flags of one BN layer ``bn`` (``fixed``: its recalibrated copy)."""
    params = [p for p in (bn.weight, bn.bias) if p is not None]
    trainable = any(p.requires_grad for p in params) if params else None
    tracked = bn.track_running_stats and bn.running_mean is not None
    shift = ratio_min = ratio_max = None
    near_zero: list[int] = []
    flags = []

    def flag(key, detail):
        flags.append(Flag(key, detail, *FLAGS[key]))

    if tracked:
        rm, rv = bn.running_mean.detach().double().cpu(), bn.running_var.detach().double().cpu()
        mean, var = fixed.running_mean.double().cpu(), fixed.running_var.double().cpu()
        shift = float(((rm - mean).abs() / (var + bn.eps).sqrt()).max())
        floor = NEAR_ZERO_FACTOR * bn.eps
        near_zero = [int(c) for c in torch.nonzero(var < floor).flatten()]
        live = var >= floor
        if live.any():
            ratio = rv[live] / var[live]
            ratio_min, ratio_max = float(ratio.min()), float(ratio.max())
        if shift > STALE_SHIFT or (ratio_min is not None and not
                                   (1 / STALE_RATIO <= ratio_min and ratio_max <= STALE_RATIO)):
            flag("stale_statistics", f"running_mean up to {shift:.2f} population std away, "
                 f"running_var / var in {_fmt(ratio_min, '.2f')}..{_fmt(ratio_max, '.2f')} "
                 f"(thresholds {STALE_SHIFT} std, ratio 1/{STALE_RATIO:g}..{STALE_RATIO:g})")
    if not model_training and (bn.training or not tracked):
        why = "in training mode" if tracked else "track_running_stats=False"
        flag("training_mode_at_eval", f"model in eval mode, this layer {why}")
    if trainable is False and bn.training and tracked:
        flag("frozen_weights_moving_stats", "requires_grad=False on gamma and beta, training mode")
    if near_zero:
        flag("near_zero_variance", f"{len(near_zero)} channel(s) with population variance below "
             f"{NEAR_ZERO_FACTOR:g} * eps = {NEAR_ZERO_FACTOR * bn.eps:.2g}")
    big = {"max |input|": seen["max_abs"]}
    if tracked:
        big.update({"max running_var": float(bn.running_var.max()),
                    "max |running_mean|": float(bn.running_mean.abs().max()),
                    "max population var": float(fixed.running_var.max())})
    over = [f"{k} {v:.3g}" for k, v in big.items() if not (abs(v) <= FLOAT16_MAX)]
    if over:
        flag("float16_overflow", ", ".join(over))
    if bn.momentum is not None and (bn.momentum > MOMENTUM_MAX or bn.momentum == 0):
        flag("suspicious_momentum", f"momentum {bn.momentum:g} (PyTorch's default 0.1)")
    if seen["min_count"] < TINY_BATCH:
        flag("tiny_batch", f"a batch with {seen['min_count']} value(s) per channel "
             f"(threshold {TINY_BATCH})")
    if feeds["bias"]:
        flag("redundant_bias", "the Linear/Conv right before it has a bias")
    if feeds["dropout"]:
        flag("dropout_before_bn", "a dropout between it and the BN layers (or input) upstream")
    nbt = bn.num_batches_tracked
    return LayerReport(
        name=name, kind=type(bn).__name__, mode="train" if bn.training else "eval",
        momentum=bn.momentum, num_batches_tracked=None if nbt is None else int(nbt),
        track_running_stats=bool(bn.track_running_stats), affine_trainable=trainable,
        mean_shift=shift, var_ratio_min=ratio_min, var_ratio_max=ratio_max,
        near_zero_channels=near_zero, max_abs_input=seen["max_abs"],
        min_values_per_channel=seen["min_count"], flags=flags)


def _verdict(layers: list[LayerReport], model_training: bool, max_gap: float,
             agree: float | None, error: str | None) -> str:
    """One line: healthy, or how many layers carry which flags, and what it costs."""
    counts: dict[str, int] = {}
    for layer in layers:
        for f in layer.flags:
            counts[f.name] = counts.get(f.name, 0) + 1
    cost = f"outputs change by up to {max_gap:.3g} with population statistics"
    if agree is not None:
        cost += f" (argmax agrees on {100 * agree:.1f}%)"
    mode = ""
    if model_training:
        mode = "; the model is in training mode (call model.eval() to evaluate)"
    mode += f"; {error}" if error else ""
    if not counts and not model_training:
        return f"healthy: no flag on {len(layers)} BN layer(s); {cost}{mode}"
    flagged = sum(1 for layer in layers if layer.flags)
    names = ", ".join(f"{k} ({counts[k]})" for k in FLAGS if k in counts)
    head = f"{flagged} of {len(layers)} BN layer(s) flagged: {names}" if counts else (
        f"no flag on {len(layers)} BN layer(s)")
    return f"{head}; {cost}{mode}"
