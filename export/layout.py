"""Make an NCHW graph convert to TFLite without TRANSPOSE operators.

litert folds the NHWC->NCHW input transpose into the convolutions, but a `flatten` of a feature
map with more than one pixel has to be done in NCHW order, so the converter puts a TRANSPOSE in
front of it. The fix is a channel-last rewrite: flatten the map in NHWC order instead (a permute
the converter folds away) and permute the columns of the Linear layer that reads it to match.
"""
from __future__ import annotations

import torch

aten = torch.ops.aten
FLATTENS = (aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _flatten_of_feature_map(node) -> bool:
    """A (N, C, H, W) -> (N, C*H*W) flatten/view/reshape with H*W > 1."""
    if node.op != "call_function" or node.target not in FLATTENS:
        return False
    src, out = node.args[0], node.meta.get("val")
    val = getattr(src, "meta", {}).get("val")
    if val is None or out is None or val.dim() != 4 or out.dim() != 2:
        return False
    c, h, w = (int(d) if not isinstance(d, torch.SymInt) else None for d in val.shape[1:])
    return None not in (c, h, w) and h * w > 1 and int(out.shape[1]) == c * h * w


# Per-element ops commute with a permutation of the features, so they may sit between the flatten
# and the Linear (dropout is an identity in an eval-mode program).
PER_ELEMENT = {aten.dropout.default, aten.relu.default, aten.hardtanh.default, aten.clone.default,
               aten.alias.default, aten.contiguous.default, aten.gelu.default, aten.silu.default,
               aten.sigmoid.default, aten.leaky_relu.default, aten.hardswish.default}


def _linear_consumers(node) -> list:
    """The Linear nodes fed by `node` through per-element ops, or [] if anything else reads it."""
    linears = []
    for user in node.users:
        if user.op != "call_function":
            return []
        if user.target == aten.linear.default and user.args[0] is node and user.args[1].op == "get_attr":
            linears.append(user)
        elif user.target in PER_ELEMENT and user.args[0] is node:
            further = _linear_consumers(user)
            if not further:
                return []
            linears += further
        else:
            return []
    return linears


def _owner(gm: torch.nn.Module, target: str):
    *path, leaf = target.split(".")
    module = gm
    for p in path:
        module = getattr(module, p)
    return module, leaf


def flatten_channels_last(gm: torch.fx.GraphModule) -> int:
    """Rewrite every flatten->Linear of a multi-pixel feature map in place; returns how many."""
    rewrites = 0
    for node in list(gm.graph.nodes):
        if not _flatten_of_feature_map(node):
            continue
        users = _linear_consumers(node)
        if not users:
            continue
        _, c, h, w = node.args[0].meta["val"].shape
        with gm.graph.inserting_before(node):
            nhwc = gm.graph.call_function(aten.permute.default, (node.args[0], [0, 2, 3, 1]))
        nhwc.meta["val"] = node.args[0].meta["val"].permute(0, 2, 3, 1)
        if node.target == aten.flatten.using_ints:
            node.args = (nhwc, *node.args[1:])
        else:  # a view of a permuted tensor is not a view any more
            node.target, node.args = aten.reshape.default, (nhwc, *node.args[1:])
        for linear in users:
            module, leaf = _owner(gm, linear.args[1].target)
            weight = getattr(module, leaf)
            permuted = weight.detach().reshape(-1, int(c), int(h), int(w)).permute(0, 2, 3, 1).reshape(weight.shape)
            new = torch.nn.Parameter(permuted.contiguous(), requires_grad=False) \
                if isinstance(weight, torch.nn.Parameter) else permuted.contiguous()
            setattr(module, leaf, new)
        rewrites += 1
    if rewrites:
        gm.graph.lint()
        gm.recompile()
    return rewrites
