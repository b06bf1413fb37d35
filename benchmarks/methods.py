"""Pruning methods side by side on CIFAR-10, at the same epoch budget, at FLOPs reductions 0.5/0.76/0.9.

    python benchmarks/methods.py --preset cpu                     # VGG-16 x 3 targets + ResNet-56 x 2
    python benchmarks/methods.py --preset smoke --methods seed,random --targets 0.5
    python benchmarks/methods.py --preset cpu --dry-run           # what is done, what is left, the commands
    python benchmarks/methods.py --preset cpu --report-only       # aggregate what exists
    python benchmarks/methods.py --preset cpu --seeds 0,1 --methods seed,uniform   # a second seed
    python benchmarks/methods.py --preset long --methods torch-pruning,uniform --no-dense   # 30 epochs

Every configuration (model, method, target, seed) is one compress run folder in RESULTS/runs/NAME;
the dense reference of each model is a `--method none` run with the same budget (`--no-dense` leaves
it out). A finished run's report.json, arch.json and train_log.csv are copied to RESULTS/reports/NAME/
(small, committed), so a later session, or a clone, skips it even without the run folder (weights are
not committed); a half-done one (NAME.partial/checkpoint.pt) is continued with `--resume`: rerun the
same command in the next session and it picks up where it stopped. `random` and `scratch` take the
per-layer widths of the seed run at the same target and seed (`--widths-from`), so they run after it.
`uniform` is the network thinned by one width share to the target and trained from scratch.
`--params R` makes every target joint (`--target flops=T,params=R`, run names `-fTT-pRR`): the
methods that select channels by a budget take it (seed, l1, slimming, taylor; random and scratch
inherit the seed run's widths); uniform and the Torch-Pruning peer hit one FLOPs target and refuse it.
The one-shot methods (l1, slimming, taylor, random, torch-pruning*) keep their dense phase
(`--keep-dense`); a later one of the same kind, model and seed starts from it (`--dense-from`), so
the grid trains each dense phase once per model and seed (slimming's has its own L1 term).
`torch-pruning` and `torch-pruning-taylor` are benchmarks/torch_pruning_peer.py with
`--importance magnitude` (group L2 norm) and `taylor`. Every run records the git commit it ran at.

Writes RESULTS/methods.json, methods.md (per method and target: mean top-1 over the seeds, their
spread, every seed's value) and methods.png (top-1 vs achieved FLOPs reduction, a line per method,
min-max bars over seeds, the dense reference as a horizontal line); each run's output is in
RESULTS/logs/NAME.log.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    DEFAULT_DATA_DIR,
    PYTHON,
    RESULTS,
    BenchError,
    Logged,
    Parser,
    lock_folder,
    meta,
    meta_markdown,
    pyplot,
    read_json,
    save_figure,
    tail,
    write_json,
    write_text,
)
from compress import cli as compress_cli  # noqa: E402

METHODS = ("seed", "l1", "slimming", "taylor", "random", "scratch", "uniform", "torch-pruning",
           "torch-pruning-taylor")
# The external peer with each of its two criteria that fit a one-shot FLOPs target: group L2 norm
# (GroupMagnitudeImportance) and group first-order Taylor (GroupTaylorImportance).
PEER_IMPORTANCE = {"torch-pruning": "magnitude", "torch-pruning-taylor": "taylor"}
NEEDS_SEED_WIDTHS = ("random", "scratch")
ONE_TARGET = ("uniform", *PEER_IMPORTANCE)  # one width multiplier / one bisected global ratio: no joint target
# The one-shot methods train dense, then cut once: runs whose dense phases are the same training
# (compress's DENSE_PHASE, the Torch-Pruning peer's is l1's) keep it (--keep-dense), and a run at
# another target or with another criterion starts from it (--dense-from) instead of training it again.
DENSE_PHASE = {**compress_cli.DENSE_PHASE, **{m: compress_cli.DENSE_PHASE["torch-pruning"] for m in PEER_IMPORTANCE}}
PEER = Path(__file__).resolve().parent / "torch_pruning_peer.py"


@dataclass(frozen=True)
class Preset:
    compress_preset: str              # the compress preset the runs start from (optimizer, schedule, bf16)
    flags: tuple                      # compress flags added to every run; the same for every method
    targets: dict                     # model -> FLOPs reductions
    about: str


PRESETS = {
    # Minutes: a 1/8-width VGG-16 on 256 images, 2 epochs. Proves the plumbing, says nothing about accuracy.
    "smoke": Preset("smoke", ("--width", "0.125", "--train-subset", "256", "--test-subset", "128", "--calib", "32"),
                    {"vgg16": (0.5, 0.76)}, "tiny: 1/8-width VGG-16, 256 train / 128 test images, 2 epochs, fp32"),
    # Hours on a 2-core CPU: the whole CIFAR-10 training set, 4 epochs of one-cycle (compress's cpu
    # preset otherwise: batch 256, lr 0.1, Nesterov, wd 5e-4, bf16). Test-set evaluation only at the
    # end of each run (a full-test-set evaluation of VGG-16 costs ~15-30 s here; 34 runs x 4 epochs
    # would add ~50 min). Cost: ~24 dense-VGG-16-epoch equivalents per budget epoch over the first 34 runs
    # (one-shot methods train dense half the time, seed ~80 %, slim nets 1.5-4x faster); at
    # ~300 img/s, 167 s per dense epoch: ~70 min per budget epoch, ~5-5.5 h for 4 epochs incl.
    # evaluation and export of the run folders, on an otherwise idle host.
    "cpu": Preset("cpu", ("--epochs", "4", "--eval-every", "4"),
                  {"vgg16": (0.5, 0.76, 0.9), "resnet56": (0.5, 0.76)},
                  "full CIFAR-10 train/test, 4 epochs one-cycle, batch 256, lr 0.1, bf16 (~5-5.5 h on 2 idle cores)"),
    # The long budget: compress's cpu preset as it is (30 epochs one-cycle), the high targets only.
    # 1-5 h per run on a 2-core CPU (dense VGG-16 ~106 min on a 2-core EPYC).
    "long": Preset("cpu", (), {"vgg16": (0.76, 0.9)},
                   "full CIFAR-10 train/test, 30 epochs one-cycle, batch 256, lr 0.1, bf16 (1-5 h per run)"),
    # The literature's GPU schedule (not meant for this host): 200 epochs, batch 64, lr 0.1 / 10 at 50 %
    # and 75 %, wd 1e-4, fp32 — compress's paper preset, unchanged.
    "paper": Preset("paper", (), {"vgg16": (0.5, 0.76, 0.9), "resnet56": (0.5, 0.76)},
                    "the paper's GPU schedule: 200 epochs, batch 64, step lr 0.1, wd 1e-4"),
}


@dataclass(frozen=True)
class Config:
    model: str
    method: str                        # one of METHODS or "none" (the dense reference)
    target: Optional[float]            # FLOPs reduction; None for the dense reference
    seed: int = 0                      # compress --seed (initialisation, data order)
    params: Optional[float] = None     # a params reduction asked beside the FLOPs target (joint), or None

    @property
    def name(self) -> str:
        return f"{self.model}-{self.method}" + ("" if self.target is None else f"-f{round(self.target * 100):02d}") \
            + ("" if self.params is None else f"-p{round(self.params * 100):02d}") \
            + (f"-s{self.seed}" if self.seed else "")

    @property
    def target_text(self) -> str:
        return f"flops={self.target:g}" + ("" if self.params is None else f",params={self.params:g}")

    def seed_run(self) -> Config:
        """The seed-method run whose widths random/scratch take."""
        return replace(self, method="seed")


def plan(models: list[str], methods: list[str], targets: dict, seeds: tuple = (0,),
         dense: bool = True, params: Optional[float] = None) -> list[Config]:
    """Every configuration, in the order it must run: per seed the dense reference, then per target
    the seed method first (random and scratch take its widths). `params`: every target joint."""
    configs = []
    for seed in seeds:
        for model in models:
            if dense:
                configs.append(Config(model, "none", None, seed))
            for t in targets[model]:
                needs_seed = [m for m in methods if m in NEEDS_SEED_WIDTHS]
                order = (["seed"] if methods and ("seed" in methods or needs_seed) else []) + \
                    [m for m in methods if m != "seed" and m not in NEEDS_SEED_WIDTHS] + needs_seed
                configs += [Config(model, m, t, seed, params) for m in order]
    return configs


def same_dense_phase(a: Config, b: Config) -> bool:
    """Whether two one-shot runs train the same dense phase: same model and seed, methods of one kind."""
    kind = DENSE_PHASE.get(a.method)
    return kind is not None and kind == DENSE_PHASE.get(b.method) and (a.model, a.seed) == (b.model, b.seed)


def put_first(configs: list[Config], names: list[str], flag: str = "--first") -> list[Config]:
    """`configs` with the named ones moved to the front in the order named (a run waiting for its
    seed run's widths still waits: run_all starts it once that one has finished)."""
    by_name = {c.name: c for c in configs}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise BenchError(f"{flag} {','.join(unknown)}: not in this grid (its names: {', '.join(by_name)})")
    first = [by_name[n] for n in dict.fromkeys(names)]
    return first + [c for c in configs if c not in first]


# ---------------------------------------------------------------------------------------------
# running one configuration


@dataclass
class Layout:
    root: Path                        # results: logs, reports, tables, plot (small, committed)
    runs: Optional[Path] = None       # run folders (weights, checkpoints); default root/runs
    # Finished rows of the last methods.json whose run left no copy here (results committed before the
    # copies were: a bad .gitignore pattern kept them out of git): done, so not run again.
    earlier: dict = field(default_factory=dict)

    def done(self, config: Config) -> bool:
        return self.finished(config) is not None or config.name in self.earlier

    def run(self, config: Config) -> Path:
        return (self.runs or self.root / "runs") / config.name

    def log(self, config: Config) -> Path:
        return self.root / "logs" / f"{config.name}.log"

    def kept(self, config: Config) -> Path:
        """The committed copy of a finished run's small files."""
        return self.root / "reports" / config.name

    def dense_start(self, config: Config, configs: list[Config]) -> Optional[Path]:
        """A dense.pt kept by another run of the grid whose dense phase is `config`'s, or None."""
        for c in configs:
            if c == config or not same_dense_phase(c, config):
                continue
            run = self.run(c)
            for folder in (run, run.with_name(run.name + ".partial")):
                if (folder / compress_cli.DENSE_CHECKPOINT).is_file():
                    return folder / compress_cli.DENSE_CHECKPOINT
        return None

    def finished(self, config: Config) -> Optional[Path]:
        """Where the finished run's report.json is (run folder first, else the kept copy), or None."""
        for folder in (self.run(config), self.kept(config)):
            if (folder / "report.json").is_file():
                return folder
        return None

    @property
    def walls(self) -> Path:
        return self.root / "wall_times.json"


def is_done(folder: Path) -> bool:
    return (folder / "report.json").is_file()


KEPT_FILES = ("report.json", "arch.json", "train_log.csv")


def keep_copy(layout: Layout, config: Config) -> None:
    """Copy the finished run's small files to RESULTS/reports/NAME (temp folder + rename)."""
    src, dst = layout.run(config), layout.kept(config)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in KEPT_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / name)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def command(config: Config, preset_name: str, layout: Layout, data_dir: Optional[str],
            extra: tuple, dense_start: Optional[Path] = None) -> list[str]:
    """The command for `config`; `dense_start`: a sibling's kept dense phase to start from."""
    preset = PRESETS[preset_name]
    out = layout.run(config)
    if config.method in PEER_IMPORTANCE:
        cmd = [PYTHON, str(PEER), "--importance", PEER_IMPORTANCE[config.method]]
    else:
        cmd = [PYTHON, "-m", "compress", "--method", config.method]
    cmd += ["--preset", preset.compress_preset, "--model", config.model, "--out", str(out), "--no-progress"]
    if config.seed:
        cmd += ["--seed", str(config.seed)]
    if config.method in NEEDS_SEED_WIDTHS:
        seed_run = config.seed_run()
        cmd += ["--widths-from", str(layout.finished(seed_run) or layout.run(seed_run))]
    elif config.target is not None:
        cmd += ["--target", config.target_text]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    cmd += [*preset.flags, *extra]
    if config.method in DENSE_PHASE:
        cmd.append("--keep-dense")
    partial = out.with_name(out.name + ".partial")
    if (partial / "checkpoint.pt").is_file():
        return cmd + ["--resume"]
    if partial.exists():
        cmd.append("--force")   # died before its first checkpoint: nothing to keep
    if dense_start is not None:
        cmd += ["--dense-from", str(dense_start)]
    return cmd


