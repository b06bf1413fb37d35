"""Does a latency table predict the measured p50 of networks it has never seen? On this machine.

    python benchmarks/latency_prediction.py [--models vgg16,resnet56] [--formats tflite,tflite-int8] \
        [--threads 1,2] [--configs 6] [--seed 0] [--runs 200] [--data-dir DIR] [--out DIR]

For each model: `python -m device_bench profile MODEL` writes OUT/tables/MODEL.json (kept and
reused; --fresh-tables re-profiles), with its wall time. Then --configs held-out networks: every
channel group keeps a random number of channels (uniform in 20-95 % of its width, random
channels: a random mask cut out with compress.prune.extract), so the widths are not the table's
grid points, written as an ordinary run folder (compress.report.write_run_folder, 256 CIFAR-10
training / 64 test images), exported with `python -m export`, and measured with `python -m
device_bench run --latency-table OUT/tables/MODEL.json`, whose report holds predicted and
measured p50 per format and thread count. Target: every prediction within +-10 % of the measured
p50. Writes OUT/latency_prediction.json, .md and .png (predicted vs measured). A finished
configuration (its bench report exists) is not redone: rerun the same command to continue.

--repredict measures nothing: it predicts every finished network again from its table with
today's table code (the network's kept counts are drawn again from its seed), keeping the
prediction made at measurement time beside it, so a change to how tables predict is judged on
the same measurements.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    DEFAULT_DATA_DIR,
    PYTHON,
    RESULTS,
    BenchError,
    Parser,
    cli,
    code_text,
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

TARGET = 0.10
KEEP_RANGE = (0.20, 0.95)


def parse_args(argv=None):
    p = Parser(prog="python benchmarks/latency_prediction.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vgg16,resnet56")
    p.add_argument("--formats", default="tflite,tflite-int8")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--configs", type=int, default=6, help="held-out networks per model (default 6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-range", default=f"{KEEP_RANGE[0]},{KEEP_RANGE[1]}", metavar="LO,HI",
                   help="share of each group's channels a held-out network keeps, drawn uniformly "
                   f"(default {KEEP_RANGE[0]},{KEEP_RANGE[1]}; what a pruner leaves: e.g. 0.05,0.35)")
    p.add_argument("--runs", type=int, default=200, help="timed invokes per measurement (device_bench run)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder with cifar10.npz")
    p.add_argument("--cache", type=Path, default=None, help="probe cache for device_bench profile")
    p.add_argument("--out", type=Path, default=RESULTS / "latency-prediction")
    p.add_argument("--fresh-tables", action="store_true", help="profile again even if a table exists")
    p.add_argument("--report-only", action="store_true", help="summarise what is finished, measure nothing")
    p.add_argument("--repredict", action="store_true", help="measure nothing; predict the finished networks "
                   "again with today's table code, beside the prediction made when they were measured")
    args = p.parse_args(argv)
    if args.configs < 1:
        raise BenchError("--configs must be at least 1")
    try:
        lo, hi = (float(x) for x in args.keep_range.split(","))
    except ValueError:
        raise BenchError(f"--keep-range {args.keep_range!r}: expected LO,HI, e.g. 0.05,0.35") from None
    if not 0 < lo <= hi <= 1:
        raise BenchError(f"--keep-range {args.keep_range!r}: needs 0 < LO <= HI <= 1")
    args.keep_range = (lo, hi)
    args.report_only = args.report_only or args.repredict
    if not (args.data_dir / "cifar10.npz").is_file() and not args.report_only:
        raise BenchError(f"--data-dir {args.data_dir} has no cifar10.npz")
    return args


def profile_table(model: str, args, log: Path) -> Path:
    table = args.out / "tables" / f"{model}.json"
    if table.is_file() and not args.fresh_tables:
        return table
    cmd = [PYTHON, "-m", "device_bench", "profile", model, "--formats", args.formats, "--threads", args.threads,
           "--out", str(table)]
    if args.cache:
        cmd += ["--cache", str(args.cache)]
    rc, _ = run_logged(cmd, log)
    if rc != 0 or not table.is_file():
        raise BenchError(f"profiling {model} failed (exit {rc}): {tail(log, 1)} (log: {log})")
    return table


def random_masks(groups, seed: int, keep_range=KEEP_RANGE) -> Dict[str, Any]:
    """Per group (name, size), in model order: a boolean mask keeping a random share in `keep_range`
    of random channels. Seeded: the same groups and seed draw the same masks (--repredict)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    masks = {}
    for name, size in groups:
        k = int(np.clip(round(rng.uniform(*keep_range) * size), 1, size))
        mask = np.zeros(size, dtype=bool)
        mask[rng.permutation(size)[:k]] = True
        masks[name] = mask
    return masks


