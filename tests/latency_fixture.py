"""A tiny residual CNN for the latency-table tests (`tests.latency_fixture:tiny_resnet`, 16x16
input): every layer kind a table covers (3x3 convs, a residual add, a max-pool, a global mean, a
Linear) with few distinct shapes, so that profiling it takes seconds of conversion, not minutes.
conftest.py's `table_path` fixture profiles it once per session (MODEL, PROFILE)."""
from __future__ import annotations

import torch
from torch import nn

MODEL = "tests.latency_fixture:tiny_resnet"
PROFILE = ["--input-size", "16", "--grid", "coarse", "--formats", "tflite", "--threads", "1",
           "--rounds", "3", "--burst-ms", "3"]


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        c = max(1, round(16 * width))
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, padding=1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.head = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * c, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)
        x = self.conv3(self.pool(x))
        return self.fc(torch.flatten(self.head(x), 1))


def tiny_resnet(num_classes: int = 10, width: float = 1.0) -> nn.Module:
    return TinyResNet(num_classes, width)
