"""The model zoo and the way a user brings their own network.

    create_model("vgg16", num_classes=10, width=0.5)        # a zoo network
    build_model("mypkg.nets:make_net", num_classes=100)      # a user's factory, no registration
    build_model("path/to/nets.py:make_net")                  # the same, from a file

The zoo is the CIFAR (32x32) family the pruning literature reports on:

* ``vgg11/13/16/19``: 3x3 convs (with bias) each followed by BatchNorm and ReLU, five max-pools,
  then global pooling and ONE Linear 512->classes head. VGG-16 on 32x32: 313.2 M MACs, 14.73 M
  params, the numbers in Li et al. 2017 / Liu et al. 2017.
* ``resnet20/32/56``: He et al. 2016 CIFAR ResNets, basic blocks on 16/32/64 channels.
  Shortcuts where the shape changes are 1x1 conv + BN projections ("option B"). The numbers quoted
  in the pruning literature for ResNet-56 (125.49 M MACs, 0.85 M params) are for option A
  (parameter-free zero-padded identity); option B adds two 1x1 convs: +0.26 M MACs and +2,752
  params (ResNet-56: 125.75 M / 855,770; ResNet-20: 40.81 M / 272,474). We use option B because a
  zero-padding shortcut is invisible to channel-dependency tracing (Torch-Pruning) and to
  exporters, while a projection is an ordinary conv that prunes and exports like any other.
* ``mobilenetv2``: Sandler et al. 2018 with CIFAR strides (stride 1 in the stem and in the
  second stage, so 32x32 input ends at 4x4), inverted residuals with depthwise 3x3 convs.

``width`` scales every channel count: ``max(1, round(c * width))`` for VGG/ResNet, the nearest
multiple of 8 (at least 8, never more than 10 % below) for MobileNetV2 as in its paper.
All models are plain module trees (no data-dependent control flow): torch.fx traces them,
torch.export exports them, and channels_last memory format works.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from compress.errors import UserError

# ----------------------------------------------------------------------------- helpers


def scale(channels: int, width: float) -> int:
    """Channel count at width multiplier `width` (VGG/ResNet rule)."""
    return max(1, int(round(channels * width)))


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of `divisor`, not going more than 10 % down (MobileNet rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def init_weights(model: nn.Module) -> None:
    """Standard init: kaiming-normal convs (fan_out, ReLU), BN scale 1 / shift 0, small normal heads."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 relu: type[nn.Module] | None = nn.ReLU, bias: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=bias),
        nn.BatchNorm2d(cout),
    ]
    if relu is not None:
        layers.append(relu(inplace=True))
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------- VGG