def config_seed(seed: int, model: str, index: int) -> int:
    return seed * 1000 + index + sum(map(ord, model))


def held_out_keep(groups, seed: int, result: Dict[str, Any], keep_range=KEEP_RANGE) -> Dict[str, int]:
    """The kept channels per group of a measured held-out network (`result`, named MODEL-rINDEX) of a
    run with `--seed seed`: drawn again from its seed, as write_random_run drew them."""
    index = int(result["config"].rsplit("-r", 1)[1])
    masks = random_masks(groups, config_seed(seed, result["model"], index), tuple(keep_range))
    return {name: int(mask.sum()) for name, mask in masks.items()}


def repredict(result: Dict[str, Any], table, args) -> None:
    """Predict `result`'s network again with today's table code (a loaded LatencyTable; see the
    module docstring)."""
    keep = held_out_keep(table.groups, args.seed, result, args.keep_range)
    for row in result["rows"]:
        entry = table.find(row["format"], row["threads"])
        if entry is None or row.get("predicted_ms") is None:
            continue
        row.setdefault("predicted_ms_at_measurement", row["predicted_ms"])
        row.setdefault("error_at_measurement", row["error"])
        row["predicted_ms"] = round(float(entry.predict_keep(keep)), 6)
        row["error"] = round(row["predicted_ms"] / row["measured_p50_ms"] - 1, 4)


def write_random_run(model_name: str, folder: Path, *, seed: int, data_dir: Path,
                     keep_range=KEEP_RANGE, width: float = 1.0) -> Dict[str, int]:
    """A run folder holding an untrained `model_name` with random channels kept in every group: a
    share uniform in `keep_range` of each group ((1.0, 1.0): the dense network). Latency only."""
    import torch

    from compress.data import load_dataset, subset
    from compress.flops import count
    from compress.models import build_model
    from compress.prune import arch_of, extract, find_groups
    from compress.report import write_run_folder

    torch.manual_seed(seed)
    model = build_model(model_name, 10, width).eval()
    example = torch.randn(1, 3, 32, 32)
    groups = find_groups(model, example)
    masks = {name: torch.from_numpy(mask) for name, mask in random_masks([(g.name, g.size) for g in groups],
                                                                         seed, keep_range).items()}
    keep = {name: int(mask.sum()) for name, mask in masks.items()}
    slim = extract(model, groups, masks, example).eval()
    data = subset(load_dataset("cifar10", data_dir, download=False), train=256, test=64)
    folder.mkdir(parents=True, exist_ok=True)
    write_run_folder(folder, slim, name=folder.name, method="random", data=data, num_classes=10, target=None,
                     dense_counts=count(model, (1, 3, 32, 32)), dense_top1=None, slim_top1=0.0,
                     arch=arch_of(slim, model_name, 10, width), epochs=0, seconds=0.0, wall_seconds=0.0,
                     config={"model": model_name, "dataset": "cifar10", "seed": seed}, calib=64, seed=seed)
    return keep


