"""Folding Batch Norm into the layer before it, for deployment (``fold_bn``).

At test time BN is the affine map z -> s z + (beta - mu s) with s = gamma / sqrt(var + eps),
so a Linear/Conv followed by BN is one Linear/Conv with weight diag(s) W and bias
(b - mu) s + beta.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnkit.reference import inference_affine


_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, keeping bnkit's BN modules whole as it does torch.nn's."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, qualname)


class FoldedLinear(nn.Linear):
    """A Linear layer with the BatchNorm1d that followed it folded in (``fold_bn``).

    Only for input of shape (m, n): Linear acts on the last axis and BatchNorm1d on axis 1,
    which are the same axis only for 2-D input, so for (m, C, L) the pair is not one affine map.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2:
            raise ValueError(
                f"this Linear layer has a BatchNorm1d folded into it, which is valid for input (m, n) "
                f"only (Linear acts on the last axis, BatchNorm1d on axis 1), got shape {tuple(x.shape)}"
            )
        return F.linear(x, self.weight, self.bias)


def _as_folded_linear(layer: nn.Linear) -> FoldedLinear:
    folded = FoldedLinear(layer.in_features, layer.out_features, bias=True, device=layer.weight.device,
                          dtype=layer.weight.dtype)
    folded.weight, folded.bias = layer.weight, layer.bias  # the folded parameters themselves
    return folded


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: _BatchNorm) -> None:
    """W' = diag(s) W, b' = (b - mu) s + beta with s = gamma / sqrt(var + eps), in float64."""
    ones = torch.ones_like(bn.running_mean, dtype=torch.float64)
    gamma = bn.weight.double() if bn.weight is not None else ones
    beta = bn.bias.double() if bn.bias is not None else 0 * ones
    scale, shift = inference_affine(gamma, beta, bn.running_mean.double(), bn.running_var.double(), bn.eps)
    w = layer.weight.double() * scale.reshape((-1,) + (1,) * (layer.weight.ndim - 1))
    b = (layer.bias.double() * scale if layer.bias is not None else 0) + shift
    layer.weight.copy_(w.to(layer.weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(b.to(layer.weight.dtype))
    else:
        layer.bias.copy_(b.to(layer.bias.dtype))


def fold_bn(model: nn.Module) -> torch.fx.GraphModule:
    """A new model for inference: every BN (with running statistics) whose input is the output
    of a Linear or Conv layer, used by nothing else, is folded into that layer.

    At test time BN is the affine map z -> s z + (beta - mu s), s = gamma / sqrt(var + eps), so
    Linear/Conv followed by BN equals one Linear/Conv with weight diag(s) W and bias
    (b - mu) s + beta. BN layers that cannot be folded stay, in eval mode. The result equals
    ``model.eval()`` up to round-off; ``model`` itself is not changed. A Linear with a BN folded
    into it becomes a ``FoldedLinear``, which refuses input that is not (m, n) (for (m, C, L) the
    pair is not one affine map).
    Uses torch.fx to find the pairs, so the model must be symbolically traceable.
    """
    model = copy.deepcopy(model).eval()
    gm = torch.fx.GraphModule(model, _Tracer().trace(model))
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not (isinstance(bn, _BatchNorm) and bn.track_running_stats):
            continue
        prev = node.args[0]
        layer = modules.get(prev.target) if isinstance(prev, torch.fx.Node) and prev.op == "call_module" else None
        if not isinstance(layer, _FOLDABLE) or len(prev.users) != 1 or calls[prev.target] != 1 or calls[node.target] != 1:
            continue
        if layer.weight.shape[0] != bn.num_features:
            continue
        _fold_into(layer, bn)
        if isinstance(layer, nn.Linear):
            parent, _, attr = prev.target.rpartition(".")
            setattr(gm.get_submodule(parent), attr, _as_folded_linear(layer))
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval()
