"""The Python API in a user's own loop: their model, their DataLoader, their loss (not cross-entropy),
an image size that is not CIFAR's; the result written as a run folder and exported by `python -m export`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import compress
from compress.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SIZE, CLASSES = 48, 4
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class UserNet(nn.Module):
    """Not in the zoo, not registered: what a user brings."""

    def __init__(self, num_classes: int = CLASSES):
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
        self.body = nn.Sequential(block(3, 16, 2), block(16, 32, 2), block(32, 32, 1), block(32, 48, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(48, num_classes)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.body(x)), 1))


def images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, 48, 48, 3): class k is a bright square in quadrant k on noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = rng.integers(0, 90, (n, SIZE, SIZE, 3), dtype=np.uint8)
    h = SIZE // 2
    for i, k in enumerate(y):
        r, c = divmod(int(k), 2)
        x[i, r * h + 4:r * h + h - 4, c * h + 4:c * h + h - 4] = 230
    return x, y.astype(np.int64)


def loader(x: np.ndarray, y: np.ndarray, batch: int = 32) -> DataLoader:
    t = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(STD).view(1, 3, 1, 1)
    return DataLoader(TensorDataset(t, torch.from_numpy(y)), batch_size=batch, shuffle=True,
                      generator=torch.Generator().manual_seed(0), drop_last=True)


def one_hot_bce(logits, y):   # not cross-entropy
    return nn.functional.binary_cross_entropy_with_logits(logits, nn.functional.one_hot(y, CLASSES).float())


def test_seed_pruner_in_a_users_loop_then_export(tmp_path: Path):
    torch.manual_seed(0)
    x_train, y_train = images(256, 0)
    x_test, y_test = images(128, 1)
    data = loader(x_train, y_train)
    model = UserNet()
    epochs = 6
    pruner = compress.Pruner(model, torch.zeros(1, 3, SIZE, SIZE), target="flops=0.5", method="seed",
                             epochs=epochs, steps_per_epoch=len(data), warmup=0.1, ramp=0.2, end=0.4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    net, cut_at = model, None
    for epoch in range(epochs):
        net.train()
        for xb, yb in data:
            loss = one_hot_bce(net(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            pruner.step()
            optimizer.step()
        if cut_at is None and pruner.ready:   # train the compact network for the rest
            net, cut_at = pruner.extract(), epoch + 1
            optimizer = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)
    assert cut_at == pruner.extract_epoch < epochs
    slim = pruner.extract()
    assert slim is net   # the same module, trained after the cut
    dense_flops = compress.count(model, (1, 3, SIZE, SIZE)).flops
    assert 0.5 <= 1 - compress.count(slim, (1, 3, SIZE, SIZE)).flops / dense_flops <= 0.51
    assert compress.accuracy(slim, x_test, y_test, MEAN, STD) > 0.5   # it learned (chance: 0.25)

    run = tmp_path / "runs" / "user"
    summary = compress.save_run(run, slim, pruner=pruner, calib=(x_train, y_train), test=(x_test, y_test),
                                classes=["tl", "tr", "bl", "br"], mean=MEAN, std=STD, epochs=epochs)
    assert summary["method"] == "seed" and summary["input"]["shape"] == [1, 3, SIZE, SIZE]
    assert summary["pruning"]["seed"]["config"]["ramp_steps"] == round(0.2 * epochs * len(data))
    assert {p.name for p in run.iterdir()} >= {"model.pt2", "report.json", "calib.npz", "test.npz", "arch.json"}
    with pytest.raises(UserError, match="overwrite"):
        compress.save_run(run, slim, pruner=pruner, calib=(x_train, y_train), test=(x_test, y_test),
                          classes=["tl", "tr", "bl", "br"], mean=MEAN, std=STD)

    dist = tmp_path / "dist" / "user"
    proc = subprocess.run([sys.executable, "-m", "export", str(run), "--out", str(dist), "--formats", "onnx,tflite-int8"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((dist / "manifest.json").read_text())
    assert set(manifest["artifacts"]) == {"onnx", "tflite-int8"}
    assert manifest["artifacts"]["onnx"]["top1"] == pytest.approx(summary["slim"]["top1"], abs=1 / 128)
    assert manifest["preprocess"]["height"] == SIZE


def test_one_shot_pruners_and_their_errors():
    torch.manual_seed(0)
    model = UserNet()
    example = torch.zeros(1, 3, SIZE, SIZE)
    slim = compress.Pruner(model, example, "flops=0.6", method="l1").extract()
    assert 0.6 <= 1 - compress.count(slim, (1, 3, SIZE, SIZE)).flops / compress.count(model, (1, 3, SIZE, SIZE)).flops
    # widths instead of a target: exactly those channel counts
    first = compress.Pruner(model, example, None, method="random", widths={"body.0.0": 5}).extract()
    assert first.body[0][0].out_channels == 5
    # Taylor scores what step() recorded after each backward
    pruner = compress.Pruner(model, example, "params=0.5", method="taylor")
    with pytest.raises(UserError, match="no backward"):
        pruner.extract()
    xb, yb = next(iter(loader(*images(64, 2))))
    one_hot_bce(model(xb), yb).backward()
    pruner.step()
    assert pruner.extract() is pruner.extract()
    with pytest.raises(UserError, match="epochs"):
        compress.Pruner(model, example, "flops=0.5", method="seed")
    with pytest.raises(UserError, match="unknown pruning method"):
        compress.Pruner(model, example, "flops=0.5", method="magic")
    with pytest.raises(UserError, match="flops=R"):
        compress.Pruner(model, example, "speed=3", method="l1")
    with pytest.raises(UserError, match="priced with a latency table"):
        compress.Pruner(model, example, "latency=3", method="l1")
    with pytest.raises(UserError, match="unreachable"):
        compress.Pruner(model, example, "flops=0.995", method="l1")
    with pytest.raises(UserError, match="no prunable group"):
        compress.Pruner(model, example, None, method="l1", widths={"nope": 3})
