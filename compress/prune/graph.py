"""Which channels must be cut together: the coupling graph, found by tracing the model itself.

    groups = find_groups(model, torch.randn(1, 3, 32, 32), ignore=["features.0"])

Built on Torch-Pruning's ``DependencyGraph`` (autograd tracing), so a user's own network works
without per-architecture tables. A ``ChannelGroup`` is one set of channels that share a mask:

* a conv and its BN (and the next layer's input channels);
* every conv/BN whose output meets at a residual addition, and everything reading that sum;
* a depthwise conv with the layer that feeds it (its inputs and outputs are the same channels);
* a branch of a ``torch.cat``: its channels sit at an offset in the consumer's input;
* the channels of a conv flattened into a Linear (each channel is H*W input features there).

Channel ``k`` of a group is member ``m``'s channels ``m.idxs[j]`` for every ``j`` with
``m.channels[j] == k`` (one index per channel, except a Linear after flatten: H*W indices).

The mask of a group multiplies the output of every *producer* of its channels (each BN that
carries them, or a conv/Linear that has no BN after it), so a masked channel is zero on every
branch of a residual sum and everywhere it is read, which is what cutting it removes. ``norm``
is the BN after the group's first conv: the layer the group is reported by.

Refused at the start, with the module named (a ``UserError``): operations whose effect on the
channel axis Torch-Pruning cannot express (channel padding, permutes, channel shuffles, custom
autograd functions ...), layer types we cannot cut (LayerNorm, GroupNorm, PReLU, grouped
non-depthwise convs, stray ``nn.Parameter``s), and a prunable module called twice in one forward.
Use ``ignore`` to leave the offending region whole.
"""
from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch
import torch_pruning as tp
from torch import nn

from compress.errors import UserError
from compress.flops import forward_with_hooks

OPTYPE = tp.ops.OPTYPE

# Autograd ops that act on each channel separately and keep zero at zero, so a channel masked
# before them stays zero after them (what cutting the channel means). Names as in grad_fn.name().
CHANNELWISE_OPS = {
    "Relu", "Hardtanh", "Hardswish", "Silu", "Gelu", "LeakyRelu", "Elu", "Mish", "Threshold",
    "Clamp", "ClampMin", "ClampMax",
    "Add", "Sub", "Mul", "Neg",
    "MaxPool2DWithIndices", "MaxPool2D", "AvgPool2D", "AdaptiveAvgPool2D", "AdaptiveMaxPool2D",
    "Mean", "Sum", "Amax",
    "Clone", "ToCopy", "Contiguous", "Alias", "Detach", "NativeDropout", "Dropout", "FeatureDropout",
    "Sigmoid", "Hardsigmoid",  # gates (squeeze-excitation): their output multiplies a masked tensor
    "Squeeze", "Unsqueeze",
}
SUPPORTED_LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.BatchNorm1d, nn.Linear)


class Member(NamedTuple):
    module: str           # qualified module name
    kind: str             # "out" (its output channels) or "in" (its input channels / features)
    idxs: list            # indices in that module's channel axis
    channels: list        # the group channel each index belongs to (same length as idxs)


@dataclass
class ChannelGroup:
    name: str                 # the first conv (in model order) whose output channels define the group
    size: int                 # channels in the group
    norm: str | None          # the BN after `name` (None if it has none)
    members: list = field(default_factory=list)   # list[Member], cut together
    outputs: list = field(default_factory=list)   # modules whose output the mask multiplies


def _op_name(grad_fn) -> str:
    name = grad_fn.name() if hasattr(grad_fn, "name") else type(grad_fn).__name__
    return re.sub(r"Backward\d*$", "", name)


def _nearest_module(node, seen=None) -> str:
    """The name of the closest named module upstream of an anonymous op (for error messages)."""
    seen = seen if seen is not None else set()
    for parent in node.inputs:
        if parent in seen:
            continue
        seen.add(parent)
        if isinstance(parent.module, nn.Module) and parent._name:
            return parent._name
        found = _nearest_module(parent, seen)
        if found != "the network input":
            return found
    return "the network input"


