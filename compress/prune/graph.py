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
non-depthwise convs, stray ``nn.Parameter``s), a prunable module called twice in one forward, and
ops that would make a pruned channel non-zero before a conv/Linear reads it (a Sigmoid, an added
constant or buffer, a clamp whose range leaves out 0 ...: cutting the channel would then change
the network; the same op as a gate multiplying a masked tensor is fine). Then, unless
``check=False``, every other channel of every group is cut once and the cut network compared with
the masked one (``surgery.trial_cut``), which catches whatever these rules miss.
Use ``ignore`` to leave the offending region whole.
"""
from __future__ import annotations

import copy
import math
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

# Autograd ops we can prune channels through (names as in grad_fn.name(), without "Backward<n>"),
# sorted by what they do to a channel that masking set to zero. Cutting a channel equals masking
# it only if it is still zero wherever a conv/Linear reads it (see _check_zero_flow).
ZERO_PRESERVING = {  # act on each channel separately and map 0 to 0
    "Relu", "Hardswish", "Silu", "Gelu", "LeakyRelu", "Elu", "Celu", "Mish", "Tanh", "Abs", "Neg",
    "MaxPool2DWithIndices", "MaxPool2D", "AvgPool2D", "AdaptiveAvgPool2D", "AdaptiveMaxPool2D",
    "UpsampleNearest2D", "UpsampleBilinear2D", "Mean", "Sum", "Amax",
    "Clone", "ToCopy", "Contiguous", "Alias", "Detach", "NativeDropout", "Dropout", "FeatureDropout",
    "Squeeze", "Unsqueeze",
}
BOUNDED = {"Hardtanh", "Clamp", "ClampMin", "ClampMax", "Threshold"}  # 0 -> 0 iff the range holds 0
NONZERO_AT_ZERO = {  # what they make of a zero channel: fine as a gate multiplying a masked tensor, not on the way to a conv
    "Sigmoid": "0.5", "Hardsigmoid": "0.5", "Softplus": "log(2)/beta", "LogSigmoid": "-log(2)", "Exp": "1",
    "Cos": "1", "Rsub": "the constant it subtracts from",
}
BINARY = {"Add", "Sub", "Mul", "Div"}  # zero iff both operands are (add, sub) / either is (mul) / the numerator is (div)
CHANNELWISE_OPS = ZERO_PRESERVING | BOUNDED | set(NONZERO_AT_ZERO) | BINARY
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
    removable: bool = False   # may lose every channel: the inner channels of a residual branch


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


class _NonZero(NamedTuple):
    op: str      # the op that makes a pruned channel non-zero
    where: str   # the module nearest before it
    value: str   # what it makes of the zero


def _value_at_zero(grad_fn, op: str) -> float | None:
    """What a clamp-like op makes of 0 (None: autograd does not record enough to tell)."""
    if op == "Threshold":  # x <= threshold -> value, and the value is not saved; the trial cut decides
        return 0.0 if grad_fn._saved_threshold < 0 else None
    if op == "Hardtanh":
        low, high = grad_fn._saved_min_val, grad_fn._saved_max_val
    else:
        low, high = getattr(grad_fn, "_saved_min", None), getattr(grad_fn, "_saved_max", None)
    value = torch.zeros(())
    if low is not None:
        value = torch.maximum(value, torch.as_tensor(low, dtype=torch.float32))
    if high is not None:
        value = torch.minimum(value, torch.as_tensor(high, dtype=torch.float32))
    flat = value.flatten()
    return float(flat[flat.abs().argmax()])


def _zero_state(node, operands, state, outputs, names) -> _NonZero | None:
    """None if this node's copy of the group's pruned channels is zero in the masked network."""
    if node.module in names:  # a layer: zero where the mask multiplies its output
        name = names[node.module]
        return None if name in outputs else _NonZero(type(node.module).__name__, name, "its unmasked output")
    inside = [state[n] for n in operands if n is not None]  # operands carrying the group's channels
    first = next((s for s in inside if s is not None), None)
    if node.type in (OPTYPE.CONCAT, OPTYPE.RESHAPE):  # other branches of a cat hold other channels
        return first
    op = _op_name(node.grad_fn)
    if op == "T" and not node.inputs:  # a Linear's weight
        return None

    def nonzero(value: str) -> _NonZero:
        return _NonZero(op, _nearest_module(node), value)

    if op in NONZERO_AT_ZERO:
        if op == "Softplus":
            return nonzero(f"{math.log(2) / node.grad_fn._saved_beta:.3g}")
        return nonzero(NONZERO_AT_ZERO[op])
    if op in BOUNDED:
        value = _value_at_zero(node.grad_fn, op)
        return nonzero(f"{value:g}") if value not in (None, 0.0) else first
    if op in ("Add", "Sub"):
        return nonzero("the constant, buffer or outside tensor it adds") if None in operands else first
    if op == "Mul":
        return None if any(s is None for s in inside) else first
    if op == "Div":
        numerator, denominator = (operands + [None])[:2]
        if numerator is None:
            return nonzero("infinity (it divides by the channel)")
        if denominator is not None and state[denominator] is None:
            return nonzero("NaN (0 / 0)")
        return state[numerator]
    return first


def _check_zero_flow(nodes: set, graph, names, members, outputs) -> None:
    """Refuse a group whose pruned channels would not be zero where a conv/Linear reads them.

    The mask zeroes a channel at each of its producers (`outputs`); cutting it removes that zero
    from every conv/Linear reading it. An op in between that maps 0 elsewhere (a Sigmoid, an added
    constant or buffer, a clamp above 0) feeds the reader a value in the masked network that the cut
    one lacks. Such an op is harmless where its result multiplies a tensor that is still zero (a
    squeeze-excitation gate), so we follow the zeros through the graph, not the op names alone.
    """
    def operands(node):  # per autograd input: its node if it carries the group's channels, else None
        if node.module in names or node.grad_fn is None:
            return []
        by_fn = {n.grad_fn: n for n in node.inputs}
        return [by_fn[f] if by_fn.get(f) in nodes else None for f, _ in node.grad_fn.next_functions]

    readers = []
    for m in members:
        module = graph.model.get_submodule(m.module)
        depthwise = isinstance(module, nn.Conv2d) and module.groups > 1  # cut with its input: a producer
        if m.kind == "in" and isinstance(module, (nn.Conv2d, nn.Linear)) and not depthwise:
            node = graph.module2node[module]
            readers += [(m.module, n) for n in node.inputs if n in nodes and not (
                _op_name(n.grad_fn) == "T" and not n.inputs)]
    state: dict = {}
    stack = [(n, False) for _, n in readers]
    while stack:  # post-order over the group's part of the graph (iterative: deep nets, long chains)
        node, ready = stack.pop()
        if node in state:
            continue
        ops = operands(node)
        if not ready:
            stack.append((node, True))
            stack += [(n, False) for n in ops if n is not None and n not in state]
            continue
        state[node] = _zero_state(node, ops, state, outputs, names)
    for reader, node in readers:
        bad = state[node]
        if bad is not None:
            raise UserError(f"cannot prune channels through '{bad.op}' after module '{bad.where}': it maps a "
                            f"pruned (zero) channel to {bad.value}, so cutting the channel would change what "
                            f"'{reader}' computes (add '{bad.where}' to --ignore)")


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


def find_groups(model: nn.Module, example_input: torch.Tensor, ignore: Sequence[str] = (),
                check: bool = True) -> list[ChannelGroup]:
    """All prunable channel groups of `model`, in model order. See the module docstring.

    With `check`, every other channel of every group is cut once and the cut network compared
    with the masked one (surgery.trial_cut): what the op rules miss is refused here too."""
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
    if check and groups:
        from compress.prune.surgery import trial_cut  # surgery imports this module
        trial_cut(model, groups, example_input)
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
    nodes = {item.dep.target for item in items} | {item.dep.source for item in items}
    _check_zero_flow(nodes, graph, names, members.values(), set(outputs))
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

