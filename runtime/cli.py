"""python -m runtime {info,verify,predict} BUNDLE ...

Exit codes: 0 ok, 1 `verify` found a problem, 2 a user error (bad bundle, image, option) —
printed as one line, no traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, List, Optional, Sequence

import numpy as np

from .backends import BACKENDS, backends_for, describe, install_hint, is_installed
from .bundle import FORMATS, read_bundle
from .errors import RuntimeUserError
from .images import read_image_file
from .model import load
from .verify import DEFAULT_MIN_AGREEMENT, DEFAULT_RTOL, verify


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _size(n: Optional[int]) -> str:
    if n is None:
        return "?"
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


# --------------------------------------------------------------------------- info

def cmd_info(args: argparse.Namespace) -> int:
    bundle = read_bundle(args.bundle)
    m = bundle.manifest
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    pre = bundle.preprocess
    print(f"bundle   {bundle.name}   ({bundle.root}, created {m.get('created', '?')})")
    names = ", ".join(bundle.classes[:10]) + (", ..." if len(bundle.classes) > 10 else "")
    print(f"classes  {len(bundle.classes)}: {names}")
    print(f"input    {pre.height}x{pre.width} {pre.color} uint8; x = (pixel * {pre.scale:.6g} - mean) / std, "
          f"mean {list(pre.mean)}, std {list(pre.std)}")
    src = m.get("source") or {}
    slim, dense, achieved = src.get("slim") or {}, src.get("dense") or {}, src.get("achieved") or {}
    if slim:
        print(f"model    {src.get('model', '?')} pruned by {src.get('method', '?')}: "
              f"{slim.get('flops', 0) / 1e6:.2f} MFLOPs (MACs), {slim.get('params', 0) / 1e6:.3f} M params"
              + (f", -{achieved['flops_reduction']:.1%} FLOPs / -{achieved['params_reduction']:.1%} params vs dense "
                 f"({dense.get('flops', 0) / 1e6:.1f} MFLOPs)" if "flops_reduction" in achieved
                 and "params_reduction" in achieved else ""))
    rows = []
    for fmt, a in bundle.artifacts.items():
        runner = next((b for b in backends_for(fmt) if is_installed(b)), None)
        top1 = a.info.get("top1")
        rows.append([fmt, a.path.name, _size(a.size), f"{a.input.dtype} {a.input.layout} {list(a.input.shape)}",
                     "-" if top1 is None else f"{top1:.2%} of {a.info.get('eval_images', '?')}",
                     runner or f"not installed ({install_hint(fmt)})"])
    print()
    print(table(rows, ["format", "file", "size", "input", "top-1 (export)", "runs with"]))
    backends = []
    for b in BACKENDS:
        ok, version = describe(b)
        backends.append(f"{b} {version or ''}".strip() if ok else f"{b} (not installed)")
    print(f"\nbackends here: {', '.join(backends)}")
    tool = m.get("toolchain") or {}
    if tool:
        print("exported with: " + ", ".join(f"{k} {v}" for k, v in tool.items()))
    return 0


# --------------------------------------------------------------------------- verify

def cmd_verify(args: argparse.Namespace) -> int:
    formats = None if args.format == "all" else [args.format]
    report = verify(args.bundle, formats, backend=args.backend, threads=args.threads,
                    rtol=args.rtol, min_agreement=args.min_agreement)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0 if report.ok else 1
    print(f"bundle {report.bundle} ({report.path})\n")
    print(table([[f.file, "ok" if f.ok else "FAIL", "" if f.ok else f.detail] for f in report.files],
                ["file", "sha256", "problem"]))
    print()
    rows = []
    for r in report.formats:
        if r.status == "skipped":
            rows.append([r.format, "-", "-", "-", "-", "-", "skipped", r.detail])
            continue
        backend = f"{r.backend} {r.backend_version}" if r.backend else "-"
        if r.max_abs_diff is not None:
            check = f"max|dlogit| {r.max_abs_diff:.2g} <= {r.tolerance:.2g}"
        elif r.min_agreement is not None and r.top1_agreement is not None:
            check = f"top-1 agree {_pct(r.top1_agreement)} >= {r.min_agreement:.0%}"
        else:
            check = "-"
        rows.append([r.format, backend, r.images or "-", check, _pct(r.top1_agreement), _pct(r.top1),
                     r.status.upper(), r.detail])
    print(table(rows, ["format", "backend", "images", "check", "agree", "top-1", "result", "problem"]))
    torch_top1 = next((r.torch_top1 for r in report.formats if r.torch_top1 is not None), None)
    if torch_top1 is not None:
        print(f"\n(torch top-1 on the same samples: {_pct(torch_top1)})")
    print("\nOK" if report.ok else "\nFAILED")
    return 0 if report.ok else 1


# --------------------------------------------------------------------------- predict

def _inputs(files: List[str]) -> List[tuple]:
    """(name, uint8 image array) for every image in the files (an .npy may hold a batch)."""
    out = []
    for f in files:
        a = read_image_file(f)
        if isinstance(a, np.ndarray) and a.ndim == 4:
            out += [(f"{f}[{i}]", a[i]) for i in range(len(a))]
        else:
            out.append((f, a))
    return out


def cmd_predict(args: argparse.Namespace) -> int:
    model = load(args.bundle, format=args.format, threads=args.threads, backend=args.backend, resize=args.resize)
    items = _inputs(args.files)
    results = []
    for name, image in items:
        probs = model.predict(image)
        results.append({"file": name, "top": [{"label": c, "p": round(p, 6)} for c, p in model.top(probs, args.top)[0]]})
    if args.json:
        print(json.dumps({"bundle": model.bundle.name, "format": model.format, "backend": model.backend,
                          "backend_version": model.backend_version, "predictions": results}, indent=2))
        return 0
    # which model answered goes to stderr, so stdout stays one line per image
    print(f"{model.bundle.name}: {model.format} on {model.backend} {model.backend_version}", file=sys.stderr)
    width = max(len(r["file"]) for r in results)
    for r in results:
        print(r["file"].ljust(width) + "  " + "   ".join(f"{t['label']} {t['p']:.3f}" for t in r["top"]))
    return 0


# --------------------------------------------------------------------------- main

def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{s} must be >= 1")
    return v


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime",
                                description="Run an edgeslim bundle with numpy and one interpreter (no torch).")
    sub = p.add_subparsers(dest="command", required=True, metavar="{info,verify,predict}")

    def common(sp: argparse.ArgumentParser, all_formats: bool) -> None:
        sp.add_argument("bundle", help="bundle folder, e.g. dist/vgg16-f76")
        choices = (["all"] if all_formats else ["auto"]) + list(FORMATS)
        sp.add_argument("--format", default=choices[0], choices=choices,
                        help="auto = fastest installed: tflite-int8 > tflite > onnx-int8 > onnx" if not all_formats
                        else "check one format (default: every format in the bundle)")
        sp.add_argument("--backend", choices=list(BACKENDS), default=None,
                        help="interpreter (default: first installed of " + ", ".join(BACKENDS) + ")")
        sp.add_argument("--threads", type=_positive_int, default=None, help="interpreter threads (default: all cores)")
        sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = sub.add_parser("info", help="what the bundle holds and what runs it here")
    sp.add_argument("bundle")
    sp.add_argument("--json", action="store_true", help="print the manifest")
    sp.set_defaults(func=cmd_info)

    sp = sub.add_parser("verify", help="checksums + samples.npz against the stored torch logits; exit 1 on failure")
    common(sp, all_formats=True)
    sp.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                    help="fp32: allowed |logit - torch logit| as a fraction of max(1, max|torch logit|)")
    sp.add_argument("--min-agreement", type=float, default=DEFAULT_MIN_AGREEMENT,
                    help="int8: fraction of samples whose top-1 must match torch")
    sp.set_defaults(func=cmd_verify)

    sp = sub.add_parser("predict", help="classify image files (.png/.jpg/... or .npy)")
    common(sp, all_formats=False)
    sp.add_argument("files", nargs="+", help="images (.png, .jpg, ... need Pillow except .png) or .npy arrays")
    sp.add_argument("--top", type=_positive_int, default=3, help="classes to show per image")
    sp.add_argument("--resize", action="store_true", help="resize images of another size (Pillow) instead of refusing")
    sp.set_defaults(func=cmd_predict)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except RuntimeUserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `... | head`
        return 0

