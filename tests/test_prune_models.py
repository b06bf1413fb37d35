"""Small user-style networks for the pruning tests (imported by the other test_prune_* files).

They are what a user would bring with `--model tests.test_prune_models:concat_net`: no zoo,
no registration. Each exercises a coupling the zoo lacks, or an op pruning must refuse.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.models import create_model


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and shifts, so a masked channel's BN output is far from zero."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
    return model


class ConcatNet(nn.Module):
    """Two branches concatenated then a conv; a depthwise conv; flatten (not global pool) into a Linear."""

    def __init__(self, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        c = max(2, int(8 * width))
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.left = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU(),
                                   nn.Conv2d(2 * c, 2 * c, 3, 1, 1, groups=2 * c, bias=False),
                                   nn.BatchNorm2d(2 * c), nn.ReLU6())
        self.mix = nn.Conv2d(3 * c, 2 * c, 1)  # reads both branches: left at offset 0, right at c
        self.pool = nn.MaxPool2d(4)
        self.fc = nn.Linear(2 * c * 2 * 2, 16)  # 8x8 input -> 2x2 after the pool: 4 features per channel
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.left(x), self.right(x)], dim=1)
        x = self.pool(F.relu(self.mix(x)))
        return self.head(F.relu(self.fc(torch.flatten(x, 1))))


def concat_net(num_classes: int = 10, width: float = 1.0) -> nn.Module:
    return ConcatNet(num_classes, width)


class PadShortcutNet(nn.Module):
    """A ResNet 'option A' shortcut: zero-padding on the channel axis, which pruning can't follow."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = self.conv1(x)
        y = self.conv2(y) + F.pad(y, (0, 0, 0, 0, 2, 2))
        return self.fc(y.mean((2, 3)))


class ShuffleNet(nn.Module):
    """A channel shuffle (view-transpose-view) between convs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = self.conv1(x)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(self.conv2(y).mean((2, 3)))


class LayerNormNet(nn.Module):
    """A GroupNorm after a conv: a layer type whose channels we do not cut."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.conv2(self.norm(self.conv1(x))).mean((2, 3)))


class SharedConvNet(nn.Module):
    """One conv applied twice."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        return self.fc(self.shared(F.relu(self.shared(x))).mean((2, 3)))


ZOO_SMALL = ["vgg11", "vgg13", "vgg16", "vgg19", "resnet20", "resnet32", "resnet56", "mobilenetv2"]


def zoo(name: str, width: float = 0.5) -> nn.Module:
    return create_model(name, 10, width)


def test_concat_net_runs():
    out = ConcatNet()(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 10)
