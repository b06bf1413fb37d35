"""Cut the masked-off channels out of the weights, prove the result, describe / rebuild it.

    slim = extract(model, groups, masks, check_input=x)   # a new, ordinary, dense and smaller nn.Module
    slim.extraction_check                                 # what the check measured (report.json)
    arch = arch_of(slim, "vgg16", 10, 1.0)                # JSON-able: every Conv2d/BN/Linear's shape
    again = rebuild(arch)                                 # same shapes, fresh weights: load_state_dict next

`extract` deep-copies the model and removes, for every group, the channels its mask switches
off from every member (output channels of its convs/BNs, input channels of the layers reading
them) with Torch-Pruning's layer pruners. Its eval-mode outputs equal the masked network's:
the masker zeroes a channel at every layer that produces it, so whatever read it saw zeros,
which is what a missing input channel contributes.

That argument needs every op between a producer and a reader to keep zero at zero; graph.py
refuses those that don't, and `check_extraction` proves it for the network at hand: the masked
network (the model with hard masks) and the cut one run on a batch and must agree to CHECK_RTOL
of the output's scale, and every channel a layer stops reading must have been zero there. A
mismatch is a UserError naming the first layer where the two part. `trial_cut` runs the same
check on every other channel of every group: find_groups calls it, so a network that pruning
would change is refused before any training.
"""
from __future__ import annotations

import copy
from contextlib import ExitStack, contextmanager
from typing import Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn

from compress.errors import UserError
from compress.prune.graph import ChannelGroup

LAYER_TYPES = (nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.Linear)

# How far the cut network may drift from the masked one, relative to the largest output value
# (and, layer by layer, to the largest value of that tensor). Cutting removes terms that were
# exactly zero, so the two differ only by float32 rounding in sums of another order: at most
# 8.1e-7 of the scale over the zoo (benchmarks/extraction_diff.py), a >100x margin. One pruned
# channel that is not zero where it is read moves outputs by far more (the issue: 0.10 on ~0.08).
CHECK_RTOL = 1e-4
CHECK_ATOL = 1e-7     # for tensors that are zero everywhere
LOCATE_SAMPLES = 8    # samples kept per layer to find where a failing check parts (memory)


def _removed_indices(groups: Sequence[ChannelGroup], masks: Mapping[str, torch.Tensor]) -> dict:
    """(module name, "in"|"out") -> sorted indices to remove, gathered over all groups. Only a
    removable group (ChannelGroup.removable: a residual branch's inner channels) may lose them all."""
    cut: dict[tuple[str, str], set[int]] = {}
    for group in groups:
        mask = masks.get(group.name)
        if mask is None:
            continue
        mask = torch.as_tensor(mask).bool().cpu()
        if mask.numel() != group.size:
            raise ValueError(f"mask for group {group.name!r} has {mask.numel()} entries, expected {group.size}")
        if not mask.any() and not group.removable:
            raise ValueError(f"mask for group {group.name!r} removes every channel")
        off = set(torch.nonzero(~mask).flatten().tolist())
        if not off:
            continue
        for member in group.members:
            idxs = [i for i, c in zip(member.idxs, member.channels) if c in off]
            cut.setdefault((member.module, member.kind), set()).update(idxs)
    return {key: sorted(v) for key, v in cut.items() if v}


def extract(model: nn.Module, groups: Sequence[ChannelGroup], masks: Mapping[str, torch.Tensor],
            example_input: torch.Tensor | None = None, check_input: torch.Tensor | None = None) -> nn.Module:
    """A deep copy of `model` with every switched-off channel physically removed.

    Indices of all groups are gathered per layer first, then each layer is cut once (a layer
    reading a concatenation holds channels of several groups, and cutting one group would shift
    the indices of the next). Given `check_input` (a real batch: best) or else `example_input`,
    the result is run on it and compared with the masked network (`check_extraction`: a
    UserError if it does not run or computes something else), and the measurement is left in
    `slim.extraction_check` (absent when there was no batch to check with).
    """
    slim = _without_masks(copy.deepcopy(model))
    slim.zero_grad(set_to_none=True)  # pruners would also cut .grad; we don't need it
    whole = []   # (name, kind) losing every channel on that side: replaced below, not cut
    for (name, kind), idxs in _removed_indices(groups, masks).items():
        layer = slim.get_submodule(name)
        if len(idxs) == _width(layer, kind):
            whole.append((name, kind))
        else:
            _cut(layer, kind, idxs)
    batch = check_input if check_input is not None else example_input
    if whole:
        if batch is None:
            raise ValueError("extract: removing a whole branch needs example_input (to find the BN after a layer)")
        _remove_branches(slim, whole, batch)
    if batch is not None:  # running the check runs the cut network: it proves it works too
        slim.extraction_check = check_extraction(model, slim, groups, masks, batch)
    return slim


