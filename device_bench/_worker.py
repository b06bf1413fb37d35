"""One measurement in a process of its own: `python -m device_bench._worker BUNDLE --format F ...`.

A fresh process per (format, threads) keeps each peak RSS the model's own (no allocator memory
left over from a previous interpreter) and each interpreter cold, as on a real start. The result
goes to --result as JSON (stdout stays free for whatever the interpreter prints).

Order: load (init) -> first invoke (timed alone: delegates prepare lazily) -> warmup -> timed runs.
Only one invoke (`model.bind(x)()`, the checks of run() done once) is inside the timer: preprocessing is done once before and measured apart.
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time
from typing import Any, Dict, Optional

from .files import write_json_atomic


def rss_mb(field: str) -> Optional[float]:
    """VmRSS / VmHWM of this process from /proc/self/status (Linux), MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return round(int(line.split()[1]) / 1024, 2)
    except OSError:
        pass
    return None


def maxrss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return round(peak / (1 << 20) if sys.platform == "darwin" else peak / 1024, 2)


def sample_images(bundle_dir: str, manifest: Dict[str, Any], batch: int):
    """`batch` real test images from samples.npz (repeated if it holds fewer); random uint8
    images of the bundle's size when the bundle has no samples."""
    import numpy as np

    samples = manifest.get("samples") or {}
    path = os.path.join(bundle_dir, samples.get("file", "samples.npz"))
    if os.path.isfile(path):
        with np.load(path, allow_pickle=False) as z:
            x = z["x"]
        if len(x):
            return x[np.arange(batch) % len(x)]
    pre = manifest["preprocess"]
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(batch, pre["height"], pre["width"], 3), dtype=np.uint8)


def measure(args: argparse.Namespace) -> Dict[str, Any]:
    import numpy as np  # imported before the baseline: numpy is overhead, not the model's

    import runtime

    from .stats import summarize_ns

    baseline = rss_mb("VmRSS")
    t0 = time.perf_counter()
    model = runtime.load(args.bundle, format=args.format, threads=args.threads)
    init_ms = (time.perf_counter() - t0) * 1e3
    info: Dict[str, Any] = {"backend": model.backend, "backend_version": model.backend_version}
    fixed = getattr(model, "fixed_batch", None)
    if fixed is not None and fixed != args.batch:
        return {"status": "skipped", **info,
                "reason": f"{args.format} takes a fixed batch of {fixed} per invoke (--batch {args.batch})"}

    images = sample_images(args.bundle, model.manifest, args.batch)
    x = model.preprocess(images)

    t0 = time.perf_counter()
    model.run(x)
    first_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(args.warmup):
        model.run(x)

    gc.collect()
    durations = []
    # The timed call is the bound invoke: input checks ran once in bind(), not per iteration.
    clock = time.perf_counter_ns
    run_bound = model.bind(x)
    if args.seconds is not None:
        deadline = clock() + int(args.seconds * 1e9)
        while True:
            start = clock()
            run_bound()
            end = clock()
            durations.append(end - start)
            if end >= deadline:
                break
    else:
        for _ in range(args.runs):
            start = clock()
            run_bound()
            durations.append(clock() - start)

    pre_ns = []
    for _ in range(min(20, len(durations))):
        start = clock()
        model.preprocess(images)
        pre_ns.append(clock() - start)

    latency = summarize_ns(durations, args.batch)
    throughput = latency.pop("throughput_ips")
    return {"status": "ok", **info, "runs": len(durations),
            "init_ms": round(init_ms, 3), "first_inference_ms": round(first_ms, 3),
            "latency_ms": {k: round(v, 4) for k, v in latency.items()},
            "throughput_ips": round(throughput, 2),
            "preprocess_ms": round(float(np.median(pre_ns)) / 1e6, 4) if pre_ns else None,
            "rss_baseline_mb": baseline, "peak_rss_mb": maxrss_mb(), "vm_hwm_mb": rss_mb("VmHWM")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m device_bench._worker")
    p.add_argument("bundle")
    p.add_argument("--format", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--result", required=True)
    args = p.parse_args(argv)
    try:
        result = measure(args)
    except Exception as e:  # any failure is this measurement's result, reported in one line
        msg = " ".join(str(e).split()) or type(e).__name__
        known = type(e).__module__.startswith("runtime")
        result = {"status": "error", "error": msg if known else f"{type(e).__name__}: {msg}"}
    write_json_atomic(args.result, result)
    return 0 if result["status"] != "error" else 1


if __name__ == "__main__":
    sys.exit(main())
