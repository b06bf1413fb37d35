"""Would another whole-network calibration predict the held-out networks better? No timing.

    python benchmarks/calibration_alternatives.py        # every benchmarks/results/latency-prediction*/

A latency table maps a network's sum of isolated layer times to its whole-network time through
seven measured anchors, interpolated (device_bench/latency_table.py, `calibration_curve`). This
script takes the tables and the held-out measurements that `latency_prediction.py` left, and
predicts every held-out network again with the same layer sums under other calibrations fitted to
the same seven anchors:

- interp:  the table's own curve (non-decreasing, linear between anchors): what ships;
- power:   ms = c * sum^p, least squares in log-log (smooth: one anchor's noise moves less);
- ratio:   ms = sum * (a + b * log sum) (the ratio whole/sum growing with size);
- weights: ms = a * sum + b * weights (whole networks stream their weights from memory; layers
           timed alone keep them in cache), weights = conv/linear parameters at the kept widths.

Writes RESULTS/calibration_alternatives.md and .json: per table entry, the mean absolute error
and how many networks land within ±10 % under each.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, meta, meta_markdown, write_json, write_text  # noqa: E402
from benchmarks.latency_prediction import KEEP_RANGE, held_out_keep  # noqa: E402
from device_bench import latency_table as lt  # noqa: E402

WITHIN = 0.10
FITS = ("interp", "power", "ratio", "weights")


def weights_of(table: lt.LatencyTable, keep) -> float:
    """Conv/linear parameters (millions) of the network that keeps `keep`."""
    k = table.keep_vector(keep)
    total = 0.0
    for layer, c_in, c_out in zip(table.layers, table.width_in(k), table.width_out(k)):
        if layer.op in ("conv2d", "linear", "depthwise"):
            kh, kw = table.shapes[layer.shape].get("kernel", [1, 1])
            total += (c_out if layer.op == "depthwise" else c_in * c_out) * kh * kw
    return total / 1e6


def fit(kind: str, sums: np.ndarray, weights: np.ndarray, ms: np.ndarray, entry: lt.LatencyEntry):
    """A function (sum, weights) -> ms fitted to the anchors."""
    if kind == "interp":
        return lambda s, w: float(entry.network_ms(s))
    if kind == "power":
        p = np.polyfit(np.log(sums), np.log(ms), 1)
        return lambda s, w: float(np.exp(np.polyval(p, np.log(s))))
    if kind == "ratio":
        q = np.polyfit(np.log(sums), ms / sums, 1)
        return lambda s, w: float(s * np.polyval(q, np.log(s)))
    coef, *_ = np.linalg.lstsq(np.stack([sums, weights], axis=1), ms, rcond=None)
    return lambda s, w: float(coef @ [s, w])


def run_seed(doc: dict) -> int:
    """The --seed the measuring run was started with (its command is in the document's meta)."""
    words = shlex.split(doc["meta"]["command"])
    return int(words[words.index("--seed") + 1]) if "--seed" in words else 0


def evaluate(folder: Path) -> list[dict]:
    doc = json.loads((folder / "latency_prediction.json").read_text())
    results = doc["results"]
    rows = []
    for table_path in sorted((folder / "tables").glob("*.json")):
        table, model = lt.load_table(table_path), table_path.stem
        for entry in table.entries:
            anchors = entry.raw.get("anchors") or []
            if len(anchors) < 3:
                continue
            sums = np.array([sum(entry.breakdown(a["keep"]).values()) for a in anchors])
            weights = np.array([weights_of(table, a["keep"]) for a in anchors])
            measured = np.array([a["measured_ms"] for a in anchors])
            fns = {k: fit(k, sums, weights, measured, entry) for k in FITS}
            errors = {k: [] for k in FITS}
            for r in results:
                if not r["config"].startswith(model + "-"):
                    continue
                hit = [x for x in r["rows"] if x["format"] == entry.format and x["threads"] == entry.threads]
                if not hit:
                    continue
                keep = held_out_keep(table.groups, run_seed(doc), r, doc.get("keep_range", KEEP_RANGE))
                s, w = sum(entry.breakdown(keep).values()), weights_of(table, keep)
                for k, fn in fns.items():
                    errors[k].append(fn(s, w) / hit[0]["measured_p50_ms"] - 1)
            if errors["interp"]:
                rows.append({"results": folder.name, "model": model, "entry": entry.label,
                             **{k: {"mean_abs": float(np.mean(np.abs(v))), "within": int(sum(abs(e) <= WITHIN for e in v)),
                                    "networks": len(v)} for k, v in errors.items()}})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/calibration_alternatives.py", description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(RESULTS), help="folder holding latency-prediction*/ result folders")
    p.add_argument("--out", default=str(RESULTS / "calibration-alternatives"))
    args = p.parse_args(argv)
    folders = [f for f in sorted(Path(args.results).glob("latency-prediction*"))
               if (f / "latency_prediction.json").is_file() and list((f / "tables").glob("*.json"))]
    info = meta(argv)
    rows = [row for f in folders for row in evaluate(f)]
    if not rows:
        raise SystemExit(f"error: no latency-prediction*/ results with tables and held-out networks under {args.results}")
    out = Path(args.out)
    write_json(out / "calibration_alternatives.json", {"meta": info, "within": WITHIN, "rows": rows})
    totals = {k: sum(r[k]["within"] for r in rows) for k in FITS}
    n = sum(r["interp"]["networks"] for r in rows)
    lines = ["# Whole-network calibration: the table's curve vs smooth fits, on held-out networks", "",
             *meta_markdown(info), "",
             "No timing: the tables and held-out measurements of benchmarks/results/latency-prediction*/ "
             "predicted again from the same layer sums. Cell: mean |error|, networks within ±10 %.", "",
             "| results | model | entry | " + " | ".join(FITS) + " |", "|---|---|---|" + "---|" * len(FITS)]
    for r in rows:
        lines.append(f"| {r['results']} | {r['model']} | {r['entry']} | " + " | ".join(
            f"{r[k]['mean_abs'] * 100:.1f} %, {r[k]['within']}/{r[k]['networks']}" for k in FITS) + " |")
    lines += ["", "Within ±10 %, all entries: " + ", ".join(f"{k} {totals[k]}/{n}" for k in FITS), ""]
    write_text(out / "calibration_alternatives.md", "\n".join(lines))
    print("\n".join(lines[-2:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