# ----------------------------------------------------------------------------- removed branches
#
# A group cut to width 0 (a residual branch's inner channels): torch has no 0-channel conv, so its
# producers become Removed (nothing reads them any more) and each layer that read only those
# channels computes a constant, its bias (or 0) pushed through the BN right after it: a BranchBias,
# one learned value per channel, broadcast where it is added to the shortcut.


class Removed(nn.Module):
    """A layer whose every output channel was pruned: what it computed is read by nobody."""

    def forward(self, x):
        return x.new_zeros(())


class BranchBias(nn.Module):
    """A conv/Linear whose every input channel was pruned (and the BN after it, folded in): one
    value per output channel, shaped to broadcast over the batch and the positions."""

    def __init__(self, channels: int, spatial: int = 2):
        super().__init__()
        self.value = nn.Parameter(torch.zeros(channels))
        self.spatial = spatial   # 2 for a conv's (N, C, H, W), 0 for a Linear's (N, C)

    def forward(self, x):
        return self.value.view(1, -1, *([1] * self.spatial))


class Folded(nn.Identity):
    """A BN folded into the BranchBias before it."""


REPLACEMENTS = {"BranchBias": BranchBias, "Removed": Removed, "Folded": Folded}


def _width(layer: nn.Module, kind: str) -> int:
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels if kind == "in" else layer.out_channels
    if isinstance(layer, nn.Linear):
        return layer.in_features if kind == "in" else layer.out_features
    return layer.num_features


def _bn_after(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, str]:
    """{layer: the BN called directly on its output} for the layers `names` (one traced forward)."""
    outputs, found, handles = {}, {}, []
    modules = dict(model.named_modules())

    def produced(name):
        def hook(module, args, out):
            outputs[id(out)] = name
        return hook

    def reads(name):
        def hook(module, args):
            if id(args[0]) in outputs:
                found.setdefault(outputs[id(args[0])], name)
        return hook

    for name in names:
        handles.append(modules[name].register_forward_hook(produced(name)))
    for name, m in modules.items():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            handles.append(m.register_forward_pre_hook(reads(name)))
    try:
        with _in_eval(model), _fp32():
            model(x.detach().cpu().float() if x.is_floating_point() else x)
    finally:
        for h in handles:
            h.remove()
    return found


def _remove_branches(slim: nn.Module, whole: list[tuple[str, str]], x: torch.Tensor) -> None:
    readers = [name for name, kind in whole if kind == "in"]
    after = _bn_after(slim, readers, x)
    for name in readers:
        layer = slim.get_submodule(name)
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"cannot remove every input of {type(layer).__name__} {name!r}")
        conv = isinstance(layer, nn.Conv2d)
        n_out = layer.out_channels if conv else layer.out_features
        value = layer.bias.detach().clone() if layer.bias is not None else torch.zeros(n_out)
        bias = BranchBias(n_out, spatial=2 if conv else 0)
        bn_name = after.get(name)
        if bn_name is not None:   # fold the BN: what it makes of the constant, in eval mode
            bn = slim.get_submodule(bn_name)
            with torch.no_grad(), _in_eval(bn):
                value = bn(value.view(1, -1, *([1] * bias.spatial)).to(bn.weight.dtype if bn.affine else value.dtype))
            slim.set_submodule(bn_name, Folded())
        with torch.no_grad():
            bias.value.copy_(value.flatten())
        slim.set_submodule(name, bias)
    for name, kind in whole:
        if kind == "out":
            slim.set_submodule(name, Removed())


def _without_masks(model: nn.Module) -> nn.Module:
    """Drop a ChannelMasker's hooks (a deep copy has them too): the cut network has no masks."""
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "edgeslim_mask", False):
                del module._forward_hooks[key]
    return model


# ----------------------------------------------------------------------------- the proof