def wall_after(before: Optional[float], cmd: list[str], seconds: float) -> float:
    """Wall time is summed over the sessions of one run; a run started afresh (its folder was
    removed, or it died before its first checkpoint) starts again at 0."""
    return round((before or 0.0) + seconds if "--resume" in cmd else seconds, 2)


def known_wall(recorded: Optional[float], train_seconds: float) -> Optional[float]:
    """The recorded wall time, or None when it cannot be the whole run: a session that ended while a
    run was training never recorded its part (the training time, summed in the checkpoints, still is)."""
    return recorded if recorded is not None and recorded >= train_seconds else None


def with_threads(extra: tuple, jobs: int) -> tuple:
    """The flags for every run: each gets its share of the cores as torch threads (unless
    --compress-arg gives --workers), so runs at once do not fight over them. Given even to a run
    alone: a resumed run keeps the threads it was started with unless told (compress --resume), and
    a run started two at a time and continued alone would otherwise keep half the cores."""
    if any(f == "--workers" or f.startswith("--workers=") for f in extra):
        return extra
    return (*extra, f"--workers={max(1, (os.cpu_count() or 1) // jobs)}")


def run_all(configs: list[Config], preset: str, layout: Layout, data_dir: Optional[str], extra: tuple,
            dry_run: bool, jobs: int = 1, grid: Optional[list[Config]] = None) -> dict[str, str]:
    """Run what is not done yet, up to `jobs` at once; returns {name: "done" | "ran" | "failed: ..." |
    "blocked: ..."}. A run that takes the seed run's widths starts once that one has finished; a
    one-shot run starts from the dense phase a run of the same kind in `grid` (default `configs`)
    kept, and waits while one is still training it."""
    grid = configs if grid is None else grid
    from tqdm import tqdm

    status: dict[str, str] = {c.name: "done" for c in configs if layout.done(c)}
    todo = [c for c in configs if c.name not in status]
    if dry_run:   # pretend each command succeeds, so what depends on it is listed too
        for c in todo:
            print(shlex.join(command(c, preset, layout, data_dir, with_threads(extra, jobs),
                                     layout.dense_start(c, grid))))
        return {c.name: "pending" for c in todo}
    if not todo:
        return status
    walls = read_json(layout.walls) if layout.walls.is_file() else {}
    # The lock is inherited by every run started, so an orphaned run still blocks the next session.
    lock = lock_folder(layout.root)
    extra = with_threads(extra, jobs)
    running: dict[str, tuple[Config, list[str], Logged]] = {}
    bar = tqdm(total=len(todo), desc="methods", unit="run", dynamic_ncols=True)

    def finish(name: str) -> None:
        c, cmd, started = running.pop(name)
        rc, seconds = started.wait()
        walls[c.name] = wall_after(walls.get(c.name), cmd, seconds)
        write_json(layout.walls, walls)
        if rc == 0 and is_done(layout.run(c)):
            keep_copy(layout, c)
            status[c.name] = "ran"
        else:
            status[c.name] = f"failed (exit {rc}): {tail(layout.log(c), 1)}"
            tqdm.write(f"{c.name}: failed (exit {rc}), see {layout.log(c)}\n{tail(layout.log(c), 5)}")
        bar.update(1)

    try:
        while todo or running:
            for c in list(todo):
                if len(running) >= jobs:
                    break
                if c.method in NEEDS_SEED_WIDTHS:
                    seed = c.seed_run()
                    if seed.name in running or seed in todo:
                        continue   # waits for its widths
                    if layout.finished(seed) is None:
                        todo.remove(c)
                        status[c.name] = "blocked: the seed run at this target did not finish"
                        bar.update(1)
                        continue
                dense = layout.dense_start(c, grid)
                if dense is None and any(same_dense_phase(r, c) for r, _, _ in running.values()):
                    continue   # a run of the same kind is training the dense phase this one can start from
                todo.remove(c)
                cmd = command(c, preset, layout, data_dir, extra, dense)
                running[c.name] = (c, cmd, Logged(cmd, layout.log(c), pass_fds=(lock,)))
            if ", ".join(running) != bar.postfix:   # redraw only when the runs change (logs are files)
                bar.set_postfix_str(", ".join(running))
            if not running:
                continue
            done = [name for name, (_, _, started) in running.items() if started.poll() is not None]
            for name in done:
                finish(name)
            if not done:
                time.sleep(1.0)
    finally:   # Ctrl-C: the runs keep their last checkpoint; stop them with us, as a blocking run would be
        for _, _, started in running.values():
            started.proc.terminate()
        for _, _, started in running.values():
            started.wait()
        bar.close()
    return status


