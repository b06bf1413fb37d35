"""Does one sweep describe every layer? A latency table finds the runtime's channel plateaus from
one 3x3 conv on an 8x8 input (device_bench/profile.py) and applies them to every conv of the
model, from 32x32 down to 2x2. This script sweeps the output width of that conv at every input
size VGG-16 and ResNet-56 have, on this machine, with the profile's own probes and timing, and
measures what costing each size with the 8x8 plateaus gets wrong.

    python benchmarks/plateaus_by_size.py [--formats tflite,tflite-int8] [--threads 1,2] [--out DIR]

Per (format, threads, input size): the plateaus that size's own sweep shows, and the error of
pricing every swept width w at its 8x8 plateau top (`Axis.effective`, dips included, as
`LatencyEntry` does) against what w measured at that size. The same number with the size's own
plateaus is the floor that timing noise sets. Writes OUT/plateaus_by_size.{json,md}.
Probe files are shared with `python -m device_bench profile` (its cache).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, cli, meta, meta_markdown, write_json, write_text  # noqa: E402
from device_bench import latency_table as lt  # noqa: E402
from device_bench import probes as P  # noqa: E402
from device_bench.profile import SWEEP_OTHER, Board, ProfileConfig, _timing, _tolerance, write_probeset  # noqa: E402

SIZES = (32, 16, 8, 4, 2)   # every conv input size of VGG-16 (and ResNet-56's 32, 16, 8) on CIFAR
REFERENCE = 8               # the size the profile sweeps (probes.sweep_shape)


def shape(size: int) -> dict:
    return {**P.sweep_shape(), "in_hw": [size, size], "out_hw": [size, size]}


def axis_of(widths, ms, tolerance: float) -> lt.Axis:
    """The Axis a table fits to this sweep when it is loaded (plateaus and dips)."""
    return lt.Axis.from_json({"sweep": {"widths": list(widths), "ms": list(ms)}}, tolerance)


def priced(axis: lt.Axis, widths, ms) -> np.ndarray:
    """Each width's cost as a table prices it from the sweep's values at the plateau tops: a top's
    value, divided by its dip for the widths below a dipped top (LatencyEntry.grids/_evaluate)."""
    at = dict(zip(widths, ms))
    w = np.asarray(widths)
    top = axis.effective(w)
    return np.array([at[int(t)] / axis.factor([t])[0] * axis.factor([x])[0] for x, t in zip(w, top)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/plateaus_by_size.py", description=__doc__.splitlines()[0])
    p.add_argument("--formats", default="tflite,tflite-int8")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "edgeslim" / "latency-probes")
    p.add_argument("--out", type=Path, default=RESULTS / "plateaus-by-size")
    args = p.parse_args(argv)
    info = meta(argv)
    cfg = ProfileConfig([f for f in args.formats.split(",") if f], [int(t) for t in args.threads.split(",")],
                        args.cache)
    widths = cfg.sweep
    specs = {"null": P.null_spec(), **{(s, w): P.probe_spec(shape(s), SWEEP_OTHER, w) for s in SIZES for w in widths}}
    built = P.build(list(specs.values()), cfg.formats, cfg.cache)
    with tempfile.TemporaryDirectory(prefix="plateaus_by_size.") as tmp:
        entries = [{"id": k, "kind": "probe", "files": f} for k, f in built.files.items()]
        timings = Board().time(Path(tmp), write_probeset(Path(tmp), entries), cfg, "the sweeps")
    rows = []
    for fmt in cfg.formats:
        for threads in cfg.threads:
            probes = _timing(timings, fmt, threads)["probes"]
            null = probes[P.spec_key(specs["null"])]["ms"]
            sweeps = {s: [max(probes[P.spec_key(specs[(s, w)])]["ms"] - null, 1e-6) for w in widths] for s in SIZES}
            tol = _tolerance([probes[P.spec_key(specs[(s, w)])]["spread"] for s in SIZES for w in widths])
            reference = axis_of(widths, sweeps[REFERENCE], tol)
            for s in SIZES:
                own = axis_of(widths, sweeps[s], tol)
                measured = np.array(sweeps[s])
                err_ref = priced(reference, widths, sweeps[s]) / measured - 1
                err_own = priced(own, widths, sweeps[s]) / measured - 1
                rows.append({"format": fmt, "threads": threads, "size": s, "tolerance": round(tol, 4),
                             "tops": own.tops(max(widths)), "dips": own.dips,
                             "same_plateaus_as_8x8": own.tops(max(widths)) == reference.tops(max(widths)),
                             "error_8x8_axis": {"median_abs": round(float(np.median(np.abs(err_ref))), 4),
                                                "max_abs": round(float(np.max(np.abs(err_ref))), 4)},
                             "error_own_axis": {"median_abs": round(float(np.median(np.abs(err_own))), 4),
                                                "max_abs": round(float(np.max(np.abs(err_own))), 4)},
                             "widths": widths, "ms": [round(m, 6) for m in sweeps[s]]})
    write_json(args.out / "plateaus_by_size.json", {"meta": info, "reference_size": REFERENCE,
                                                    "other_width": SWEEP_OTHER, "rows": rows})
    lines = ["# Channel plateaus of a 3x3 conv at every input size, against the 8x8 sweep", "",
             *meta_markdown(info), "",
             f"Output width swept {widths[0]}..{widths[-1]} ({len(widths)} widths), input width {SWEEP_OTHER}. "
             "Error: each swept width priced at its plateau top (dips included) vs measured at that size; "
             "median / max over the widths. 'own' fits the size's own sweep (the noise floor).", "",
             "| format | threads | input | plateau tops (own sweep) | dips | same as 8x8 | error, 8x8 plateaus | error, own |",
             "|---|---:|---|---|---|---|---:|---:|"]
    for r in rows:
        tops = ", ".join(map(str, r["tops"]))
        dips = ", ".join(f"{w}: {f:.2f}" for w, f in r["dips"].items()) or "-"
        e, o = r["error_8x8_axis"], r["error_own_axis"]
        lines.append(f"| {r['format']} | {r['threads']} | {r['size']}x{r['size']} | {tops} | {dips} | "
                     f"{'yes' if r['same_plateaus_as_8x8'] else 'no'} | {e['median_abs'] * 100:.1f} / {e['max_abs'] * 100:.1f} % | "
                     f"{o['median_abs'] * 100:.1f} / {o['max_abs'] * 100:.1f} % |")
    write_text(args.out / "plateaus_by_size.md", "\n".join(lines) + "\n")
    print("\n".join(lines[-len(rows):]))
    return 0


if __name__ == "__main__":
    cli(main)