def check_extraction(model: nn.Module, slim: nn.Module, groups: Sequence[ChannelGroup],
                     masks: Mapping[str, torch.Tensor], check_input: torch.Tensor, rtol: float = CHECK_RTOL,
                     context: str = "the pruned network does not compute what the masked one did") -> dict:
    """Prove `slim` computes what `model` does under `masks`; return what was measured.

    Both run on `check_input` in eval mode, in float32 on the CPU (copies unless a network is there
    already; modes and hooks are restored): the masked one is `model` with a ChannelMasker of its
    own (hard masks; a masker already on `model` is left out). Passes when every output is within
    rtol * (largest |output|) + CHECK_ATOL of the masked one, and every channel a conv/Linear stops
    reading was zero there to the same relative tolerance. Else raises UserError(context + where
    the two first part); a cut network that does not run at all raises a UserError saying so.
    """
    removed = _removed_indices(groups, masks)
    x = check_input.detach().cpu()
    x = x.float() if x.is_floating_point() else x
    with _masked_view(model, groups, masks) as masked, _eval_view(slim) as cut:
        leaks: list[float] = []   # per reader call: largest |value| in the channels it loses, over its scale
        handles = [masked.get_submodule(name).register_forward_pre_hook(_leak_probe(idxs, leaks))
                   for name, idxs in _reader_inputs(masked, removed).items()]
        try:
            with _fp32():
                want, got = _tensors(masked(x)), _tensors(_run(cut, x))
        finally:
            for h in handles:
                h.remove()
        if len(want) != len(got) or any(a.shape != b.shape for a, b in zip(want, got)):
            raise UserError(f"{context}: its output has shapes {[tuple(b.shape) for b in got]}, "
                            f"not {[tuple(a.shape) for a in want]}")
        scale = max((float(a.abs().max()) for a in want if a.numel()), default=0.0)
        diff = max((float((a - b).abs().max()) for a, b in zip(want, got) if a.numel()), default=0.0)
        tolerance = rtol * scale + CHECK_ATOL
        record = {"max_abs_diff": diff, "output_scale": scale, "relative_diff": diff / scale if scale else 0.0,
                  "tolerance": tolerance, "rtol": rtol, "samples": int(x.shape[0]) if x.dim() else 1,
                  "max_pruned_input": max(leaks, default=0.0)}
        if diff > tolerance or record["max_pruned_input"] > rtol:
            where = _locate(masked, cut, x[:LOCATE_SAMPLES], removed, rtol)
            measured = f"outputs differ by {diff:.3g} where they reach {scale:.3g}, tolerance {tolerance:.3g}"
            raise UserError(f"{context}: {where} ({measured})" if where else f"{context}: {measured}")
    return record


def trial_cut(model: nn.Module, groups: Sequence[ChannelGroup], example_input: torch.Tensor) -> dict:
    """Cut every other channel of every group and check the result (before training: find_groups).

    The batch is seeded random data of `example_input`'s shape (at least 2 samples), so zero
    inputs do not hide a changed network; an integer input (token ids) is used as given."""
    masks = {g.name: torch.arange(g.size) % 2 == 0 for g in groups}
    x = example_input
    if x.is_floating_point():
        shape = (max(2, x.shape[0]) if x.dim() else 2, *x.shape[1:])
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(x.dtype)
    slim = extract(model, groups, masks)
    return check_extraction(model, slim, groups, masks, x, context="pruning would change this network")


def mark_removable(model: nn.Module, groups: Sequence[ChannelGroup], example_input: torch.Tensor) -> list[str]:
    """Set `removable` on the groups whose every channel can go: the inner channels of a residual
    branch, so the network still depends on its input without them (two random batches give other
    outputs with the group masked off). All of them are then removed at once, with every other
    channel of the rest cut, and checked as extract does; returns the removable groups' names."""
    from compress.prune.masks import ChannelMasker

    x = torch.randn((max(2, example_input.shape[0]), *example_input.shape[1:]),
                    generator=torch.Generator().manual_seed(0))
    y = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    net = _without_masks(copy.deepcopy(model)).float().cpu()
    masker = ChannelMasker(net, groups)
    found = []
    try:
        with _in_eval(net), _fp32():
            for g in groups:
                masker.set({g.name: torch.zeros(g.size, dtype=torch.bool)})
                a, b = _tensors(net(x)), _tensors(net(y))
                scale = max(float(t.abs().max()) for t in a)
                if max(float((u - v).abs().max()) for u, v in zip(a, b)) > 1e-3 * scale:
                    found.append(g.name)
    finally:
        masker.remove()
    for g in groups:
        g.removable = g.name in found
    if found:
        masks = {g.name: (torch.zeros(g.size, dtype=torch.bool) if g.removable else torch.arange(g.size) % 2 == 0)
                 for g in groups}
        extract(model, groups, masks, check_input=x)   # a UserError if removing them changes the network
    return found


