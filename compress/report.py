"""Writing the finished run folder (docs/formats.md §1), apart from train_log.csv and
checkpoint.pt which the trainer keeps up to date while it runs.

Every file is written to a temporary name and renamed, and the folder itself is only renamed
to its final name by the CLI once all of this succeeded.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

SCALE = 1.0 / 255.0


@dataclass
class LayerWidth:
    name: str
    before: int
    after: int


def layer_widths(dense_counts, slim_counts, arch: dict | None = None) -> list[LayerWidth]:
    """Output channels of every conv before and after pruning, matched by module name. A removed
    residual branch (arch.json's Removed / BranchBias, compress.prune.surgery) counts as what it
    computes: its first conv 0 channels, the conv that read it as many as its constant has."""
    after = {layer.name: layer.out_channels for layer in slim_counts.layers if layer.type.startswith("Conv")}
    for name, shape in ((arch or {}).get("modules") or {}).items():
        if shape.get("type") in ("Removed", "BranchBias"):
            after[name] = int(shape["out"])
    return [LayerWidth(layer.name, int(layer.out_channels), int(after[layer.name]))
            for layer in dense_counts.layers
            if layer.type.startswith("Conv") and layer.name in after and layer.out_channels is not None]


def _replace_into(path: Path, write) -> None:
    # The temp name keeps the suffix: some writers (torch.export.save, np.savez) insist on it.
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    write(tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def export_program(model: nn.Module, path: Path, input_hw: tuple[int, int], channels: int = 3) -> None:
    """torch.export of the eval-mode network, NCHW float32 input, dynamic batch dimension."""
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    example = torch.zeros(2, channels, *input_hw)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    _replace_into(path, lambda tmp: torch.export.save(program, str(tmp)))


def save_weights(model: nn.Module, arch: dict, folder: Path) -> None:
    from safetensors.torch import save_file
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    _replace_into(folder / "weights.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    _replace_into(folder / "arch.json", lambda tmp: tmp.write_text(json.dumps(arch, indent=1)))


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    _replace_into(path, lambda tmp: np.savez(tmp, **arrays))


def plot_channels(layers: list[LayerWidth], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(layers), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * n + 2), 4.0))
    xs = np.arange(len(layers))
    ax.bar(xs, [layer.before for layer in layers], color="#d0d7e1", label="original")
    ax.bar(xs, [layer.after for layer in layers], color="#2f6db5", label="kept")
    ax.set_xticks(xs)
    ax.set_xticklabels([layer.name for layer in layers], rotation=90, fontsize=7)
    ax.set_ylabel("output channels")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    _replace_into(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def toolchain() -> dict:
    import torch_pruning
    return {"torch": torch.__version__.split("+")[0], "torch_pruning": torch_pruning.__version__,
            "python": platform.python_version()}


def write_report(path: Path, report: dict) -> None:
    _replace_into(path, lambda tmp: tmp.write_text(json.dumps(report, indent=1)))


def write_run_folder(work: Path, slim: nn.Module, *, name: str, method: str, data, num_classes: int,
                     target: dict | None, dense_counts, dense_top1: float | None, slim_top1: float, arch: dict,
                     epochs: int, seconds: float, wall_seconds: float, config: dict, calib: int,
                     seed: int, pruning: dict | None = None) -> dict:
    """Everything but train_log.csv/checkpoint.pt, into `work`; returns report.json's content.
    The FLOPs/params are compress.flops.count's on the extracted network."""
    from compress.flops import count
    from compress.latency import latency_report
    from compress.provenance import code_version
    from compress.prune.targets import budget_text

    hw = tuple(data.x_train.shape[1:3])
    channels = int(data.x_train.shape[3])
    input_shape = (1, channels, *hw)
    slim_counts = count(slim, input_shape)
    layers = layer_widths(dense_counts, slim_counts, arch)
    achieved = {"flops_reduction": 1 - slim_counts.flops / dense_counts.flops,
                "params_reduction": 1 - slim_counts.params / dense_counts.params}
    latency = latency_report(target, arch)
    if latency is not None and latency["predicted_ms"] is not None:
        achieved["latency_ms"] = latency["predicted_ms"]
        achieved["latency_reduction"] = 1 - latency["predicted_ms"] / latency["dense_predicted_ms"]
        if not latency["within_budget"]:
            print(f"warning: the slim network is predicted at {latency['predicted_ms']:.4g} ms, over the "
                  f"budget of {latency['budget_ms']:g} ms", file=sys.stderr)
    if target is not None:
        for metric, reduction in {target["metric"]: target["reduction"], **target.get("also", {})}.items():
            if f"{metric}_reduction" not in achieved or metric == "latency":
                continue   # a latency budget is a ceiling: under it is met (checked above)
            got = achieved[f"{metric}_reduction"]
            if abs(got - reduction) > 0.01:
                print(f"warning: achieved {metric} reduction {got:.4f} is more than 1 pp from the "
                      f"target {reduction}", file=sys.stderr)

    export_program(slim, work / "model.pt2", hw, channels)
    save_weights(slim, arch, work)
    # Calibration images: a seeded draw from the training images the run used.
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(data.y_train), size=min(calib, len(data.y_train)), replace=False))
    save_arrays(work / "calib.npz", x=data.x_train[idx], y=data.y_train[idx].astype(np.int64))
    save_arrays(work / "test.npz", x=data.x_test, y=data.y_test.astype(np.int64))
    target_text = "" if not target else ", " + budget_text(target)
    plot_channels(layers, work / "channels.png", f"{name}: {method}, {config['model']}{target_text}")
    summary = {
        "schema": 1,
        "name": name,
        "method": method,
        "model": config["model"],
        "dataset": config["dataset"],
        "num_classes": num_classes,
        "classes": [str(c) for c in data.classes],
        "target": target,
        "latency": latency,
        "dense": {"flops": dense_counts.flops, "params": dense_counts.params, "top1": dense_top1},
        "slim": {"flops": slim_counts.flops, "params": slim_counts.params, "top1": slim_top1},
        "achieved": achieved,
        "layers": [asdict(layer) for layer in layers],
        "epochs": epochs,
        "seconds": round(seconds, 2),
        "wall_seconds": round(wall_seconds, 2),
        "input": {"shape": list(input_shape), "layout": "NCHW", "dtype": "float32", "scale": SCALE,
                  "mean": [float(v) for v in data.mean], "std": [float(v) for v in data.std]},
        "config": config,
        "pruning": pruning,
        "toolchain": toolchain(),
        "code": code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_report(work / "report.json", summary)
    return summary
