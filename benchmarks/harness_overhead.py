"""Is device_bench measuring the model or itself? Compare the harness's p50 with a bare loop.

    python benchmarks/harness_overhead.py dist/NAME [--format tflite] [--threads 1] [--runs 2000] [--rounds 5]

Each round runs, in fresh processes and alternating (so drift hits both alike):
  harness  `python -m device_bench._worker` exactly as `device_bench run` does (times model.run(x))
  bare     the interpreter itself, no edgeslim code in the loop: ai_edge_litert/tflite_runtime
           `interpreter.invoke()` with the input set once, or onnxruntime `session.run`
The median over rounds of each p50 is compared: the harness must be within --limit (5 %) of the
bare invoke() loop. Exit 1 when it is not. On a model whose invoke takes tens of microseconds
the fixed cost of run()'s checks (dtype/shape/finite) is a visible fraction; on real models it is
noise. The bare set_tensor+invoke+get_tensor loop is printed too, for reference.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bare_loop(bundle: str, fmt: str, threads: int, runs: int, warmup: int) -> dict:
    """In this (fresh) process: the interpreter alone on the harness's exact input."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    import runtime

    model = runtime.load(bundle, format=fmt, threads=threads)  # only to get the same input tensor
    with np.load(Path(bundle) / model.manifest["samples"]["file"], allow_pickle=False) as z:
        x = model.preprocess(z["x"][:1])
    path = str(Path(bundle) / model.manifest["artifacts"][fmt]["file"])
    del model
    clock = time.perf_counter_ns
    invoke_ns, full_ns = [], []
    if fmt.startswith("tflite"):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            from tflite_runtime.interpreter import Interpreter
        interp = Interpreter(model_path=path, num_threads=threads)
        interp.allocate_tensors()
        inp, out = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]
        interp.set_tensor(inp, x)
        for _ in range(warmup + 1):
            interp.invoke()
        for _ in range(runs):
            t = clock()
            interp.invoke()
            invoke_ns.append(clock() - t)
        for _ in range(runs):
            t = clock()
            interp.set_tensor(inp, x)
            interp.invoke()
            interp.get_tensor(out)
            full_ns.append(clock() - t)
    else:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        feed = {name: x}
        for _ in range(warmup + 1):
            sess.run(None, feed)
        for _ in range(runs):
            t = clock()
            sess.run(None, feed)
            invoke_ns.append(clock() - t)
        full_ns = invoke_ns
    ms = lambda v: float(np.percentile(np.asarray(v) / 1e6, 50))  # noqa: E731
    return {"invoke_p50": ms(invoke_ns), "full_p50": ms(full_ns)}


def harness(bundle: str, fmt: str, threads: int, runs: int, warmup: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "r.json")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        subprocess.run([sys.executable, "-m", "device_bench._worker", bundle, "--format", fmt, "--threads",
                        str(threads), "--runs", str(runs), "--warmup", str(warmup), "--result", result],
                       check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(result) as f:
            r = json.load(f)
    if r["status"] != "ok":
        raise SystemExit(f"harness_overhead: the worker failed: {r.get('error') or r.get('reason')}")
    return r["latency_ms"]["p50"]


def bare(bundle: str, fmt: str, threads: int, runs: int, warmup: int) -> dict:
    out = subprocess.run([sys.executable, __file__, bundle, "--format", fmt, "--threads", str(threads),
                          "--runs", str(runs), "--warmup", str(warmup), "--bare-child"],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle")
    p.add_argument("--format", default="tflite")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--limit", type=float, default=0.05, help="allowed relative overhead (default 0.05)")
    p.add_argument("--bare-child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if not (Path(a.bundle) / "manifest.json").is_file():
        print(f"harness_overhead: error: {a.bundle} is not a bundle folder", file=sys.stderr)
        return 2
    if a.bare_child:
        print(json.dumps(bare_loop(a.bundle, a.format, a.threads, a.runs, a.warmup)))
        return 0
    rows = []
    for i in range(a.rounds):
        h = harness(a.bundle, a.format, a.threads, a.runs, a.warmup)
        b = bare(a.bundle, a.format, a.threads, a.runs, a.warmup)
        rows.append((h, b["invoke_p50"], b["full_p50"]))
        print(f"round {i + 1}: harness p50 {h:.4f} ms   bare invoke() p50 {b['invoke_p50']:.4f} ms   "
              f"bare set+invoke+get p50 {b['full_p50']:.4f} ms", flush=True)
    h, inv, full = (statistics.median(c) for c in zip(*rows))
    overhead = h / inv - 1
    print(f"{a.format} x{a.threads}, {a.runs} runs x {a.rounds} rounds (medians): harness {h:.4f} ms, "
          f"bare invoke {inv:.4f} ms, bare set+invoke+get {full:.4f} ms -> harness overhead {overhead:+.1%} "
          f"({'within' if overhead <= a.limit else 'OVER'} the {a.limit:.0%} limit)")
    return 0 if overhead <= a.limit else 1


if __name__ == "__main__":
    sys.exit(main())
