"""Latency-targeted vs FLOPs-targeted pruning at equal measured latency, on this machine.

    python benchmarks/latency_target.py [--models resnet56,vgg16] [--targets 0.5,0.76] \
        [--format tflite-int8] [--threads 1] [--tables DIR] [--epochs 4] [--rounds 3] [--data-dir DIR] [--out DIR] \
        [--kinds flops,latency,depth]

For each model and FLOPs reduction T (default: ResNet-56 0.5 and 0.76, VGG-16 0.76 and 0.9; --targets
sets one list for every model), with the seed method and the same 4-epoch schedule
(methods.py's cpu preset: full CIFAR-10, compress's cpu preset with --epochs 4):

1. FLOPs-targeted: `python -m compress --method seed --target flops=T` -> OUT/runs/M-flops-T.
2. Its bundle (`python -m export`, the entry's format) measured with `python -m device_bench run`,
   --rounds interleaved rounds with the dense network: the median p50 is the budget B the
   latency-targeted run gets. Right before, in the same quiet stretch,
   the table's whole-network anchors are timed again (`device_bench profile --recalibrate`, into
   OUT/tables/M-recalibrated.json; --no-recalibrate: the table as it is) and the dense network is measured: a
   VM host's speed moves by 20 % within an hour, and the budget, the table and the dense reference
   must be in the same currency.
3. Latency-targeted: `--target latency=Bms --latency-table TABLE --format F --threads N`
   -> OUT/runs/M-latency-T (the table: OUT/../latency-prediction/tables/M.json, made by
   benchmarks/latency_prediction.py, or profiled here when missing). With --kinds ...,depth also the
   same budget with --remove-branches (residual branches may go whole) -> OUT/runs/M-depth-T.
4. A final pass measures the dense network (untrained, every channel: latency only) and every
   bundle again, --rounds interleaved rounds, the median of the rounds' p50 per bundle, so that all
   the numbers compared come from one stretch of time on the host. The host's drift since step 2
   is the dense network's p50 now over then; p50 / B is reported as measured and corrected by it.

Reported per pair: top-1, measured p50 (and p50 / B), predicted p50 (the table), FLOPs
reduction, speed-up over dense, FLOPs ratio and efficiency = speed-up / FLOPs ratio. Goals
(issue 16): the latency-targeted network at least as accurate at equal measured latency, its
p50 within +-10 % of B, and on ResNet-56 efficiency >= 0.85. Training runs are resumable (a killed
run continues from its checkpoint); a finished step is not redone. Writes OUT/latency_target.json,
.md and .png.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    DEFAULT_DATA_DIR,
    PYTHON,
    RESULTS,
    BenchError,
    Parser,
    cli,
    lock_folder,
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
from benchmarks.latency_prediction import write_random_run  # noqa: E402

TOLERANCE = 0.10        # measured p50 within +-10 % of the budget
QUIET_LOAD = 0.9        # a measurement waits until the 1-min load average is below this ...
QUIET_WAIT = 45 * 60    # ... for at most this long (s; --quiet-wait), then measures anyway and records the load
EFFICIENCY_GOAL = 0.85  # ResNet-56: speed-up >= 0.85 x FLOPs ratio
DEFAULT_TARGETS = {"resnet56": (0.5, 0.76), "vgg16": (0.76, 0.9)}
KINDS = {"flops": "FLOPs-targeted", "latency": "latency-targeted", "depth": "latency-targeted + branch removal"}


class NoRoom(BenchError):
    """The FLOPs-targeted network is predicted no faster than dense: there is no latency budget to prune to."""


def parse_args(argv=None):
    p = Parser(prog="python benchmarks/latency_target.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet56,vgg16")
    p.add_argument("--targets", default=None, help="FLOPs reductions of the FLOPs-targeted runs, one list for "
                   "every model (default: ResNet-56 0.5,0.76; VGG-16 0.76,0.9; others 0.5,0.76)")
    p.add_argument("--format", default="tflite-int8", help="the table entry the budget is in (default tflite-int8)")
    p.add_argument("--threads", type=int, default=1, help="its interpreter threads (default 1)")
    p.add_argument("--tables", type=Path, default=RESULTS / "latency-prediction" / "tables",
                   help="folder with MODEL.json latency tables (profiled here when missing)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=300, help="timed invokes per measurement")
    p.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds in the final pass")
    p.add_argument("--quiet-wait", type=float, default=QUIET_WAIT, help="seconds a measurement may wait for the "
                   f"1-min load average to fall below {QUIET_LOAD} (default {QUIET_WAIT}; 0: measure at once)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder with cifar10.npz")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier of the models (and their tables)")
    p.add_argument("--profile-flags", default="", help="more device_bench profile flags, e.g. '--grid coarse'")
    p.add_argument("--extra", default="", help="more compress flags for every run (smoke tests: '--train-subset 256')")
    p.add_argument("--out", type=Path, default=RESULTS / "latency-target")
    p.add_argument("--kinds", default="flops,latency", help="runs per budget: flops (always: it sets the budget), "
                   "latency (latency-targeted), depth (latency-targeted with --remove-branches: residual branches may "
                   "go whole); default flops,latency")
    p.add_argument("--recalibrate", action=argparse.BooleanOptionalAction, default=True,
                   help="time the table's anchors again right before the budgets are measured (default on)")
    p.add_argument("--report-only", action="store_true", help="summarise what is finished, run nothing")
    args = p.parse_args(argv)
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.targets is None:
        args.model_targets = {m: list(DEFAULT_TARGETS.get(m, (0.5, 0.76))) for m in args.model_list}
    else:
        try:
            targets = [float(t) for t in args.targets.split(",") if t.strip()]
        except ValueError:
            raise BenchError(f"--targets {args.targets!r}: expected comma-separated reductions like 0.5,0.76") from None
        if not targets or not all(0 < t < 1 for t in targets):
            raise BenchError(f"--targets {args.targets!r}: every reduction must lie strictly between 0 and 1")
        args.model_targets = {m: targets for m in args.model_list}
    args.kind_list = ["flops"] + [k.strip() for k in args.kinds.split(",") if k.strip() and k.strip() != "flops"]
    unknown = set(args.kind_list) - set(KINDS)
    if unknown or len(set(args.kind_list)) != len(args.kind_list):
        raise BenchError(f"--kinds {args.kinds!r}: choose from {', '.join(KINDS)}, each once")
    if args.threads < 1 or args.rounds < 1 or args.epochs < 1 or args.runs < 1:
        raise BenchError("--threads, --rounds, --runs and --epochs must be at least 1")
    if not 0 < args.width <= 4:
        raise BenchError(f"--width {args.width:g}: expected a multiplier in (0, 4]")
    if not (args.data_dir / "cifar10.npz").is_file() and not args.report_only:
        raise BenchError(f"--data-dir {args.data_dir} has no cifar10.npz")
    return args


# ---------------------------------------------------------------------------------------------
# steps, each skipped when its output exists


def table_for(model: str, args) -> Path:
    table = args.tables / f"{model}.json"
    if not table.is_file():
        log = args.out / "logs" / f"{model}-profile.log"
        rc, _ = run_logged([PYTHON, "-m", "device_bench", "profile", model, "--formats", args.format,
                            "--threads", str(args.threads), "--width", f"{args.width:g}", *args.profile_flags.split(),
                            "--out", str(table)], log)
        if rc != 0 or not table.is_file():
            raise BenchError(f"profiling {model} failed (exit {rc}): {tail(log, 1)} (log: {log})")
    return table


def recalibrated(table: Path, model: str, args) -> Path:
    """OUT/tables/MODEL-recalibrated.json: `table` with its anchors timed again now (once; kept for a
    resumed run)."""
    out = args.out / "tables" / f"{model}-recalibrated.json"
    if not out.is_file():
        wait_quiet(args.quiet_wait)
        log = args.out / "logs" / f"{model}-recalibrate.log"
        rc, _ = run_logged([PYTHON, "-m", "device_bench", "profile", "--recalibrate", str(table), "--out", str(out)], log)
        if rc != 0 or not out.is_file():
            raise BenchError(f"recalibrating {table} failed (exit {rc}): {tail(log, 1)} (log: {log})")
    return out


def train(name: str, target: List[str], args) -> Path:
    """A seed-method run folder OUT/runs/NAME (resumed from its checkpoint after a kill)."""
    run = args.out / "runs" / name
    if (run / "report.json").is_file():
        return run
    cmd = [PYTHON, "-m", "compress", "--method", "seed", "--preset", "cpu", "--epochs", str(args.epochs),
           "--eval-every", str(args.epochs), "--seed", str(args.seed), "--model", name.split("-")[0],
           "--width", f"{args.width:g}",
           "--data-dir", str(args.data_dir), "--out", str(run), "--no-progress", *target, *args.extra.split()]
    partial = run.with_name(run.name + ".partial")
    if (partial / "checkpoint.pt").is_file():
        cmd.append("--resume")
    elif partial.exists():
        cmd.append("--force")
    log = args.out / "logs" / f"{name}.log"
    rc, seconds = run_logged(cmd, log)
    if rc != 0 or not (run / "report.json").is_file():
        if "is not below the dense network's predicted" in tail(log, 1):
            raise NoRoom(tail(log, 1).removeprefix("compress: error: "))
        raise BenchError(f"{name}: compress failed (exit {rc}): {tail(log, 1)} (log: {log})")
    walls_path = args.out / "wall_times.json"
    walls = read_json(walls_path) if walls_path.is_file() else {}
    walls[name] = round(walls.get(name, 0.0) + seconds if "--resume" in cmd else seconds, 1)
    write_json(walls_path, walls)
    return run


def bundle(run: Path, args) -> Path:
    dist = args.out / "dist" / run.name
    if not (dist / "manifest.json").is_file():
        log = args.out / "logs" / f"{run.name}.log"
        rc, _ = run_logged([PYTHON, "-m", "export", str(run), "--out", str(dist), "--formats", args.format,
                            "--force"], log)
        if rc != 0:
            raise BenchError(f"export of {run.name} failed (exit {rc}): {tail(log, 1)} (log: {log})")
    return dist


def wait_quiet(limit: float) -> float:
    """Wait (at most `limit` s) until nothing else loads the host (another job, the training this
    script just ran); returns the load average the measurement starts at."""
    started = time.time()
    while os.getloadavg()[0] >= QUIET_LOAD and time.time() - started < limit:
        time.sleep(10)
    return round(os.getloadavg()[0], 2)


def measure(dist: Path, table: Path, tag: str, args, budget_ms: Optional[float] = None) -> Dict[str, Any]:
    """device_bench run of one bundle in the entry's format: its latency_check row (measured, predicted)
    and the load average it started at."""
    report = args.out / "bench" / f"{dist.name}-{tag}.json"
    load_path = report.with_suffix(".load")
    if not report.is_file():
        write_text(load_path, f"{wait_quiet(args.quiet_wait)}\n")
        cmd = [PYTHON, "-m", "device_bench", "run", str(dist), "--formats", args.format, "--threads",
               str(args.threads), "--runs", str(args.runs), "--latency-table", str(table), "--out", str(report)]
        if budget_ms is not None:
            cmd += ["--budget-ms", f"{budget_ms:.4f}"]
        log = args.out / "logs" / f"{dist.name}.log"
        rc, _ = run_logged(cmd, log)
        # exit 1 = the budget was missed: the report is written and says so; that is a result here
        if rc not in (0, 1) or not report.is_file():
            raise BenchError(f"device_bench run of {dist.name} failed (exit {rc}): {tail(log, 1)} (log: {log})")
    rows = read_json(report)["latency_check"]["results"]
    if len(rows) != 1:
        raise BenchError(f"{report}: expected one {args.format} x{args.threads} result, got {len(rows)}")
    load = float(load_path.read_text()) if load_path.is_file() else None
    return {**rows[0], "load_average": load}


def dense_run(model: str, args) -> Path:
    run = args.out / "runs" / f"{model}-dense"
    if not (run / "report.json").is_file():
        write_random_run(model, run, seed=args.seed, data_dir=args.data_dir, keep_range=(1.0, 1.0), width=args.width)
    return run


# ---------------------------------------------------------------------------------------------
# the benchmark


def pct(t: float) -> str:
    return f"{round(t * 100):02d}"


def run_model(model: str, args) -> List[Dict[str, Any]]:
    table = table_for(model, args)
    targets = args.model_targets[model]
    pairs = []
    # Train every FLOPs-targeted run first, then measure their budgets in one quiet stretch.
    for t in targets:
        train(f"{model}-flops-{pct(t)}", ["--target", f"flops={t:g}"], args)
    flops_dists = {t: bundle(args.out / "runs" / f"{model}-flops-{pct(t)}", args) for t in targets}
    dense_dist = bundle(dense_run(model, args), args)
    if args.recalibrate:
        table = recalibrated(table, model, args)
    # Each budget is the median of --rounds interleaved rounds, as in the final pass: one measurement
    # of a 0.2 ms VGG-16 put its budget 25 % above what the final pass measured (latency-target-xeon-vgg16-s0).
    then: Dict[Any, List[float]] = {key: [] for key in ("dense", *targets)}
    for r in range(args.rounds):
        for key, dist in (("dense", dense_dist), *((t, flops_dists[t]) for t in targets)):
            then[key].append(measure(dist, table, "budget" if r == 0 else f"budget{r}", args)["measured_p50_ms"])
    dense_then = statistics.median(then["dense"])
    budgets = {t: statistics.median(then[t]) for t in targets}
    no_room: Dict[tuple, str] = {}
    for t in targets:
        b = budgets[t]
        print(f"{model} flops={t:g}: measured p50 {b:.4f} ms -> latency budget", file=sys.stderr, flush=True)
        for kind in args.kind_list[1:]:
            try:
                train(f"{model}-{kind}-{pct(t)}", ["--target", f"latency={b:.4f}ms", "--latency-table", str(table),
                                                   "--format", args.format, "--threads", str(args.threads),
                                                   *(["--remove-branches"] if kind == "depth" else [])], args)
            except NoRoom as e:   # a result, not a failure: FLOPs bought no predicted latency here
                no_room[(kind, t)] = str(e)
    dists = {"dense": dense_dist}
    for t in targets:
        for kind in args.kind_list:
            if (kind, t) not in no_room:
                dists[f"{kind}-{pct(t)}"] = bundle(args.out / "runs" / f"{model}-{kind}-{pct(t)}", args)
    # Final pass: every bundle once per round, rounds interleaved.
    p50: Dict[str, List[float]] = {k: [] for k in dists}
    predicted: Dict[str, Optional[float]] = {}
    loads: List[float] = []
    for r in range(args.rounds):
        for key, dist in dists.items():
            row = measure(dist, table, f"final{r}", args)
            p50[key].append(row["measured_p50_ms"])
            predicted[key] = row["predicted_ms"]
            loads.append(row["load_average"] or 0.0)
    med = {k: statistics.median(v) for k, v in p50.items()}
    dense_report = read_json(args.out / "runs" / f"{model}-dense" / "report.json")
    drift = med["dense"] / dense_then   # < 1: the host runs faster now than when the budgets were measured
    for t in targets:
        for (kind, tt), why in no_room.items():
            if tt == t:
                pairs.append({"model": model, "flops_target": t, "kind": kind, "budget_ms": budgets[t], "no_room": why})
        for kind in args.kind_list:
            key = f"{kind}-{pct(t)}"
            if key not in dists:
                continue
            rep = read_json(args.out / "runs" / f"{model}-{key}" / "report.json")
            flops_ratio = dense_report["slim"]["flops"] / rep["slim"]["flops"]
            speedup = med["dense"] / med[key]
            pairs.append({
                "model": model, "flops_target": t, "kind": kind, "run": f"{model}-{key}",
                "budget_ms": budgets[t], "top1": rep["slim"]["top1"],
                "flops_reduction": round(1 - 1 / flops_ratio, 4),
                "params_reduction": round(1 - rep["slim"]["params"] / dense_report["slim"]["params"], 4),
                "p50_ms": round(med[key], 4), "p50_rounds_ms": p50[key], "predicted_ms": predicted[key],
                "p50_over_budget": round(med[key] / budgets[t], 4), "dense_p50_ms": round(med["dense"], 4),
                "dense_p50_at_budget_ms": round(dense_then, 4), "host_drift": round(drift, 4),
                "p50_over_budget_drift_corrected": round(med[key] / (budgets[t] * drift), 4),
                "speedup": round(speedup, 3), "flops_ratio": round(flops_ratio, 3),
                "efficiency": round(speedup / flops_ratio, 3), "max_load_at_measurement": max(loads),
                "widths": {layer["name"]: layer["after"] for layer in rep.get("layers", [])},
                "removed_branches": (((rep.get("pruning") or {}).get("seed") or {}).get("depth") or {}).get("removed"),
            })
    return pairs


def verdicts(pairs: List[Dict[str, Any]]) -> List[str]:
    out = []
    for model in sorted({p["model"] for p in pairs}):
        for t in sorted({p["flops_target"] for p in pairs if p["model"] == model}):
            here = [p for p in pairs if p["model"] == model and p["flops_target"] == t]
            f = next(p for p in here if p["kind"] == "flops")
            for lat in (p for p in here if p["kind"] != "flops"):
                name = KINDS.get(lat["kind"], lat["kind"])
                if "no_room" in lat:
                    out.append(f"{model}, flops={t:g}: no {name} run: {lat['no_room']}")
                    continue
                d = (lat["top1"] - f["top1"]) * 100
                text = (f"{model}, budget {lat['budget_ms']:.3f} ms (the flops={t:g} run's p50): {name} "
                        f"{lat['top1'] * 100:.2f} % at {lat['p50_ms']:.3f} ms vs FLOPs-targeted {f['top1'] * 100:.2f} % "
                        f"at {f['p50_ms']:.3f} ms ({d:+.2f} pp; p50 {budget_text(lat)})")
                if model.startswith("resnet"):
                    text += (f"; efficiency {lat['efficiency']:.2f} / FLOPs-targeted {f['efficiency']:.2f} "
                             f"(goal ≥ {EFFICIENCY_GOAL})")
                if lat.get("removed_branches") is not None:
                    text += f"; {len(lat['removed_branches'])} residual branches removed"
                out.append(text)
    return out


def budget_text(p: Dict[str, Any]) -> str:
    """p50 against the budget, as measured and, when the host's drift was measured, corrected by it."""
    def within(r: float) -> str:
        return f"{(r - 1) * 100:+.1f} %: {'within' if abs(r - 1) <= TOLERANCE else 'outside'} ±{TOLERANCE * 100:.0f} %"
    text = f"{within(p['p50_over_budget'])} of the budget"
    if p.get("host_drift") is not None:
        text += (f"; host {p['host_drift']:.3f}x as slow as when the budget was measured (dense "
                 f"{p['dense_p50_at_budget_ms']:.3f} -> {p['dense_p50_ms']:.3f} ms), corrected "
                 f"{within(p['p50_over_budget_drift_corrected'])}")
    return text


