"""`runtime verify`: is this bundle, on this board, the model that was exported?

1. The sha256 of every file the manifest names (all model files + samples.npz).
2. Each format run on samples.npz (64 test images) against the torch logits stored at export:
   fp32 formats must match within rtol * max(1, max|torch logit|) (default rtol 1e-4 — float
   reordering in a different kernel library is ~1e-6 relative; a wrong layout/normalisation
   is ~1); int8 formats must agree with torch's top-1 on >= min_agreement of the images
   (default 0.9; int8 changes logits by design, so only the decision is compared).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, List, Optional, Sequence

import numpy as np

from .backends import backends_for, install_hint, is_installed
from .bundle import Bundle, read_bundle, read_samples, sha256_file
from .errors import BundleError, RuntimeUserError
from .model import load

DEFAULT_RTOL = 1e-4
DEFAULT_MIN_AGREEMENT = 0.9


@dataclass
class FileCheck:
    file: str
    ok: bool
    detail: str  # "ok", "missing", "sha256 mismatch", "N bytes, manifest says M"


@dataclass
class FormatCheck:
    format: str
    status: str  # "pass" | "fail" | "skipped"
    detail: str = ""
    backend: Optional[str] = None
    backend_version: Optional[str] = None
    images: int = 0
    max_abs_diff: Optional[float] = None  # fp32: max |logit - torch logit|
    tolerance: Optional[float] = None
    top1_agreement: Optional[float] = None  # fraction of images with the same top-1 as torch
    min_agreement: Optional[float] = None
    top1: Optional[float] = None  # accuracy on the samples' labels (information only)
    torch_top1: Optional[float] = None


@dataclass
class VerifyReport:
    bundle: str
    path: str
    files: List[FileCheck] = field(default_factory=list)
    formats: List[FormatCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.files) and all(f.status != "fail" for f in self.formats) \
            and any(f.status == "pass" for f in self.formats)

    def as_dict(self) -> dict:
        return {"bundle": self.bundle, "path": self.path, "ok": self.ok,
                "files": [asdict(f) for f in self.files], "formats": [asdict(f) for f in self.formats]}


def check_files(bundle: Bundle) -> List[FileCheck]:
    named = [(a.path, a.sha256, a.size) for a in bundle.artifacts.values()]
    if bundle.samples_path is not None:
        named.append((bundle.samples_path, bundle.samples_sha256, None))
    checks = []
    for path, digest, size in named:
        if not path.is_file():
            checks.append(FileCheck(path.name, False, "missing"))
        elif size is not None and path.stat().st_size != size:
            checks.append(FileCheck(path.name, False, f"{path.stat().st_size} bytes, manifest says {size}"))
        elif sha256_file(path) != digest:
            checks.append(FileCheck(path.name, False, "sha256 mismatch"))
        else:
            checks.append(FileCheck(path.name, True, "ok"))
    return checks


def check_format(bundle: Bundle, fmt: str, x: np.ndarray, y: np.ndarray, ref: np.ndarray, *,
                 backend: Optional[str], threads: Optional[int], rtol: float, min_agreement: float) -> FormatCheck:
    row = FormatCheck(format=fmt, status="fail", images=len(x))
    row.torch_top1 = float((ref.argmax(1) == y).mean())
    try:
        model = load(bundle.root, format=fmt, threads=threads, backend=backend)
        row.backend, row.backend_version = model.backend, model.backend_version
        logits = model.logits(x)
    except RuntimeUserError as e:
        row.detail = str(e)
        return row
    if not np.isfinite(logits).all():
        row.detail = "the model output NaN/Inf"
        return row
    row.top1_agreement = float((logits.argmax(1) == ref.argmax(1)).mean())
    row.top1 = float((logits.argmax(1) == y).mean())
    if fmt.endswith("-int8"):
        row.min_agreement = min_agreement
        ok = row.top1_agreement >= min_agreement
        row.detail = "" if ok else f"top-1 agrees with torch on {row.top1_agreement:.1%} < {min_agreement:.0%}"
    else:
        row.max_abs_diff = float(np.abs(logits - ref).max())
        row.tolerance = rtol * max(1.0, float(np.abs(ref).max()))
        ok = row.max_abs_diff <= row.tolerance
        row.detail = "" if ok else f"logits differ from torch by {row.max_abs_diff:.3g} > {row.tolerance:.3g}"
    row.status = "pass" if ok else "fail"
    return row


def _skip_reason(fmt: str, backend: Optional[str]) -> Optional[str]:
    if backend not in (None, "auto"):
        return None if backend in backends_for(fmt) else f"backend {backend} does not run {fmt} models"
    if any(is_installed(b) for b in backends_for(fmt)):
        return None
    return f"no interpreter installed: {install_hint(fmt)}"


def verify(path: Any, formats: Optional[Sequence[str]] = None, *, backend: Optional[str] = None,
           threads: Optional[int] = None, rtol: float = DEFAULT_RTOL,
           min_agreement: float = DEFAULT_MIN_AGREEMENT) -> VerifyReport:
    """Check a bundle. formats=None: every format the bundle has (those no installed backend
    runs are reported as skipped); a named format that cannot run here fails."""
    bundle = read_bundle(path)
    report = VerifyReport(bundle=bundle.name, path=str(bundle.root), files=check_files(bundle))
    explicit = formats is not None
    wanted = list(formats) if explicit else list(bundle.artifacts)
    for fmt in wanted:
        bundle.artifact(fmt)  # unknown / absent format -> BundleError
    try:
        samples = read_samples(bundle)  # checksum-verified
    except BundleError as e:  # a damaged samples file fails the verification (exit 1), it is not a usage error
        report.formats = [FormatCheck(format=fmt, status="skipped", detail=f"not run: {e}") for fmt in wanted]
        return report
    for fmt in wanted:
        why = None if explicit else _skip_reason(fmt, backend)
        if why:
            report.formats.append(FormatCheck(format=fmt, status="skipped", detail=why))
            continue
        report.formats.append(check_format(bundle, fmt, samples.x, samples.y, samples.logits, backend=backend,
                                           threads=threads, rtol=rtol, min_agreement=min_agreement))
    return report
