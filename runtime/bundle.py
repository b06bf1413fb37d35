"""Read and check a bundle (docs/formats.md §2): manifest.json, the model files, samples.npz.

Everything here is plain data + checks; nothing imports an interpreter. Every problem becomes one
`BundleError` line naming the file and field, so a user on a board knows what to fix.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .errors import BundleError

SCHEMA_VERSION = 1
# The formats a bundle can hold, in the order format="auto" prefers them (fastest first on ARM
# boards: full-integer TFLite, then fp32 TFLite, then ONNX Runtime's QDQ int8, then fp32 ONNX).
FORMATS = ("tflite-int8", "tflite", "onnx-int8", "onnx")
LAYOUTS = ("NCHW", "NHWC")
DTYPES = ("float32", "int8", "uint8")


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the manifest describes it."""

    name: str
    shape: Tuple[int, ...]  # -1 = dynamic
    dtype: str
    layout: Optional[str] = None  # inputs only
    kind: Optional[str] = None  # outputs only: "logits"
    scale: Optional[float] = None  # int8/uint8 tensors: real = (q - zero_point) * scale
    zero_point: Optional[int] = None

    @property
    def quantized(self) -> bool:
        return self.dtype in ("int8", "uint8")

    def as_manifest(self) -> Dict[str, Any]:
        """The manifest entry read_bundle parses back into this spec (export writes it)."""
        d: Dict[str, Any] = {"name": self.name, "shape": list(self.shape)}
        if self.layout is not None:
            d["layout"] = self.layout
        d["dtype"] = self.dtype
        if self.kind is not None:
            d["kind"] = self.kind
        if self.scale is not None:
            d["quantization"] = {"scale": self.scale, "zero_point": self.zero_point}
        return d


@dataclass(frozen=True)
class Artifact:
    format: str
    path: Path
    sha256: str
    size: Optional[int]
    input: TensorSpec
    output: TensorSpec
    info: Dict[str, Any]  # the raw manifest entry (top1, eval_images, ...)


@dataclass(frozen=True)
class Preprocess:
    """x = (uint8_rgb * scale - mean) / std, per channel; images are height x width RGB."""

    scale: float
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    height: int
    width: int
    color: str = "RGB"

    def normalize(self, images: np.ndarray, layout: str = "NHWC") -> np.ndarray:
        """uint8 (N, H, W, 3) RGB -> float32 (pixel * scale - mean) / std, NHWC or NCHW. The one
        implementation: the runtime feeds models with it and export feeds torch and calibration."""
        x = (images.astype(np.float32) * np.float32(self.scale) - np.asarray(self.mean, np.float32)) \
            / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if layout == "NCHW" else x)

    def as_manifest(self) -> Dict[str, Any]:
        return {"scale": self.scale, "mean": list(self.mean), "std": list(self.std), "color": self.color,
                "height": self.height, "width": self.width}


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Dict[str, Any]
    name: str
    classes: List[str]
    preprocess: Preprocess
    artifacts: Dict[str, Artifact]  # keyed by format, in FORMATS order
    samples_path: Optional[Path]
    samples_sha256: Optional[str]

    def artifact(self, fmt: str) -> Artifact:
        if fmt not in FORMATS:
            raise BundleError(f"unknown format {fmt!r}; formats are {', '.join(FORMATS)}")
        if fmt not in self.artifacts:
            have = ", ".join(self.artifacts) or "none"
            raise BundleError(f"bundle {self.root} has no {fmt!r} model (it has: {have})")
        return self.artifacts[fmt]


# --------------------------------------------------------------------------- manifest fields

def _get(d: Any, key: str, where: str, types: Any, default: Any = ...) -> Any:
    """d[key], checked for type; BundleError names the manifest path when it is missing/wrong."""
    full = f"{where}.{key}" if where else key
    if not isinstance(d, dict):
        raise BundleError(f"manifest.json: {where or 'the top level'} must be an object")
    if key not in d or d[key] is None:
        if default is not ...:
            return default
        raise BundleError(f"manifest.json: missing field {full}")
    value = d[key]
    # bool is an int in Python; a manifest "true" where a number belongs is still wrong.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise BundleError(f"manifest.json: field {full} has the wrong type ({type(value).__name__})")
    return value


def _as_tuple(types: Any) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _number(d: Any, key: str, where: str, positive: bool = False) -> float:
    v = float(_get(d, key, where, (int, float)))
    if not math.isfinite(v) or (positive and v <= 0):
        raise BundleError(f"manifest.json: {where}.{key} = {v} is not a valid {'positive ' * positive}number")
    return v


