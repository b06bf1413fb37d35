"""`run`: measure every (format, threads) of a bundle, each in a fresh worker process, and write
one report JSON (fields: device_bench/README.md). Runs on the board: stdlib + numpy only here,
the interpreter is imported by the worker through `runtime`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from . import __version__, _board, device
from .bundle import BundleInfo, artifact_top1, select_formats, source_summary
from .errors import BenchError
from .files import write_json_atomic

REPORT_SCHEMA = 1
REPORT_KIND = "edgeslim-device-bench"


@dataclass
class RunConfig:
    formats: str = "all"
    threads: List[int] = field(default_factory=lambda: [1])
    runs: int = 200
    seconds: Optional[float] = None  # set: time for this long instead of `runs` invokes
    warmup: int = 20
    batch: int = 1
    cooldown: float = 0.0  # seconds of idle between measurements (lets a hot board cool down)

    def worker_args(self) -> List[str]:
        args = ["--warmup", str(self.warmup), "--batch", str(self.batch)]
        return args + (["--seconds", str(self.seconds)] if self.seconds is not None else ["--runs", str(self.runs)])


def parse_threads(text: str) -> List[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 or v > 256 for v in values):
        raise BenchError(f"bad --threads {text!r}: expected a comma list of positive integers, e.g. 1,2,4")
    return list(dict.fromkeys(values))


def installed_backends() -> Dict[str, Optional[str]]:
    return {d: _board.installed_version(d, m) for d, m in _board.BACKEND_MODULES.items()}


def runnable(fmt: str, backends: Dict[str, Optional[str]]) -> bool:
    family = "tflite" if fmt.startswith("tflite") else "onnx"
    return any(v for d, v in backends.items() if _board.BACKEND_FAMILY[d] == family)


def code_path() -> str:
    """The folder holding device_bench (and, in a deployed release, runtime) for the worker."""
    return str(Path(__file__).resolve().parent.parent)


def measure_once(bundle: BundleInfo, fmt: str, threads: int, cfg: RunConfig) -> Dict[str, Any]:
    """One worker process; its JSON result (status ok / skipped / error)."""
    with tempfile.TemporaryDirectory(prefix="device_bench.") as tmp:
        result_path = os.path.join(tmp, "result.json")
        argv = [sys.executable, "-m", "device_bench._worker", str(bundle.root), "--format", fmt,
                "--threads", str(threads), "--result", result_path] + cfg.worker_args()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (code_path(), env.get("PYTHONPATH")) if p)
        start = time.time()
        proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.time() - start
        if os.path.isfile(result_path):
            with open(result_path) as f:
                result = json.load(f)
        else:  # the worker died without a word (killed, out of memory, crashed in native code)
            tail = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
            result = {"status": "error", "error": f"worker {why}" + (f": {tail[-1].strip()}" if tail else "")}
    return {"format": fmt, "threads": threads, "batch": cfg.batch, **result,
            "model_bytes": bundle.root.joinpath(bundle.artifact(fmt)["file"]).stat().st_size,
            "top1": artifact_top1(bundle, fmt), "temperature_c": device.max_temperature(),
            "wall_s": round(wall, 2)}


def describe_result(r: Dict[str, Any]) -> str:
    head = f"{r['format']:<12} threads={r['threads']:<2}"
    if r["status"] == "ok":
        lat = r["latency_ms"]
        return (f"{head} p50 {lat['p50']:.3f} ms  p90 {lat['p90']:.3f}  p99 {lat['p99']:.3f}  "
                f"{r['throughput_ips']:.0f} img/s  peak {r['peak_rss_mb']:.0f} MB")
    return f"{head} {r['status'].upper()}: {r.get('error') or r.get('reason')}"


class Progress:
    """tqdm on a terminal; one line per finished measurement otherwise (logs, ssh)."""

    def __init__(self, total: int):
        self.total, self.done, self.bar = total, 0, None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="measurement", file=sys.stderr)
            except ImportError:
                pass

    def start(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)

    def finish(self, text: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
            self.bar.update(1)
        else:
            print(f"[{self.done}/{self.total}] {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_bench(bundle: BundleInfo, cfg: RunConfig, out: Path,
              progress_factory: Callable[[int], Progress] = Progress,
              finish: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Measure, write `out` atomically, return the report. `finish(report)` may add to the report
    before it is written (the latency budget check)."""
    formats = select_formats(bundle, cfg.formats)
    backends = installed_backends()
    skipped: List[Dict[str, str]] = []
    if cfg.formats.strip() == "all":  # "all" = all this board can run; name a format to insist
        for fmt in [f for f in formats if not runnable(f, backends)]:
            formats.remove(fmt)
            skipped.append({"format": fmt, "reason": "no interpreter for it is installed"})
        if not formats:
            raise BenchError("no TFLite or ONNX interpreter is installed for this Python: "
                             "pip install ai-edge-litert (or tflite-runtime, or onnxruntime)")
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    info = device.describe()
    if info["emulated"]:
        print(f"warning: this machine is emulated ({info['emulation']}); its latencies measure the emulator, "
              "not a board", file=sys.stderr, flush=True)
    plan = [(f, t) for f in formats for t in cfg.threads]
    progress = progress_factory(len(plan))
    results = []
    try:
        for i, (fmt, threads) in enumerate(plan):
            if i and cfg.cooldown > 0:
                time.sleep(cfg.cooldown)
            progress.start(f"{fmt} x{threads}")
            result = measure_once(bundle, fmt, threads, cfg)
            results.append(result)
            progress.finish(describe_result(result))
    finally:
        progress.close()
    for s in skipped:
        print(f"skipped {s['format']}: {s['reason']}", file=sys.stderr)
    used = {r["backend"]: r["backend_version"] for r in results if r.get("backend")}
    report = {
        "schema": REPORT_SCHEMA,
        "kind": REPORT_KIND,
        "created": created,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": {**info, "backends": {d: v for d, v in backends.items() if v}},
        "bundle": {
            "name": bundle.name,
            "path": str(bundle.root),
            "manifest_sha256": bundle.manifest_sha256,
            "created": bundle.manifest.get("created"),
            "formats": {f: {k: bundle.artifact(f).get(k) for k in
                            ("file", "bytes", "sha256", "top1", "eval_images", "top1_drop_vs_fp32")}
                        for f in bundle.formats},
            "source": source_summary(bundle),
        },
        "settings": {"formats": formats, "threads": cfg.threads, "runs": None if cfg.seconds else cfg.runs,
                     "seconds": cfg.seconds, "warmup": cfg.warmup, "batch": cfg.batch, "cooldown_s": cfg.cooldown},
        "tool": {"device_bench": __version__, "python": sys.version.split()[0], "backends_used": used},
        "results": results,
        "skipped": skipped,
        "temperature_c_end": device.max_temperature(),
    }
    if finish is not None:
        finish(report)
    write_json_atomic(out, report)
    return report
