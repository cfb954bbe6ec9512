"""Folding Batch Norm into the layer before it, for deployment (``fold_bn``).

At test time BN is the affine map z -> s z + (beta - mu s) with s = gamma / sqrt(var + eps),
so a Linear/Conv followed by BN is one Linear/Conv with weight diag(s) W and bias
(b - mu) s + beta. ``fold_bn`` folds every pair where that is exact and leaves every other BN
in place, with the reason in its report (``FoldReport``): the result never differs from
``model.eval()`` beyond round-off.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from bnkit.population import _KERNEL_FORWARDS
from bnkit.reference import inference_affine

_FOLDABLE = (nn.Linear, _ConvNd)  # Conv1d/2d/3d and ConvTranspose1d/2d/3d
_WEIGHT_HOOKS = {  # the older hook-based weight reparametrizations, and how to remove them
    SpectralNorm: nn.utils.remove_spectral_norm,
    WeightNorm: nn.utils.remove_weight_norm,
}


class FoldedLinear(nn.Linear):
    """A Linear layer with the BatchNorm1d that followed it folded in (``fold_bn``).

    Only for input of shape (m, n): Linear acts on the last axis and BatchNorm1d on axis 1,
    which are the same axis only for 2-D input, so for (m, C, L) the pair is not one affine map.
    TorchScript-able, like nn.Linear.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(
                "this Linear layer has a BatchNorm1d folded into it, which is valid for input "
                "(m, n) only (Linear acts on the last axis, BatchNorm1d on axis 1), got shape "
                f"{list(x.shape)}"
            )
        return F.linear(x, self.weight, self.bias)


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, keeping BN modules and FoldedLinear whole as it does torch.nn's."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (_BatchNorm, FoldedLinear)) or super().is_leaf_module(m, qualname)


@dataclass
class FoldReport:
    """What ``fold_bn`` did with every BN layer, in execution order.

    rows: one dict per BN layer: "bn" (its name), "folded_into" (the layer's name, or None),
    "reason" (why it was left, or a note on how it was folded; "" for a plain fold).
    max_abs_diff: the largest |folded(probe) - model.eval()(probe)|, if a probe was given.
    ``print(report)`` shows a table under a one-line verdict; ``report.to_dict()`` plain data.
    """

    rows: list[dict] = field(default_factory=list)
    max_abs_diff: float | None = None

    @property
    def verdict(self) -> str:
        folded = sum(r["folded_into"] is not None for r in self.rows)
        n = len(self.rows)
        text = f"fold_bn: folded {folded} of {n} BN layer(s), left {n - folded}"
        if self.max_abs_diff is not None:
            text += f"; max |folded - model.eval()| on the probe: {self.max_abs_diff:.3g}"
        return text

    def to_dict(self) -> dict:
        layers = [dict(r) for r in self.rows]
        return {"verdict": self.verdict, "max_abs_diff": self.max_abs_diff, "layers": layers}

    def __str__(self) -> str:
        table = [("BN layer", "folded into", "reason / note")]
        table += [(r["bn"], r["folded_into"] or "- (left)", r["reason"]) for r in self.rows]
        w0, w1 = (max(len(row[i]) for row in table) for i in (0, 1))
        lines = [f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in table]
        return "\n".join([self.verdict, lines[0], "-" * max(len(s) for s in lines), *lines[1:]])

    __repr__ = __str__