def _run(slim: nn.Module, x: torch.Tensor):
    try:
        return slim(x)
    except Exception as exc:
        raise UserError(f"the pruned network does not run ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:200]}); a layer probably hard-codes a channel "
                        f"count (e.g. x.view(-1, 512), or a per-channel buffer): use torch.flatten or "
                        f"--ignore it") from exc


def _on_cpu_in_fp32(model: nn.Module) -> bool:
    tensors = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def _has_masks(model: nn.Module) -> bool:
    return any(getattr(h, "edgeslim_mask", False) for m in model.modules() for h in m._forward_hooks.values())


@contextmanager
def _in_eval(net: nn.Module):
    modes = {m: m.training for m in net.modules()}
    net.eval()
    try:
        yield net
    finally:
        for m, mode in modes.items():
            m.training = mode


@contextmanager
def _masked_view(model: nn.Module, groups, masks):
    """`model` with hard `masks`, in eval mode, in float32 on the CPU: the model itself if it is that
    already and carries no masker (the check's masker is removed after), else a copy."""
    from compress.prune.masks import ChannelMasker  # masks imports graph only; keep surgery's imports light

    own = _on_cpu_in_fp32(model) and not _has_masks(model)
    net = model if own else _without_masks(copy.deepcopy(model)).float().cpu()
    masker = ChannelMasker(net, groups)
    try:
        masker.set(masks)
        with _in_eval(net):
            yield net
    finally:
        masker.remove()


@contextmanager
def _eval_view(slim: nn.Module):
    net = slim if _on_cpu_in_fp32(slim) else copy.deepcopy(slim).float().cpu()
    with _in_eval(net):
        yield net


def _fp32():
    """No autograd, and no autocast even if the caller is inside one: the check compares in float32."""
    stack = ExitStack()
    stack.enter_context(torch.no_grad())
    stack.enter_context(torch.autocast("cpu", enabled=False))
    return stack


def _tensors(out) -> list[torch.Tensor]:
    """The tensors in a module's output (a tensor, or tuples / lists / dicts of them)."""
    if isinstance(out, torch.Tensor):
        return [out.float()]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    return []


def _reader_inputs(model: nn.Module, removed: dict) -> dict[str, list[int]]:
    """The convs/Linears that read cut channels -> the input indices they lose."""
    readers = {}
    for (name, kind), idxs in removed.items():
        layer = model.get_submodule(name)
        if kind == "in" and isinstance(layer, (nn.Conv2d, nn.Linear)) and not _depthwise(layer):
            readers[name] = idxs
    return readers