def measure_config(model: str, index: int, table: Path, args) -> Dict[str, Any]:
    name = f"{model}-r{index}"
    bench = args.out / "bench" / f"{name}.json"
    log = args.out / "logs" / f"{name}.log"
    if not bench.is_file():
        run, dist = args.out / "runs" / name, args.out / "dist" / name
        if not (run / "report.json").is_file():
            write_random_run(model, run, seed=config_seed(args.seed, model, index),
                             data_dir=args.data_dir, keep_range=args.keep_range)
        if not (dist / "manifest.json").is_file():
            rc, _ = run_logged([PYTHON, "-m", "export", str(run), "--out", str(dist), "--formats", args.formats,
                                "--calib", "64", "--force"], log)
            if rc != 0:
                raise BenchError(f"export of {name} failed (exit {rc}): {tail(log, 1)} (log: {log})")
        rc, _ = run_logged([PYTHON, "-m", "device_bench", "run", str(dist), "--formats", args.formats, "--threads",
                            args.threads, "--runs", str(args.runs), "--latency-table", str(table),
                            "--out", str(bench)], log)
        if rc != 0 or not bench.is_file():
            raise BenchError(f"device_bench run of {name} failed (exit {rc}): {tail(log, 1)} (log: {log})")
    report = read_json(bench)
    source = args.out / "runs" / name / "report.json"
    if source.is_file():
        source = read_json(source)
        flops = round(source["slim"]["flops"] / source["dense"]["flops"], 4)
    else:   # a clone has the bench reports, not the run folders: the last summary has the FLOPs
        flops = earlier_result(args, name).get("flops_fraction")
    return {"model": model, "config": name, "flops_fraction": flops,
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "rows": report["latency_check"]["results"], "warnings": report["latency_check"]["warnings"]}


def earlier_result(args, name: str) -> Dict[str, Any]:
    path = args.out / "latency_prediction.json"
    earlier = read_json(path).get("results", []) if path.is_file() else []
    return next((r for r in earlier if r.get("config") == name), {})


