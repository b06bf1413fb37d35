"""Build every requested format into a folder, measure each through the runtime package, write the manifest."""
from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
from tqdm import tqdm

from export import measure
from export.errors import ExportError
from export.formats import FORMATS, Context
from export.run import Run
from runtime.bundle import sha256_file

SOURCE_KEYS = ("method", "model", "target", "achieved", "dense", "slim", "layers")
TOOLCHAIN = ("torch", "onnx", "onnxruntime", "onnxsim", "litert-torch", "ai-edge-litert", "numpy")


@dataclass
class Options:
    formats: list[str] = field(default_factory=lambda: list(FORMATS))
    calib: int = 512  # calibration images for the int8 formats
    strict: bool = False  # an int8 accuracy miss fails the export
    parity_images: int = 256  # test images on which fp32 logits are compared with torch
    max_abs_diff: float = 1e-4  # fp32 artifact vs torch logits; exceeding it always fails
    max_int8_drop: float = 0.01  # int8 top-1 vs fp32 top-1
    samples: int = 64


def torch_logits(program, run: Run, max_batch: int) -> np.ndarray:
    import torch

    model = program.module()
    batch = min(250, max_batch)
    out = []
    with torch.no_grad():
        for i in tqdm(range(0, len(run.test.x), batch), desc="torch reference", leave=False, unit="batch"):
            x = run.preprocess.normalize(run.test.x[i:i + batch], "NCHW")
            out.append(model(torch.from_numpy(x)).numpy())
    return np.concatenate(out).astype(np.float32)


def program_conv_out_channels(program) -> list[int]:
    """Output channels of every conv2d in the slim program, from its weights."""
    import torch

    module = program.module()
    channels = []
    for node in module.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.conv2d.default:
            weight = module
            for part in node.args[1].target.split("."):
                weight = getattr(weight, part)
            channels.append(int(weight.shape[0]))
    return channels


def toolchain() -> dict:
    versions = {}
    for dist in TOOLCHAIN:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    versions["python"] = platform.python_version()
    return versions


@dataclass
class Reference:
    """What every artifact is compared with: the torch program on the same test images."""
    logits: np.ndarray
    top1: float
    conv_channels: list[int]  # sorted output channels of every conv in the slim program


def export_format(name: str, ctx: Context, folder: Path, ref: Reference, options: Options,
                  checks: list[dict]) -> dict:
    """Build one format, run it through the runtime on the whole test set, check it; its manifest entry."""
    fmt, run = FORMATS[name], ctx.run
    file = folder / fmt.file
    started = time.time()
    extra = fmt.build(ctx, file)
    seconds = time.time() - started

    # The pruned channels must be physically gone: every conv of the artifact has the slim widths.
    channels = sorted(fmt.conv_channels(file))
    checks.append({"name": f"{name} conv channels equal the slim model's", "passed": channels == ref.conv_channels})
    if channels != ref.conv_channels:
        raise ExportError(f"{name}: conv output channels {channels} differ from the slim model's {ref.conv_channels}")

    entry = measure.artifact_entry(name, file)
    model = measure.load(folder, name, run, entry)
    logits = measure.logits(model, run.test.x)
    top1 = float((logits.argmax(1) == run.test.y).mean())
    entry.update(top1=top1, eval_images=len(run.test.x), measured_with=measure.measured_with(model))
    if fmt.int8:
        entry["top1_drop_vs_fp32"] = check_int8(name, top1, ref, options, checks)
    else:
        entry["max_abs_diff"] = check_parity(name, logits, ref, options, checks)
    entry.update(extra)
    entry["export_seconds"] = round(seconds, 3)
    tqdm.write(f"{name:12s} {fmt.file:18s} top-1 {top1:.4f}  ({seconds:.1f} s)", file=sys.stderr)
    return entry


def check_parity(name: str, logits: np.ndarray, ref: Reference, options: Options, checks: list[dict]) -> float:
    """fp32 artifacts compute what torch computes; exceeding the bound always fails the export."""
    n = min(options.parity_images, len(logits))
    diff = float(np.abs(logits[:n] - ref.logits[:n]).max())
    checks.append({"name": f"{name} logits match torch on {n} test images", "passed": diff <= options.max_abs_diff,
                   "value": diff, "limit": options.max_abs_diff})
    if diff > options.max_abs_diff:
        raise ExportError(f"{name}: max abs logit difference vs torch is {diff:.3g} on {n} test images "
                          f"(limit {options.max_abs_diff:g})")
    return diff


def check_int8(name: str, top1: float, ref: Reference, options: Options, checks: list[dict]) -> float:
    """int8 keeps top-1 within max_int8_drop of fp32: recorded always, fatal with --strict."""
    drop = ref.top1 - top1
    passed = drop <= options.max_int8_drop
    checks.append({"name": f"{name} top-1 within {options.max_int8_drop * 100:g} pp of fp32", "passed": passed,
                   "value": drop, "limit": options.max_int8_drop})
    if not passed:
        message = (f"{name}: int8 top-1 {top1:.4f} is {drop * 100:.2f} pp below fp32 {ref.top1:.4f} "
                   f"(limit {options.max_int8_drop * 100:g} pp)")
        if options.strict:
            raise ExportError(message)
        tqdm.write(f"warning: {message}", file=sys.stderr)
    return drop


def build_bundle(run: Run, folder: Path, options: Options, scratch: Path) -> dict:
    """Write the artifacts, samples.npz and manifest.json into `folder`; return the manifest."""
    program, max_batch = run.load_program()
    logits = torch_logits(program, run, max_batch)
    ref = Reference(logits=logits, top1=float((logits.argmax(1) == run.test.y).mean()),
                    conv_channels=sorted(program_conv_out_channels(program)))
    # A fixed random subset: calib.npz may be stored in index order, and its head is not a fair sample.
    pick = np.sort(np.random.default_rng(0).permutation(len(run.calib.x))[:options.calib])
    ctx = Context(run=run, program=program, calib_x=run.calib.x[pick], calib_y=run.calib.y[pick], scratch=scratch,
                  max_batch=max_batch)
    artifacts, checks = {}, []
    bar = tqdm(options.formats, desc="export", unit="format")
    for name in bar:
        bar.set_postfix_str(name)
        artifacts[name] = export_format(name, ctx, folder, ref, options, checks)

    n = min(options.samples, len(run.test.x))
    np.savez(folder / "samples.npz", x=run.test.x[:n], y=run.test.y[:n], logits=ref.logits[:n])
    report = run.report
    manifest = {
        **measure.manifest(run, artifacts),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "samples": {"file": "samples.npz", "sha256": sha256_file(folder / "samples.npz"), "count": n},
        "source": {k: report.get(k) for k in SOURCE_KEYS},
        "reference": {"top1": ref.top1, "eval_images": len(run.test.x), "runtime": "torch"},
        "checks": checks,
        "toolchain": toolchain(),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
