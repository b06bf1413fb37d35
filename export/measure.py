"""Measure an artifact the way the board runs it: through the runtime package.

The manifest's numbers (top-1, parity with torch, calibration choices) come from
`runtime.load(folder, format).logits(images)` -- the same manifest reader, sha256 check,
preprocessing, quantisation, batching and interpreter set-up as on the device -- so there is no
second copy of any of it here. An artifact is measured from a folder holding it and a
manifest.json that names it alone (export rewrites that manifest with every artifact at the end).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

import runtime
from export.run import Run
from runtime.backends import default_threads
from runtime.bundle import SCHEMA_VERSION, sha256_file
from runtime.model import file_specs

CHUNK = 1000  # images per progress-bar step


def artifact_entry(fmt: str, file: Path) -> dict:
    """The manifest entry of a model file: name, checksum, size, and its input/output as the
    interpreter that runs it reports them."""
    inp, out = file_specs(file, fmt)
    return {"file": file.name, "sha256": sha256_file(file), "bytes": file.stat().st_size,
            "input": inp.as_manifest(), "output": out.as_manifest()}


def manifest(run: Run, artifacts: dict) -> dict:
    """The part of manifest.json that runtime.load reads (export adds samples, source, checks...)."""
    return {"schema_version": SCHEMA_VERSION, "name": run.name, "classes": [str(c) for c in run.report["classes"]],
            "preprocess": run.preprocess.as_manifest(), "artifacts": artifacts}


def load(folder: Path, fmt: str, run: Run, entry: dict) -> runtime.Model:
    """Write folder/manifest.json naming this one artifact, then load it as a board would."""
    (folder / "manifest.json").write_text(json.dumps(manifest(run, {fmt: entry}), indent=2) + "\n")
    return runtime.load(folder, format=fmt, threads=default_threads())


def load_file(fmt: str, file: Path, run: Run) -> runtime.Model:
    """A model file that is not in the bundle (a calibration candidate), loaded from its own folder."""
    return load(file.parent, fmt, run, artifact_entry(fmt, file))


def logits(model: runtime.Model, images: np.ndarray, desc: str = "  evaluate") -> np.ndarray:
    """float32 logits of uint8 images, in chunks so the bar moves."""
    chunks = range(0, len(images), CHUNK)
    return np.concatenate([model.logits(images[i:i + CHUNK])
                           for i in tqdm(chunks, desc=desc, leave=False, unit="kimg", disable=len(chunks) < 2)])


def top1(model: runtime.Model, images: np.ndarray, labels: np.ndarray) -> float:
    return float((logits(model, images).argmax(1) == labels).mean())


def measured_with(model: runtime.Model) -> dict:
    """Which interpreter produced an artifact's numbers (`runtime.load` with these reproduces them)."""
    return {"backend": model.backend, "backend_version": model.backend_version, "threads": default_threads()}
