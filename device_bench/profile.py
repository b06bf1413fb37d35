"""`device_bench profile MODEL_OR_RUN [--host user@board]`: measure a latency table on a board.

Two passes, each: build probe files on the host (probes.py: export's converters, cached), ship
them with the deploy machinery (or use them in place when profiling this machine), time them on
the board (_profile_worker.py), fetch the timings.

1. The plateaus. One 3x3 conv is swept over input and output widths (GRIDS: 1, 2..32 by 2,
   40..128 by 8) per format and thread count: where the latency is flat (the runtime pads to its SIMD
   tiles), latency_table.find_flat_gaps records it. Plus the "null" probe (an invoke with one
   trivial op), which every probe's time is taken net of.
2. The grid. Every distinct layer shape of the model is timed at input/output widths at fixed
   fractions (1/8, 1/4, 1/2, 3/4, 1) of its widest use (plus every fixed and every dense width), snapped to plateau tops; and the
   whole network at several widths (ANCHORS), which gives the curve from the sum of layers to the
   network's latency (latency_table docstring).

The table is written atomically (docs/formats.md §4).
"""
from __future__ import annotations

import copy
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np

from . import __version__
from . import latency_table as lt
from ._profile_worker import PROBESET_KIND, PROGRESS, TIMINGS_KIND
from .errors import FAILED, BenchError
from .files import write_json_atomic

# The probe grids: "full" (the default) and "coarse" (a quarter of the probes: a first look, CI).
GRIDS = {
    "full": {"sweep": [1] + list(range(2, 33, 2)) + list(range(40, 129, 8)),
             "fractions": (1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0)},
    "coarse": {"sweep": [1, 4, 8, 12, 16, 24, 32, 48, 64], "fractions": (1 / 4, 1 / 2, 1.0)},
}
SWEEP_OTHER = 64  # the fixed width while the other one is swept
# Whole networks timed for the calibration curve (latency_table docstring): every group kept at
# these fractions, plus UNEVEN networks whose groups keep seeded random shares in UNEVEN_RANGE
# (pruned networks are uneven; their layer sums fall between the uniform ones').
ANCHORS = {"dense": 1.0, "three-quarter": 0.75, "half": 0.5, "quarter": 0.25, "eighth": 0.125}
UNEVEN, UNEVEN_RANGE = 2, (0.2, 0.95)
TOLERANCE = (0.02, 0.08)  # a "flat" gap's relative rise: from the timing spread, within these bounds


@dataclass
class ProfileConfig:
    formats: List[str]
    threads: List[int]
    cache: Path
    rounds: int = 5
    burst_ms: float = 10.0
    grid: str = "full"  # a key of GRIDS

    @property
    def sweep(self) -> List[int]:
        return GRIDS[self.grid]["sweep"]

    @property
    def fractions(self) -> Tuple[float, ...]:
        return GRIDS[self.grid]["fractions"]


@dataclass
class ModelSource:
    model: Any  # nn.Module, dense
    example: Any  # torch tensor (1, 3, H, W)
    info: Dict[str, Any]  # the table's `model` object
    ignore: List[str] = field(default_factory=list)


# --------------------------------------------------------------------------- what to profile


def resolve_model(target: str, num_classes: int, width: float, input_size: int,
                  ignore: Sequence[str] = ()) -> ModelSource:
    """A zoo name, package.module:factory / file.py:factory, or a run folder (runs/NAME with
    arch.json): then the *dense* model it was pruned from, at its input size."""
    import torch

    from compress.errors import UserError
    from compress.models import build_model

    source, path = None, Path(target)
    if path.is_dir():
        arch_file = path / "arch.json"
        if not arch_file.is_file():
            raise BenchError(f"{target} is a folder without arch.json: not a run folder (runs/NAME)")
        try:
            arch = json.loads(arch_file.read_text())
            spec, num_classes, width = str(arch["model"]), int(arch["num_classes"]), float(arch["width"])
        except (ValueError, KeyError, TypeError) as e:
            raise BenchError(f"{arch_file}: not a valid arch.json ({type(e).__name__}: {e})") from None
        report = path / "report.json"
        if report.is_file():
            try:
                shape = json.loads(report.read_text())["input"]["shape"]
                input_size = int(shape[2]) if int(shape[2]) == int(shape[3]) else input_size
            except (ValueError, KeyError, TypeError, IndexError):
                pass
        source = str(path)
    else:
        spec = target
    try:
        model = build_model(spec, num_classes, width).eval()
    except UserError as e:
        raise BenchError(str(e)) from None
    example = torch.randn(1, 3, input_size, input_size)
    info = {"spec": spec, "num_classes": num_classes, "width": width, "input": [1, 3, input_size, input_size],
            "source": source}
    return ModelSource(model, example, info, list(ignore))


