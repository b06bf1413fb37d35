"""Depth or width: what a latency table predicts for removing whole residual branches of a CIFAR
ResNet vs thinning every layer, at equal FLOPs. A prediction from a measured table, no timing.

    python benchmarks/depth_vs_width.py                     # the committed ResNet-56 table
    python benchmarks/depth_vs_width.py --table FILE.json --out benchmarks/results/depth-vs-width

Why: on a thin residual net, channel pruning buys little latency (BENCHMARKS.md, "Latency-targeted
vs FLOPs-targeted pruning": efficiency 0.60-0.76 where issue 16 asks for 0.85), because each of
the ~57 small convs costs a fixed overhead whatever its width. Removing a residual branch (a block's
internal group at width 0: conv1's outputs, so conv1 and conv2 vanish and the block is its
shortcut plus bn2's constant) removes that overhead too. The table prices a layer with 0 input or
output channels at 0 ms, so both choices are read from the same measured costs:

* depth: j of the blocks 1..n-1 of every stage lose their residual branch (evenly spaced; block 0,
  which changes the width or stride, is kept), j = 0..n-1;
* width: every group thinned by one share (as `--method uniform`), shares 1.0 down to 0.25.

Efficiency = predicted speed-up x (1 - FLOPs reduction): 1.0 means latency falls as fast as FLOPs.
Writes OUT/depth_vs_width.{json,md,png}.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RESULTS,
    BenchError,
    Parser,
    cli,
    meta,
    meta_markdown,
    pyplot,
    save_figure,
    write_json,
    write_text,
)

DEFAULT_TABLE = RESULTS / "latency-prediction" / "tables" / "resnet56.json"
BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.conv1$")   # the zoo's CIFAR ResNets: a block's internal group
SHARES = np.round(np.arange(1.0, 0.24, -0.05), 2)


def flops_model(table):
    """FLOPs of the table's model at a kept-count vector (compress's own counter)."""
    import torch

    from compress.models import build_model
    from compress.prune.cost import ResourceModel
    from compress.prune.graph import find_groups
    spec = table.model
    model = build_model(spec["spec"], spec.get("num_classes") or 10, spec.get("width") or 1.0).eval()
    example = torch.zeros(2, 3, 32, 32)
    rm = ResourceModel(model, find_groups(model, example, ()), example)
    names = [g for g, _ in table.groups]
    return lambda k: rm.flops(dict(zip(names, (int(v) for v in k))))


def depth_configs(table) -> list[tuple[str, np.ndarray]]:
    sizes = np.array([c for _, c in table.groups], dtype=float)
    stages: dict[int, list[int]] = {}
    for i, (g, _) in enumerate(table.groups):
        m = BLOCK.match(g)
        if m and int(m.group(2)) > 0:
            stages.setdefault(int(m.group(1)), []).append(i)
    if not stages:
        raise BenchError(f"{table.path}: no residual blocks named layerS.B.conv1 (the zoo's CIFAR ResNets)")
    n = min(len(v) for v in stages.values())
    out = []
    for j in range(n + 1):
        k = sizes.copy()
        for idx in stages.values():   # j of them, evenly spaced
            for p in np.unique(np.linspace(0, len(idx) - 1, j).round().astype(int)) if j else ():
                k[idx[p]] = 0
        out.append((f"{j} of {n + 1} blocks per stage removed", k))
    return out


def width_configs(table) -> list[tuple[str, np.ndarray]]:
    sizes = np.array([c for _, c in table.groups], dtype=float)
    return [(f"every layer x{s:.2f}", np.maximum(1, np.round(sizes * s))) for s in SHARES]


def main(argv=None) -> int:
    p = Parser(prog="python benchmarks/depth_vs_width.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--table", default=str(DEFAULT_TABLE), help="a latency table of a zoo CIFAR ResNet "
                   "(python -m device_bench profile); default the committed ResNet-56 one")
    p.add_argument("--out", default=str(RESULTS / "depth-vs-width"), help="results folder")
    args = p.parse_args(argv)
    from device_bench.latency_table import TableError, load_table
    try:
        table = load_table(args.table)
    except (OSError, TableError) as e:
        raise BenchError(f"--table {args.table}: {e}") from None
    flops = flops_model(table)
    configs = {"depth": depth_configs(table), "width": width_configs(table)}
    dense_flops = flops(np.array([c for _, c in table.groups]))
    rows = []
    for raw in table.raw["entries"]:
        entry = table.entry(raw["format"], int(raw["threads"]))
        dense_ms = entry.predict_keep(None)
        for kind, items in configs.items():
            for label, k in items:
                reduction = 1 - flops(k) / dense_flops
                ms = entry.predict_keep(k)
                rows.append({"entry": entry.label, "kind": kind, "config": label, "flops_reduction": round(reduction, 4),
                             "predicted_ms": round(ms, 6), "speedup": round(dense_ms / ms, 4),
                             "efficiency": round(dense_ms / ms * (1 - reduction), 4)})
    out = Path(args.out)
    result = {"benchmark": "depth_vs_width", "table": str(args.table), "board": table.board_text,
              "model": table.model_text, "meta": meta(argv), "rows": rows}
    write_json(out / "depth_vs_width.json", result)
    write_text(out / "depth_vs_width.md", markdown(result))
    plot(rows, out / "depth_vs_width.png", table.model_text)
    print(f"wrote {out}/depth_vs_width.md")
    return 0


def markdown(result: dict) -> str:
    lines = [f"# Depth vs width: predicted from {result['table']} ({result['model']}, {result['board']})", "",
             *meta_markdown(result["meta"]), "",
             "| entry | kind | configuration | FLOPs cut | predicted ms | speed-up | efficiency |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['entry']} | {r['kind']} | {r['config']} | {r['flops_reduction']:.1%} | "
                     f"{r['predicted_ms']:.4f} | {r['speedup']:.2f} | {r['efficiency']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, model: str) -> None:
    plt = pyplot()
    entries = list(dict.fromkeys(r["entry"] for r in rows))
    fig, axes = plt.subplots(1, len(entries), figsize=(4.2 * len(entries), 3.8), sharey=True, squeeze=False)
    x = np.linspace(0, 0.95, 50)
    for ax, entry in zip(axes[0], entries):
        for kind, style in (("depth", "o-"), ("width", "s--")):
            pts = sorted((r["flops_reduction"], r["speedup"]) for r in rows if r["entry"] == entry and r["kind"] == kind)
            ax.plot(*zip(*pts), style, ms=3, label="residual branches removed" if kind == "depth" else "every layer thinned")
        ax.plot(x, 1 / (1 - x), ":", color="grey", label="speed-up = FLOPs ratio")
        ax.set_title(entry)
        ax.set_xlabel("FLOPs reduction")
        ax.set_ylim(0.9, 4.5)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("predicted speed-up over dense")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{model}: depth vs width, predicted by the latency table", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    cli(main)
