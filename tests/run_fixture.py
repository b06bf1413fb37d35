"""Write a small but real run folder (docs/formats.md §1) for the export/runtime/bench tests.

A 3-conv CNN with BatchNorm whose widths (13, 21, 29) look like what pruning leaves behind
(arch="plain"; arch="residual" is a depthwise residual block, as in MobileNets/ResNets),
trained for a few epochs on real CIFAR-10 images so that fp32 vs int8 accuracy means something.
Only what `export` reads is written: model.pt2, report.json, calib.npz, test.npz.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
SCALE = 1.0 / 255.0
WIDTHS = (13, 21, 29)  # "pruned" from (32, 64, 128): odd widths catch layout bugs
DENSE_WIDTHS = (32, 64, 128)


class TinySlimNet(nn.Module):
    def __init__(self, widths=WIDTHS, num_classes: int = 10):
        super().__init__()
        layers, c_in = [], 3
        for i, c in enumerate(widths):
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class ResidualSlimNet(nn.Module):
    """A stem and one depthwise-separable residual block closed by an add and a ReLU module, then global
    pooling, as in ResNets/MobileNets: the pattern whose add stays float in a naive PT2E int8 export."""

    def __init__(self, width: int = 11, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False),
                                   nn.BatchNorm2d(width), nn.ReLU6(), nn.Conv2d(width, width, 1, bias=False),
                                   nn.BatchNorm2d(width))
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.relu(self.block(x) + x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


ARCHS = {  # name -> (slim, dense) factories
    "plain": (lambda k: TinySlimNet(WIDTHS, k), lambda k: TinySlimNet(DENSE_WIDTHS, k)),
    "residual": (lambda k: ResidualSlimNet(11, k), lambda k: ResidualSlimNet(32, k)),
}


def normalise(x_uint8_nhwc: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(x_uint8_nhwc).permute(0, 3, 1, 2).float() * SCALE
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def count_flops_params(model: nn.Module, hw: int = 32) -> tuple[int, int]:
    """MACs of Conv2d/Linear (as docs/formats.md counts them) and all parameters."""
    macs = []

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            macs.append(out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1])
        elif isinstance(m, nn.Linear):
            macs.append(m.in_features * m.out_features)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, hw, hw))
    for h in handles:
        h.remove()
    return int(sum(macs)), int(sum(p.numel() for p in model.parameters()))


def layer_widths(slim: nn.Module, dense: nn.Module) -> list[dict]:
    dense_convs = dict(dense.named_modules())
    return [{"name": n, "before": dense_convs[n].out_channels, "after": m.out_channels}
            for n, m in slim.named_modules() if isinstance(m, nn.Conv2d)]


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(normalise(x[i:i + 250])).argmax(1) for i in range(0, len(x), 250)])
    return float((pred.numpy() == y).mean())


def write_trained_run(out: Path, cifar_npz: Path, *, epochs: int = 8, seed: int = 0,
                      n_calib: int = 512, name: str = "tiny-slim", arch: str = "plain") -> Path:
    """Train ARCHS[arch] on the npz's train split and write the run folder `out`. Returns `out`."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    with np.load(cifar_npz, allow_pickle=False) as z:
        x_train, y_train = z["x_train"], z["y_train"].astype(np.int64)
        x_test, y_test = z["x_test"], z["y_test"].astype(np.int64)
        classes = [str(c) for c in z["classes"]]

    slim_factory, dense_factory = ARCHS[arch]
    model = slim_factory(len(classes))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.time()
    for _ in range(epochs):
        model.train()
        order = rng.permutation(len(x_train))
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            xb = x_train[idx]
            flip = rng.random(len(idx)) < 0.5  # cheap augmentation: horizontal flips
            xb = np.where(flip[:, None, None, None], xb[:, :, ::-1], xb)
            loss = nn.functional.cross_entropy(model(normalise(np.ascontiguousarray(xb))),
                                               torch.from_numpy(y_train[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    seconds = time.time() - start
    model.eval()

    out.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (normalise(x_test[:2]),), dynamic_shapes=({0: batch},))
    torch.export.save(program, out / "model.pt2")

    calib_idx = np.sort(rng.choice(len(x_train), size=min(n_calib, len(x_train)), replace=False))
    np.savez(out / "calib.npz", x=x_train[calib_idx], y=y_train[calib_idx])
    np.savez(out / "test.npz", x=x_test, y=y_test)

    flops, params = count_flops_params(model)
    dense_flops, dense_params = count_flops_params(dense_factory(len(classes)))
    report = {
        "schema": 1, "name": name, "method": "fixture", "model": f"tiny-{arch}", "dataset": "cifar10",
        "num_classes": len(classes), "classes": classes,
        "target": {"metric": "flops", "reduction": round(1 - flops / dense_flops, 3)},
        "dense": {"flops": dense_flops, "params": dense_params, "top1": None},
        "slim": {"flops": flops, "params": params, "top1": evaluate(model, x_test, y_test)},
        "achieved": {"flops_reduction": 1 - flops / dense_flops, "params_reduction": 1 - params / dense_params},
        "layers": layer_widths(model, dense_factory(len(classes))),
        "epochs": epochs, "seconds": seconds,
        "input": {"shape": [1, 3, 32, 32], "layout": "NCHW", "dtype": "float32",
                  "scale": SCALE, "mean": list(MEAN), "std": list(STD)},
        "config": {"epochs": epochs, "seed": seed, "optimizer": "adam", "lr": 3e-3, "batch_size": 64},
        "toolchain": {"torch": torch.__version__.split("+")[0], "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return out