def summarize(results: List[Dict[str, Any]], tables: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    groups: Dict[tuple, List[float]] = {}
    for r in results:
        for row in r["rows"]:
            if row.get("error") is not None:
                groups.setdefault((r["model"], row["format"], row["threads"]), []).append(row["error"])
    out = []
    for (model, fmt, threads), errors in sorted(groups.items()):
        entry = next((e for e in tables.get(model, {}).get("entries", [])
                      if e["format"] == fmt and e["threads"] == threads), {})
        out.append({"model": model, "format": fmt, "threads": threads, "n": len(errors),
                    "mean_error": round(sum(errors) / len(errors), 4),
                    "max_abs_error": round(max(abs(e) for e in errors), 4),
                    "within_target": sum(abs(e) <= TARGET for e in errors),
                    "table_noise": entry.get("noise", {}).get("median_spread")})
    return out


def plot(results: List[Dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    models = sorted({r["model"] for r in results})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 5), squeeze=False)
    colors = {}
    for ax, model in zip(axes[0], models):
        top = 0.0
        for r in (r for r in results if r["model"] == model):
            for row in r["rows"]:
                if row.get("predicted_ms") is None:
                    continue
                key = f"{row['format']} x{row['threads']}"
                color = colors.setdefault(key, f"C{len(colors)}")
                ax.scatter(row["measured_p50_ms"], row["predicted_ms"], color=color, s=24,
                           label=key if key not in ax.get_legend_handles_labels()[1] else None)
                top = max(top, row["measured_p50_ms"], row["predicted_ms"])
        line = [0, top * 1.08]
        ax.plot(line, line, color="black", lw=0.8)
        ax.fill_between(line, [v * (1 - TARGET) for v in line], [v * (1 + TARGET) for v in line], color="grey",
                        alpha=0.15, label=f"±{TARGET * 100:.0f} %")
        ax.set_xlim(0, line[1])
        ax.set_ylim(0, line[1])
        ax.set_xlabel("measured p50 (ms)")
        ax.set_ylabel("predicted by the latency table (ms)")
        ax.set_title(f"{model}: held-out widths")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def markdown(doc: Dict[str, Any]) -> str:
    lines = ["# Latency table: predicted vs measured p50 on held-out widths", ""] + meta_markdown(doc["meta"])
    again = doc["meta"].get("repredicted")
    if again:
        lines += [f"- predictions made again on {again['created']} by `{again['command']}` at code "
                  f"{code_text(again.get('code'))}: the measurements above, that code's table predictions "
                  f"(the ones made at measurement time in the last columns)"]
    lines += [f"- load average at the end: {doc.get('load_average_end')}", "",
              f"Target: every prediction within ±{TARGET * 100:.0f} % of the measured p50.", "",
              "| model | format | threads | networks | mean error | max abs error | within ±10 % | table noise |",
              "|---|---|---|---|---|---|---|---|"]
    for s in doc["summary"]:
        lines.append(f"| {s['model']} | {s['format']} | {s['threads']} | {s['n']} | {s['mean_error'] * 100:+.1f} % | "
                     f"{s['max_abs_error'] * 100:.1f} % | {s['within_target']}/{s['n']} | "
                     f"{(s['table_noise'] or 0) * 100:.1f} % |")
    lines += ["", "Profile wall time (`python -m device_bench profile`, all formats and thread counts above, "
              "probe cache empty unless said):", "", "| model | wall | probes converted | entries |", "|---|---|---|---|"]
    for model, t in doc["profiles"].items():
        lines.append(f"| {model} | {t['wall_seconds'] / 60:.1f} min | {t['probes_converted']} | {t['entries']} |")
    then = " predicted then | error then |" if again else ""
    lines += ["", "Every network:", "", "| network | FLOPs | format | threads | measured p50 | predicted | error |" + then,
              "|---|---|---|---|---|---|---|" + ("---|---|" if again else "")]

    def ms(v):
        return f"{v:.3f}" if v is not None else "–"

    def pct(v):
        return f"{v * 100:+.1f} %" if v is not None else "–"

    for r in doc["results"]:
        for row in r["rows"]:
            flops = f"{r['flops_fraction'] * 100:.0f} %" if r.get("flops_fraction") is not None else "–"
            cells = [r["config"], flops, row["format"], str(row["threads"]),
                     ms(row["measured_p50_ms"]), ms(row.get("predicted_ms")), pct(row.get("error"))]
            if again:
                cells += [ms(row.get("predicted_ms_at_measurement")), pct(row.get("error_at_measurement"))]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![predicted vs measured](latency_prediction.png)", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = meta(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    results, tables, profiles, failed = [], {}, {}, []
    for model in models:
        table_path = args.out / "tables" / f"{model}.json"
        if not args.report_only:
            print(f"{model}: profiling ...", file=sys.stderr, flush=True)
            profile_table(model, args, args.out / "logs" / f"{model}-profile.log")
        if not table_path.is_file():
            continue
        tables[model] = read_json(table_path)
        if args.repredict:   # loaded once: the calibration is derived from the anchors at load
            from device_bench.latency_table import load_table
            table = load_table(table_path)
        p = tables[model]["profile"]
        profiles[model] = {"wall_seconds": p["wall_seconds"], "probes_converted": p["probes_converted"],
                           "entries": len(tables[model]["entries"])}
        for i in range(args.configs):
            bench = args.out / "bench" / f"{model}-r{i}.json"
            if args.report_only and not bench.is_file():
                continue
            try:
                started_at = time.time()
                results.append(measure_config(model, i, table_path, args))
                if args.repredict:
                    repredict(results[-1], table, args)
                print(f"{model}-r{i}: " + ", ".join(
                    f"{row['format']} x{row['threads']} {row['error'] * 100:+.1f} %" for row in results[-1]["rows"]
                    if row.get("error") is not None) + f" ({time.time() - started_at:.0f} s)", file=sys.stderr, flush=True)
            except BenchError as e:
                failed.append(str(e))
                print(f"FAILED {e}", file=sys.stderr, flush=True)
    started["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if args.repredict:   # the measurements are the earlier run's: its provenance stays, today's code is added
        earlier = read_json(args.out / "latency_prediction.json") if (args.out / "latency_prediction.json").is_file() else {}
        started = {**earlier.get("meta", started), "repredicted": started}
        load_end = earlier.get("load_average_end")
    else:
        load_end = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    doc = {"meta": started, "target": TARGET, "keep_range": list(args.keep_range), "load_average_end": load_end,
           "profiles": profiles, "summary": summarize(results, tables), "results": results, "failed": failed}
    write_json(args.out / "latency_prediction.json", doc)
    if results:
        plot(results, args.out / "latency_prediction.png")
    write_text(args.out / "latency_prediction.md", markdown(doc))
    print(f"wrote {args.out / 'latency_prediction.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    cli(main)
