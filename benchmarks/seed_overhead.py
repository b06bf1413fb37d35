"""What the seed method costs per training step over plain training of the same dense network.

    python benchmarks/seed_overhead.py [--model vgg16] [--steps 100] [--batch-size 64] [--bf16 both|on|off] \
        [--repeat 1] [--out DIR]

Both variants run compress's own Trainer on the same batches (same data, seed, model init): plain
(no callback) and seed (compress.api.Pruner as the CLI drives it: Taylor significance hooks on every BN output,
utility smoothing, hard channel masks, mask recomputation every 10 steps, budget redistribution at
each epoch end). The seed callback is configured in its most expensive regime, which covers ~75 % of
a seed run's epochs (the masked "seed" phase): masks active from the first step, never frozen,
never extracted. Each measurement trains 2 epochs of `--steps` steps on `steps x batch` CIFAR-10
training images; the first epoch warms up oneDNN and is discarded, the second is timed (it holds no
test evaluation: the test set is 10 images, evaluated only after it). Variants alternate, `--repeat`
times; the median over repeats is reported, of both the mean step (the epoch's time / steps) and
the median step (robust to stalls caused by other work on a shared host). Writes DIR/seed_overhead.json and .md (default
benchmarks/results/seed_overhead-<model>).
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    DEFAULT_DATA_DIR,
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
from compress.train import Callback, Phase, TrainConfig, Trainer  # noqa: E402

EPOCHS = 2   # the first warms up, the second is timed


def load_data(data_dir: Optional[str], n_train: int, seed: int):
    from compress.data import load_dataset
    data = load_dataset("cifar10", data_dir)
    if n_train > len(data.y_train):
        raise BenchError(f"--steps x --batch-size = {n_train} images; CIFAR-10 has {len(data.y_train)}")
    # The first images, not a draw: both variants see exactly the same batches anyway.
    return replace(data, x_train=data.x_train[:n_train], y_train=data.y_train[:n_train],
                   x_test=data.x_test[:10], y_test=data.y_test[:10])


def seed_callback(model, steps_per_epoch: int, reduction: float):
    """The seed method as the CLI runs it (compress.api.Pruner in compress.methods.PruneCallback), with
    masks active from step 1 and never frozen or cut: the masked phase's cost."""
    import torch

    from compress.api import Pruner
    from compress.methods import PruneCallback
    pruner = Pruner(model, torch.zeros(2, 3, 32, 32), f"flops={reduction}", "seed", epochs=EPOCHS,
                    steps_per_epoch=steps_per_epoch, warmup=0.0, end=1.0, settle_epochs=0)
    return PruneCallback(lambda trainer: pruner, EPOCHS + 1, one_shot=False, pruner=pruner)


def measure(variant: str, *, model_name: str, width: float, data, steps: int, batch_size: int, bf16: bool,
            reduction: float, threads: int) -> tuple[float, float]:
    """(mean, median) seconds per optimizer step in the timed epoch. The mean includes the periodic
    work (mask updates every 10 steps, the epoch-end redistribution); the median resists the stalls
    other processes on a shared host cause."""
    import torch

    from compress.models import build_model
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(model_name, 10, width)
    clock = EpochClock()
    # The clock goes last: the seed callback's epoch-end work (budget redistribution) is inside the timing.
    callbacks = ([seed_callback(model, steps, reduction)] if variant == "seed" else []) + [clock]
    config = TrainConfig(epochs=EPOCHS, batch_size=batch_size, lr=0.05, bf16=bf16, eval_every=EPOCHS,
                         progress=False, seed=0)
    Trainer(model, data, config, [Phase("train", EPOCHS)], callbacks).fit()
    return (clock.marks[1] - clock.marks[0]) / steps, statistics.median(clock.step_seconds())


