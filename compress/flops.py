"""Count a network's FLOPs and parameters by running it once.

FLOPs here are multiply-accumulates (MACs), the unit the pruning literature calls "FLOPs"
(VGG-16 on CIFAR: 313.2 M; ResNet-56: 125.5 M). What is counted:

* Conv (1d/2d/3d, grouped and depthwise included):
  ``out_elements * (in_channels / groups) * prod(kernel_size)``, i.e. per output pixel
  ``k_h * k_w * (in / groups)`` MACs for each of the ``out`` channels.
* ConvTranspose: ``in_elements * (out_channels / groups) * prod(kernel_size)``.
* Linear: ``out_elements * in_features``.
* Nothing else: biases, BatchNorm (it folds into the conv for inference), activations,
  pooling and residual additions are free, as in the papers we compare with.

Counting uses forward hooks on a real forward pass, so it sees the shapes that actually flow
(pruned networks with odd channel counts, any input size, user models). A layer called twice is
counted twice. Operations done with functional calls (``F.conv2d``) instead of modules are not
seen. ``params`` is every parameter of the model, whether or not a counted layer owns it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LayerCount:
    name: str              # qualified module name, e.g. "layer1.0.conv1"
    type: str              # module class name, e.g. "Conv2d"
    flops: int             # MACs for the counted input shape
    params: int            # parameters the module itself owns
    out_channels: int | None = None  # channel (or feature) count of its output, None if it has no channels


@dataclass
class Counts:
    flops: int
    params: int
    layers: list[LayerCount] = field(default_factory=list)


def layer_macs(module: nn.Module, inputs: tuple, output) -> int:
    """MACs of one call of `module` (0 for module types that are free by our convention)."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        kernel = math.prod(module.kernel_size)
        return inputs[0].numel() * (module.out_channels // module.groups) * kernel
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = math.prod(module.kernel_size)
        return output.numel() * (module.in_channels // module.groups) * kernel
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def _does_macs(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))


def _out_channels(module: nn.Module, output) -> int | None:
    if isinstance(output, torch.Tensor) and output.dim() >= 2:
        return int(output.shape[-1] if isinstance(module, nn.Linear) else output.shape[1])
    return None


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def count(model: nn.Module, input_shape=(1, 3, 32, 32)) -> Counts:
    """MACs ("FLOPs") and parameters of `model` for one forward pass of a zero input of `input_shape`.

    The FLOPs are for the whole input shape given (batch 1 by default). `layers` lists, in the order
    they first ran, the leaf modules that own parameters or do MACs (so BatchNorm appears with 0 FLOPs).
    The model runs in eval mode under no_grad; every module's training flag is restored afterwards.
    """
    first = next(model.parameters(), None)
    if first is None:
        first = next(model.buffers(), torch.zeros(()))
    dtype = first.dtype if first.dtype.is_floating_point else torch.float32
    example = torch.zeros(tuple(input_shape), dtype=dtype, device=first.device)

    names = {m: n for n, m in model.named_modules()}
    found: dict[nn.Module, LayerCount] = {}  # dict keeps first-call order

    def hook(module, inputs, output):
        macs = layer_macs(module, inputs, output)
        if module not in found:
            found[module] = LayerCount(names[module], type(module).__name__, 0, _own_params(module),
                                       _out_channels(module, output))
        found[module].flops += int(macs)

    # Convs/Linears even when they have children (e.g. torch parametrizations); other leaves with parameters.
    forward_with_hooks(model, example, [m for m in model.modules()
                                        if _does_macs(m) or (_own_params(m) and not list(m.children()))], hook)

    layers = list(found.values())
    params = sum(p.numel() for p in model.parameters())
    return Counts(flops=sum(layer.flops for layer in layers), params=params, layers=layers)


def forward_with_hooks(model: nn.Module, example: torch.Tensor, modules, hook) -> None:
    """One no-grad forward pass in eval mode (no BN statistics update) with `hook` as a forward
    hook on `modules`; the hooks are removed and every module's train/eval flag restored after."""
    handles = [m.register_forward_hook(hook) for m in modules]
    modes = {m: m.training for m in model.modules()}  # per module: some may be frozen in eval
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