VGG_CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """CIFAR VGG: conv(bias)-BN-ReLU blocks and max-pools; global average pool; one Linear head.

    After five pools a 32x32 input is 1x1, so the pool is a no-op there; it lets other input
    sizes work with the same head.
    """

    def __init__(self, config: list, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                cout = scale(item, width)
                layers += list(conv_bn_relu(cin, cout, bias=True))
                cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# ----------------------------------------------------------------------------- ResNet (CIFAR)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU. Projection shortcut when shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32: a 3x3 stem, three stages of n blocks on 16/32/64 channels."""

    def __init__(self, depth: int, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        c1, c2, c3 = (scale(c, width) for c in (16, 32, 64))
        self.conv1 = nn.Conv2d(3, c1, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(c1, c1, blocks_per_stage, stride=1)
        self.layer2 = self._stage(c1, c2, blocks_per_stage, stride=2)
        self.layer3 = self._stage(c2, c3, blocks_per_stage, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)

    @staticmethod
    def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(cin, cout, stride)]
        layers += [BasicBlock(cout, cout, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# ----------------------------------------------------------------------------- MobileNetV2 (CIFAR)


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise - 1x1 linear project; identity added when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = cin * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_relu(cin, hidden, kernel=1, relu=nn.ReLU6))
        layers.append(conv_bn_relu(hidden, hidden, kernel=3, stride=stride, groups=hidden, relu=nn.ReLU6))
        layers.append(conv_bn_relu(hidden, cout, kernel=1, relu=None))
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:  # fixed at construction, so fx/export see a static graph
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    # (expand ratio t, channels c, blocks n, stride s); ImageNet has s=2 in the stem and in row 2.
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        cin = make_divisible(32 * width)
        last = make_divisible(1280 * max(1.0, width))  # the paper never thins the last layer
        layers: list[nn.Module] = [conv_bn_relu(3, cin, kernel=3, stride=1, relu=nn.ReLU6)]
        for t, c, n, s in self.SETTINGS:
            cout = make_divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(conv_bn_relu(cin, last, kernel=1, relu=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# ----------------------------------------------------------------------------- registry

ZOO: dict[str, Callable[[int, float], nn.Module]] = {
    "vgg11": lambda k, w: VGG(VGG_CONFIGS["vgg11"], k, w),
    "vgg13": lambda k, w: VGG(VGG_CONFIGS["vgg13"], k, w),
    "vgg16": lambda k, w: VGG(VGG_CONFIGS["vgg16"], k, w),
    "vgg19": lambda k, w: VGG(VGG_CONFIGS["vgg19"], k, w),
    "resnet20": lambda k, w: CifarResNet(20, k, w),
    "resnet32": lambda k, w: CifarResNet(32, k, w),
    "resnet56": lambda k, w: CifarResNet(56, k, w),
    "mobilenetv2": lambda k, w: MobileNetV2(k, w),
}


def list_models() -> list[str]:
    return list(ZOO)


def _check_size(num_classes, width) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(width, (int, float)) or not width > 0 or width == float("inf"):
        raise UserError(f"width must be a positive number, got {width!r}")


def create_model(name: str, num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """A freshly initialised zoo network. Case, "-" and "_" in `name` are ignored ("ResNet-56").

    Unknown name -> UserError listing the zoo.
    """
    if not isinstance(name, str):
        raise UserError(f"model name must be a string, got {name!r}")
    key = name.strip().lower().replace("-", "").replace("_", "")  # "ResNet-56", "mobilenet_v2"
    if key not in ZOO:
        raise UserError(f"unknown model {name!r}; the zoo has: {', '.join(ZOO)} "
                        f"(or give your own as package.module:factory or path/to/file.py:factory)")
    _check_size(num_classes, width)
    model = ZOO[key](num_classes, float(width))
    init_weights(model)
    return model


# ----------------------------------------------------------------------------- user factories


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _import_file(path: Path):
    """Import a .py file as a module registered under a name unique to its absolute path."""
    path = path.resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"_edgeslim_user_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"cannot import {path}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses & pickling look modules up here
    # Let the file import its neighbours, as `python file.py` would.
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise UserError(f"importing {path} failed: {_one_line(exc)}") from exc
    finally:
        sys.path.remove(str(path.parent))
    return module


def _import_module(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Missing the module itself (or its package) vs. the module importing something missing.
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise UserError(f"module {module_name!r} not found on sys.path (run from the folder that "
                            f"holds it, set PYTHONPATH, or give path/to/file.py:factory)") from exc
        raise UserError(f"importing {module_name!r} failed: {_one_line(exc)}") from exc
    except Exception as exc:
        raise UserError(f"importing {module_name!r} failed: {_one_line(exc)}") from exc


def _looks_like_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def load_factory(spec: str) -> Callable[..., nn.Module]:
    """Resolve "package.module:factory" or "path/to/file.py:factory" to the callable it names."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise UserError(f"model spec {spec!r} is not a zoo name and not of the form "
                        f"package.module:factory or path/to/file.py:factory")
    if _looks_like_file(target):
        path = Path(target).expanduser()
        if not path.is_file():
            raise UserError(f"model file {target!r} not found")
        module = _import_file(path)
    else:
        module = _import_module(target)
    factory = module
    for part in attr.split("."):  # "module:Class.build" is allowed
        try:
            factory = getattr(factory, part)
        except AttributeError:
            raise UserError(f"{target!r} has no attribute {attr!r}") from None
    if not callable(factory):
        raise UserError(f"{spec!r} names a {type(factory).__name__}, not a callable factory")
    return factory


def _accepts(fn: Callable, name: str) -> str | None:
    """"named" if `fn` has a parameter `name`, "kwargs" if only a **kwargs could take it, else None."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return None
    if name in params and params[name].kind is not inspect.Parameter.POSITIONAL_ONLY:
        return "named"
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return "kwargs"
    return None


def build_model(spec: str, num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """A zoo name, or a user's factory given as package.module:factory or path/to/file.py:factory.

    The factory gets ``num_classes=`` (and ``width=``) if its signature accepts them. Every failure
    is a one-line UserError that says which step went wrong.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"model spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if ":" not in spec:
        return create_model(spec, num_classes, width)
    _check_size(num_classes, width)
    factory = load_factory(spec)
    kwargs: dict = {}
    if _accepts(factory, "num_classes"):
        kwargs["num_classes"] = num_classes
    # width= goes through a bare **kwargs only when asked for: such factories often forward
    # their kwargs to a constructor that has never heard of it.
    takes_width = _accepts(factory, "width")
    if takes_width == "named" or (takes_width == "kwargs" and width != 1.0):
        kwargs["width"] = width
    elif width != 1.0:
        raise UserError(f"--width {width} asked for, but factory {spec!r} takes no width= argument")
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise UserError(f"factory {spec!r} raised {_one_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise UserError(f"factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
