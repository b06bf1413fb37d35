"""python -m export RUN --out dist/NAME [--formats ...] [--calib N] [--data-dir DIR] [--strict] [--force]"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from export.errors import ExportError, UserError
from export.formats import FORMATS
from export.pipeline import Options
from export.publish import staging_dir, tar_path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export",
                                description="Export a compress run folder to ONNX and TFLite (fp32 and int8), "
                                            "verify every artifact with its runtime, and write a bundle.")
    p.add_argument("run", type=Path, help="run folder written by `python -m compress` (runs/NAME)")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to write (dist/NAME); "
                   "dist/NAME.tar.gz is written next to it")
    p.add_argument("--formats", default=",".join(FORMATS),
                   help=f"comma-separated subset of {','.join(FORMATS)} (default: all)")
    p.add_argument("--calib", type=int, default=512, help="calibration images for int8 (default 512)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with DATASET.npz, used when the run has no calib.npz / test.npz")
    p.add_argument("--strict", action="store_true", help="fail if an int8 format loses more than 1 pp top-1")
    p.add_argument("--force", action="store_true", help="replace an existing bundle (only once the new one is complete)")
    return p.parse_args(argv)


def check_args(args) -> list[str]:
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UserError(f"unknown format {', '.join(unknown) or repr(args.formats)}; choose from {', '.join(FORMATS)}")
    if args.calib < 1:
        raise UserError(f"--calib must be at least 1, got {args.calib}")
    if not args.force:
        for existing in (args.out, tar_path(args.out)):
            if existing.exists():
                raise UserError(f"{existing} already exists (use --force to replace it)")
    if args.out.resolve() == args.run.resolve() or args.run.resolve() in args.out.resolve().parents:
        raise UserError(f"--out {args.out} must not be inside the run folder {args.run}")
    return list(dict.fromkeys(formats))


def quiet_toolchain() -> None:
    """Our progress bars are the progress; litert/absl/TF-style chatter goes (set before they load)."""
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("GLOG_minloglevel", "2")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("torch").setLevel(logging.ERROR)


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_toolchain()
    try:
        formats = check_args(args)
        from export.pipeline import build_bundle
        from export.publish import publish
        from export.run import open_run

        run = open_run(args.run, args.data_dir, need_calib=any(FORMATS[f].int8 for f in formats))
        options = Options(formats=formats, calib=args.calib, strict=args.strict)
        staged = staging_dir(args.out)
        try:
            with tempfile.TemporaryDirectory(prefix="edgeslim-export-") as scratch:
                build_bundle(run, staged, options, Path(scratch))
            publish(staged, args.out)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ExportError as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:  # a converter crashed: one line, the traceback on request
        if os.environ.get("EDGESLIM_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"export failed: {type(e).__name__}: {first} (nothing was written; EDGESLIM_DEBUG=1 shows the "
              "traceback)", file=sys.stderr)
        return 1
    print(f"wrote {args.out} and {tar_path(args.out)}")
    return 0