def _check_op(node) -> None:
    """Refuse an anonymous op whose channel behaviour we can't vouch for."""
    op = _op_name(node.grad_fn) if hasattr(node.grad_fn, "name") else "Unknown"
    where = _nearest_module(node)
    if op == "T" and not node.inputs:  # the transposed weight inside a Linear
        return
    if op not in CHANNELWISE_OPS:
        raise UserError(f"cannot prune channels through operation '{op}' after module '{where}': "
                        f"its effect on the channel axis is unknown (add '{where}' to --ignore)")
    grad_fn = node.grad_fn
    dims = getattr(grad_fn, "_saved_dim", None)
    if op in ("Mean", "Sum", "Amax") and dims is not None:
        dims = [dims] if isinstance(dims, int) else list(dims)
        ndim = len(getattr(grad_fn, "_saved_self_sym_sizes", ()) or ()) or 4
        if any(d % ndim == 1 for d in dims):
            raise UserError(f"cannot prune channels through '{op}' over the channel axis after module "
                            f"'{where}' (add '{where}' to --ignore)")


def _check_layer(name: str, module: nn.Module) -> None:
    if not isinstance(module, SUPPORTED_LAYERS):
        kind = "parameter" if isinstance(module, nn.Parameter) else type(module).__name__
        raise UserError(f"cannot prune channels through {kind} '{name}': only Conv2d, BatchNorm and "
                        f"Linear layers can be cut (add '{name}' to --ignore)")
    if isinstance(module, nn.Conv2d) and module.groups != 1 and not (
            module.groups == module.in_channels == module.out_channels):
        raise UserError(f"cannot prune grouped conv '{name}' (groups={module.groups}): only plain and "
                        f"depthwise convs can be cut (add '{name}' to --ignore)")


def _resolve_ignore(model: nn.Module, ignore: Sequence[str]) -> set[str]:
    """Module names to keep whole; a name may be a container (all modules under it)."""
    names = [n for n, _ in model.named_modules() if n]
    kept: set[str] = set()
    for item in ignore:
        hits = [n for n in names if n == item or n.startswith(item + ".")]
        if not hits:
            close = [n for n in names if item in n][:5]
            hint = f"; did you mean one of {close}?" if close else ""
            raise UserError(f"--ignore names a layer that does not exist: {item!r}{hint}")
        kept.update(hits)
    return kept


def _calls(model: nn.Module, example_input: torch.Tensor) -> dict[nn.Module, int]:
    """How many times each conv/BN/Linear runs in one forward pass."""
    counts: dict[nn.Module, int] = {}

    def hook(module, inputs, output):
        counts[module] = counts.get(module, 0) + 1

    forward_with_hooks(model, example_input, [m for m in model.modules() if isinstance(m, SUPPORTED_LAYERS)], hook)
    return counts


def build_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """Trace `model` (eval mode, autograd on) into a Torch-Pruning dependency graph."""
    was_training = model.training
    try:
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"tracing the model for channel dependencies failed: {type(exc).__name__}: "
                        f"{' '.join(str(exc).split())}") from exc
    finally:
        model.train(was_training)
    return graph


def find_groups(model: nn.Module, example_input: torch.Tensor, ignore: Sequence[str] = ()) -> list[ChannelGroup]:
    """All prunable channel groups of `model`, in model order. See the module docstring."""
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    ignored = _resolve_ignore(model, ignore)
    # Trace a contiguous-format copy: channels_last turns flatten into as_strided, which hides
    # what happens to the channel axis. Names are the same in the copy.
    traced = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    graph = build_graph(traced, example_input.contiguous())

    traced_names = {m: n for n, m in traced.named_modules()}
    for module, count in _calls(traced, example_input.contiguous()).items():
        if count > 1 and module in graph.module2node and traced_names[module] not in ignored:
            raise UserError(f"module '{traced_names[module]}' is called {count} times in one forward pass; "
                            f"a shared layer cannot be pruned (add it to --ignore)")

    # The layer that produces the network output never loses output channels.
    output_layers = set()
    for node in graph.module2node.values():
        if isinstance(node.module, nn.Module) and node.module in traced_names and not node.outputs:
            output_layers.add(node.module)

    groups: list[ChannelGroup] = []
    for tp_group in graph.get_all_groups(root_module_types=(nn.Conv2d, nn.Linear)):
        group = _convert(tp_group, graph, traced_names, order, ignored, output_layers)
        if group is not None:
            groups.append(group)
    groups.sort(key=lambda g: order[g.name])
    return groups