def _three(d: Any, key: str, where: str, positive: bool) -> Tuple[float, float, float]:
    v = _get(d, key, where, list)
    if len(v) != 3 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in v):
        raise BundleError(f"manifest.json: {where}.{key} must be 3 numbers (R, G, B)")
    if not all(math.isfinite(a) and (a > 0 or not positive) for a in v):
        raise BundleError(f"manifest.json: {where}.{key} = {v} has invalid values")
    return (float(v[0]), float(v[1]), float(v[2]))


def _tensor(d: Any, where: str, is_input: bool) -> TensorSpec:
    shape = _get(d, "shape", where, list)
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and (s > 0 or s == -1)
                            for s in shape):
        raise BundleError(f"manifest.json: {where}.shape = {shape} is not a shape")
    dtype = _get(d, "dtype", where, str)
    if dtype not in DTYPES:
        raise BundleError(f"manifest.json: {where}.dtype {dtype!r} is not supported ({', '.join(DTYPES)})")
    layout = kind = None
    if is_input:
        layout = _get(d, "layout", where, str)
        if layout not in LAYOUTS:
            raise BundleError(f"manifest.json: {where}.layout {layout!r} is not NCHW or NHWC")
        if len(shape) != 4:
            raise BundleError(f"manifest.json: {where}.shape {shape} is not 4-D")
    else:
        kind = _get(d, "kind", where, str, default="logits")
        if kind != "logits":
            raise BundleError(f"manifest.json: {where}.kind {kind!r} is not supported (only 'logits')")
        if len(shape) != 2:
            raise BundleError(f"manifest.json: {where}.shape {shape} is not (batch, classes)")
    scale = zero_point = None
    if dtype != "float32":
        q = _get(d, "quantization", where, dict)
        scale = _number(q, "scale", where + ".quantization", positive=True)
        zero_point = _get(q, "zero_point", where + ".quantization", int)
    return TensorSpec(name=_get(d, "name", where, str, default=""), shape=tuple(shape), dtype=dtype,
                      layout=layout, kind=kind, scale=scale, zero_point=zero_point)


