"""What device_bench needs to know about a bundle (docs/formats.md §2), read with the stdlib only.

The full checks (tensor specs, preprocessing) belong to `runtime.load`, which every measurement
calls; here we only need the names, files and checksums, and the source report to quote.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import BenchError
from .files import sha256_file

# The formats docs/formats.md defines, in the order reports list them.
KNOWN_FORMATS = ("tflite-int8", "tflite", "onnx-int8", "onnx")


@dataclass(frozen=True)
class BundleInfo:
    root: Path
    name: str
    manifest: Dict[str, Any]
    manifest_sha256: str
    formats: List[str]  # the artifacts this bundle has, KNOWN_FORMATS order first

    def artifact(self, fmt: str) -> Dict[str, Any]:
        return self.manifest["artifacts"][fmt]

    def files(self) -> List[str]:
        """Every file the manifest names (relative to the bundle), manifest.json first."""
        names = ["manifest.json"] + [self.artifact(f)["file"] for f in self.formats]
        samples = self.manifest.get("samples")
        if isinstance(samples, dict) and isinstance(samples.get("file"), str):
            names.append(samples["file"])
        return names


def read_bundle(path: str) -> BundleInfo:
    root = Path(path)
    if not root.exists():
        raise BenchError(f"bundle not found: {path}")
    if not root.is_dir():
        raise BenchError(f"{path} is not a bundle folder (expected dist/NAME/ with manifest.json; "
                         "unpack a .tar.gz first)")
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise BenchError(f"{path} has no manifest.json: not a bundle made by `python -m export`")
    raw = manifest_path.read_bytes()
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise BenchError(f"{manifest_path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("artifacts"), dict):
        raise BenchError(f"{manifest_path}: no 'artifacts' object; not a bundle manifest")
    if manifest.get("schema_version") != 1:
        raise BenchError(f"{manifest_path}: schema_version {manifest.get('schema_version')!r} "
                         "is not supported (expected 1)")
    artifacts = manifest["artifacts"]
    for fmt, entry in artifacts.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) \
                or not isinstance(entry.get("sha256"), str):
            raise BenchError(f"{manifest_path}: artifacts.{fmt} needs 'file' and 'sha256'")
        rel = Path(entry["file"])
        if rel.is_absolute() or ".." in rel.parts:
            raise BenchError(f"{manifest_path}: artifacts.{fmt}.file must be inside the bundle")
    if not artifacts:
        raise BenchError(f"{manifest_path}: the bundle has no model files")
    formats = [f for f in KNOWN_FORMATS if f in artifacts] + sorted(f for f in artifacts if f not in KNOWN_FORMATS)
    name = manifest.get("name") if isinstance(manifest.get("name"), str) else root.name
    return BundleInfo(root=root, name=name, manifest=manifest,
                      manifest_sha256=hashlib.sha256(raw).hexdigest(), formats=formats)


def select_formats(bundle: BundleInfo, spec: str) -> List[str]:
    """`all` or a comma list, checked against what the bundle holds."""
    if spec.strip() == "all":
        return list(bundle.formats)
    wanted = [f.strip() for f in spec.split(",") if f.strip()]
    if not wanted:
        raise BenchError(f"--formats {spec!r} names no format; use 'all' or e.g. tflite,onnx-int8")
    for f in wanted:
        if f not in bundle.formats:
            what = "unknown format" if f not in KNOWN_FORMATS else "the bundle has no format"
            raise BenchError(f"{what} {f!r}; {bundle.name} has: {', '.join(bundle.formats)}")
    return list(dict.fromkeys(wanted))


def verify_files(bundle: BundleInfo) -> Dict[str, str]:
    """sha256 of every bundle file, checked against the manifest. {relative name: sha256}."""
    digests = {"manifest.json": bundle.manifest_sha256}
    expected = {bundle.artifact(f)["file"]: bundle.artifact(f)["sha256"] for f in bundle.formats}
    samples = bundle.manifest.get("samples")
    if isinstance(samples, dict) and isinstance(samples.get("file"), str):
        expected[samples["file"]] = samples.get("sha256")
    for rel, want in expected.items():
        path = bundle.root / rel
        if not path.is_file():
            raise BenchError(f"bundle {bundle.root}: {rel} is missing")
        got = sha256_file(path)
        if isinstance(want, str) and got != want.lower():
            raise BenchError(f"bundle {bundle.root}: {rel} does not match its sha256 in manifest.json "
                             "(corrupt or edited; re-export it)")
        digests[rel] = got
    return digests


def source_summary(bundle: BundleInfo) -> Dict[str, Any]:
    """The parts of the compress report a reader of a benchmark wants next to the numbers
    (accuracy per format is in the report's bundle.formats)."""
    src = bundle.manifest.get("source")
    src = src if isinstance(src, dict) else {}
    keep = ("method", "model", "target", "achieved", "dense", "slim")
    return {k: src.get(k) for k in keep}


def artifact_top1(bundle: BundleInfo, fmt: str) -> Optional[float]:
    v = bundle.artifact(fmt).get("top1")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
