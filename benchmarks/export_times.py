"""Export wall time per format, for one or more run folders (e.g. dense and slim side by side).

    python benchmarks/export_times.py runs/vgg16-dense-cpu runs/vgg16-seed-flops076-cpu --repeat 3
    python benchmarks/export_times.py runs/vgg16-f76 --formats tflite,tflite-int8 --out /tmp/export-times

Each build starts from scratch in its own temp folder with export's own build function (so
onnx-int8 pays for the fp32 ONNX it starts from, as in `python -m export`); the converters are
imported before anything is timed, so the first build does not pay for loading them. Every build
is repeated --repeat times (the first one is reported separately: a converter's own first-call
setup shows there). The last build of each format is then evaluated once on the run's test set
through the runtime package, as `python -m export` does to check it (export/measure.py): that
time and the top-1 are reported too. Writes export_times.json, export_times.md and export_times.png into --out.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RESULTS,
    BenchError,
    Parser,
    meta,
    meta_markdown,
    now_iso,
    pyplot,
    save_figure,
    write_json,
    write_text,
)


def warm_imports() -> None:
    """Import the converters first so the first format timed does not pay for loading them."""
    import litert_torch  # noqa: F401
    import onnxruntime.quantization  # noqa: F401
    import onnxsim  # noqa: F401
    import torch.onnx  # noqa: F401
    from torchao.quantization.pt2e import quantize_pt2e  # noqa: F401


def time_format(run, program, max_batch: int, name: str, n_calib: int, repeat: int, bar) -> dict:
    """Build `name` `repeat` times from scratch; evaluate the last build once."""
    from export import measure
    from export.formats import FORMATS, Context

    fmt = FORMATS[name]
    builds = []
    with tempfile.TemporaryDirectory(prefix="export-times-") as tmp:
        for i in range(repeat):  # each build in a fresh folder: nothing cached from the one before
            scratch = Path(tmp) / str(i)
            scratch.mkdir()
            ctx = Context(run=run, program=program, calib_x=run.calib.x[:n_calib], calib_y=run.calib.y[:n_calib],
                          scratch=scratch, max_batch=max_batch)
            file = scratch / fmt.file
            started = time.perf_counter()
            fmt.build(ctx, file)
            builds.append(time.perf_counter() - started)
            bar.update(1)
        started = time.perf_counter()
        model = measure.load(file.parent, name, run, measure.artifact_entry(name, file))
        logits = measure.logits(model, run.test.x)
        eval_s = time.perf_counter() - started
        size = file.stat().st_size
    return {"build_s": statistics.median(builds), "build_first_s": builds[0], "build_min_s": min(builds),
            "builds_s": [round(b, 3) for b in builds], "eval_s": eval_s, "bytes": size,
            "top1": float((logits.argmax(1) == run.test.y).mean())}


def markdown(result: dict) -> str:
    lines = ["# Export time per format", "", *meta_markdown(result["meta"]),
             f"- {result['calib_images']} calibration images per int8 build; each build repeated "
             f"{result['repeat']}× from scratch; evaluation once, on the run's test set; torch threads "
             f"{result['torch_threads']}", "",
             "| run | format | build s (median) | first build s | evaluate s | test images | file MB | top-1 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for run_name, run in result["runs"].items():
        for name, r in run["formats"].items():
            lines.append(f"| {run_name} | {name} | {r['build_s']:.2f} | {r['build_first_s']:.2f} | "
                         f"{r['eval_s']:.2f} | {run['test_images']:,} | {r['bytes'] / 1e6:.1f} | {r['top1']:.4f} |")
    lines += ["", "![export time per format](export_times.png)", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    runs = list(result["runs"])
    formats = list(dict.fromkeys(f for r in result["runs"].values() for f in r["formats"]))
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(formats), 3.8))
    for i, run_name in enumerate(runs):
        fmts = result["runs"][run_name]["formats"]
        xs = [j + (i - (len(runs) - 1) / 2) * width for j, f in enumerate(formats) if f in fmts]
        build = [fmts[f]["build_s"] for f in formats if f in fmts]
        ev = [fmts[f]["eval_s"] for f in formats if f in fmts]
        bars = ax.bar(xs, build, width, label=f"{run_name}: build")
        ax.bar(xs, ev, width, bottom=build, color=bars.patches[0].get_facecolor(), alpha=0.35,
               label=f"{run_name}: evaluate")
    ax.set_xticks(range(len(formats)), formats)
    ax.set_ylabel("seconds")
    ax.set_title("export time per format (build median; evaluation on the test set)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def make_parser() -> Parser:
    from export.formats import FORMATS

    p = Parser(prog="python benchmarks/export_times.py", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="compress run folders (runs/NAME)")
    p.add_argument("--out", type=Path, default=RESULTS / "export-times",
                   help="folder for export_times.json/.md/.png (default benchmarks/results/export-times)")
    p.add_argument("--formats", default=",".join(FORMATS), help=f"comma list of {', '.join(FORMATS)} (default all)")
    p.add_argument("--calib", type=int, default=512,
                   help="calibration images per int8 build, from the run's calib.npz (default 512, as export)")
    p.add_argument("--repeat", type=int, default=3, help="builds per format, each from scratch (default 3)")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from export.cli import quiet_toolchain
    from export.errors import UserError
    from export.formats import FORMATS
    from export.run import open_run

    try:
        args = make_parser().parse_args(argv)
        names = [f.strip() for f in args.formats.split(",") if f.strip()]
        unknown = [f for f in names if f not in FORMATS]
        if not names or unknown:
            raise BenchError(f"--formats: unknown {', '.join(unknown) or '(empty list)'}; choose from "
                             f"{', '.join(FORMATS)}")
        if args.repeat < 1 or args.calib < 1:
            raise BenchError("--repeat and --calib must be at least 1")
        if args.out.exists() and not args.out.is_dir():
            raise BenchError(f"--out {args.out}: exists and is not a folder")
        try:
            runs = [open_run(r) for r in args.runs]
        except UserError as exc:
            raise BenchError(str(exc)) from None
        if len({r.name for r in runs}) < len(runs):
            raise BenchError("two run folders have the same name in report.json; give distinct runs")
    except BenchError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2

    import torch
    from tqdm import tqdm

    quiet_toolchain()
    info = meta(argv)
    warm_imports()
    result = {"benchmark": "export_times", "meta": info, "repeat": args.repeat, "calib_images": args.calib,
              "torch_threads": torch.get_num_threads(), "formats": names, "runs": {}}
    bar = tqdm(total=len(runs) * len(names) * args.repeat, desc="export builds", unit="build", dynamic_ncols=True)
    for run in runs:
        try:
            program, max_batch = run.load_program()
        except UserError as exc:
            print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
        n_calib = min(args.calib, len(run.calib.x))
        formats = {}
        for name in names:
            bar.set_postfix_str(f"{run.name} {name}")
            formats[name] = time_format(run, program, max_batch, name, n_calib, args.repeat, bar)
            tqdm.write(f"{run.name} {name:12s} build {formats[name]['build_s']:.2f} s (first "
                       f"{formats[name]['build_first_s']:.2f} s)  evaluate {formats[name]['eval_s']:.2f} s")
        result["runs"][run.name] = {"path": str(run.path), "test_images": len(run.test.x),
                                    "calib_images": n_calib, "formats": formats}
    bar.close()
    info["finished"] = now_iso()
    write_json(args.out / "export_times.json", result)
    write_text(args.out / "export_times.md", markdown(result))
    plot(result, args.out / "export_times.png")
    print(f"wrote {args.out}/export_times.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
