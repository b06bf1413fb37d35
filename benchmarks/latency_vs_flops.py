"""Does a FLOPs reduction buy the same latency reduction? Dense vs slim, every format, on this host.

    python benchmarks/latency_vs_flops.py --dense runs/vgg16-dense --slim runs/vgg16-f76 [--slim runs/vgg16-f90] \
        [--threads 1,2] [--runs 200] [--formats onnx,onnx-int8,tflite,tflite-int8] [--out DIR]

Each run folder is exported with `python -m export` (into OUT/dist/NAME; an existing bundle there is
reused, `--fresh` rebuilds it) and measured with `python -m device_bench run` (OUT/bench/NAME.json),
in every format at each thread count. For each slim run, format and thread count:

    speed-up     = p50(dense) / p50(slim)
    FLOPs ratio  = FLOPs(dense) / FLOPs(slim)          (MACs, from report.json)
    efficiency   = speed-up / FLOPs ratio              (1.0 = latency falls exactly as FLOPs do)

and, per bundle, the int8 speed-up over fp32 of each runtime (onnx vs onnx-int8, tflite vs
tflite-int8). Writes OUT/latency_vs_flops.json, .md and .png (default OUT:
benchmarks/results/latency_vs_flops-<first slim run's name>).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    PYTHON,
    RESULTS,
    BenchError,
    Parser,
    meta,
    meta_markdown,
    pyplot,
    read_json,
    run_logged,
    save_figure,
    tail,
    write_json,
    write_text,
)

FORMATS = ("onnx", "onnx-int8", "tflite", "tflite-int8")
INT8_PAIRS = (("onnx", "onnx-int8"), ("tflite", "tflite-int8"))


def bundle_for(run: Path, out: Path, formats: list[str], fresh: bool, log: Path) -> Path:
    """Export `run` into out/dist/NAME unless a bundle with every wanted format is already there."""
    bundle = out / "dist" / run.name
    manifest = bundle / "manifest.json"
    if manifest.is_file() and not fresh:
        have = read_json(manifest).get("artifacts", {})
        if all(f in have for f in formats):
            return bundle
    cmd = [PYTHON, "-m", "export", str(run), "--out", str(bundle), "--formats", ",".join(formats)]
    if bundle.exists():
        cmd.append("--force")
    rc, _ = run_logged(cmd, log)
    if rc != 0 or not manifest.is_file():
        raise BenchError(f"export of {run} failed (exit {rc}): {tail(log, 1)} (log: {log})")
    return bundle


def bench(bundle: Path, out: Path, formats: list[str], threads: str, runs: int, warmup: int, log: Path) -> dict:
    report = out / "bench" / f"{bundle.name}.json"
    cmd = [PYTHON, "-m", "device_bench", "run", str(bundle), "--formats", ",".join(formats),
           "--threads", threads, "--runs", str(runs), "--warmup", str(warmup), "--out", str(report)]
    rc, _ = run_logged(cmd, log)
    if not report.is_file():
        raise BenchError(f"device_bench on {bundle} wrote no report (exit {rc}): {tail(log, 1)} (log: {log})")
    return read_json(report)


def p50s(report: dict) -> dict[tuple[str, int], float]:
    return {(r["format"], r["threads"]): r["latency_ms"]["p50"] for r in report["results"] if r["status"] == "ok"}


def compare(dense: dict, slims: list[dict]) -> dict:
    """Speed-ups against the FLOPs ratio, and int8 vs fp32, from device_bench reports."""
    d50 = p50s(dense)
    dense_flops = dense["bundle"]["source"]["slim"]["flops"]
    rows = []
    for slim in slims:
        s50 = p50s(slim)
        src = slim["bundle"]["source"]
        ratio = dense_flops / src["slim"]["flops"]
        for key in sorted(set(d50) & set(s50), key=lambda k: (FORMATS.index(k[0]), k[1])):
            speedup = d50[key] / s50[key]
            rows.append({"slim": slim["bundle"]["name"], "method": src.get("method"), "format": key[0],
                         "threads": key[1], "dense_p50_ms": d50[key], "slim_p50_ms": s50[key],
                         "speedup": speedup, "flops_ratio": ratio, "efficiency": speedup / ratio})
    int8 = []
    for report in [dense, *slims]:
        lat = p50s(report)
        for fp32, q in INT8_PAIRS:
            for (fmt, threads), v in sorted(lat.items()):
                if fmt == fp32 and (q, threads) in lat:
                    int8.append({"bundle": report["bundle"]["name"], "runtime": fp32, "threads": threads,
                                 "fp32_p50_ms": v, "int8_p50_ms": lat[(q, threads)], "speedup": v / lat[(q, threads)]})
    return {"speedups": rows, "int8_vs_fp32": int8}


def markdown(result: dict) -> str:
    lines = ["# Latency vs FLOPs: dense vs slim on this host", "", *meta_markdown(result["meta"]),
             f"- device_bench: `--threads {result['threads']} --runs {result['runs']} --warmup {result['warmup']}`, "
             f"batch 1, p50 of the timed invokes", ""]
    lines += ["| bundle | method | top-1 (fp32) | FLOPs | params |", "|---|---|---:|---:|---:|"]
    for b in result["bundles"]:
        top1 = b["top1"]
        lines.append(f"| {b['name']} | {b['method']} | {'' if top1 is None else f'{top1:.4f}'} "
                     f"| {b['flops'] / 1e6:.2f}M | {b['params'] / 1e6:.3f}M |")
    lines += ["", "## Speed-up of the slim network vs its FLOPs ratio", "",
              "efficiency = speed-up / FLOPs ratio: 1.0 means latency fell exactly as the FLOPs did.", "",
              "| slim | format | threads | dense p50 ms | slim p50 ms | speed-up | FLOPs ratio | efficiency |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["speedups"]:
        lines.append(f"| {r['slim']} | {r['format']} | {r['threads']} | {r['dense_p50_ms']:.3f} | {r['slim_p50_ms']:.3f} "
                     f"| {r['speedup']:.2f}x | {r['flops_ratio']:.2f}x | {r['efficiency']:.2f} |")
    lines += ["", "## int8 vs fp32", "", "| bundle | runtime | threads | fp32 p50 ms | int8 p50 ms | int8 speed-up |",
              "|---|---|---:|---:|---:|---:|"]
    for r in result["int8_vs_fp32"]:
        lines.append(f"| {r['bundle']} | {r['runtime']} | {r['threads']} | {r['fp32_p50_ms']:.3f} "
                     f"| {r['int8_p50_ms']:.3f} | {r['speedup']:.2f}x |")
    if result["not_measured"]:
        lines += ["", "Not measured: " + "; ".join(result["not_measured"])]
    lines += ["", "![latency vs FLOPs](latency_vs_flops.png)", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    bundles = [b["name"] for b in result["bundles"]]
    keys = sorted({(r["format"], r["threads"]) for r in result["speedups"]},
                  key=lambda k: (FORMATS.index(k[0]), k[1]))
    lat = {(r["slim"], r["format"], r["threads"]): r["slim_p50_ms"] for r in result["speedups"]}
    lat.update({(bundles[0], r["format"], r["threads"]): r["dense_p50_ms"] for r in result["speedups"]})
    width = 0.8 / max(len(bundles), 1)
    for i, name in enumerate(bundles):
        xs = [k + i * width for k in range(len(keys))]
        left.bar(xs, [lat.get((name, f, t), 0.0) for f, t in keys], width, label=name)
    left.set_xticks([k + width * (len(bundles) - 1) / 2 for k in range(len(keys))])
    left.set_xticklabels([f"{f}\n{t} thr" for f, t in keys], fontsize=8)
    left.set_ylabel("p50 latency (ms)")
    left.set_title("latency per format and thread count")
    left.legend(fontsize=8)

    markers = dict(zip(FORMATS, "osD^"))
    top = 1.0
    for r in result["speedups"]:
        right.scatter(r["flops_ratio"], r["speedup"], marker=markers[r["format"]],
                      color="C0" if r["threads"] == 1 else "C1", s=40)
        top = max(top, r["flops_ratio"], r["speedup"])
    right.plot([1, top * 1.1], [1, top * 1.1], "k--", linewidth=1, label="speed-up = FLOPs ratio")
    for fmt, m in markers.items():
        right.scatter([], [], marker=m, color="grey", label=fmt)
    right.scatter([], [], color="C0", label="1 thread")
    right.scatter([], [], color="C1", label="2+ threads")
    right.set_xlabel("FLOPs ratio dense / slim")
    right.set_ylabel("p50 speed-up dense / slim")
    right.set_title("latency speed-up vs FLOPs reduction")
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def parse_formats(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in FORMATS]
    if bad or not items:
        raise BenchError(f"--formats {text!r}: choose from {', '.join(FORMATS)}")
    return items


def check_run(path: str) -> Path:
    run = Path(path).resolve()
    if not (run / "report.json").is_file():
        raise BenchError(f"{path}: not a finished compress run folder (no report.json)")
    return run


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = Parser(prog="python benchmarks/latency_vs_flops.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--dense", required=True, help="the dense reference run folder (compress --method none)")
    p.add_argument("--slim", required=True, action="append", help="a pruned run folder (repeatable)")
    p.add_argument("--threads", default="1,2", help="interpreter thread counts (default 1,2)")
    p.add_argument("--runs", type=int, default=200, help="timed invokes per measurement (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed invokes first (default 20)")
    p.add_argument("--formats", default=",".join(FORMATS), help="formats to export and measure (default all four)")
    p.add_argument("--out", help="results folder (default benchmarks/results/latency_vs_flops-<slim name>)")
    p.add_argument("--fresh", action="store_true", help="re-export even when OUT/dist/NAME exists")
    try:
        args = p.parse_args(argv)
        formats = parse_formats(args.formats)
        if args.runs < 1 or args.warmup < 0:
            raise BenchError("--runs must be >= 1 and --warmup >= 0")
        if not all(t.strip().isdigit() and int(t) >= 1 for t in args.threads.split(",")):
            raise BenchError(f"--threads {args.threads!r}: expected a comma list of positive integers")
        dense = check_run(args.dense)
        slims = [check_run(s) for s in args.slim]
        names = [r.name for r in [dense, *slims]]
        if len(set(names)) != len(names):
            raise BenchError(f"run folders must have distinct names (bundles are named after them): {names}")
        out = Path(args.out) if args.out else RESULTS / f"latency_vs_flops-{slims[0].name}"
        out = out.resolve()
        info = meta(argv)
        log = out / "logs" / "latency_vs_flops.log"
        reports = []
        from tqdm import tqdm
        for run in tqdm([dense, *slims], desc="export + bench", unit="run", dynamic_ncols=True):
            bundle = bundle_for(run, out, formats, args.fresh, log)
            reports.append(bench(bundle, out, formats, args.threads, args.runs, args.warmup, log))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    not_measured = [f"{rep['bundle']['name']} {r['format']} x{r['threads']}: {r['status']} "
                    f"{r.get('reason') or r.get('error') or ''}".strip()
                    for rep in reports for r in rep["results"] if r["status"] != "ok"]
    not_measured += [f"{rep['bundle']['name']} {s['format']}: {s['reason']}" for rep in reports for s in rep.get("skipped", [])]
    info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    bundles = [{"name": rep["bundle"]["name"], "method": rep["bundle"]["source"].get("method"),
                "top1": rep["bundle"]["source"]["slim"].get("top1"), "flops": rep["bundle"]["source"]["slim"]["flops"],
                "params": rep["bundle"]["source"]["slim"]["params"], "device": rep["device"].get("cpu"),
                "report": str(out / "bench" / f"{rep['bundle']['name']}.json")} for rep in reports]
    result = {"benchmark": "latency_vs_flops", "meta": info, "threads": args.threads, "runs": args.runs,
              "warmup": args.warmup, "formats": formats, "bundles": bundles,
              **compare(reports[0], reports[1:]), "not_measured": not_measured}
    write_json(out / "latency_vs_flops.json", result)
    write_text(out / "latency_vs_flops.md", markdown(result))
    plot(result, out / "latency_vs_flops.png")
    print(f"wrote {out}/latency_vs_flops.md")
    for r in result["speedups"]:
        print(f"  {r['slim']} {r['format']:11s} x{r['threads']}: speed-up {r['speedup']:.2f}x for FLOPs ratio "
              f"{r['flops_ratio']:.2f}x (efficiency {r['efficiency']:.2f})")
    return 1 if not_measured else 0


if __name__ == "__main__":
    sys.exit(main())