def _convert(tp_group, graph, names, order, ignored, output_layers) -> ChannelGroup | None:
    """A Torch-Pruning group -> ChannelGroup, or None if it must stay whole (ignored / reaches output)."""
    items = list(tp_group)
    targets = [item.dep.target for item in items]
    if any(t.type == OPTYPE.OUTPUT for t in targets):
        return None
    if any(isinstance(t.module, nn.Module) and names.get(t.module) in ignored for t in targets):
        return None
    size = len(items[0].idxs)

    members: dict[tuple[str, str], Member] = {}
    for item in items:
        target, handler = item.dep.target, item.dep.handler
        if target.type in (OPTYPE.ELEMENTWISE,):
            _check_op(target)
            continue
        if target.type in (OPTYPE.CONCAT, OPTYPE.SPLIT, OPTYPE.RESHAPE, OPTYPE.SLICE, OPTYPE.UNBIND,
                           OPTYPE.EXPAND):
            if target.type != OPTYPE.CONCAT and target.type != OPTYPE.RESHAPE:
                where = _nearest_module(target)
                raise UserError(f"cannot prune channels through a {target.type.name.lower()} operation "
                                f"after module '{where}' (add '{where}' to --ignore)")
            continue
        module = target.module
        name = names.get(module) if isinstance(module, nn.Module) else None
        if name is None:
            raise UserError(f"cannot prune channels through an unwrapped nn.Parameter of shape "
                            f"{tuple(module.shape)} (wrap it in a module or --ignore its neighbour)")
        _check_layer(name, module)
        if module in output_layers and graph.is_out_channel_pruning_fn(handler):
            return None
        kind = "out" if graph.is_out_channel_pruning_fn(handler) else "in"
        if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            kind = "out"
        pairs = sorted(zip(item.root_idxs, item.idxs), key=lambda p: (p[0], p[1]))
        key = (name, kind)
        if key in members:  # the same layer reached twice (e.g. a depthwise conv's in and out)
            old = members[key]
            merged = sorted(set(zip(old.channels, old.idxs)) | set(pairs))
            pairs = merged
        members[key] = Member(name, kind, [int(i) for _, i in pairs], [int(c) for c, _ in pairs])

    producers = [m for m in members.values() if m.kind == "out"]
    convs = [m.module for m in producers if not _is_bn(graph, m.module)]
    if not convs:
        return None
    first = min(convs, key=lambda n: order[n])
    bns = {m.module for m in producers if _is_bn(graph, m.module)}
    outputs = sorted(bns, key=lambda n: order[n])
    for conv in convs:
        if _following_bn(graph, names, conv) not in bns:
            outputs.append(conv)
    outputs.sort(key=lambda n: order[n])
    norm = _following_bn(graph, names, first)
    return ChannelGroup(name=first, size=size, norm=norm if norm in bns else None,
                        members=sorted(members.values(), key=lambda m: (order[m.module], m.kind)),
                        outputs=outputs)


def _module_by_name(graph, name):
    return graph.model.get_submodule(name)


def _is_bn(graph, name: str) -> bool:
    return isinstance(_module_by_name(graph, name), nn.modules.batchnorm._BatchNorm)


def _following_bn(graph, names, conv_name: str) -> str | None:
    """The BN that reads this conv's output directly and alone, if any."""
    node = graph.module2node.get(_module_by_name(graph, conv_name))
    if node is None or len(node.outputs) != 1:
        return None
    nxt = node.outputs[0].module
    if isinstance(nxt, nn.modules.batchnorm._BatchNorm):
        return names.get(nxt)
    return None