class EpochClock(Callback):
    """perf_counter at every epoch end and after every backward of the timed (second) epoch (one tick
    per step: the interval between two ticks is one whole step)."""

    def __init__(self):
        self.marks: list[float] = []
        self.steps: list[float] = []

    def after_backward(self, trainer, step):
        if len(self.marks) == 1:
            self.steps.append(time.perf_counter())

    def on_epoch_end(self, trainer, epoch):
        self.marks.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        """Each timed step's duration (data, forward, backward, callbacks, update)."""
        ticks = [self.marks[0], *self.steps]
        return [b - a for a, b in zip(ticks, ticks[1:])]


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = ["# Seed method overhead per training step", "", *meta_markdown(result["meta"]),
             f"- {s['model']} (width {s['width']}), batch {s['batch_size']}, {s['steps']} timed steps per "
             f"measurement, target flops={s['reduction']}, median of {s['repeat']}", "",
             "ms/step is the timed epoch's wall time over its steps (mask updates and the epoch-end budget "
             "redistribution included); the median step is robust to stalls from other work on the host.", "",
             "| bf16 | plain ms/step | seed ms/step | overhead | median step plain / seed ms | overhead (median) "
             "| plain img/s | seed img/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {'on' if r['bf16'] else 'off'} | {r['plain_ms']:.1f} | {r['seed_ms']:.1f} "
                     f"| {r['overhead']:+.1%} | {r['plain_median_step_ms']:.1f} / {r['seed_median_step_ms']:.1f} "
                     f"| {r['overhead_median_step']:+.1%} | {r['plain_ips']:.0f} | {r['seed_ips']:.0f} |")
    lines += ["", "The seed numbers are for the masked phase (masks on, Taylor recorded every step). After "
              "the masks freeze the recording stops, and after extraction the compact network trains "
              "with no callback cost at all, and faster than the dense one.", "",
              "![overhead](seed_overhead.png)", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    rows = result["rows"]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["plain_ms"] for r in rows], 0.4, label="plain")
    ax.bar([x + 0.2 for x in xs], [r["seed_ms"] for r in rows], 0.4, label="seed (masked phase)")
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['overhead']:+.0%}", (x + 0.2, r["seed_ms"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"bf16 {'on' if r['bf16'] else 'off'}" for r in rows])
    ax.set_ylabel("ms per training step")
    s = result["settings"]
    ax.set_title(f"{s['model']} x{s['width']}, batch {s['batch_size']}", fontsize=10)
    ax.set_ylim(0, 1.3 * max(max(r["plain_ms"], r["seed_ms"]) for r in rows))   # room for the labels
    ax.legend(fontsize=8, ncol=2, loc="upper center")
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = Parser(prog="python benchmarks/seed_overhead.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vgg16", help="compress zoo model (default vgg16)")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier (default 1.0)")
    p.add_argument("--steps", type=int, default=100, help="timed steps per measurement (default 100)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--bf16", default="both", help="both (default), on or off")
    p.add_argument("--target", type=float, default=0.76, help="FLOPs reduction the seed callback prunes to")
    p.add_argument("--repeat", type=int, default=1, help="measurements per variant; the median is kept")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR) if DEFAULT_DATA_DIR.is_dir() else None,
                   help="folder with cifar10.npz")
    p.add_argument("--out", help="results folder (default benchmarks/results/seed_overhead-MODEL)")
    try:
        args = p.parse_args(argv)
        if args.bf16 not in ("both", "on", "off"):
            raise BenchError(f"--bf16 {args.bf16!r}: choose both, on or off")
        if args.steps < 1 or args.batch_size < 1 or args.repeat < 1:
            raise BenchError("--steps, --batch-size and --repeat must be at least 1")
        if not 0 < args.target < 1:
            raise BenchError(f"--target {args.target}: a FLOPs reduction strictly between 0 and 1")
        info = meta(argv)
        from compress.errors import UserError
        try:
            data = load_data(args.data_dir, args.steps * args.batch_size, 0)
        except UserError as exc:
            raise BenchError(str(exc)) from None
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from tqdm import tqdm
    modes = {"both": [False, True], "on": [True], "off": [False]}[args.bf16]
    jobs = [(bf16, variant) for _ in range(args.repeat) for bf16 in modes for variant in ("plain", "seed")]
    times: dict[tuple[bool, str], list[tuple[float, float]]] = {}
    for bf16, variant in tqdm(jobs, desc="seed overhead", unit="measurement", dynamic_ncols=True):
        t = measure(variant, model_name=args.model, width=args.width, data=data, steps=args.steps,
                    batch_size=args.batch_size, bf16=bf16, reduction=args.target, threads=args.threads)
        times.setdefault((bf16, variant), []).append(t)
    rows = []
    for bf16 in modes:
        plain, seed = (statistics.median(t[0] for t in times[(bf16, v)]) for v in ("plain", "seed"))
        plain_med, seed_med = (statistics.median(t[1] for t in times[(bf16, v)]) for v in ("plain", "seed"))
        rows.append({"bf16": bf16, "plain_ms": plain * 1e3, "seed_ms": seed * 1e3, "overhead": seed / plain - 1,
                     "plain_median_step_ms": plain_med * 1e3, "seed_median_step_ms": seed_med * 1e3,
                     "overhead_median_step": seed_med / plain_med - 1,
                     "plain_ips": args.batch_size / plain, "seed_ips": args.batch_size / seed,
                     "plain_all_ms": [t[0] * 1e3 for t in times[(bf16, "plain")]],
                     "seed_all_ms": [t[0] * 1e3 for t in times[(bf16, "seed")]]})
    info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result = {"benchmark": "seed_overhead", "meta": info,
              "settings": {"model": args.model, "width": args.width, "steps": args.steps,
                           "batch_size": args.batch_size, "reduction": args.target, "repeat": args.repeat,
                           "threads": args.threads or None},
              "rows": rows}
    out = Path(args.out) if args.out else RESULTS / f"seed_overhead-{args.model}"
    write_json(out / "seed_overhead.json", result)
    write_text(out / "seed_overhead.md", markdown(result))
    plot(result, out / "seed_overhead.png")
    for r in rows:
        print(f"bf16 {'on ' if r['bf16'] else 'off'}: plain {r['plain_ms']:.1f} ms/step, seed {r['seed_ms']:.1f} "
              f"ms/step ({r['overhead']:+.1%}; median step {r['overhead_median_step']:+.1%})")
    print(f"wrote {out}/seed_overhead.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
