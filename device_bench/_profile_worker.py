"""Time a probe set on the board (the part of `device_bench profile` that runs there).

    python -m device_bench._profile_worker PROBESET --formats tflite,tflite-int8 --threads 1,2 --out T.json

PROBESET is a folder with probes.json (docs/formats.md §4: every probe's id, kind and file per
format) and the files. Each (format, threads) runs in a fresh process of its own, like `run`'s
measurements, one after the other. stdlib + numpy + runtime only.

Timing is built to survive a busy or drifting board: the probes of a chunk are loaded together,
then timed in ROUNDS interleaved rounds (a different order each round); in each round a probe
runs a burst of invokes lasting about BURST_MS, timed one by one, and its value for the round is
the burst's median. The probe's latency is the median of its rounds, its `spread` the rounds'
(max - min) / median. A layer probe is timed on `Session.invoker` (one invoke, input placed once,
no copies: a layer's input can be as large as its work); a whole network ("network" probes) on
`Session.run`, which is what `device_bench run` times, with at least NETWORK_INVOKES invokes a round.

Progress goes to stderr as `EDGESLIM-PROGRESS <done> <total> <what>` lines (the host draws a bar).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

from .files import write_json_atomic

ROUNDS = 5
BURST_MS = 10.0
CHUNK_BYTES = 64 << 20  # model bytes loaded at once (boards have little memory)
PROGRESS = "EDGESLIM-PROGRESS"
PROBESET_KIND = "edgeslim-probe-set"
TIMINGS_KIND = "edgeslim-profile-timings"


def read_probeset(folder: str) -> Dict[str, Any]:
    path = os.path.join(folder, "probes.json")
    with open(path) as f:
        probeset = json.load(f)
    if probeset.get("kind") != PROBESET_KIND:
        raise ValueError(f"{path} is not a probe set")
    return probeset


def progress(done: int, total: int, what: str) -> None:
    print(f"{PROGRESS} {done} {total} {what}", file=sys.stderr, flush=True)


def _input(session, rng):
    import numpy as np

    shape = [1 if d < 0 else d for d in session.input_shape]
    if session.input_dtype.kind == "f":
        return rng.standard_normal(shape).astype(session.input_dtype)
    info = np.iinfo(session.input_dtype)
    return rng.integers(info.min, info.max + 1, size=shape).astype(session.input_dtype)


def _burst(call, n: int) -> float:
    """Median ms of n invokes timed one by one."""
    clock = time.perf_counter_ns
    times = []
    for _ in range(n):
        start = clock()
        call()
        times.append(clock() - start)
    times.sort()
    return times[len(times) // 2] / 1e6


NETWORK_INVOKES = 30  # at least this many invokes per round for a whole network: it calibrates every layer


def time_chunk(calls: Dict[str, Any], rounds: int, burst_ms: float, seed: int,
               min_invokes: Optional[Dict[str, int]] = None) -> Dict[str, Dict[str, float]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    estimate = {}
    for pid, call in calls.items():  # warm-up (XNNPACK packs weights on the first invoke) + estimate
        call()
        call()
        estimate[pid] = max(_burst(call, 3), 1e-4)
    values: Dict[str, List[float]] = {pid: [] for pid in calls}
    ids = list(calls)
    for _ in range(rounds):
        for i in rng.permutation(len(ids)):
            pid = ids[i]
            n = int(min(2000, max(3, (min_invokes or {}).get(pid, 3), burst_ms / estimate[pid])))
            values[pid].append(_burst(calls[pid], n))
    out = {}
    for pid, v in values.items():
        med = float(np.median(v))
        out[pid] = {"ms": med, "spread": float((max(v) - min(v)) / med) if med > 0 else 0.0}
    return out


def measure(folder: str, fmt: str, threads: int, rounds: int, burst_ms: float, report) -> Dict[str, Any]:
    """Every probe of `fmt` in the set, with `threads` interpreter threads."""
    import numpy as np

    from runtime.backends import choose_backend, open_model

    probes = [p for p in read_probeset(folder)["probes"] if fmt in p["files"]]
    backend = choose_backend(fmt)
    results: Dict[str, Dict[str, float]] = {}
    rng = np.random.default_rng(0)
    chunk: List[Dict[str, Any]] = []
    size = 0
    version = None

    def flush():
        nonlocal version
        calls, floor = {}, {}
        for p in chunk:
            session = open_model(os.path.join(folder, p["files"][fmt]), fmt, threads, backend)
            version = session.backend_version
            x = _input(session, rng)
            calls[p["id"]] = session.invoker(x) if p.get("kind", "probe") == "probe" else (lambda s=session, x=x: s.run(x))
            if p.get("kind") == "network":
                floor[p["id"]] = NETWORK_INVOKES
        results.update(time_chunk(calls, rounds, burst_ms, seed=len(results), min_invokes=floor))
        report(len(chunk))
        chunk.clear()

    for p in probes:
        nbytes = os.path.getsize(os.path.join(folder, p["files"][fmt]))
        if chunk and size + nbytes > CHUNK_BYTES:
            flush()
            size = 0
        chunk.append(p)
        size += nbytes
    if chunk:
        flush()
    return {"status": "ok", "backend": backend, "backend_version": version, "probes": results}


def drive(args) -> int:
    """All (format, threads), each in a child process; one timings JSON."""
    from . import device
    from .run import installed_backends

    probeset = read_probeset(args.probeset)
    formats = [f for f in args.formats.split(",") if f]
    threads = [int(t) for t in args.threads.split(",") if t]
    counts = {f: sum(1 for p in probeset["probes"] if f in p["files"]) for f in formats}
    total, done = sum(counts[f] for f in formats) * len(threads), 0
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results = []
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    for fmt in formats:
        for t in threads:
            with tempfile.TemporaryDirectory(prefix="device_bench.profile.") as tmp:
                result_path = os.path.join(tmp, "result.json")
                argv = [sys.executable, "-m", "device_bench._profile_worker", args.probeset, "--one", fmt, str(t),
                        "--result", result_path, "--rounds", str(args.rounds), "--burst-ms", str(args.burst_ms)]
                start = time.time()
                proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                tail = []
                for line in proc.stderr:
                    if line.startswith(PROGRESS):
                        done += int(line.split()[1])
                        progress(done, total, f"{fmt} x{t}")
                    elif line.strip():
                        tail.append(line.strip())
                proc.wait()
                if os.path.isfile(result_path):
                    with open(result_path) as f:
                        result = json.load(f)
                else:
                    why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
                    result = {"status": "error", "error": f"worker {why}" + (f": {tail[-1]}" if tail else "")}
            results.append({"format": fmt, "threads": t, "seconds": round(time.time() - start, 2), **result})
            if result["status"] != "ok":
                print(f"{fmt} x{t}: {result.get('error')}", file=sys.stderr, flush=True)
    write_json_atomic(args.out, {
        "schema": 1, "kind": TIMINGS_KIND, "created": created,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": device.describe(), "backends": {d: v for d, v in installed_backends().items() if v},
        "settings": {"rounds": args.rounds, "burst_ms": args.burst_ms}, "results": results})
    return 0 if all(r["status"] == "ok" for r in results) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m device_bench._profile_worker")
    p.add_argument("probeset")
    p.add_argument("--formats", default="tflite")
    p.add_argument("--threads", default="1")
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--burst-ms", type=float, default=BURST_MS)
    p.add_argument("--out")
    p.add_argument("--one", nargs=2, metavar=("FORMAT", "THREADS"))
    p.add_argument("--result")
    args = p.parse_args(argv)
    if not args.one:
        return drive(args)
    fmt, threads = args.one[0], int(args.one[1])
    try:
        result = measure(args.probeset, fmt, threads, args.rounds, args.burst_ms,
                         lambda n: print(f"{PROGRESS} {n}", file=sys.stderr, flush=True))
    except Exception as e:  # one line in the result, as _worker does
        msg = " ".join(str(e).split()) or type(e).__name__
        result = {"status": "error", "error": msg if type(e).__module__.startswith("runtime") else
                  f"{type(e).__name__}: {msg}"}
    write_json_atomic(args.result, result)
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