# ---------------------------------------------------------------------------------------------
# aggregating


def collect(configs: list[Config], layout: Layout, status: dict[str, str]) -> list[dict]:
    walls = read_json(layout.walls) if layout.walls.is_file() else {}
    rows = []
    for c in configs:
        row = {"name": c.name, "model": c.model, "method": c.method, "target": c.target, "params_target": c.params,
               "seed": c.seed,
               "status": status.get(c.name, "pending"), "run": str(layout.run(c))}
        folder = layout.finished(c)
        if folder is None and c.name in layout.earlier:
            rows.append({**layout.earlier[c.name], "status": "done"})
            continue
        if folder is not None:
            r = read_json(folder / "report.json")
            row.update(status="done", top1=r["slim"]["top1"], dense_top1_at_prune=r["dense"]["top1"],
                       flops=r["slim"]["flops"], params=r["slim"]["params"],
                       flops_reduction=r["achieved"]["flops_reduction"],
                       params_reduction=r["achieved"]["params_reduction"],
                       epochs=r["epochs"], train_seconds=r["seconds"],
                       wall_seconds=known_wall(walls.get(c.name, r.get("wall_seconds")), r["seconds"]),
                       code=r.get("code"), created=r.get("created"))
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per (model, method, target): mean top-1 over the finished seeds and its spread."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["model"], r["method"], r["target"], r.get("params_target")), []).append(r)
    out = []
    for (model, method, target, params_target), runs in cells.items():
        done = [r for r in runs if "top1" in r]
        entry = {"model": model, "method": method, "target": target, "params_target": params_target,
                 "n": len(done), "planned": len(runs)}
        if done:
            top1 = [r["top1"] for r in done]
            entry.update(mean=statistics.fmean(top1), min=min(top1), max=max(top1),
                         std=statistics.stdev(top1) if len(top1) > 1 else None,
                         seeds={str(r["seed"]): r["top1"] for r in done},
                         flops_reduction=statistics.fmean(r["flops_reduction"] for r in done),
                         params_reduction=statistics.fmean(r["params_reduction"] for r in done),
                         train_seconds=statistics.fmean(r["train_seconds"] for r in done))
        out.append(entry)
    return out