def plot(pairs: List[Dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    models = sorted({p["model"] for p in pairs})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for kind, marker, color in (("flops", "o", "C0"), ("latency", "s", "C1"), ("depth", "^", "C2")):
            pts = sorted((p for p in pairs if p["model"] == model and p["kind"] == kind and "p50_ms" in p),
                         key=lambda p: p["p50_ms"])
            if pts:
                ax.plot([p["p50_ms"] for p in pts], [p["top1"] * 100 for p in pts], marker=marker, color=color,
                        label=f"{KINDS[kind]} (seed)")
        for b in sorted({p["budget_ms"] for p in pairs if p["model"] == model}):
            ax.axvline(b, color="grey", lw=0.6, ls="--")
        ax.set_xlabel("measured p50 (ms), dashed: budgets")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{model}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def markdown(doc: Dict[str, Any]) -> str:
    a = doc["args"]
    lines = ["# Latency-targeted vs FLOPs-targeted pruning at equal measured latency", ""] + meta_markdown(doc["meta"])
    lines += [f"- entry: {a['format']} x{a['threads']}; seed method, {a['epochs']} epochs, seed {a['seed']}; "
              f"final pass {a['rounds']} interleaved rounds of {a['runs']} invokes (median p50)", ""]
    lines += ["| model | run | budget (ms) | top-1 | FLOPs | params | p50 (ms) | p50 / budget (drift-corrected) | "
              "predicted (ms) | speed-up | FLOPs ratio | efficiency |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in doc["pairs"]:
        if "no_room" in p:
            lines.append(f"| {p['model']} | {p['kind']} (flops={p['flops_target']:g} p50) | {p['budget_ms']:.3f} | "
                         f"not run: {p['no_room']} |||||||||")
            continue
        pred = f"{p['predicted_ms']:.3f}" if p.get("predicted_ms") is not None else "–"
        corrected = (f" ({p['p50_over_budget_drift_corrected']:.3f})"
                     if p.get("p50_over_budget_drift_corrected") is not None else "")
        lines.append(f"| {p['model']} | {p['kind']} (flops={p['flops_target']:g} p50) | {p['budget_ms']:.3f} | "
                     f"{p['top1'] * 100:.2f} % | −{p['flops_reduction'] * 100:.1f} % | −{p['params_reduction'] * 100:.1f} % | "
                     f"{p['p50_ms']:.3f} | {p['p50_over_budget']:.3f}{corrected} | {pred} | {p['speedup']:.2f}× | "
                     f"{p['flops_ratio']:.2f}× | {p['efficiency']:.2f} |")
    lines += ["", *[f"- {v}" for v in doc["verdicts"]], "", "![top-1 vs measured p50](latency_target.png)", ""]
    if doc["failed"]:
        lines += ["Failed:", *[f"- {f}" for f in doc["failed"]], ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = meta(argv)
    pairs_path = args.out / "pairs.json"
    done = read_json(pairs_path) if pairs_path.is_file() else {}
    failed = []
    lock = None if args.report_only else lock_folder(args.out)
    for model in args.model_list:
        if args.report_only or model in done:
            continue
        t0 = time.time()
        try:
            done[model] = run_model(model, args)
            write_json(pairs_path, done)
            print(f"{model}: done ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        except BenchError as e:
            failed.append(str(e))
            print(f"FAILED {e}", file=sys.stderr, flush=True)
    del lock
    pairs = [p for m in args.model_list for p in done.get(m, [])]
    started["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    doc = {"meta": started, "args": {k: getattr(args, k) for k in ("format", "threads", "epochs", "seed", "runs",
                                                                    "rounds", "width", "extra", "kinds",
                                                                    "recalibrate")},
           "pairs": pairs, "verdicts": verdicts(pairs), "failed": failed}
    write_json(args.out / "latency_target.json", doc)
    if pairs:
        plot(pairs, args.out / "latency_target.png")
    write_text(args.out / "latency_target.md", markdown(doc))
    print(f"wrote {args.out / 'latency_target.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    cli(main)
