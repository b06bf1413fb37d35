"""`report`: many bench reports -> one Markdown table and the plots people compare.

    summary/README.md        device + bundle tables, every measurement, dense vs slim
    summary/latency.png      p50 bars, p90 (thick) and p99 (thin) whiskers, per board x bundle x format x threads
    summary/tradeoff.png     top-1 vs p50 latency per format (best thread count): the trade-off
    summary/memory.png       peak RSS per format: Python+numpy baseline vs the model and its interpreter
    summary/dense_vs_slim.png  only when a dense and a slim bundle of the same model ran on one board

Host-only (matplotlib); nothing here runs on the board.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import BenchError
from .files import write_bytes_atomic, write_text_atomic
from .run import REPORT_KIND, REPORT_SCHEMA

FORMAT_COLORS = {"tflite-int8": "#1f77b4", "tflite": "#aec7e8", "onnx-int8": "#d62728", "onnx": "#ff9896"}
DENSE_METHODS = {"dense", "none", "baseline"}


# --------------------------------------------------------------------------- reading


@dataclass
class Row:
    """One successful measurement, flattened for tables and plots."""

    board: str
    bundle: str
    model: Optional[str]
    method: Optional[str]
    dense: bool
    format: str
    threads: int
    batch: int
    lat: Dict[str, float]
    throughput: float
    init_ms: float
    first_ms: float
    peak_mb: float
    baseline_mb: Optional[float]
    model_bytes: int
    top1: Optional[float]


def _fail(path: Path, why: str) -> BenchError:
    return BenchError(f"{path}: {why}")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def expand_inputs(inputs: Sequence[str]) -> List[Path]:
    paths: List[Path] = []
    for text in inputs:
        p = Path(text)
        if p.is_dir():
            found = sorted(q for q in p.glob("*.json") if q.name != "summary.json")
            if not found:
                raise BenchError(f"{p}: folder holds no report .json")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise BenchError(f"report not found: {text}" + (" (the shell found no match for the pattern)"
                                                           if any(c in text for c in "*?[") else ""))
    if not paths:
        raise BenchError("no report JSON given")
    return list(dict.fromkeys(paths))


def load_report(path: Path) -> Dict[str, Any]:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(path, f"cannot read ({e})") from None
    except ValueError as e:
        raise _fail(path, f"not valid JSON ({e})") from None
    if not isinstance(report, dict) or report.get("kind") != REPORT_KIND:
        raise _fail(path, "not a device_bench report (no \"kind\": \"edgeslim-device-bench\")")
    if report.get("schema") != REPORT_SCHEMA:
        raise _fail(path, f"report schema {report.get('schema')!r} is not supported (expected {REPORT_SCHEMA})")
    for key, kind in (("device", dict), ("bundle", dict), ("results", list)):
        if not isinstance(report.get(key), kind):
            raise _fail(path, f"malformed report: '{key}' is missing or not a {kind.__name__}")
    for i, r in enumerate(report["results"]):
        if not isinstance(r, dict) or not isinstance(r.get("format"), str) or r.get("status") not in \
                ("ok", "error", "skipped"):
            raise _fail(path, f"malformed report: results[{i}] has no format/status")
        if r["status"] == "ok":
            lat = r.get("latency_ms")
            needed = ("p50", "p90", "p99", "mean", "std")
            if not isinstance(lat, dict) or not all(_number(lat.get(k)) for k in needed) \
                    or not _number(r.get("peak_rss_mb")) or not _number(r.get("threads")):
                raise _fail(path, f"malformed report: results[{i}] lacks latency_ms/peak_rss_mb/threads numbers")
    return report


def board_label(report: Dict[str, Any]) -> str:
    """How tables and plots name the board; an emulated one says so wherever its numbers appear."""
    remote = report.get("remote")
    if isinstance(remote, dict) and remote.get("host"):
        label = str(remote["host"])
    else:
        label = str(report["device"].get("hostname") or "device")
    return label + (" (emulated)" if report["device"].get("emulated") else "")


def is_dense(source: Dict[str, Any]) -> bool:
    if str(source.get("method") or "").lower() in DENSE_METHODS:
        return True
    achieved = source.get("achieved") if isinstance(source.get("achieved"), dict) else {}
    reduction = achieved.get("flops_reduction")
    return _number(reduction) and abs(reduction) < 0.005


def rows_of(report: Dict[str, Any]) -> List[Row]:
    bundle = report["bundle"]
    source = bundle.get("source") if isinstance(bundle.get("source"), dict) else {}
    formats = bundle.get("formats") if isinstance(bundle.get("formats"), dict) else {}
    rows = []
    for r in report["results"]:
        if r["status"] != "ok":
            continue
        top1 = r.get("top1", (formats.get(r["format"]) or {}).get("top1"))
        rows.append(Row(board=board_label(report), bundle=str(bundle.get("name", "?")), model=source.get("model"),
                        method=source.get("method"), dense=is_dense(source), format=r["format"],
                        threads=int(r["threads"]), batch=int(r.get("batch", 1)), lat=r["latency_ms"],
                        throughput=float(r.get("throughput_ips") or 0), init_ms=float(r.get("init_ms") or 0),
                        first_ms=float(r.get("first_inference_ms") or 0), peak_mb=float(r["peak_rss_mb"]),
                        baseline_mb=r.get("rss_baseline_mb") if _number(r.get("rss_baseline_mb")) else None,
                        model_bytes=int(r.get("model_bytes") or 0), top1=top1 if _number(top1) else None))
    return rows


# --------------------------------------------------------------------------- plots


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    write_bytes_atomic(path, buf.getvalue())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on a build machine or in CI
    import matplotlib.pyplot as plt

    return plt


def _format_order(fmt: str) -> int:
    order = list(FORMAT_COLORS)
    return order.index(fmt) if fmt in order else len(order)


def _sorted(rows: List[Row]) -> List[Row]:
    return sorted(rows, key=lambda r: (r.board, r.bundle, _format_order(r.format), r.format, r.threads, r.batch))


def plot_latency(rows: List[Row], path: Path) -> None:
    plt = _pyplot()
    rows = _sorted(rows)
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.32 * len(rows)))
    y = list(range(len(rows)))[::-1]
    for yi, r in zip(y, rows):
        color = FORMAT_COLORS.get(r.format, "#7f7f7f")
        ax.barh(yi, r.lat["p50"], color=color, edgecolor="black", linewidth=0.4)
        ax.plot([r.lat["p50"], r.lat["p90"]], [yi, yi], color="black", linewidth=2.2)
        ax.plot([r.lat["p90"], r.lat["p99"]], [yi, yi], color="black", linewidth=0.8)
        ax.plot([r.lat["p99"]], [yi], marker="|", color="black", markersize=8)
    multi_bundle = len({r.bundle for r in rows}) > 1
    ax.set_yticks(y)
    ax.set_yticklabels([f"{r.board} · " + (f"{r.bundle} · " if multi_bundle else "")
                        + f"{r.format} · {r.threads}T" + (f" · b{r.batch}" if r.batch != 1 else "") for r in rows],
                       fontsize=8)
    low, high = min(r.lat["p50"] for r in rows), max(r.lat["p99"] for r in rows)
    if high > 20 * low:  # one slow tail (or a big model next to a tiny one) would flatten the rest
        ax.set_xscale("log")
        ax.set_xlim(low / 2, high * 1.5)
    ax.set_xlabel("latency per invoke (ms): bar = p50, thick whisker to p90, thin to p99")
    ax.set_title("Inference latency" + ("" if multi_bundle else f" — {rows[0].bundle}"))
    ax.grid(axis="x", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=FORMAT_COLORS.get(f, "#7f7f7f"))
               for f in dict.fromkeys(r.format for r in rows)]
    ax.legend(handles, list(dict.fromkeys(r.format for r in rows)), loc="lower right", fontsize=8)
    _save(fig, path)
    plt.close(fig)


def best_per_format(rows: List[Row]) -> List[Row]:
    """The fastest thread count of each (board, bundle, format)."""
    best: Dict[Tuple[str, str, str], Row] = {}
    for r in rows:
        key = (r.board, r.bundle, r.format)
        if key not in best or r.lat["p50"] < best[key].lat["p50"]:
            best[key] = r
    return _sorted(list(best.values()))


def plot_tradeoff(rows: List[Row], path: Path) -> None:
    """Colour = format, marker = (board, bundle). Point labels only while they fit: with several
    bundles or boards the names go to the legends, or they would print over each other."""
    plt = _pyplot()
    points = [r for r in best_per_format(rows) if r.top1 is not None]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = "osD^v<>Ph*"
    groups = list(dict.fromkeys((r.board, r.bundle) for r in points))
    few = len(groups) == 1 and len(points) <= 6
    for r in points:
        ax.scatter(r.lat["p50"], 100 * r.top1, s=70, color=FORMAT_COLORS.get(r.format, "#7f7f7f"),
                   marker=markers[groups.index((r.board, r.bundle)) % len(markers)], edgecolor="black",
                   linewidth=0.5, zorder=3)
        label = f"{r.format} ({r.threads}T)" if few else f"{r.threads}T"
        ax.annotate(label, (r.lat["p50"], 100 * r.top1), textcoords="offset points", xytext=(6, 4), fontsize=7)
    if not points:
        ax.text(0.5, 0.5, "no top-1 accuracy in these bundles' manifests", ha="center", va="center",
                transform=ax.transAxes)
    else:
        if max(r.lat["p50"] for r in points) > 10 * min(r.lat["p50"] for r in points):
            ax.set_xscale("log")
        formats = list(dict.fromkeys(r.format for r in points))
        fmt_handles = [ax.scatter([], [], marker="o", color=FORMAT_COLORS.get(f, "#7f7f7f"), edgecolor="black")
                       for f in formats]
        first = ax.legend(fmt_handles, formats, title="format", fontsize=8, loc="lower right")
        ax.add_artist(first)
        group_handles = [ax.scatter([], [], marker=markers[i % len(markers)], color="white", edgecolor="black")
                         for i in range(len(groups))]
        ax.legend(group_handles, [f"{board} · {bundle}" for board, bundle in groups], title="board · bundle",
                  fontsize=8, loc="upper left")
        ax.margins(x=0.15, y=0.25)
    ax.set_xlabel("p50 latency (ms, fastest thread count)")
    ax.set_ylabel("top-1 accuracy (%) from the bundle manifest")
    ax.set_title("Accuracy vs latency")
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def plot_memory(rows: List[Row], path: Path) -> None:
    plt = _pyplot()
    peak: Dict[Tuple[str, str, str], Row] = {}
    for r in _sorted(rows):
        key = (r.board, r.bundle, r.format)
        if key not in peak or r.peak_mb > peak[key].peak_mb:
            peak[key] = r
    items = list(peak.values())
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.36 * len(items)))
    y = list(range(len(items)))[::-1]
    multi_bundle = len({r.bundle for r in items}) > 1
    for yi, r in zip(y, items):
        base = r.baseline_mb if r.baseline_mb is not None else 0.0
        ax.barh(yi, base, color="#c7c7c7", edgecolor="black", linewidth=0.4)
        ax.barh(yi, r.peak_mb - base, left=base, color=FORMAT_COLORS.get(r.format, "#7f7f7f"),
                edgecolor="black", linewidth=0.4)
        ax.annotate(f"{r.peak_mb:.0f} MB (model file {r.model_bytes / 1024:.0f} KiB)", (r.peak_mb, yi),
                    textcoords="offset points", xytext=(4, -3), fontsize=7)
    ax.set_yticks(y)
    ax.set_yticklabels([f"{r.board} · " + (f"{r.bundle} · " if multi_bundle else "") + r.format for r in items],
                       fontsize=8)
    ax.set_xlabel("peak RSS of the benchmark process (MiB): grey = Python + numpy + runtime before loading, "
                  "colour = model + interpreter")
    ax.set_title("Peak memory (highest over thread counts)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlim(0, max(r.peak_mb for r in items) * 1.35)
    _save(fig, path)
    plt.close(fig)


def dense_slim_pairs(rows: List[Row]) -> List[Tuple[Row, Row]]:
    """(dense, slim) at their fastest thread count, same board, same source model, same format."""
    best = best_per_format(rows)
    pairs = []
    for slim in (r for r in best if not r.dense):
        for dense in (r for r in best if r.dense):
            if (dense.board, dense.model, dense.format) == (slim.board, slim.model, slim.format) \
                    and dense.model is not None:
                pairs.append((dense, slim))
    return pairs


def plot_dense_vs_slim(pairs: List[Tuple[Row, Row]], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(pairs) + 2), 4.5))
    width = 0.38
    for i, (dense, slim) in enumerate(pairs):
        ax.bar(i - width / 2, dense.lat["p50"], width, color="#7f7f7f", edgecolor="black", linewidth=0.4,
               label="dense" if i == 0 else None)
        ax.bar(i + width / 2, slim.lat["p50"], width, color=FORMAT_COLORS.get(slim.format, "#2ca02c"),
               edgecolor="black", linewidth=0.4, label="slim" if i == 0 else None)
        ax.annotate(f"{dense.lat['p50'] / slim.lat['p50']:.2f}x", (i + width / 2, slim.lat["p50"]),
                    textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    ax.set_xticks(range(len(pairs)))
    ax.set_xticklabels([f"{s.board}\n{s.model} {s.method}\n{s.format}" for _, s in pairs], fontsize=7)
    ax.set_ylabel("p50 latency (ms, fastest thread count)")
    ax.set_title("Dense vs slim (speed-up above the slim bar)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    plt.close(fig)


# --------------------------------------------------------------------------- markdown


def _fmt(v: Any, spec: str = ".3f", none: str = "–") -> str:
    return none if v is None else format(v, spec)


def _table(header: Sequence[str], lines: List[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in line) + " |" for line in lines]
    return "\n".join(out)


def _count(v: Any) -> str:
    if not _number(v):
        return "–"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return str(int(v))


def markdown(reports: List[Tuple[Path, Dict[str, Any]]], rows: List[Row], plots: List[str],
             pairs: List[Tuple[Row, Row]]) -> str:
    parts = ["# Device benchmark summary", "",
             f"{len(reports)} report(s), {len(rows)} measurement(s). Latency is one interpreter invoke on a "
             "preprocessed input (ms); throughput = batch / mean latency; peak RSS is the whole benchmark "
             "process (MiB). Top-1 comes from the bundle manifest (measured at export).", ""]
    emulated = {board_label(rep): rep["device"].get("emulation") or "emulated" for _, rep in reports
                if rep["device"].get("emulated")}
    if emulated:
        parts += ["**Emulated:** " + "; ".join(f"{b} ran under {how}" for b, how in emulated.items())
                  + ". Its latencies measure the emulator, not a board: never quote them as board figures.", ""]
    parts += [f"![{p[:-4]}]({p})" for p in plots] + [""]

    parts += ["## Measurements", ""]
    parts.append(_table(
        ["board", "bundle", "format", "threads", "batch", "p50", "p90", "p99", "mean ± std", "img/s",
         "init ms", "first ms", "peak RSS MB", "model KiB", "top-1"],
        [[r.board, r.bundle, r.format, r.threads, r.batch, _fmt(r.lat["p50"]), _fmt(r.lat["p90"]),
          _fmt(r.lat["p99"]), f"{r.lat['mean']:.3f} ± {r.lat['std']:.3f}", f"{r.throughput:.1f}",
          _fmt(r.init_ms, ".1f"), _fmt(r.first_ms, ".2f"), _fmt(r.peak_mb, ".1f"),
          f"{r.model_bytes / 1024:.0f}", _fmt(None if r.top1 is None else 100 * r.top1, ".2f") + "%" * (r.top1 is not None)]
         for r in _sorted(rows)]))

    problems = [(board_label(rep), rep["bundle"].get("name"), r) for _, rep in reports for r in rep["results"]
                if r["status"] != "ok"]
    problems += [(board_label(rep), rep["bundle"].get("name"), {"status": "skipped", **s})
                 for _, rep in reports for s in rep.get("skipped") or [] if isinstance(s, dict)]
    if problems:
        parts += ["", "## Not measured", ""]
        parts.append(_table(["board", "bundle", "format", "threads", "status", "why"],
                            [[b, n, r.get("format"), r.get("threads", "all"), r["status"],
                              r.get("error") or r.get("reason") or ""] for b, n, r in problems]))

    checked = [(board_label(rep), rep["bundle"].get("name"), rep["latency_check"]) for _, rep in reports
               if isinstance(rep.get("latency_check"), dict)]
    if checked:
        parts += ["", "## Latency budget and prediction", "",
                  "Measured p50 against the `--budget-ms` given to `run`/`remote`, and what the `--latency-table` "
                  "predicted for the bundle (error = predicted / measured - 1).", ""]
        lines = []
        for board, name, block in checked:
            budget = block.get("budget_ms")
            for row in block.get("results") or []:
                verdict = "–" if budget is None else ("met" if row.get("within_budget") else
                                                      f"**MISSED** by {-row['margin'] * 100:.1f} %")
                lines.append([board, name, row["format"], row["threads"], _fmt(budget, "g"),
                              _fmt(row.get("predicted_ms")), _fmt(row["measured_p50_ms"]),
                              _fmt(None if row.get("error") is None else 100 * row["error"], "+.1f")
                              + " %" * (row.get("error") is not None), verdict])
        parts.append(_table(["board", "bundle", "format", "threads", "budget ms", "predicted ms", "measured p50",
                             "error", "budget"], lines))
        notes = [f"{b} / {n}: {w}" for b, n, block in checked for w in block.get("warnings") or []]
        notes += [f"{b} / {n}: table refused: {block['refused']}" for b, n, block in checked if block.get("refused")]
        if notes:
            parts += [""] + [f"- {note}" for note in notes]

    if pairs:
        parts += ["", "## Dense vs slim", ""]
        parts.append(_table(["board", "model", "method", "format", "dense p50", "slim p50", "speed-up",
                             "dense top-1", "slim top-1"],
                            [[s.board, s.model, s.method, s.format, _fmt(d.lat["p50"]), _fmt(s.lat["p50"]),
                              f"{d.lat['p50'] / s.lat['p50']:.2f}x",
                              _fmt(None if d.top1 is None else 100 * d.top1, ".2f"),
                              _fmt(None if s.top1 is None else 100 * s.top1, ".2f")] for d, s in pairs]))

    parts += ["", "## Boards", ""]
    seen = {}
    for _, rep in reports:
        seen.setdefault(board_label(rep), rep)
    lines = []
    for label, rep in seen.items():
        d = rep["device"]
        freq = d.get("cpufreq") or {}
        temps = d.get("temperature_c") or {}
        backends = ", ".join(f"{k} {v}" for k, v in (d.get("backends") or {}).items())
        lines.append([label, d.get("board") or "–", d.get("cpu") or "–", d.get("cpu_cores") or "–",
                      d.get("os") or "–", d.get("kernel") or "–", d.get("python") or "–", backends or "–",
                      freq.get("governor") or "–", _fmt(max(temps.values()) if temps else None, ".1f"),
                      _fmt(rep.get("temperature_c_end"), ".1f"), d.get("throttled") or "–"])
    parts.append(_table(["board", "model", "CPU", "cores", "OS", "kernel", "Python", "interpreters",
                         "governor", "°C start", "°C end", "throttled"], lines))

    parts += ["", "## Bundles", ""]
    bundles = {}
    for _, rep in reports:
        b = rep["bundle"]
        bundles.setdefault((b.get("name"), b.get("manifest_sha256")), b)
    lines = []
    for (name, sha), b in bundles.items():
        s = b.get("source") or {}
        target = s.get("target") or {}
        achieved = s.get("achieved") or {}
        slim, dense = s.get("slim") or {}, s.get("dense") or {}
        lines.append([name, (sha or "")[:12], s.get("model") or "–", s.get("method") or "–",
                      f"{target.get('metric', '–')} -{_fmt(target.get('reduction'), '.0%')}" if target else "–",
                      f"{_count(slim.get('flops'))} / {_count(dense.get('flops'))}",
                      f"{_count(slim.get('params'))} / {_count(dense.get('params'))}",
                      _fmt(achieved.get("flops_reduction"), ".1%"),
                      ", ".join(f"{f} {100 * v['top1']:.2f}%" for f, v in (b.get("formats") or {}).items()
                                if isinstance(v, dict) and _number(v.get("top1")))])
    parts.append(_table(["bundle", "manifest", "model", "method", "target", "FLOPs slim / dense",
                         "params slim / dense", "FLOPs cut", "top-1 per format"], lines))
    parts += ["", "Sources: " + ", ".join(f"`{p}`" for p, _ in reports), ""]
    return "\n".join(parts)


def summarize(inputs: Sequence[str], out: Path) -> Path:
    """Read the reports (every one checked before anything is written), write README.md + PNGs."""
    paths = expand_inputs(inputs)
    reports = [(p, load_report(p)) for p in paths]
    rows = [row for _, rep in reports for row in rows_of(rep)]
    if not rows:
        raise BenchError("no successful measurement in the given reports; nothing to summarise")
    if out.exists() and not out.is_dir():
        raise BenchError(f"--out {out} is a file; the summary is a folder")
    out.mkdir(parents=True, exist_ok=True)
    plots = ["latency.png", "tradeoff.png", "memory.png"]
    plot_latency(rows, out / "latency.png")
    plot_tradeoff(rows, out / "tradeoff.png")
    plot_memory(rows, out / "memory.png")
    pairs = dense_slim_pairs(rows)
    if pairs:
        plot_dense_vs_slim(pairs, out / "dense_vs_slim.png")
        plots.append("dense_vs_slim.png")
    write_text_atomic(out / "README.md", markdown(reports, rows, plots, pairs))
    return out
