"""Test top-1, train top-1 and parameter count per epoch of finished compress runs, side by side.

    python benchmarks/training_curves.py RUN [RUN ...] --out DIR

Each RUN is a compress run folder (or a copy holding its report.json and train_log.csv). Reads
only those two files, trains nothing. Writes DIR/curves.json, curves.md (final numbers per run)
and curves.png (test top-1, train top-1 and parameters against the epoch, one line per run): how a pruning
run's accuracy and size evolve while it trains, next to the dense run it is compared with.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    BenchError,
    Parser,
    meta,
    meta_markdown,
    pyplot,
    read_json,
    save_figure,
    write_json,
    write_text,
)


def read_run(folder: Path) -> dict:
    """The report's headline and the per-epoch log of one run folder."""
    report = read_json(folder / "report.json")
    log_path = folder / "train_log.csv"
    try:
        with open(log_path, newline="") as f:
            rows = list(csv.DictReader(f))
        epochs = [{"epoch": int(r["epoch"]), "phase": r["phase"],
                   "train_top1": float(r["train_top1"]), "train_loss": float(r["train_loss"]),
                   "test_top1": float(r["test_top1"]) if r["test_top1"] else None,
                   "test_loss": float(r["test_loss"]) if r["test_loss"] else None,
                   "params": int(r["params"]), "flops": int(r["flops"]), "seconds": float(r["seconds"])}
                  for r in rows]
    except (OSError, KeyError, ValueError) as exc:
        raise BenchError(f"{log_path}: not a compress train log ({type(exc).__name__}: {exc})") from None
    if not epochs:
        raise BenchError(f"{log_path}: no epochs logged")
    try:
        slim = report["slim"]
        return {"name": report["name"], "method": report["method"], "model": report["model"],
                "top1": slim["top1"], "flops": slim["flops"], "params": slim["params"],
                "dense_params": report["dense"]["params"], "finished": report.get("created", ""), "epochs": epochs}
    except (KeyError, TypeError) as exc:
        raise BenchError(f"{folder / 'report.json'}: missing {exc}; is it a compress report?") from None


def markdown(result: dict) -> str:
    lines = ["# Training curves", "", *meta_markdown(result["meta"]),
             "- read from the runs' report.json and train_log.csv; each run's own date is its `finished` column", "",
             "- last epoch: train top-1 and loss as logged while training (augmented images, the network "
             "changing), test loss on the test images: a network that fits its training data less "
             "(lower train top-1) is short of capacity or epochs, one with a wider train-test gap overfits", "",
             "| run | method | epochs | top-1 | FLOPs (MACs) | params | params cut | last epoch: train top-1 / "
             "loss | test loss | train s (summed) | finished |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in result["runs"]:
        cut = 1 - r["params"] / r["dense_params"]
        last = r["epochs"][-1]
        test_loss = f"{last['test_loss']:.3f}" if last["test_loss"] is not None else "–"
        lines.append(f"| {r['name']} | {r['method']} | {len(r['epochs'])} | {r['top1']:.4f} | "
                     f"{r['flops'] / 1e6:.2f} M | {r['params'] / 1e6:.3f} M | {cut:.1%} | "
                     f"{last['train_top1']:.4f} / {last['train_loss']:.3f} | {test_loss} | "
                     f"{last['seconds']:.0f} | {r['finished']} |")
    lines += ["", "![test top-1 and parameters per epoch](curves.png)", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, (acc, fit, size) = plt.subplots(1, 3, figsize=(16, 4.2))
    for r in result["runs"]:
        evaluated = [e for e in r["epochs"] if e["test_top1"] is not None]
        acc.plot([e["epoch"] for e in evaluated], [e["test_top1"] for e in evaluated], "o-", markersize=3,
                 label=f"{r['name']} ({r['top1']:.2%})")
        fit.plot([e["epoch"] for e in r["epochs"]], [e["train_top1"] for e in r["epochs"]], "o-", markersize=3,
                 label=f"{r['name']} ({r['epochs'][-1]['train_top1']:.2%})")
        size.plot([e["epoch"] for e in r["epochs"]], [e["params"] / 1e6 for e in r["epochs"]], "o-", markersize=3,
                  label=r["name"])
    acc.set_ylabel("test top-1 after the epoch")
    fit.set_ylabel("train top-1 during the epoch (augmented)")
    size.set_ylabel("parameters (M) after the epoch")
    for ax in (acc, fit, size):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = Parser(prog="python benchmarks/training_curves.py", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="compress run folders")
    p.add_argument("--out", required=True, help="results folder")
    try:
        args = p.parse_args(argv)
        runs = [read_run(Path(folder)) for folder in args.runs]
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    result = {"benchmark": "training_curves", "meta": meta(argv), "runs": runs}
    write_json(out / "curves.json", result)
    write_text(out / "curves.md", markdown(result))
    plot(result, out / "curves.png")
    print(f"wrote {out / 'curves.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
