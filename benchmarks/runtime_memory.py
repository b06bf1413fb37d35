"""Does `Model.predict` leak? 10,000 single-image calls per format, resident memory sampled
along the way; the growth after warm-up should be ~0 (allocator noise is well under 1 MB).

    python benchmarks/runtime_memory.py dist/vgg16-f76 --out reports/runtime-memory
    python benchmarks/runtime_memory.py dist/vgg16-f76 --formats tflite-int8 --calls 20000

Each format runs in its own fresh process (so one format's memory does not hide another's).
Writes runtime-memory-NAME.json/.md/.png into --out; exit 1 if any format grew more than
--limit-mb (default 2 MB).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]
WARMUP = 200


def rss_mb() -> float:
    """Current resident set size (Linux /proc; elsewhere the peak, which still shows growth)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_format(bundle: str, fmt: str, calls: int, threads: int, every: int) -> dict:
    """Runs in the child process."""
    import gc

    import numpy as np

    sys.path.insert(0, str(REPO))
    import runtime
    from runtime.bundle import read_bundle, read_samples

    model = runtime.load(bundle, format=fmt, threads=threads)
    images = read_samples(read_bundle(bundle)).x
    for i in range(WARMUP):
        model.predict(images[i % len(images)])
    gc.collect()
    before, start = rss_mb(), time.perf_counter()
    trace = [(0, before)]
    first = model.predict(images[0])
    for i in range(1, calls + 1):
        model.predict(images[i % len(images)])
        if i % every == 0:
            trace.append((i, rss_mb()))
    gc.collect()
    after = rss_mb()
    same = bool(np.array_equal(model.predict(images[0]), first))
    return {"format": fmt, "backend": model.backend, "backend_version": model.backend_version,
            "calls": calls, "rss_before_mb": before, "rss_after_mb": after, "growth_mb": after - before,
            "seconds": time.perf_counter() - start, "trace": trace, "same_result_after": same}


def write(results: List[dict], name: str, out: Path, limit: float, provenance: dict) -> Path:
    from benchmarks.common import meta_markdown

    out.mkdir(parents=True, exist_ok=True)
    stem = f"runtime-memory-{name}"
    md = [f"# `predict` memory over {results[0]['calls']:,} calls: {name}", "", *meta_markdown(provenance), "",
          f"RSS after {WARMUP} warm-up calls vs after the run (limit {limit} MB).", "",
          "| format | backend | RSS before MB | RSS after MB | growth MB | calls/s | verdict |",
          "|---|---|---:|---:|---:|---:|---|"]
    for r in results:
        verdict = "flat" if r["growth_mb"] <= limit and r["same_result_after"] else "GROWS"
        md.append(f"| {r['format']} | {r['backend']} {r['backend_version']} | {r['rss_before_mb']:.1f} | "
                  f"{r['rss_after_mb']:.1f} | {r['growth_mb']:+.2f} | {r['calls'] / r['seconds']:.0f} | {verdict} |")
    for suffix, text in ((".json", json.dumps({**provenance, "bundle": name, "limit_mb": limit,
                                                          "results": results}, indent=2)), (".md", "\n".join(md) + "\n")):
        tmp = out / (stem + suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / (stem + suffix))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        calls, rss = zip(*r["trace"])
        ax.plot(calls, [v - r["rss_before_mb"] for v in rss], label=f"{r['format']} ({r['backend']})")
    ax.axhline(limit, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("predict() calls after warm-up")
    ax.set_ylabel("RSS growth (MB)")
    ax.set_title(f"runtime memory: {name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = out / (stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out / (stem + ".png"))
    print("\n".join(md))
    return out / stem


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle")
    p.add_argument("--formats", default="all", help="comma list or 'all' (those an installed backend runs)")
    p.add_argument("--calls", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("reports/runtime-memory"))
    p.add_argument("--limit-mb", type=float, default=2.0)
    p.add_argument("--one", help=argparse.SUPPRESS)  # child mode: one format, JSON on stdout
    a = p.parse_args(argv)
    every = max(1, a.calls // 40)
    if a.one:
        print(json.dumps(one_format(a.bundle, a.one, a.calls, a.threads, every)))
        return 0

    from tqdm import tqdm

    sys.path.insert(0, str(REPO))
    from benchmarks.common import meta
    from runtime.backends import backends_for, is_installed
    from runtime.bundle import read_bundle

    provenance = meta(argv)
    bundle = read_bundle(a.bundle)
    formats = list(bundle.artifacts) if a.formats == "all" else a.formats.split(",")
    formats = [f for f in formats if any(is_installed(b) for b in backends_for(f))]
    results = []
    for fmt in tqdm(formats, desc="formats", unit="format"):
        proc = subprocess.run([sys.executable, __file__, a.bundle, "--one", fmt, "--calls", str(a.calls),
                               "--threads", str(a.threads)], capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            print(f"error: {fmt}: {proc.stderr.strip()[-500:]}", file=sys.stderr)
            return 2
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    stem = write(results, bundle.name, a.out, a.limit_mb, provenance)
    print(f"wrote {stem}.json, .md, .png")
    return 0 if all(r["growth_mb"] <= a.limit_mb and r["same_result_after"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
