"""Cut the masked-off channels out of the weights, and describe / rebuild the result.

    slim = extract(model, groups, masks)          # a new, ordinary, dense and smaller nn.Module
    arch = arch_of(slim, "vgg16", 10, 1.0)        # JSON-able: every Conv2d/BN/Linear's shape
    again = rebuild(arch)                         # same shapes, fresh weights: load_state_dict next

`extract` deep-copies the model and removes, for every group, the channels its mask switches
off from every member (output channels of its convs/BNs, input channels of the layers reading
them) with Torch-Pruning's layer pruners. Its eval-mode outputs equal the masked network's:
the masker zeroes a channel at every layer that produces it, so whatever read it saw zeros,
which is what a missing input channel contributes.
"""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn

from compress.errors import UserError
from compress.prune.graph import ChannelGroup

LAYER_TYPES = (nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.Linear)


def _removed_indices(groups: Sequence[ChannelGroup], masks: Mapping[str, torch.Tensor]) -> dict:
    """(module name, "in"|"out") -> sorted indices to remove, gathered over all groups."""
    cut: dict[tuple[str, str], set[int]] = {}
    for group in groups:
        mask = masks.get(group.name)
        if mask is None:
            continue
        mask = torch.as_tensor(mask).bool().cpu()
        if mask.numel() != group.size:
            raise ValueError(f"mask for group {group.name!r} has {mask.numel()} entries, expected {group.size}")
        if not mask.any():
            raise ValueError(f"mask for group {group.name!r} removes every channel")
        off = set(torch.nonzero(~mask).flatten().tolist())
        if not off:
            continue
        for member in group.members:
            idxs = [i for i, c in zip(member.idxs, member.channels) if c in off]
            cut.setdefault((member.module, member.kind), set()).update(idxs)
    return {key: sorted(v) for key, v in cut.items() if v}


def extract(model: nn.Module, groups: Sequence[ChannelGroup], masks: Mapping[str, torch.Tensor],
            example_input: torch.Tensor | None = None) -> nn.Module:
    """A deep copy of `model` with every switched-off channel physically removed.

    Indices of all groups are gathered per layer first, then each layer is cut once (a layer
    reading a concatenation holds channels of several groups, and cutting one group would shift
    the indices of the next). With `example_input`, the result is run once to prove it works.
    """
    slim = copy.deepcopy(model)
    slim.zero_grad(set_to_none=True)  # pruners would also cut .grad; we don't need it
    for module in slim.modules():  # a ChannelMasker's hooks were copied too: the cut network has no masks
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "edgeslim_mask", False):
                del module._forward_hooks[key]
    for (name, kind), idxs in _removed_indices(groups, masks).items():
        layer = slim.get_submodule(name)
        _cut(layer, kind, idxs)
    if example_input is not None:
        was_training = slim.training
        slim.eval()
        try:
            with torch.no_grad():
                slim(example_input)
        except Exception as exc:
            raise UserError(f"the pruned network does not run ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]}); a layer probably hard-codes a channel "
                            f"count (e.g. x.view(-1, 512)): use torch.flatten or --ignore it") from exc
        finally:
            slim.train(was_training)
    return slim


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
        if isinstance(m, nn.Conv2d):
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
