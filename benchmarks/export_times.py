"""Export wall time per format for one run folder.

    python benchmarks/export_times.py runs/vgg16-f76 --out reports/export_times [--formats ...] [--repeat 3]

Each format is built from scratch in its own temp folder (so onnx-int8 pays for the fp32 ONNX it
starts from; converters are imported before timing), then evaluated on the run's test set with its
runtime. Writes NAME.json, NAME.md and
NAME.png (build and evaluation seconds per format, median over --repeat).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.cli import quiet_toolchain  # noqa: E402
from export.errors import UserError  # noqa: E402
from export.formats import FORMATS, Context  # noqa: E402
from export.pipeline import evaluate, toolchain  # noqa: E402
from export.run import open_run  # noqa: E402


def warm_imports() -> None:
    """Import the converters first so the first format timed does not pay for loading them."""
    import litert_torch  # noqa: F401
    import onnxruntime.quantization  # noqa: F401
    import onnxsim  # noqa: F401
    import torch.onnx  # noqa: F401
    from torchao.quantization.pt2e import quantize_pt2e  # noqa: F401


def time_format(run, program, max_batch: int, name: str, n_calib: int) -> dict:
    fmt = FORMATS[name]
    with tempfile.TemporaryDirectory(prefix="export-times-") as tmp:
        ctx = Context(run=run, program=program, calib_x=run.calib.x[:n_calib], calib_y=run.calib.y[:n_calib],
                      scratch=Path(tmp), max_batch=max_batch)
        file = Path(tmp) / fmt.file
        started = time.perf_counter()
        fmt.build(ctx, file)
        built = time.perf_counter()
        logits = evaluate(fmt.runner(file, run.preprocess), run)
        done = time.perf_counter()
        return {"build_s": built - started, "eval_s": done - built, "bytes": file.stat().st_size,
                "top1": float((logits.argmax(1) == run.test.y).mean())}


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / result["run"]
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Export times: {result['run']}", "",
             f"{result['eval_images']} test images, {result['calib_images']} calibration images, "
             f"median of {result['repeat']}, {result['machine']}", "",
             "| format | build s | evaluate s | bytes | top-1 |", "|---|---:|---:|---:|---:|"]
    for name, r in result["formats"].items():
        lines.append(f"| {name} | {r['build_s']:.2f} | {r['eval_s']:.2f} | {r['bytes']:,} | {r['top1']:.4f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["formats"])
    build = [result["formats"][n]["build_s"] for n in names]
    ev = [result["formats"][n]["eval_s"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, build, label="build")
    ax.bar(names, ev, bottom=build, label=f"evaluate ({result['eval_images']} images)")
    ax.set_ylabel("seconds")
    ax.set_title(f"export time per format: {result['run']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--out", type=Path, default=Path("reports/export_times"))
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args(argv)
    quiet_toolchain()
    names = [f for f in args.formats.split(",") if f]
    unknown = [f for f in names if f not in FORMATS]
    if unknown:
        print(f"error: unknown format {', '.join(unknown)}", file=sys.stderr)
        return 2
    try:
        run = open_run(args.run)
        program, max_batch = run.load_program()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    warm_imports()
    n_calib = min(args.calib, len(run.calib.x))  # the head of calib.npz: enough for timing
    formats = {}
    for name in names:
        trials = [time_format(run, program, max_batch, name, n_calib) for _ in range(args.repeat)]
        formats[name] = {k: statistics.median(t[k] for t in trials) for k in trials[0]}
        print(f"{name:12s} build {formats[name]['build_s']:.2f} s  evaluate {formats[name]['eval_s']:.2f} s",
              file=sys.stderr)
    result = {"run": run.name, "eval_images": len(run.test.x), "calib_images": n_calib, "repeat": args.repeat,
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "formats": formats, "toolchain": toolchain(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_outputs(result, args.out)
    print(f"wrote {args.out / run.name}.json/.md/.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
