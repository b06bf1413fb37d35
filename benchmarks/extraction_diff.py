"""How far a correct cut network drifts from the masked one (what CHECK_RTOL must allow), and what
find_groups' trial cut costs.

    python benchmarks/extraction_diff.py [--models vgg11,vgg16,...] [--widths 0.5,1.0] \
        [--reductions 0.3,0.6,0.85] [--seeds 2] [--batch 8] [--threads 1] [--out DIR]

For every zoo model and width: BN statistics and affine terms are randomised (so a masked channel's
BN output is far from zero before the mask), masks are drawn from random scores at each FLOPs
reduction and seed, the network is cut (compress.prune.extract) and compared by
compress.prune.surgery.check_extraction on a random batch: the relative difference of the
outputs is float32 rounding only, and its largest value over all runs is what CHECK_RTOL is set
against. Then the trial cut (surgery.trial_cut, run by every find_groups) is timed beside
find_groups' own tracing, best of 3. Writes DIR/extraction_diff.json, .md and .png (default
benchmarks/results/extraction_diff).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RESULTS,
    BenchError,
    Parser,
    meta,
    meta_markdown,
    pyplot,
    save_figure,
    write_json,
    write_text,
)


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v]
    except ValueError:
        raise BenchError(f"--{name} {text!r}: expected numbers separated by commas") from None


def randomize_bn(model, seed: int):
    """BN statistics and affine terms drawn at random: a masked channel's BN output is far from zero."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
    return model


def measure(models, widths, reductions, seeds, batch) -> dict:
    import torch

    from compress.models import create_model
    from compress.prune import ResourceModel, extract, find_groups, select
    from compress.prune.importance import random_scores
    from compress.prune.surgery import CHECK_RTOL, check_extraction, trial_cut

    rows, costs = [], []
    for name in models:
        for width in widths:
            model = randomize_bn(create_model(name, 10, width), seed=1).eval()
            x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
            groups = find_groups(model, x[:2], check=False)
            cost = ResourceModel(model, groups, x[:1])
            for reduction in reductions:
                for seed in range(seeds):
                    masks = select(random_scores(groups, seed), cost, "flops", reduction, 1e-9)  # >= 1 channel a group
                    record = check_extraction(model, extract(model, groups, masks), groups, masks, x)
                    rows.append({"model": name, "width": width, "reduction": reduction, "seed": seed, **record})
                    print(f"{name} width {width} reduction {reduction} seed {seed}: relative diff "
                          f"{record['relative_diff']:.2e}", flush=True)
            example = torch.zeros(2, 3, 32, 32)
            trace, trial = [], []
            for _ in range(3):
                start = time.perf_counter()
                find_groups(model, example, check=False)
                trace.append(time.perf_counter() - start)
                start = time.perf_counter()
                trial_cut(model, groups, example)
                trial.append(time.perf_counter() - start)
            costs.append({"model": name, "width": width, "find_groups_s": min(trace), "trial_cut_s": min(trial)})
    worst = max(rows, key=lambda r: r["relative_diff"])
    return {"rtol": CHECK_RTOL, "worst_relative_diff": worst["relative_diff"],
            "worst": {k: worst[k] for k in ("model", "width", "reduction", "seed")},
            "margin": CHECK_RTOL / worst["relative_diff"] if worst["relative_diff"] else None,
            "runs": rows, "cost": costs}


def markdown(result: dict) -> str:
    w = result["worst"]
    lines = ["# cut vs masked network: float32 drift, and the trial cut's cost", "", *meta_markdown(result["meta"]), "",
             f"Largest relative output difference over {len(result['runs'])} cuts: "
             f"**{result['worst_relative_diff']:.2e}** ({w['model']} x{w['width']:g}, FLOPs reduction "
             f"{w['reduction']:g}, seed {w['seed']}); CHECK_RTOL = {result['rtol']:g}"
             + (f", {result['margin']:.0f}x above it." if result["margin"] else "."), "",
             "| model | width | max relative diff | max pruned input | find_groups (s) | trial cut (s) |",
             "|---|---|---|---|---|---|"]
    for c in result["cost"]:
        runs = [r for r in result["runs"] if (r["model"], r["width"]) == (c["model"], c["width"])]
        lines.append(f"| {c['model']} | {c['width']:g} | {max(r['relative_diff'] for r in runs):.2e} | "
                     f"{max(r['max_pruned_input'] for r in runs):.1e} | {c['find_groups_s']:.2f} | "
                     f"{c['trial_cut_s']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = sorted({(r["model"], r["width"]) for r in result["runs"]}, key=lambda k: (k[0], k[1]))
    for i, key in enumerate(labels):
        diffs = [max(r["relative_diff"], 1e-9) for r in result["runs"] if (r["model"], r["width"]) == key]
        ax.scatter([i] * len(diffs), diffs, s=14, color="tab:blue")
    ax.axhline(result["rtol"], color="tab:red", linestyle="--", label=f"CHECK_RTOL {result['rtol']:g}")
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), [f"{m}\nx{w:g}" for m, w in labels], fontsize=7, rotation=30)
    ax.set_ylabel("|cut - masked| / max|masked|")
    ax.set_title("cut vs masked network, float32 (each dot: one mask draw)")
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = Parser(prog="python benchmarks/extraction_diff.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vgg11,vgg16,vgg19,resnet20,resnet56,mobilenetv2", help="zoo models")
    p.add_argument("--widths", default="0.5,1.0", help="width multipliers (default 0.5,1.0)")
    p.add_argument("--reductions", default="0.3,0.6,0.85", help="FLOPs reductions the masks are drawn at")
    p.add_argument("--seeds", type=int, default=2, help="mask draws per reduction (default 2)")
    p.add_argument("--batch", type=int, default=8, help="samples in the check batch (default 8)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default=str(RESULTS / "extraction_diff"), help="results folder")
    try:
        args = p.parse_args(argv)
        models = [m for m in args.models.split(",") if m]
        widths, reductions = _floats(args.widths, "widths"), _floats(args.reductions, "reductions")
        if not models or not widths or not reductions or args.seeds < 1 or args.batch < 1 or args.threads < 1:
            raise BenchError("--models, --widths and --reductions must name something; --seeds, --batch and "
                             "--threads must be at least 1")
        if not all(0 < r < 1 for r in reductions):
            raise BenchError(f"--reductions {args.reductions!r}: each strictly between 0 and 1")
        from compress.errors import UserError
        from compress.models import list_models
        unknown = [m for m in models if m not in list_models()]
        if unknown:
            raise BenchError(f"--models: not in the zoo: {', '.join(unknown)}")
        import torch
        torch.set_num_threads(args.threads)
        info = meta(argv)
        try:
            result = measure(models, widths, reductions, args.seeds, args.batch)
        except UserError as exc:
            raise BenchError(str(exc)) from None
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = {"meta": info, **result}
    out = Path(args.out)
    write_json(out / "extraction_diff.json", result)
    write_text(out / "extraction_diff.md", markdown(result))
    plot(result, out / "extraction_diff.png")
    print(f"worst relative diff {result['worst_relative_diff']:.2e} (CHECK_RTOL {result['rtol']:g}); "
          f"wrote {out}/extraction_diff.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