def _depthwise(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and layer.groups > 1


def _leak_probe(idxs: list[int], leaks: list[float]):
    """A pre-hook measuring the largest |value| in the channels this layer will lose, over the input's scale."""
    def hook(module, args):
        x = args[0].float()
        scale = float(x.abs().max())
        features = -1 if isinstance(module, nn.Linear) else 1   # a Linear reads the last axis
        lost = float(x.index_select(features, torch.tensor(idxs, dtype=torch.long)).abs().max())
        leaks.append(lost / scale if scale > 0 else lost)
    return hook


def _locate(masked: nn.Module, cut: nn.Module, x: torch.Tensor, removed: dict, rtol: float) -> str | None:
    """Where the masked and the cut network first part, in execution order, as words for an error.

    Every module's input and output is compared on the channels the cut kept (which those are is
    known at each conv/BN/Linear; a module in between, e.g. an activation, that also lost channels
    is matched by width to the last such layer). A reader whose lost channels were not zero is
    traced back to the first tensor on that path where they stopped being zero.
    """
    events_a, events_b = _record(masked, x), _record(cut, x)
    if [e[:2] for e in events_a] != [e[:2] for e in events_b]:
        return "the two networks run different layers (control flow depends on the channels?)"
    modules = dict(masked.named_modules())
    readers = _reader_inputs(masked, removed)
    seen = []   # (event index, full width, cut width, lost indices, lost channels zero?)
    for i, ((name, where, a), (_, _, b)) in enumerate(zip(events_a, events_b)):
        if a is None or b is None or a.dim() < 2 or b.dim() < 2:
            continue
        lost = _lost_indices(modules[name], name, where, a, b, removed, seen)
        if lost is None:
            continue
        gone = set(lost)
        kept = a.index_select(1, torch.tensor([c for c in range(a.shape[1]) if c not in gone], dtype=torch.long))
        label = f"the {where} of '{name}' ({type(modules[name]).__name__})"
        if kept.shape != b.shape:
            return f"{label} has shape {tuple(b.shape)} in the cut network, not {tuple(kept.shape)}"
        scale = float(kept.abs().max()) if kept.numel() else 0.0
        diff = float((kept - b).abs().max()) if kept.numel() else 0.0
        if diff > rtol * scale + CHECK_ATOL:
            return (f"they first part at {label}: max |diff| {diff:.3g} where its values reach {scale:.3g} "
                    f"(does a layer pick channels by position, e.g. x[:, :4]? --ignore it)")
        leak = float(a[:, lost].abs().max()) if lost else 0.0
        zero = leak <= rtol * scale + CHECK_ATOL
        if not zero and where == "input" and name in readers:
            return (f"'{name}' reads up to {leak:.3g} from channels the cut removes (they must be zero): "
                    f"{_culprit(seen, events_a, modules, a.shape[1], lost, name)}")
        seen.append((i, a.shape[1], b.shape[1], lost, zero))
    return None


def _record(model: nn.Module, x: torch.Tensor) -> list[tuple[str, str, torch.Tensor | None]]:
    """(module name, "input"|"output", first tensor) for every module call, in execution order."""
    events: list = []

    def first(value):
        tensors = _tensors(value)
        return tensors[0] if tensors else None

    def pre(name):
        return lambda module, args: events.append((name, "input", first(args)))

    def post(name):
        return lambda module, args, out: events.append((name, "output", first(out)))

    handles = []
    for name, module in model.named_modules():
        if name:
            handles += [module.register_forward_pre_hook(pre(name)), module.register_forward_hook(post(name))]
    try:
        with _fp32():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return events


def _lost_indices(module, name, where, a, b, removed, seen) -> list[int] | None:
    """The channels of this tensor the cut removed (None: cannot tell)."""
    if a.shape[1] == b.shape[1]:
        return []
    if isinstance(module, LAYER_TYPES):
        reads_own_outputs = where == "output" or _depthwise(module) or not isinstance(module, (nn.Conv2d, nn.Linear))
        return removed.get((name, "out" if reads_own_outputs else "in"))
    for _, full, slim, lost, _ in reversed(seen):   # an activation / pool: the last layer of these widths
        if (full, slim) == (a.shape[1], b.shape[1]):
            return lost
    return None


def _culprit(seen, events, modules, width, lost, reader) -> str:
    """Walk back along tensors that lost the same channels to where they stopped being zero."""
    chain = [(i, zero) for i, full, _, same, zero in reversed(seen) if full == width and same == lost]
    later = None
    for k, (i, zero) in enumerate(chain):
        if not zero:
            later = i
            continue
        name = events[i][0]
        # --ignore works on layers (the group goes with them), not on an activation module
        layer = next((events[j][0] for j, _ in chain[k:] if isinstance(modules[events[j][0]], LAYER_TYPES)), name)
        advice = f"(add '{layer}' to --ignore)"
        if later is not None and events[later][1] == "output":
            culprit = events[later][0]
            return f"'{culprit}' ({type(modules[culprit]).__name__}) after '{layer}' makes them non-zero {advice}"
        until = events[later][0] if later is not None else reader
        return f"an operation in forward() between '{name}' and '{until}' makes them non-zero {advice}"
    return "no layer before it zeroes them"


def _cut(layer: nn.Module, kind: str, idxs: list[int]) -> None:
    if isinstance(layer, nn.Conv2d):
        depthwise = layer.groups == layer.in_channels == layer.out_channels and layer.groups > 1
        if depthwise:
            tp.prune_depthwise_conv_out_channels(layer, idxs)
        elif kind == "out":
            tp.prune_conv_out_channels(layer, idxs)
        else:
            tp.prune_conv_in_channels(layer, idxs)
    elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
        tp.prune_batchnorm_out_channels(layer, idxs)
    elif isinstance(layer, nn.Linear):
        if kind == "out":
            tp.prune_linear_out_channels(layer, idxs)
        else:
            tp.prune_linear_in_channels(layer, idxs)
    else:
        raise TypeError(f"cannot cut {type(layer).__name__}")


# ----------------------------------------------------------------------------- arch.json


def arch_of(model: nn.Module, spec: str, num_classes: int, width: float) -> dict:
    """What `rebuild` needs: how to build the dense model, and every Conv2d/BN/Linear's shape."""
    modules = {}
    for name, m in model.named_modules():
        if isinstance(m, BranchBias):
            modules[name] = {"type": "BranchBias", "in": 0, "out": m.value.numel(), "groups": 1, "spatial": m.spatial}
        elif isinstance(m, Removed):
            modules[name] = {"type": "Removed", "in": 0, "out": 0, "groups": 1}
        elif isinstance(m, Folded):
            modules[name] = {"type": "Folded", "in": 0, "out": 0, "groups": 1}
        elif isinstance(m, nn.Conv2d):
            modules[name] = {"type": "Conv2d", "in": m.in_channels, "out": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            modules[name] = {"type": type(m).__name__, "in": m.num_features, "out": m.num_features, "groups": 1}
        elif isinstance(m, nn.Linear):
            modules[name] = {"type": "Linear", "in": m.in_features, "out": m.out_features, "groups": 1}
    return {"model": spec, "num_classes": int(num_classes), "width": float(width), "modules": modules}


def rebuild(arch: dict) -> nn.Module:
    """Build the dense model `arch` names and reshape each listed layer to its recorded shape.

    Weights are uninitialised placeholders of the right shapes: load a state dict next.
    """
    from compress.models import build_model  # models imports nothing from prune; keep it lazy anyway

    try:
        spec, num_classes, width, modules = arch["model"], arch["num_classes"], arch["width"], arch["modules"]
    except (KeyError, TypeError) as exc:
        raise UserError(f"arch.json is missing {exc}; expected keys model, num_classes, width, modules") from None
    model = build_model(spec, num_classes, width)
    for name, shape in modules.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"arch.json lists layer {name!r} but model {spec!r} has no such layer") from None
        want = shape.get("type")
        if want in REPLACEMENTS:   # a removed branch's layers (see BranchBias)
            new = REPLACEMENTS[want]
            model.set_submodule(name, new(int(shape["out"]), int(shape.get("spatial", 2))) if want == "BranchBias" else new())
            continue
        if type(layer).__name__ != want and not (want == "Conv2d" and isinstance(layer, nn.Conv2d)):
            raise UserError(f"arch.json says {name!r} is a {want}, but model {spec!r} has a {type(layer).__name__}")
        _reshape(layer, int(shape["in"]), int(shape["out"]), int(shape.get("groups", 1)))
    return model


def _empty_like(param: torch.Tensor | None, shape) -> nn.Parameter | None:
    if param is None:
        return None
    return nn.Parameter(torch.empty(shape, dtype=param.dtype, device=param.device), requires_grad=param.requires_grad)


def _reshape(layer: nn.Module, n_in: int, n_out: int, groups: int) -> None:
    if isinstance(layer, nn.Conv2d):
        layer.in_channels, layer.out_channels, layer.groups = n_in, n_out, groups
        layer.weight = _empty_like(layer.weight, (n_out, n_in // groups, *layer.kernel_size))
        if layer.bias is not None:
            layer.bias = _empty_like(layer.bias, (n_out,))
    elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
        layer.num_features = n_out
        if layer.affine:
            layer.weight = _empty_like(layer.weight, (n_out,))
            layer.bias = _empty_like(layer.bias, (n_out,))
        if layer.track_running_stats:
            layer.running_mean = torch.zeros(n_out, device=layer.running_mean.device)
            layer.running_var = torch.ones(n_out, device=layer.running_var.device)
    elif isinstance(layer, nn.Linear):
        layer.in_features, layer.out_features = n_in, n_out
        layer.weight = _empty_like(layer.weight, (n_out, n_in))
        if layer.bias is not None:
            layer.bias = _empty_like(layer.bias, (n_out,))