# --------------------------------------------------------------------------- the probe set


def write_probeset(folder: Path, entries: List[Dict[str, Any]]) -> List[str]:
    """probes.json + the files (symlinks into the cache) under `folder`; the relative file list."""
    folder.mkdir(parents=True, exist_ok=True)
    listing, files = [], []
    for e in entries:
        rels = {}
        for fmt, path in e["files"].items():
            rel = f"{fmt}/{path.name}"
            link = folder / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                os.symlink(path.resolve(), link)
            rels[fmt] = rel
            files.append(rel)
        listing.append({"id": e["id"], "kind": e["kind"], "files": rels})
    (folder / "probes.json").write_text(json.dumps({"schema": 1, "kind": PROBESET_KIND, "probes": listing}, indent=1))
    return ["probes.json"] + sorted(set(files))


class Bar:
    """tqdm when stderr is a terminal, else a line now and then (logs, CI)."""

    def __init__(self, total: int, desc: str):
        self.total, self.done, self.desc, self.bar, self.last = total, 0, desc, None, 0.0
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="probe", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n: int, text: str = "") -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if text:
                self.bar.set_postfix_str(text[:60], refresh=False)
        elif time.time() - self.last > 5 or self.done >= self.total:
            self.last = time.time()
            print(f"{self.desc}: {self.done}/{self.total} {text}", file=sys.stderr, flush=True)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Board:
    """Where the probes are timed: this machine (a subprocess) or a board over SSH."""

    def __init__(self, remote=None):
        self.remote = remote  # (target, ssh options, BoardConfig) or None

    @property
    def label(self) -> str:
        return self.remote[0].label if self.remote else socket.gethostname()

    def time(self, folder: Path, files: List[str], cfg: ProfileConfig, what: str) -> Dict[str, Any]:
        args = ["--formats", ",".join(cfg.formats), "--threads", ",".join(map(str, cfg.threads)),
                "--rounds", str(cfg.rounds), "--burst-ms", str(cfg.burst_ms)]
        bar = Bar(0, f"timing {what} on {self.label}")

        def on_line(line: str) -> None:
            if line.startswith(PROGRESS):
                _, done, total, *text = line.split()
                if bar.total != int(total):
                    bar.total = int(total)
                    if bar.bar is not None:
                        bar.bar.reset(total=bar.total)
                        bar.bar.update(bar.done)
                bar.update(int(done) - bar.done, " ".join(text))
            elif line.strip():
                bar.write(f"{self.label}: {line}")
        try:
            if self.remote is None:
                timings = self._local(folder, args, on_line)
            else:
                timings = self._remote(folder, files, args, on_line, bar)
        finally:
            bar.close()
        if timings.get("kind") != TIMINGS_KIND:
            raise BenchError(f"{self.label}: the board's timings are not a timings report", exit_code=FAILED)
        failed = [r for r in timings["results"] if r["status"] != "ok"]
        if failed:
            r = failed[0]
            raise BenchError(f"{self.label}: timing {r['format']} x{r['threads']} failed: {r.get('error')}",
                             exit_code=FAILED)
        return timings

    def _local(self, folder: Path, args: List[str], on_line) -> Dict[str, Any]:
        from .run import code_path

        with tempfile.TemporaryDirectory(prefix="device_bench.profile.") as tmp:
            out = Path(tmp) / "timings.json"
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (code_path(), env.get("PYTHONPATH")) if p)
            proc = subprocess.Popen([sys.executable, "-m", "device_bench._profile_worker", str(folder), *args,
                                     "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True)
            for line in proc.stderr:
                on_line(line.rstrip("\n"))
            proc.wait()
            if not out.is_file():
                raise BenchError(f"timing the probes failed (exit {proc.returncode})", exit_code=FAILED)
            return json.loads(out.read_text())

    def _remote(self, folder: Path, files: List[str], args: List[str], on_line, bar: Bar) -> Dict[str, Any]:
        from .deploy import folder_release, remote_job

        target, opts, board_cfg = self.remote
        release = folder_release("latency-probes", folder, files)
        timings, _, _, _ = remote_job(target, opts, board_cfg, release,
                                      ["device_bench._profile_worker", "../bundle", *args], bar.write,
                                      "the latency probes", echo=on_line)
        return timings


# --------------------------------------------------------------------------- fitting


def _timing(timings: Dict[str, Any], fmt: str, threads: int) -> Dict[str, Any]:
    for r in timings["results"]:
        if r["format"] == fmt and r["threads"] == threads:
            return r
    raise BenchError(f"the board reported no timings for {fmt} x{threads}", exit_code=FAILED)


def _tolerance(spreads: Sequence[float]) -> float:
    """Half the median round-to-round spread of the sweep (the median of 5 rounds is that much
    steadier than one round), within TOLERANCE."""
    return float(np.clip(0.5 * float(np.median(spreads)) if len(spreads) else TOLERANCE[0], *TOLERANCE))


def fit_axes(timing: Dict[str, Any], ids: Dict[str, Any]) -> Tuple[Dict[str, Any], float, float]:
    """(axes {in, out} as Axis JSON, null ms, tolerance) from the plateau pass of one entry."""
    probes = timing["probes"]
    null = probes[ids["null"]]["ms"]
    spreads = [probes[pid]["spread"] for side in ("in", "out") for pid in ids[side].values()]
    tol = _tolerance(spreads)
    axes = {}
    for side in ("in", "out"):
        widths = sorted(ids[side])
        ms = [max(probes[ids[side][w]]["ms"] - null, 1e-6) for w in widths]
        axes[side] = {**lt.find_flat_gaps(widths, ms, tol), "sweep": {"widths": widths, "ms": [round(m, 6) for m in ms]}}
    return axes, null, tol


def grid_points(net: Dict[str, Any], axes_by_entry: List[Tuple[lt.Axis, lt.Axis]],
                fractions: Sequence[float]) -> Dict[str, Tuple[List[int], List[int]]]:
    """Per layer shape: the input and output widths to time (see the module docstring)."""
    from .probes import dense_width, sizes_of

    sizes = sizes_of(net)
    points: Dict[str, Tuple[set, set]] = {}
    for la in net["layers"]:
        gemm = la["op"] in lt.GEMM_OPS
        p_in, p_out = points.setdefault(la["shape"], (set(), set()))
        for side, width, bucket in (("in", la["in"], p_in), ("out", la["out"], p_out)):
            if side == "in" and not gemm:
                continue
            dense = dense_width(width, sizes)
            bucket.add(dense)
            if not width["groups"]:
                continue
            for f in fractions:  # one point per fraction: the highest plateau top any entry rounds it to
                target = max(1, int(math.ceil(f * dense)))
                tops = [int(((a_in if side == "in" else a_out) if gemm else lt.Axis.identity()).effective([target])[0])
                        for a_in, a_out in axes_by_entry]
                bucket.add(min(max(tops), max(target, dense)))
    # Every layer of a shape shares its grid: the widest use decides its extent.
    return {k: (sorted(i) if i else [1], sorted(o)) for k, (i, o) in points.items()}


def fit_grid(shape_points: Tuple[List[int], List[int]], ms: np.ndarray, axis_in: lt.Axis, axis_out: lt.Axis,
             gemm: bool) -> Dict[str, Any]:
    """A grid in effective widths: points on one plateau collapse into one (their mean), the
    values made non-decreasing in both widths."""
    p_in, p_out = shape_points
    e_in = axis_in.effective(p_in) if gemm else np.asarray(p_in)
    e_out = axis_out.effective(p_out) if gemm else np.asarray(p_out)
    u_in, inv_in = np.unique(e_in, return_inverse=True)
    u_out, inv_out = np.unique(e_out, return_inverse=True)
    total = np.zeros((len(u_in), len(u_out)))
    count = np.zeros_like(total)
    for i, a in enumerate(inv_in):
        for j, b in enumerate(inv_out):
            total[a, b] += ms[i, j]
            count[a, b] += 1
    # A wider layer never costs less: timing noise must not make the grid fall along either axis
    # (a running max along one axis keeps the other axis non-decreasing too).
    ms_grid = np.maximum.accumulate(np.maximum.accumulate(total / count, axis=0), axis=1)
    return {"in": [int(x) for x in u_in], "out": [int(x) for x in u_out],
            "ms": [[round(float(v), 6) for v in row] for row in ms_grid]}


def calibrate(entry: lt.LatencyEntry, anchors: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The calibration curve of the layer sum from the whole-network anchors."""
    names = list(anchors)
    sums = {n: float(entry.bind().layers(entry.table.keep_vector(anchors[n]["keep"])).sum()) for n in names}
    measured = {n: anchors[n]["measured_ms"] for n in names}
    curve = lt.calibration_curve([sums[n] for n in names], [measured[n] for n in names])
    calibrated = lt.LatencyEntry(entry.table, {**entry.raw, "calibration": curve})
    return {"calibration": curve,
            "anchors": [{"name": n, "keep": anchors[n]["keep"], "measured_ms": round(measured[n], 6),
                         "sum_ms": round(sums[n], 6), "predicted_ms": round(float(calibrated.network_ms(sums[n])), 6),
                         "spread": anchors[n].get("spread")} for n in names]}


# --------------------------------------------------------------------------- the whole profile


def profile(source: ModelSource, cfg: ProfileConfig, board: Board, out: Path,
            log: Callable[[str], None]) -> Dict[str, Any]:
    from . import probes as P

    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), time.time()
    net = P.describe(source.model, source.example, source.ignore)
    log(f"{source.info['spec']}: {len(net['groups'])} channel groups, {len(net['layers'])} layers, "
        f"{len(net['shapes'])} distinct layer shapes")
    converted, conversion_s = 0, 0.0

    def build(specs, what, formats):
        nonlocal converted, conversion_s
        bar = Bar(len({P.spec_key(s) for s in specs}) * len(formats), f"converting {what}")
        try:
            built = P.build(specs, formats, cfg.cache, lambda n, text: bar.update(n, text))
        finally:
            bar.close()
        converted += built.converted
        conversion_s += built.seconds
        return built.files

    with tempfile.TemporaryDirectory(prefix="device_bench.profile.") as tmp:
        # ---- pass 1: plateaus
        sweep_shape = P.sweep_shape()
        sweep = {"null": P.null_spec(),
                 "in": {w: P.probe_spec(sweep_shape, w, SWEEP_OTHER) for w in cfg.sweep},
                 "out": {w: P.probe_spec(sweep_shape, SWEEP_OTHER, w) for w in cfg.sweep}}
        specs1 = [sweep["null"], *sweep["in"].values(), *sweep["out"].values()]
        built1 = build(specs1, "the plateau sweep", cfg.formats)
        entries1 = [{"id": k, "kind": "probe", "files": f} for k, f in built1.items()]
        folder1 = Path(tmp) / "pass1"
        timings1 = board.time(folder1, write_probeset(folder1, entries1), cfg, "the plateau sweep")
        ids = {"null": P.spec_key(sweep["null"]),
               "in": {w: P.spec_key(s) for w, s in sweep["in"].items()},
               "out": {w: P.spec_key(s) for w, s in sweep["out"].items()}}
        fitted: Dict[Tuple[str, int], Dict[str, Any]] = {}
        for fmt in cfg.formats:
            for t in cfg.threads:
                axes, null, tol = fit_axes(_timing(timings1, fmt, t), ids)
                fitted[(fmt, t)] = {"axes": axes, "null_ms": null, "tolerance": tol}

        # ---- pass 2: the grid and the anchors
        plans, built2 = {}, {}
        for fmt in cfg.formats:
            plans[fmt] = grid_points(net, [_axes(fitted[(fmt, t)]) for t in cfg.threads], cfg.fractions)
            specs = [P.probe_spec(net["shapes"][key], a, b)
                     for key, (p_in, p_out) in plans[fmt].items() for a in p_in for b in p_out]
            for k, files in build(specs, f"the layer grid ({fmt})", [fmt]).items():
                built2.setdefault(k, {}).update(files)
        sizes = P.sizes_of(net)
        anchors = {name: {g: max(1, int(math.ceil(f * s))) for g, s in sizes.items()} for name, f in ANCHORS.items()}
        rng = np.random.default_rng(20261204)
        for i in range(UNEVEN):
            anchors[f"uneven-{i + 1}"] = {g: max(1, int(math.ceil(rng.uniform(*UNEVEN_RANGE) * s)))
                                          for g, s in sizes.items()}
        anchor_files = build_networks(source, net, anchors, cfg)
        entries2 = [{"id": k, "kind": "probe", "files": f} for k, f in built2.items()]
        entries2 += [{"id": f"network:{name}", "kind": "network", "files": f} for name, f in anchor_files.items()]
        entries2.append({"id": ids["null"], "kind": "probe", "files": built1[ids["null"]]})
        folder2 = Path(tmp) / "pass2"
        timings2 = board.time(folder2, write_probeset(folder2, entries2), cfg, "the layer grid")

    # ---- the table
    device = timings2["device"]
    entries = []
    for fmt in cfg.formats:
        for t in cfg.threads:
            r1, r2 = _timing(timings1, fmt, t), _timing(timings2, fmt, t)
            fit = fitted[(fmt, t)]
            null = r2["probes"][ids["null"]]["ms"]  # this pass's own empty-model cost
            axis_in, axis_out = _axes(fit)
            grids = {}
            for key, (p_in, p_out) in plans[fmt].items():
                shape = net["shapes"][key]
                ms = np.array([[max(r2["probes"][P.spec_key(P.probe_spec(shape, a, b))]["ms"] - null, 0.0)
                                for b in p_out] for a in p_in])
                grids[key] = fit_grid((p_in, p_out), ms, axis_in, axis_out, shape["op"] in lt.GEMM_OPS)
            spreads = [p["spread"] for p in r2["probes"].values()]
            entry = {"format": fmt, "threads": t, "backend": r2["backend"], "backend_version": r2["backend_version"],
                     "null_ms": round(null, 6), "tolerance": round(fit["tolerance"], 4),
                     "axes": fit["axes"], "grids": grids,
                     "noise": {"median_spread": round(float(np.median(spreads)), 4),
                               "p90_spread": round(float(np.percentile(spreads, 90)), 4)},
                     "seconds": round(r1["seconds"] + r2["seconds"], 1)}
            entries.append((entry, anchor_timings(r2, anchors)))
    table = {
        "schema": lt.SCHEMA, "kind": lt.KIND, "created": started,
        "model": source.info,
        "board": {**lt.fingerprint(device), "hostname": device.get("hostname"), "os": device.get("os"),
                  "kernel": device.get("kernel"), "memory_mb": device.get("memory_mb"),
                  "cpufreq": device.get("cpufreq"), "python": device.get("python"),
                  "backends": timings2.get("backends"), "profiled_as": board.label},
        "groups": net["groups"], "layers": net["layers"], "shapes": net["shapes"],
        "entries": [e for e, _ in entries],
        "profile": {"tool": f"device_bench {__version__}", "host": socket.gethostname(),
                    "formats": cfg.formats, "threads": cfg.threads, "rounds": cfg.rounds, "burst_ms": cfg.burst_ms,
                    "probes_converted": converted, "conversion_seconds": round(conversion_s, 1),
                    "wall_seconds": None, "grid": cfg.grid, "sweep": cfg.sweep, "fractions": list(cfg.fractions)},
    }
    parsed = lt.LatencyTable(table, out)  # calibrate with the real predictor, then store the result
    for (entry, anchor_ms), parsed_entry in zip(entries, parsed.entries):
        entry.update(calibrate(parsed_entry, anchor_ms))
    table["profile"]["wall_seconds"] = round(time.time() - t0, 1)
    write_json_atomic(out, table)
    lt.load_table(out)  # what we wrote reads back
    return table


def build_networks(source: ModelSource, net: Dict[str, Any], anchors: Dict[str, Dict[str, int]],
                   cfg: ProfileConfig) -> Dict[str, Dict[str, Path]]:
    """The whole-network anchors as files, {name: {format: path}} (cached like the probes)."""
    from compress.prune import find_groups

    from . import probes as P

    identity = {"model": source.info, "net": net}
    groups = find_groups(source.model, source.example, source.ignore)
    bar = Bar(len(anchors) * len(cfg.formats), "converting the whole networks")
    files: Dict[str, Dict[str, Path]] = {}
    try:
        for name, keep in anchors.items():
            for fmt in cfg.formats:
                files.setdefault(name, {})[fmt] = P.network_file(
                    source.model, source.example, groups, keep, fmt, cfg.cache, identity)
                bar.update(1, f"{name} {fmt}")
    finally:
        bar.close()
    return files


def anchor_timings(result: Dict[str, Any], anchors: Dict[str, Dict[str, int]]) -> Dict[str, Dict[str, Any]]:
    return {name: {"keep": anchors[name], "measured_ms": result["probes"][f"network:{name}"]["ms"],
                   "spread": round(result["probes"][f"network:{name}"]["spread"], 4)} for name in anchors}


# --------------------------------------------------------------------------- re-timing the anchors


def recalibrate(source: ModelSource, table: lt.LatencyTable, cfg: ProfileConfig, board: Board, out: Path,
                log: Callable[[str], None]) -> Dict[str, Any]:
    """Time the table's whole-network anchors again and derive its calibration curves from the new
    times; the layer grid stays. A board's speed moves (thermal state, clock governor, a busy VM
    host): a minute of anchors brings a table back to the board as it runs now, where a whole
    profile takes many. Same board (fingerprint) and interpreter versions only; the previous
    anchors are kept in the table's `recalibrations` list. `cfg`: the table's formats and threads."""
    from . import probes as P

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    raw = copy.deepcopy(table.raw)
    info, table_path = table.model, table.path
    if (info.get("spec"), info.get("num_classes"), info.get("width"), info.get("input")) != \
            (source.info["spec"], source.info["num_classes"], source.info["width"], source.info["input"]):
        raise BenchError(f"{table_path} is a table for {table.model_text}, not for {source.info['spec']} "
                         f"(num_classes {source.info['num_classes']}, width {source.info['width']}, "
                         f"input {source.info['input']})")
    net = P.describe(source.model, source.example, source.ignore)
    if [(g["name"], int(g["size"])) for g in net["groups"]] != table.groups:
        raise BenchError(f"{table_path}: the model's channel groups are not the table's (was it profiled with "
                         "another --ignore?)")
    # every entry of a profile has the same anchors (profile() above)
    anchors = {a["name"]: a["keep"] for a in ((raw["entries"][0].get("anchors") or ()) if raw["entries"] else ())}
    if not anchors:
        raise BenchError(f"{table_path} has no whole-network anchors to time again (a table from before the "
                         "calibration curve): profile the board again")
    files = build_networks(source, net, anchors, cfg)
    with tempfile.TemporaryDirectory(prefix="device_bench.recalibrate.") as tmp:
        folder = Path(tmp) / "anchors"
        entries = [{"id": f"network:{name}", "kind": "network", "files": f} for name, f in files.items()]
        timings = board.time(folder, write_probeset(folder, entries), cfg, "the whole networks")
    try:
        table.check_compatible(timings["device"])
    except lt.TableMismatch as e:
        raise BenchError(str(e)) from None
    for e, entry_raw in zip(table.entries, raw["entries"]):
        r = _timing(timings, e.format, e.threads)
        if e.backend_version and (r["backend"], r["backend_version"]) != (e.backend, e.backend_version):
            raise BenchError(f"{table_path} ({e.label}) was profiled with {e.backend} {e.backend_version}, the board "
                             f"now runs {r['backend']} {r['backend_version']}: the layer grid is out of date, "
                             "profile the board again")
        before = {a["name"]: a["measured_ms"] for a in entry_raw["anchors"]}
        entry_raw.update(calibrate(e, anchor_timings(r, anchors)))
        after = {a["name"]: a["measured_ms"] for a in entry_raw["anchors"]}
        ratio = float(np.median([after[n] / before[n] for n in before if before[n] > 0]))
        entry_raw.setdefault("recalibrations", []).append(
            {"at": started, "previous_anchors_ms": before, "speed_ratio": round(ratio, 4)})
        log(f"{e.label}: whole networks now take {ratio:.3f}x what they took at the last calibration "
            f"(dense {before.get('dense', float('nan')):.3f} -> {after.get('dense', float('nan')):.3f} ms)")
    write_json_atomic(out, raw)
    lt.load_table(out)
    return raw


def _axes(fit: Dict[str, Any]) -> Tuple[lt.Axis, lt.Axis]:
    return lt.Axis.from_json(fit["axes"]["in"]), lt.Axis.from_json(fit["axes"]["out"])