def dense_reference(cells: list[dict], model: str) -> Optional[float]:
    """Mean dense top-1 of `model` (from summarize's cells)."""
    return next((c["mean"] for c in cells if c["model"] == model and c["method"] == "none" and c["n"]), None)


def _spread(c: dict) -> str:
    return f"{c['min']:.4f}–{c['max']:.4f}" if c["n"] > 1 else ""


def markdown(result: dict) -> str:
    rows, cells = result["rows"], summarize(result["rows"])
    lines = [f"# Pruning methods side by side: preset `{result['preset']}`", "",
             *meta_markdown(result["meta"]), f"- preset: {result['about']}",
             f"- compress flags for every run: `--preset {result['compress_preset']} "
             f"{' '.join(result['flags'])}`", "",
             "Top-1 is measured in fp32 on the compact network after the whole budget; FLOPs are "
             "multiply-accumulates of conv/linear layers (compress.flops). `random` and `scratch` use the "
             "seed run's per-layer widths (same seed); `uniform` thins every layer by one share. Mean over "
             "the finished seeds, spread = lowest–highest. Train time is summed over sessions; wall time "
             "too, and left blank where a session ended mid-run without recording its part.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        dense = dense_reference(cells, model)
        lines += [f"## {model}" + (f" (dense reference top-1 {dense:.4f})" if dense is not None else ""), "",
                  "| target | method | top-1 mean | spread | seeds | vs dense | FLOPs red. | params red. | train min |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for c in (c for c in cells if c["model"] == model):
            target = "dense" if c["target"] is None else f"{c['target']:.2f}" \
                + ("" if c.get("params_target") is None else f", params {c['params_target']:.2f}")
            if not c["n"]:
                lines.append(f"| {target} | {c['method']} | | | 0/{c['planned']} | | | | |")
                continue
            delta = "" if dense is None or c["method"] == "none" else f"{c['mean'] - dense:+.4f}"
            lines.append(f"| {target} | {c['method']} | {c['mean']:.4f} | {_spread(c)} | {c['n']}/{c['planned']} "
                         f"| {delta} | {c['flops_reduction']:.3f} | {c['params_reduction']:.3f} "
                         f"| {c['train_seconds'] / 60:.2f} |")
        lines.append("")
    lines += ["## Every run", "",
              "| run | seed | top-1 | FLOPs red. | params red. | train min | wall min | code | status |",
              "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        if "top1" in r:
            wall = "" if r["wall_seconds"] is None else f"{r['wall_seconds'] / 60:.2f}"
            code = (r.get("code") or {}).get("commit")
            code = "" if not code else code[:10] + ("+dirty" if r["code"].get("dirty") else "")
            lines.append(f"| {r['name']} | {r['seed']} | {r['top1']:.4f} | {r['flops_reduction']:.3f} "
                         f"| {r['params_reduction']:.3f} | {r['train_seconds'] / 60:.2f} | {wall} | {code} | done |")
        else:
            lines.append(f"| {r['name']} | {r['seed']} | | | | | | | {r['status'].replace('|', '/')} |")
    lines += ["", "![top-1 vs FLOPs reduction](methods.png)", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    cells = [c for c in summarize(result["rows"]) if c["n"]]
    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    colors = dict(zip(METHODS, plt.get_cmap("tab10").colors))
    for ax, model in zip(axes[0], models):
        pruned = [c for c in cells if c["model"] == model and c["method"] != "none"]
        dense = dense_reference(cells, model)
        if len({c["target"] for c in pruned}) == 1:
            _bars(ax, pruned, dense, colors)  # one target: a line per method would be a dot per method
        else:
            for method in METHODS:
                pts = sorted((c["flops_reduction"], c["mean"], c["min"], c["max"]) for c in pruned
                             if c["method"] == method)
                if pts:
                    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                    err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
                    ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, color=colors[method], label=method)
            if dense is not None:
                ax.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense (same budget)")
            ax.set_xlabel("achieved FLOPs reduction")
            ax.set_ylabel("top-1 (CIFAR-10 test), mean over seeds, min–max")
            ax.legend(fontsize=8)
        ax.set_title(model)
        ax.grid(alpha=0.3)
    fig.suptitle(f"methods at the same epoch budget (preset {result['preset']})", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def _bars(ax, cells: list[dict], dense: Optional[float], colors: dict) -> None:
    """Mean top-1 per method at a model's single target (min-max over seeds), best at the top."""
    cells = sorted(cells, key=lambda c: c["mean"])
    err = [[c["mean"] - c["min"] for c in cells], [c["max"] - c["mean"] for c in cells]]
    ax.barh([c["method"] for c in cells], [c["mean"] for c in cells], xerr=err, capsize=3,
            color=[colors[c["method"]] for c in cells])
    for i, c in enumerate(cells):
        ax.annotate(f"{c['mean']:.4f} (FLOPs −{c['flops_reduction']:.1%}, n={c['n']})", (c["max"], i),
                    xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
    shown = [c["min"] for c in cells] + [c["max"] for c in cells] + ([dense] if dense is not None else [])
    ax.set_xlim(max(0.0, min(shown) - 0.05), min(1.0, max(shown) + 0.08))
    if dense is not None:
        ax.axvline(dense, color="black", linestyle="--", linewidth=1, label="dense (same budget)")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel(f"top-1 (CIFAR-10 test) at {cells[0]['target']:.0%} FLOPs reduction target")


def write_outputs(result: dict, root: Path) -> None:
    write_json(root / "methods.json", result)
    write_text(root / "methods.md", markdown(result))
    plot(result, root / "methods.png")


# ---------------------------------------------------------------------------------------------


def parse_list(text: str, what: str, allowed: Optional[tuple] = None) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise BenchError(f"--{what}: empty list")
    bad = [t for t in items if allowed is not None and t not in allowed]
    if bad:
        raise BenchError(f"--{what}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


def parse_targets(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in parse_list(text, "targets"))
    except ValueError:
        raise BenchError(f"--targets {text!r}: expected comma-separated FLOPs reductions like 0.5,0.76,0.9") from None
    if not all(0 < v < 1 for v in values):
        raise BenchError(f"--targets {text!r}: every reduction must be strictly between 0 and 1")
    return values


def default_data_dir() -> Optional[str]:
    env = os.environ.get("EDGESLIM_DATA")
    if env:
        return env
    return str(DEFAULT_DATA_DIR) if (DEFAULT_DATA_DIR / "cifar10.npz").is_file() else None


def make_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python benchmarks/methods.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="presets:\n" + "\n".join(f"  {k:6s} {v.about}" for k, v in PRESETS.items()))
    p.add_argument("--preset", default="smoke", help=f"one of {', '.join(PRESETS)} (default smoke)")
    p.add_argument("--models", help="comma list of compress zoo models (default: the preset's, vgg16,resnet56)")
    p.add_argument("--targets", help="comma list of FLOPs reductions for every model (default: the preset's, "
                                     "0.5,0.76,0.9 for vgg16 and 0.5,0.76 for resnet56)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)} (default all)")
    p.add_argument("--results", help="results folder (default benchmarks/results/methods-PRESET)")
    p.add_argument("--data-dir", default=default_data_dir(), help="folder with cifar10.npz (default "
                   "$EDGESLIM_DATA or /work/shared/data; otherwise compress downloads CIFAR-10)")
    p.add_argument("--seeds", default="0", help="comma list of compress --seed values (default 0)")
    p.add_argument("--params", type=float, help="a params reduction asked beside every FLOPs target (a joint "
                   "target, flops=T,params=R); not for uniform and the Torch-Pruning peer")
    p.add_argument("--no-dense", action="store_true", help="leave out the dense reference run")
    p.add_argument("--compress-arg", action="append", default=[], metavar="FLAG",
                   help="extra flag for every run, e.g. --compress-arg=--workers=2 (repeatable; same for all methods)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each with its share of the cores as torch "
                   "threads (default 1)")
    p.add_argument("--runs", help="where the run folders (weights, checkpoints) go (default RESULTS/runs); a "
                   "folder outside a work tree that is laid anew keeps half-done runs for the next session")
    p.add_argument("--first", help="comma list of run names (as in --dry-run's --out) to start before the rest "
                                   "of the grid, in that order")
    p.add_argument("--only", help="comma list of run names: run just these, in that order (the tables still "
                                  "show the whole grid's finished runs)")
    p.add_argument("--dry-run", action="store_true", help="print the commands still to run; run nothing")
    p.add_argument("--report-only", action="store_true", help="aggregate the finished runs; run nothing")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = make_parser().parse_args(argv)
        if args.preset not in PRESETS:
            raise BenchError(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
        preset = PRESETS[args.preset]
        methods = parse_list(args.methods, "methods", METHODS)
        models = parse_list(args.models, "models") if args.models else list(preset.targets)
        if args.targets:
            targets = {m: parse_targets(args.targets) for m in models}
        else:
            missing = [m for m in models if m not in preset.targets]
            if missing:
                raise BenchError(f"preset {args.preset} has no targets for {', '.join(missing)}: give --targets")
            targets = {m: preset.targets[m] for m in models}
        if args.data_dir and not Path(args.data_dir).is_dir():
            raise BenchError(f"--data-dir {args.data_dir}: not a folder")
        root = Path(args.results) if args.results else RESULTS / f"methods-{args.preset}"
        if root.exists() and not root.is_dir():
            raise BenchError(f"--results {root}: exists and is not a folder")
        data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
        if args.jobs < 1:
            raise BenchError(f"--jobs {args.jobs}: must be at least 1")
        runs = Path(args.runs).expanduser() if args.runs else None
        if runs is not None and runs.exists() and not runs.is_dir():
            raise BenchError(f"--runs {runs}: exists and is not a folder")
        earlier = read_json(root / "methods.json").get("rows", []) if (root / "methods.json").is_file() else []
        layout = Layout(root.resolve(), runs.resolve() if runs else None,
                        {r["name"]: r for r in earlier if "top1" in r})
        try:
            seeds = tuple(int(t) for t in parse_list(args.seeds, "seeds"))
        except ValueError:
            raise BenchError(f"--seeds {args.seeds!r}: expected comma-separated integers like 0,1") from None
        if any(v < 0 for v in seeds):
            raise BenchError(f"--seeds {args.seeds!r}: seeds must be >= 0")
        if args.params is not None:
            if not 0 < args.params < 1:
                raise BenchError(f"--params {args.params:g}: a reduction strictly between 0 and 1 (0.92 removes 92 %)")
            refused = [m for m in methods if m in ONE_TARGET]
            if refused:
                raise BenchError(f"--params: {', '.join(refused)} hit(s) one FLOPs target (a width multiplier or one "
                                 f"global ratio) and cannot take a joint one; leave them out of --methods")
        configs = plan(models, methods, targets, seeds, dense=not args.no_dense, params=args.params)
        if args.first and args.only:
            raise BenchError("--first and --only: give one of them")
        if args.first or args.only:
            flag = "first" if args.first else "only"
            configs = put_first(configs, parse_list(args.first or args.only, flag), f"--{flag}")
        to_run = configs[:len(set(parse_list(args.only, "only")))] if args.only else configs
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    info = meta(argv)
    try:
        status = {} if args.report_only else run_all(to_run, args.preset, layout, data_dir,
                                                     tuple(args.compress_arg), args.dry_run, args.jobs, grid=configs)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        return 0
    previous = read_json(root / "methods.json") if (root / "methods.json").is_file() else {}
    info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result = {"benchmark": "methods", "preset": args.preset, "about": preset.about,
              "compress_preset": preset.compress_preset, "flags": list(preset.flags) + list(args.compress_arg),
              "models": models, "methods": methods, "targets": targets, "params_target": args.params,
              "seeds": list(seeds), "meta": info,
              "sessions": previous.get("sessions", []) + [info], "rows": collect(configs, layout, status)}
    write_outputs(result, root)
    done = sum("top1" in r for r in result["rows"])
    failed = [r["name"] for r in result["rows"] if r["status"].startswith(("failed", "blocked"))]
    print(f"{done}/{len(configs)} configurations done; wrote {root}/methods.md"
          + (f"; not done: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