def _out_features(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: _BatchNorm, weight: torch.Tensor) -> None:
    """W' = diag(s) W, b' = (b - mu) s + beta with s = gamma / sqrt(var + eps), in float64,
    written into new parameters of ``layer`` (a weight shared with another layer stays as it
    was there). ``weight`` is the layer's effective weight (parametrizations evaluated)."""
    ones = torch.ones_like(bn.running_mean, dtype=torch.float64)
    gamma = bn.weight.double() if bn.weight is not None else ones
    beta = bn.bias.double() if bn.bias is not None else 0 * ones
    mean, var = bn.running_mean.double(), bn.running_var.double()
    scale, shift = inference_affine(gamma, beta, mean, var, bn.eps)
    w = weight.double()
    if isinstance(layer, _ConvTransposeNd):  # weight (in, out / groups, *k): out on axis 1
        g, k = layer.groups, w.shape[2:]
        w = w.reshape(g, w.shape[0] // g, w.shape[1], *k) * scale.reshape(g, 1, -1, *(1,) * len(k))
        w = w.reshape(weight.shape)
    else:  # weight (out, ...)
        w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    b = (layer.bias.double() * scale if layer.bias is not None else 0) + shift
    layer.weight = nn.Parameter(w.to(weight.dtype), requires_grad=weight.requires_grad)
    layer.bias = nn.Parameter(b.to(weight.dtype), requires_grad=weight.requires_grad)


def _untie(layer: nn.Module) -> tuple[nn.Module, str]:
    """``layer`` with plain parameters, and a note on what that took: a parametrized layer
    becomes a new module of its original class holding the evaluated tensors (removing the
    parametrization would edit its class, which the caller's model shares)."""
    if parametrize.is_parametrized(layer):
        plain = object.__new__(parametrize.type_before_parametrizations(layer))
        plain.__dict__.update(layer.__dict__)
        plain._modules = {k: v for k, v in layer._modules.items() if k != "parametrizations"}
        plain._parameters = dict(layer._parameters)
        for name in layer.parametrizations:  # eval mode: spectral_norm does no power iteration
            plain._parameters[name] = nn.Parameter(getattr(layer, name).detach().clone())
        return plain, "its parametrized weight was evaluated into a new plain parameter"
    for hook in list(layer._forward_pre_hooks.values()):
        remove = _WEIGHT_HOOKS.get(type(hook))
        if remove is not None:  # the older hook-based spectral_norm / weight_norm (on this copy)
            remove(layer)
            return layer, f"its {type(hook).__name__} hook was evaluated into a new plain weight"
    return layer, ""


def _why_not(node, bn, modules, calls, graph, shared) -> tuple[str | None, str]:
    """(the name of the layer this BN folds into, "") or (None, the reason it stays)."""
    if not bn.track_running_stats or bn.running_mean is None:
        return None, "no running statistics (track_running_stats=False): batch statistics"
    if type(bn).forward not in _KERNEL_FORWARDS + (nn.SyncBatchNorm.forward,):
        return None, f"its class {type(bn).__name__} has its own forward"
    if calls[node.target] > 1:
        return None, f"called {calls[node.target]} times per forward pass (one BN, several inputs)"
    if bn._forward_hooks or bn._forward_pre_hooks:
        return None, "it has forward hooks, which would no longer run"
    inputs = list(node.args) + list(node.kwargs.values())
    prev = inputs[0] if len(inputs) == 1 else None
    if not (isinstance(prev, torch.fx.Node) and prev.op == "call_module"):
        node_ = isinstance(prev, torch.fx.Node)
        source = f"{prev.op} {prev.target}" if node_ else type(prev).__name__
        return None, f"its input is not the output of a layer ({source})"
    layer = modules[prev.target]
    if not isinstance(layer, _FOLDABLE):
        kind = type(layer).__name__
        return None, f"its input comes from {prev.target} ({kind}), not a Linear/Conv"
    if calls[prev.target] > 1:
        return None, f"{prev.target} is called {calls[prev.target]} times per forward pass"
    if len(prev.users) != 1:
        return None, f"the output of {prev.target} is also used elsewhere"
    meta = node.meta.get("tensor_meta")  # its shape on the probe, if one was given
    if isinstance(layer, nn.Linear) and meta is not None and len(meta.shape) != 2:
        return None, (f"its input after {prev.target} has shape {tuple(meta.shape)}: Linear acts on "
                      "the last axis, BatchNorm1d on axis 1 (one affine map for (m, n) only)")
    if _out_features(layer) != bn.num_features:
        n = _out_features(layer)
        return None, f"{prev.target} has {n} outputs, the BN {bn.num_features} features"
    if any(n.op == "get_attr" and n.target.startswith(prev.target + ".") for n in graph.nodes):
        return None, f"the parameters of {prev.target} are also read directly by the forward pass"
    other_pre_hooks = any(type(h) not in _WEIGHT_HOOKS for h in layer._forward_pre_hooks.values())
    if layer._forward_hooks or other_pre_hooks:
        return None, f"{prev.target} has forward hooks, which would see different values"
    if prev.target in shared:
        others = ", ".join(shared[prev.target])
        return prev.target, f"its weight was shared with {others}: now its own copy"
    return prev.target, ""


def _shared(model: nn.Module) -> dict[str, list[str]]:
    """Each module whose parameter (or parametrization's original) another module holds too."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, parametrize.ParametrizationList):
            continue  # counted with the module it parametrizes, below
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
        if parametrize.is_parametrized(module):
            for p in module.parametrizations.parameters():
                owners.setdefault(id(p), []).append(name)
    out: dict[str, list[str]] = {}
    for names in owners.values():
        for name in dict.fromkeys(names):
            others = [n for n in dict.fromkeys(names) if n != name]
            if others:
                out.setdefault(name, []).extend(o for o in others if o not in out.get(name, []))
    return out


def _max_abs_diff(a, b) -> float:
    """The largest |a - b| over the tensors of two outputs (tensors, tuples, lists, dicts)."""
    if isinstance(a, torch.Tensor):
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    if isinstance(a, dict):
        return max((_max_abs_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (tuple, list)):
        return max((_max_abs_diff(x, y) for x, y in zip(a, b)), default=0.0)
    return 0.0


def _run(model: nn.Module, probe):
    with torch.no_grad():
        if isinstance(probe, dict):
            return model(**probe)
        return model(*probe) if isinstance(probe, (tuple, list)) else model(probe)


def fold_bn(model: nn.Module, *, report: bool = False, probe=None):
    """A new model for inference: every BN (with running statistics) whose input is the output
    of a Linear, Conv or ConvTranspose layer, used by nothing else, is folded into that layer.

    At test time BN is the affine map z -> s z + (beta - mu s), s = gamma / sqrt(var + eps), so
    Linear/Conv followed by BN equals one Linear/Conv with weight diag(s) W and bias
    (b - mu) s + beta (for ConvTranspose, whose weight is (in, out / groups, *k), s scales
    axis 1 group by group). The folded weights are new parameters: a weight shared with another
    layer is left as it was there; a parametrized weight (parametrizations.spectral_norm,
    weight_norm) or one set by a hook (the older spectral_norm / weight_norm) is evaluated
    (eval mode) into a plain parameter. BN layers that cannot be folded exactly stay, in eval
    mode: see the report's reasons. The result equals ``model.eval()`` up to round-off;
    ``model`` itself is not changed. A Linear with a BN folded into it becomes a
    ``FoldedLinear``, which refuses input that is not (m, n); given a probe, a Linear +
    BatchNorm1d pair that sees (m, C, L) input is left unfolded instead.
    Uses torch.fx to find the pairs; a model torch.fx cannot trace comes back unfolded (a
    copy in eval mode), with a warning unless a report is asked for.

    report: also return a ``FoldReport``: (folded model, report).
    probe: an input (a tensor, a tuple of positional inputs or a dict of keyword inputs): the
        report then holds the largest difference between the folded model and model.eval() on it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_bn: model must be a torch.nn.Module, got {type(model).__name__}")
    reference = _copy(model).eval() if probe is not None else None
    model = _copy(model).eval()
    names = {m: name for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    try:
        gm = torch.fx.GraphModule(model, _Tracer().trace(model))
    except Exception as e:  # not traceable: nothing is folded
        error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]}"
        reason = f"the model is not traceable by torch.fx ({error})"
        rows = [{"bn": name, "folded_into": None, "reason": reason} for name in names.values()]
        if not report:
            warnings.warn(f"fold_bn folded nothing: {reason}", stacklevel=2)
        return _finish(model, FoldReport(rows), reference, probe, report)
    if probe is not None and not isinstance(probe, dict):  # shapes, for Linear + BatchNorm1d
        try:
            ShapeProp(gm).propagate(*(probe if isinstance(probe, (tuple, list)) else (probe,)))
        except Exception:  # the probe itself fails: reported when it runs below
            pass
    rows = _fold_graph(gm, _shared(model))
    called = {r["bn"] for r in rows}
    rows += [{"bn": n, "folded_into": None, "reason": "never called by the forward pass"}
             for n in names.values() if n not in called]
    return _finish(gm, FoldReport(rows), reference, probe, report)