def _inside(root: Path, rel: str, where: str) -> Path:
    """A bundle names its files relative to itself; refuse anything that points outside."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not rel:
        raise BundleError(f"manifest.json: {where} = {rel!r} must be a file name inside the bundle")
    return root / p


def _sha256_field(d: Any, where: str) -> str:
    digest = _get(d, "sha256", where, str).lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise BundleError(f"manifest.json: {where}.sha256 is not a sha256 hex digest")
    return digest


def _artifact(root: Path, fmt: str, entry: Any, pre: Preprocess, n_classes: int) -> Artifact:
    where = f"artifacts.{fmt}"
    path = _inside(root, _get(entry, "file", where, str), where + ".file")
    size = _get(entry, "bytes", where, int, default=None)
    inp = _tensor(_get(entry, "input", where, dict), where + ".input", is_input=True)
    out = _tensor(_get(entry, "output", where, dict), where + ".output", is_input=False)
    want_int8 = fmt.endswith("-int8") and fmt.startswith("tflite")
    if want_int8 != inp.quantized:
        raise BundleError(f"manifest.json: {where}.input.dtype {inp.dtype!r} does not fit format {fmt!r}")
    expected_layout = "NHWC" if fmt.startswith("tflite") else "NCHW"
    if inp.layout != expected_layout:
        raise BundleError(f"manifest.json: {where}.input.layout is {inp.layout}, {fmt} models take {expected_layout}")
    hwc = inp.shape[1:] if inp.layout == "NHWC" else (inp.shape[2], inp.shape[3], inp.shape[1])
    if hwc != (pre.height, pre.width, 3):
        raise BundleError(f"manifest.json: {where}.input.shape {list(inp.shape)} does not match "
                          f"preprocess {pre.height}x{pre.width} RGB")
    if out.shape[1] != n_classes:
        raise BundleError(f"manifest.json: {where}.output.shape {list(out.shape)} does not match "
                          f"{n_classes} classes")
    return Artifact(format=fmt, path=path, sha256=_sha256_field(entry, where), size=size,
                    input=inp, output=out, info=dict(entry))


# --------------------------------------------------------------------------- the bundle

def read_bundle(path: Any) -> Bundle:
    """Read and validate dist/NAME/manifest.json (path = the folder or the manifest itself)."""
    root = Path(path)
    if root.name == "manifest.json":
        root = root.parent
    if str(root).endswith((".tar.gz", ".tgz")) and root.is_file():
        raise BundleError(f"{root} is the archive; extract it first (tar xzf {root.name}) and pass the folder")
    if not root.is_dir():
        raise BundleError(f"bundle folder {root} does not exist")
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise BundleError(f"{root} is not a bundle: no manifest.json")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath} is not valid JSON ({e.__class__.__name__}: {e})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath} must hold a JSON object")

    version = _get(manifest, "schema_version", "", int)
    if version != SCHEMA_VERSION:
        raise BundleError(f"manifest.json: schema_version {version} is not supported by this runtime "
                          f"(it reads {SCHEMA_VERSION}); use the edgeslim version that made the bundle")
    name = _get(manifest, "name", "", str)
    classes = _get(manifest, "classes", "", list)
    if not classes or not all(isinstance(c, str) for c in classes):
        raise BundleError("manifest.json: classes must be a non-empty list of names")

    p = _get(manifest, "preprocess", "", dict)
    color = _get(p, "color", "preprocess", str, default="RGB")
    if color != "RGB":
        raise BundleError(f"manifest.json: preprocess.color {color!r} is not supported (only RGB)")
    height, width = (_get(p, k, "preprocess", int) for k in ("height", "width"))
    if height <= 0 or width <= 0:
        raise BundleError(f"manifest.json: preprocess size {height}x{width} is not valid")
    pre = Preprocess(scale=_number(p, "scale", "preprocess", positive=True),
                     mean=_three(p, "mean", "preprocess", positive=False),
                     std=_three(p, "std", "preprocess", positive=True),
                     height=height, width=width, color=color)

    entries = _get(manifest, "artifacts", "", dict)
    # Formats this runtime does not know are skipped (a newer exporter may add some); asking
    # for one of them by name is a clear error in Bundle.artifact.
    artifacts = {fmt: _artifact(root, fmt, entries[fmt], pre, len(classes)) for fmt in FORMATS if fmt in entries}
    if not artifacts:
        raise BundleError(f"manifest.json: artifacts lists no model this runtime reads ({', '.join(FORMATS)})")

    samples_path = samples_sha = None
    s = manifest.get("samples")
    if s is not None:
        samples_path = _inside(root, _get(s, "file", "samples", str), "samples.file")
        samples_sha = _sha256_field(s, "samples")
    return Bundle(root=root, manifest=manifest, name=name, classes=list(classes), preprocess=pre,
                  artifacts=artifacts, samples_path=samples_path, samples_sha256=samples_sha)


# --------------------------------------------------------------------------- files + checksums

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def read_checked(path: Path, sha256: str, size: Optional[int] = None) -> bytes:
    """The file's bytes, after checking they are the ones the manifest names. The caller hands
    these same bytes to the interpreter, so what runs is exactly what was checked."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{path} is missing from the bundle") from None
    except OSError as e:
        raise BundleError(f"cannot read {path}: {e.strerror or e}") from None
    if size is not None and len(data) != size:
        raise BundleError(f"{path.name} is {len(data)} bytes, the manifest says {size}: "
                          "the file is truncated or replaced; copy the bundle again")
    if sha256_bytes(data) != sha256:
        raise BundleError(f"{path.name} does not match its sha256 in manifest.json: "
                          "the file is corrupt or replaced; copy the bundle again")
    return data


@dataclass(frozen=True)
class Samples:
    x: np.ndarray  # uint8 (N, H, W, 3)
    y: np.ndarray  # int (N,)
    logits: np.ndarray  # float32 (N, K): the torch model's logits


def read_samples(bundle: Bundle) -> Samples:
    """samples.npz, checksum-verified, shapes checked against the manifest."""
    if bundle.samples_path is None or bundle.samples_sha256 is None:
        raise BundleError("manifest.json: no samples entry, nothing to verify against")
    import io

    data = read_checked(bundle.samples_path, bundle.samples_sha256)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            x, y, logits = z["x"], z["y"], z["logits"]
    except (KeyError, ValueError, OSError) as e:
        raise BundleError(f"{bundle.samples_path.name} is not a samples file with x, y, logits ({e})") from None
    pre, k = bundle.preprocess, len(bundle.classes)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (pre.height, pre.width, 3):
        raise BundleError(f"{bundle.samples_path.name}: x is {x.dtype} {x.shape}, expected uint8 "
                          f"(N, {pre.height}, {pre.width}, 3)")
    if y.shape != (len(x),) or logits.shape != (len(x), k):
        raise BundleError(f"{bundle.samples_path.name}: y {y.shape} / logits {logits.shape} do not fit "
                          f"{len(x)} images and {k} classes")
    return Samples(x=x, y=y.astype(np.int64), logits=logits.astype(np.float32))