def _fold_graph(gm: torch.fx.GraphModule, shared: dict) -> list[dict]:
    """Fold in place every BN node of gm that folds exactly; one report row per BN node."""
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    rows, seen = [], set()
    for node in list(gm.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, _BatchNorm) or node.target in seen:
            continue
        seen.add(node.target)
        into, reason = _why_not(node, bn, modules, calls, gm.graph, shared)
        if into is not None:
            layer, note = _untie(modules[into])
            _fold_into(layer, bn, layer.weight)
            if isinstance(layer, nn.Linear):
                layer = _as_folded_linear(layer)
            if layer is not modules[into]:
                parent, _, attr = into.rpartition(".")
                setattr(gm.get_submodule(parent), attr, layer)
            node.replace_all_uses_with(node.all_input_nodes[0])
            gm.graph.erase_node(node)
            reason = "; ".join(r for r in (reason, note) if r)
        rows.append({"bn": node.target, "folded_into": into, "reason": reason})
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.eval()
    return rows


def _copy(model: nn.Module) -> nn.Module:
    """copy.deepcopy, also of a model whose hook-based spectral_norm / weight_norm left a weight
    that autograd computed (deepcopy refuses those; the hook recomputes it at the next call)."""
    memo: dict = {}
    for m in model.modules():
        for hook in m._forward_pre_hooks.values():
            weight = getattr(m, hook.name, None) if type(hook) in _WEIGHT_HOOKS else None
            if isinstance(weight, torch.Tensor) and not weight.is_leaf:
                memo[id(weight)] = weight.detach().clone()
    return copy.deepcopy(model, memo)


def _finish(folded: nn.Module, rep: FoldReport, reference, probe, report: bool):
    if probe is not None:
        rep.max_abs_diff = _max_abs_diff(_run(folded, probe), _run(reference, probe))
    return (folded, rep) if report else folded


def _as_folded_linear(layer: nn.Linear) -> FoldedLinear:
    w = layer.weight
    folded = FoldedLinear(layer.in_features, layer.out_features, device=w.device, dtype=w.dtype)
    folded.weight, folded.bias = layer.weight, layer.bias  # the folded parameters themselves
    return folded
