"""`python -m compress`: train and prune a network to a FLOPs/params/latency target, write a run folder.

    python -m compress --model vgg16 --dataset cifar10 --target flops=0.76 --method seed --out runs/vgg16-f76
    python -m compress --model vgg16 --target latency=12ms --latency-table tables/vgg16-pi4.json --out runs/v16-12ms
    python -m compress --model resnet56 --target params=0.5 --preset cpu --out runs/r56-p50
    python -m compress --method none --model vgg16 --out runs/vgg16-dense
    python -m compress --out runs/vgg16-f76 --resume           # continue a killed run
    python -m compress info --model vgg16                       # FLOPs / params as JSON

The run is built in `OUT.partial/` (checkpoint.pt and train_log.csv are updated there after every
epoch; `--resume` continues from it). Only when everything is written is it renamed to `OUT`; with
`--force` an existing run in `OUT` is replaced at that moment, not before.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Optional

from compress.errors import UserError
from compress.presets import DEFAULT_PRESET, PRESETS
from compress.prune.seed_config import BUDGET_INIT, REDISTRIBUTE_BY, SCHEDULE, SeedConfig, seed_options
from compress.prune.targets import parse_target

_SEED = SeedConfig()   # the seed method's defaults, for the help text
SEED_ONLY = ("prune_warmup", "prune_ramp", "prune_end", "prune_settle", "prune_every", "prune_smoothing",
             "prune_hysteresis", "prune_budget_init", "soft_masks", "redistribute", "redistribute_by",
             "redistribute_every")

METHODS = ("seed", "l1", "slimming", "taylor", "random", "scratch", "uniform", "none")
SCHEDULES = ("onecycle", "cosine", "step")
# Options that may change when resuming: they do not change the result.
RESUME_MAY_CHANGE = {"device", "workers", "progress", "data_dir", "keep_dense"}
# --dense-from: the one-shot methods train dense, then cut once. Their dense phases are the same
# training when everything that shapes it is equal (slimming adds its L1 term on the BN scales, so
# it shares only with slimming); options that act at or after the cut may differ.
DENSE_PHASE = {"l1": "plain", "taylor": "plain", "random": "plain", "torch-pruning": "plain",
               "slimming": "slimming"}
DENSE_CHECKPOINT = "dense.pt"   # --keep-dense: the checkpoint before the last dense epoch, in the run folder
DENSE_PHASE_MAY_DIFFER = RESUME_MAY_CHANGE | set(SEED_ONLY) | {
    "out", "name", "method", "target", "latency_table", "latency_format", "latency_threads", "widths_from",
    "min_keep", "cost_power", "round_to", "taylor_batches", "ignore", "calib", "bf16_reason", "time_budget_note",
    "dense_from", "keep_dense", "remove_branches"}


@dataclass
class RunConfig:
    """Every option a run used; stored in the checkpoint and in report.json."""
    out: str = ""
    name: str = ""
    model: str = "vgg16"
    width: float = 1.0
    num_classes: Optional[int] = None        # None: the dataset's
    dataset: str = "cifar10"
    data_dir: Optional[str] = None
    image_size: Optional[int] = None         # image folders: resize every image to this square size
    target: Optional[str] = None             # "flops=0.76" | "params=0.5" | "latency=1.2ms" | None (method none)
    latency_table: Optional[str] = None      # latency=...: the table (device_bench profile) pricing the budget
    latency_format: Optional[str] = None     # its entry: tflite, tflite-int8, onnx, ... (None: its only one / tflite-int8)
    latency_threads: Optional[int] = None    # its entry's interpreter threads (None: its only one / 1)
    method: str = "seed"
    preset: str = DEFAULT_PRESET
    epochs: int = 30
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    bf16: Optional[bool] = None              # None: bf16 autocast where the hardware has bf16 arithmetic
    bf16_reason: str = ""                    # why the run trains in bf16 or fp32 (set at the start)
    time_budget: Optional[float] = None      # minutes: size the training set so training fits (demo)
    time_budget_note: str = ""               # what the --time-budget probe measured and chose
    channels_last: bool = True
    seed: int = 0
    device: str = "cpu"
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    calib: int = 1024
    eval_every: int = 1
    ignore: tuple = ()
    init: Optional[str] = None
    widths_from: Optional[str] = None
    dense_from: Optional[str] = None         # one-shot methods: start from this checkpoint of another run's dense phase
    keep_dense: bool = False                 # one-shot methods: keep the checkpoint before the last dense epoch
    finetune_fraction: float = 0.5           # l1/slimming/taylor/random: share of the budget spent fine-tuning
    finetune_epochs: int = 0                 # seed: epochs of plain fine-tuning after extraction
    # seed: None = the method's default (compress/prune/seed.py SCHEDULE and SeedConfig, the one place)
    prune_warmup: Optional[float] = None     # seed: share of the budget trained dense before pruning
    prune_ramp: Optional[float] = None       # seed: share of the budget over which the target ramps in
    prune_end: Optional[float] = None        # seed: share of the budget after which the masks are final
    prune_settle: Optional[int] = None       # seed: epochs trained on the final masks before the cut
    prune_every: Optional[int] = None        # seed: steps between mask updates
    prune_smoothing: Optional[float] = None  # seed: eps, utility smoothing
    soft_masks: Optional[bool] = None        # seed: switched-off channels fade out until the freeze
    prune_hysteresis: Optional[float] = None  # seed: a kept channel's utility counts (1 + h) at mask updates
    prune_budget_init: Optional[str] = None  # seed: layer budgets until the target: global or uniform
    slimming_lambda: float = 1e-4
    taylor_batches: int = 64
    min_keep: float = 0.1                    # every group keeps at least this share (and >= 1 channel)
    cost_power: float = 0.0                  # rank channels by score / resource**cost_power (BENCHMARKS.md)
    round_to: int = 1                        # kept widths in multiples of this (1: any width; 8 suits SIMD kernels)
    remove_branches: bool = False            # residual branches may be cut whole (their inner group to width 0)
    redistribute: Optional[float] = None     # seed: s, share of a donor layer's spare channels moved per redistribution
    redistribute_by: Optional[str] = None    # seed: layer significance xi (compress/prune/seed.py, BENCHMARKS.md)
    redistribute_every: Optional[int] = None  # seed: steps between redistributions (default one epoch)
    workers: int = 0                         # torch threads; 0 = torch's default
    progress: bool = True

    @property
    def target_spec(self) -> Optional[dict]:
        """The target as report.json holds it: {"metric", "reduction"[, "also"]}."""
        from compress.prune.targets import target_dict
        return None if self.target is None else target_dict(self.target)

    @property
    def target_metric(self) -> Optional[str]:
        return None if self.target is None else self.target_spec["metric"]

    @property
    def target_reduction(self) -> Optional[float]:
        return None if self.target is None else self.target_spec.get("reduction")   # None: a latency budget


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(message)


def _bool_flag(p, name: str, help: str):
    p.add_argument(f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction,
                   default=None, help=help)


def preset_summary(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items() if v is not None)


def make_parser() -> argparse.ArgumentParser:
    # Every default is None: an option left out takes the preset's value, then RunConfig's.
    p = _Parser(prog="python -m compress", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="presets:\n" + "\n".join(f"  {name:6s} {preset_summary(v)}" for name, v in PRESETS.items())
                + "\n\nmethods: see compress/methods.py. `python -m compress info --help`: the FLOPs/params counter.")
    a = p.add_argument
    a("--out", help="run folder to write (required)")
    a("--name", help="run name in report.json (default: the folder's name)")
    a("--model", help="zoo name (vgg11/13/16/19, resnet20/32/56, mobilenetv2) or package.module:factory "
                      "or path/to/file.py:factory (default vgg16)")
    a("--width", type=float, help="channel width multiplier of the dense model (default 1.0)")
    a("--num-classes", type=int, help="classifier outputs (default: the dataset's)")
    a("--dataset", help="cifar10 (default), folder (an image folder given as --data-dir ROOT), or the path "
                        "of an image folder ROOT/train/<class>/*.png|jpg [+ ROOT/test/...]")
    a("--data-dir", help="where the dataset lives / is downloaded to")
    a("--image-size", type=int, help="image folders: resize every image to SIZE x SIZE (default: the first "
                                     "image's size; cifar10 is 32)")
    a("--target", help="flops=R or params=R: the reduction to reach, 0<R<1; or both, flops=R,params=S "
                        "(both met, each within 1 pp); latency=Xms: a budget in ms on the board of --latency-table "
                        "(joint too: latency=1.2ms,flops=0.5); not for --method none")
    a("--latency-table", help="latency=Xms: the latency table (python -m device_bench profile) that prices the "
                              "budget and sets the widths worth keeping")
    a("--format", dest="latency_format", help="latency=Xms: the table entry's format, e.g. tflite-int8 (default: "
                                              "the table's only one, else tflite-int8)")
    a("--threads", dest="latency_threads", type=int, help="latency=Xms: the table entry's interpreter threads "
                                                           "(default: the table's only one, else 1)")
    a("--method", choices=None, help=f"one of {', '.join(METHODS)} (default seed)")
    a("--preset", help=f"one of {', '.join(PRESETS)} (default {DEFAULT_PRESET}); explicit flags override it")
    a("--epochs", type=int, help="total epoch budget, all phases included")
    a("--batch-size", type=int, help="global batch size")
    a("--lr", type=float, help="peak learning rate")
    a("--momentum", type=float, help="SGD momentum (default 0.9)")
    _bool_flag(p, "nesterov", "Nesterov momentum")
    a("--weight-decay", type=float, help="L2 on conv/linear weights")
    a("--schedule", help=f"learning-rate schedule per phase: {', '.join(SCHEDULES)}")
    a("--warmup-epochs", type=float, help="linear warm-up for cosine/step")
    a("--label-smoothing", type=float, help="cross-entropy label smoothing (default 0)")
    _bool_flag(p, "bf16", "bfloat16 autocast (default: on where the CPU has bf16 arithmetic — avx512_bf16, "
                          "amx_bf16 — or the GPU supports it; elsewhere it is slower than fp32)")
    a("--time-budget", type=float, help="minutes: measure this machine's training speed in a few steps and "
                                        "train on as many images per epoch as fit (the demo preset's 8)")
    _bool_flag(p, "channels-last", "channels_last memory format (default on)")
    a("--seed", type=int, help="random seed (default 0)")
    a("--device", help="cpu | cuda | cuda:N (default cpu)")
    a("--train-subset", type=int, help="train on this many images (seeded draw); default all")
    a("--test-subset", type=int, help="evaluate on this many test images (seeded draw); default all")
    a("--calib", type=int, help="training images saved to calib.npz for int8 calibration (default 1024)")
    a("--eval-every", type=int, help="evaluate on the test set every k epochs (and at the end)")
    a("--ignore", help="NAME[,NAME]: modules whose output channels are never pruned")
    a("--init", help="start from these dense weights (.safetensors only)")
    a("--widths-from", help="runs/SEEDRUN: per-layer widths for --method random / scratch")
    a("--dense-from", metavar="CHECKPOINT",
      help="l1/slimming/taylor/random: start from another run's dense phase (its dense.pt, see --keep-dense, or "
           "its checkpoint.pt before the cut): same model, data, budget and seed, any target or criterion; "
           "this run trains the rest")
    _bool_flag(p, "keep-dense", "l1/slimming/taylor/random: keep the checkpoint from before the last dense "
                                "epoch as dense.pt in the run folder, for --dense-from (default off)")
    a("--finetune-fraction", type=float, help="l1/slimming/taylor/random: share of the epochs spent "
                                              "fine-tuning after pruning (default 0.5)")
    a("--finetune-epochs", type=int, help="seed: epochs of fine-tuning after extraction (default 0)")
    a("--prune-warmup", type=float, help=f"seed: share of the steps trained dense first (default {SCHEDULE['warmup']})")
    a("--prune-ramp", type=float, help="seed: share of the steps over which the target ramps in from 0 "
                                       f"(default {SCHEDULE['ramp']}; 0 = the whole target at once)")
    a("--prune-end", type=float, help=f"seed: share of the steps after which masks are final (default {SCHEDULE['end']})")
    a("--prune-settle", type=int, help="seed: epochs trained on the final masks before they are cut out "
                                       f"(default {SCHEDULE['settle_epochs']})")
    a("--prune-every", type=int, help=f"seed: steps between mask updates (default {_SEED.update_every})")
    a("--prune-smoothing", type=float, help=f"seed: eps in u <- eps*u + (1-eps)*Theta (default {_SEED.smoothing})")
    a("--prune-hysteresis", type=float, help="seed: a kept channel's utility counts (1 + H) when masks are "
                                             f"recomputed, so noise does not flip masks (default {_SEED.hysteresis})")
    a("--prune-budget-init", choices=BUDGET_INIT, help="seed: the layer budgets while the target ramps in: "
                                                        "global (rank channels across layers) or uniform (every "
                                                        f"layer the same share) (default {_SEED.budget_init})")
    _bool_flag(p, "soft-masks", "seed: switched-off channels fade out linearly until the masks are final; "
                                f"--no-soft-masks drops them to 0 at once (default {'on' if SCHEDULE['soft'] else 'off'})")
    a("--slimming-lambda", type=float, help="slimming: L1 strength on BN scales (default 1e-4)")
    a("--taylor-batches", type=int, help="taylor: batches to accumulate the criterion over (default 64)")
    a("--min-keep", type=float, help="every group keeps at least this share of its channels (default 0.1)")
    a("--cost-power", type=float, help="seed, l1, slimming, taylor: rank channels by score / (FLOPs or params "
                                       "saved)**P; 1 = per unit of resource, 0 = score alone (default 0, measured "
                                       "better)")
    a("--round-to", type=int, help="seed, l1, slimming, taylor: keep every layer's width a multiple of N (or "
                                   "whole); 8 or 16 fill a CPU's vector units better (default 1: any width)")
    _bool_flag(p, "remove-branches", "seed, l1, slimming, taylor: a residual block may lose its whole branch (the "
                                     "block becomes its shortcut plus a constant); which blocks is measured on 256 "
                                     "training images: the output's KL with branches removed vs channels only, at the "
                                     "same target (default off)")
    a("--redistribute", type=float, help="seed: s, the share of a low-significance layer's channels above the "
                                         f"minimum width moved to other layers per redistribution (default {_SEED.redistribute}; "
                                         "0 = never)")
    a("--redistribute-by", choices=REDISTRIBUTE_BY, help="seed: layer significance that picks donor and receiver layers: "
                                f"{', '.join(REDISTRIBUTE_BY)} (default {_SEED.redistribute_by}; compress/prune/seed.py)")
    a("--redistribute-every", type=int, metavar="STEPS",
      help="seed: training steps between layer-budget redistributions (default one epoch; with a short budget "
           "the masks can be final before the first one)")
    a("--workers", type=int, help="CPU threads for torch (default: torch's choice)")
    _bool_flag(p, "progress", "progress bars (default on)")
    a("--resume", action="store_true", help="continue the interrupted run in OUT.partial")
    a("--force", action="store_true", help="replace the run in OUT (only once the new one is complete)")
    return p


def resolve(args: argparse.Namespace) -> RunConfig:
    """Explicit flags over the preset over RunConfig's defaults; validated."""
    preset = args.preset or DEFAULT_PRESET
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[preset], "preset": preset}
    for f in fields(RunConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    if isinstance(values.get("ignore"), str):
        values["ignore"] = tuple(n.strip() for n in values["ignore"].split(",") if n.strip())
    if values.get("widths_from") and values.get("method") in ("random", "scratch") and args.model is None:
        # The widths belong to a model: take it from the run they come from.
        import json
        try:
            arch = json.loads((Path(values["widths_from"]) / "arch.json").read_text())
            values["model"], values["width"] = arch["model"], float(arch["width"])
            values.setdefault("num_classes", int(arch["num_classes"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # validate() names the problem
    if values.get("target") is not None:
        values["target"] = parse_target(values["target"])
    cfg = RunConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    if not cfg.out:
        raise UserError("--out is required: the run folder to write")
    if cfg.method not in METHODS:
        raise UserError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    if cfg.schedule not in SCHEDULES:
        raise UserError(f"unknown schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if cfg.method == "none" and cfg.target is not None:
        raise UserError("--method none trains the dense reference: give no --target (or --target none)")
    if cfg.method in ("random", "scratch"):
        if not cfg.widths_from:
            raise UserError(f"--method {cfg.method} needs --widths-from runs/SEEDRUN (the widths to use)")
        if cfg.target is not None:
            raise UserError(f"--method {cfg.method} takes its widths, and so its target, from --widths-from: "
                            f"drop --target")
    elif cfg.method != "none" and cfg.target is None:
        raise UserError(f"--method {cfg.method} needs --target flops=R, params=R or latency=Xms")
    latency = cfg.target is not None and cfg.target.startswith("latency=")
    if latency and not cfg.latency_table:
        raise UserError(f"--target {cfg.target} needs --latency-table FILE (python -m device_bench profile makes one)")
    if not latency and (cfg.latency_table or cfg.latency_format or cfg.latency_threads is not None):
        given = "--latency-table" if cfg.latency_table else ("--format" if cfg.latency_format else "--threads")
        raise UserError(f"{given} prices a latency budget: give --target latency=Xms too")
    if cfg.latency_threads is not None and cfg.latency_threads < 1:
        raise UserError(f"--threads must be at least 1, got {cfg.latency_threads}")
    if latency:   # the table and its entry, checked now rather than after loading the data
        from compress.latency import open_table
        open_table(cfg.latency_table, cfg.latency_format, cfg.latency_threads)
    positive = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "calib": cfg.calib,
                "eval_every": cfg.eval_every, "taylor_batches": cfg.taylor_batches}
    for name, v in positive.items():
        if v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    for name in ("train_subset", "test_subset"):
        v = getattr(cfg, name)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    if cfg.image_size is not None and cfg.image_size < 8:
        raise UserError(f"--image-size must be at least 8 pixels, got {cfg.image_size}")
    if cfg.time_budget is not None and not cfg.time_budget > 0:
        raise UserError(f"--time-budget must be a positive number of minutes, got {cfg.time_budget}")
    if not cfg.lr > 0:
        raise UserError(f"--lr must be positive, got {cfg.lr}")
    if cfg.weight_decay < 0 or cfg.momentum < 0 or cfg.warmup_epochs < 0 or cfg.slimming_lambda < 0:
        raise UserError("--weight-decay, --momentum, --warmup-epochs and --slimming-lambda must be >= 0")
    if not 0 <= cfg.label_smoothing < 1:
        raise UserError(f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if not 0 < cfg.finetune_fraction < 1:
        raise UserError(f"--finetune-fraction must be strictly between 0 and 1, got {cfg.finetune_fraction}")
    if not 0 <= cfg.finetune_epochs < cfg.epochs:
        raise UserError(f"--finetune-epochs must be in [0, --epochs), got {cfg.finetune_epochs}")
    if cfg.method == "seed":   # its schedule and knobs, checked now rather than after loading the data
        # The steps per epoch come with the data; at a nominal 10,000 the shares, the settle epochs and
        # every knob are checked, and only a schedule too fine for very few steps is left to the run.
        SeedConfig.for_run("flops", 0.5, cfg.epochs - cfg.finetune_epochs, 10_000, **seed_options(cfg))
    else:
        given = [f for f in SEED_ONLY if getattr(cfg, f) is not None]
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} is a seed-method option; --method {cfg.method} "
                            f"does not use it")
    if not 0 < cfg.min_keep < 1:
        raise UserError(f"--min-keep must be strictly between 0 and 1, got {cfg.min_keep}")
    if cfg.round_to < 1:
        raise UserError(f"--round-to must be an integer >= 1, got {cfg.round_to}")
    if cfg.init is not None:
        if not cfg.init.endswith(".safetensors"):
            raise UserError(f"--init {cfg.init!r}: only .safetensors weights are accepted (no pickle)")
        if not Path(cfg.init).is_file():
            raise UserError(f"--init {cfg.init!r}: file not found")
    for given, name in ((cfg.dense_from, "--dense-from"), (cfg.keep_dense, "--keep-dense")):
        if given and cfg.method not in DENSE_PHASE:
            raise UserError(f"{name}: --method {cfg.method} has no dense phase to share (l1, slimming, taylor, "
                            f"random and Torch-Pruning train dense, then cut once)")
    if cfg.dense_from is not None and not Path(cfg.dense_from).is_file():
        raise UserError(f"--dense-from {cfg.dense_from!r}: file not found")
    if cfg.widths_from is not None and not (Path(cfg.widths_from) / "arch.json").is_file():
        raise UserError(f"--widths-from {cfg.widths_from!r}: no arch.json there (give a finished run folder)")
    if not (cfg.device == "cpu" or cfg.device.startswith("cuda")):
        raise UserError(f"--device {cfg.device!r}: expected cpu, cuda or cuda:N")
    if cfg.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise UserError(f"--device {cfg.device}: no CUDA device is available here")


# ---------------------------------------------------------------------------------------------
# the run folder: built in OUT.partial, renamed to OUT when complete


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def holds_run(folder: Path) -> bool:
    return (folder / "report.json").exists() or (folder / "checkpoint.pt").exists()


def prepare_folders(out: Path, *, resume: bool, force: bool) -> Path:
    """Check OUT and OUT.partial against --resume/--force; returns the working folder."""
    work = partial_dir(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if resume:
        if not (work / "checkpoint.pt").is_file():
            where = f"{out} is a finished run" if holds_run(out) else f"no {work}/checkpoint.pt"
            raise UserError(f"--resume: nothing to resume ({where})")
        return work
    if out.is_dir() and any(out.iterdir()):
        if not holds_run(out):
            raise UserError(f"--out {out}: folder is not empty and holds no run; refusing to touch it")
        if not force:
            raise UserError(f"--out {out} already holds a run; --force replaces it (the old run stays "
                            f"until the new one is complete)")
    if work.exists():
        if not force:
            raise UserError(f"{work} holds an interrupted run: --resume continues it, --force starts over")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


def publish(work: Path, out: Path) -> None:
    """Swap the finished work folder in as OUT; an old run there is removed only after the swap."""
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(work, out)
    if old is not None:
        shutil.rmtree(old)


# ---------------------------------------------------------------------------------------------


def load_resume_state(work: Path) -> dict:
    """The interrupted run's checkpoint, read once: its config (in "extra") and the training state."""
    import torch
    try:
        state = torch.load(work / "checkpoint.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"--resume: {work}/checkpoint.pt is unreadable ({type(exc).__name__})") from exc
    if not isinstance(state, dict) or not isinstance(state.get("extra", {}).get("config"), dict):
        raise UserError(f"--resume: {work}/checkpoint.pt holds no run configuration")
    return state


def stored_config(work: Path) -> dict:
    return load_resume_state(work)["extra"]["config"]


def _table_of(target: Optional[dict]) -> dict:
    """What a target records of the latency table it was priced with ({}: no table)."""
    return (target or {}).get("table") or {}


def table_sha(target: Optional[dict]) -> Optional[str]:
    return _table_of(target).get("sha256")


def check_resumed_table(stored: dict, target: Optional[dict]) -> None:
    """A latency run continues only with the table it started with (the budget's reduction and
    every selection were priced by it). Checkpoints from before this check carry no table hash."""
    if "latency_table_sha256" not in stored:
        return
    was, now = stored["latency_table_sha256"], table_sha(target)
    if was != now:
        path = _table_of(target).get("path", "the latency table")
        raise UserError(f"--resume: {path} is not the table this run started with (sha256 {str(was)[:12]}, now "
                        f"{str(now)[:12]}): put the original back, or start over with --force")


def load_dense_phase(cfg: RunConfig) -> dict:
    """The checkpoint --dense-from names, checked to be a dense phase this run would have trained
    itself: a one-shot run's with the same model, data, budget and seed, saved before its cut. Its
    target and criterion may differ: the dense phase does not depend on them."""
    import torch

    from compress.methods import split_epochs
    path = cfg.dense_from
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"--dense-from {path}: not a readable checkpoint ({type(exc).__name__})") from exc
    stored = state.get("extra", {}).get("config") if isinstance(state, dict) else None
    if not isinstance(stored, dict):
        raise UserError(f"--dense-from {path}: holds no run configuration (not a compress checkpoint)")
    family = DENSE_PHASE[cfg.method]
    if DENSE_PHASE.get(stored.get("method")) != family:
        raise UserError(f"--dense-from {path}: a --method {stored.get('method')} run, whose dense phase is not "
                        f"--method {cfg.method}'s")
    mine = config_as_dict(cfg)
    differ = [k for k in mine if k not in DENSE_PHASE_MAY_DIFFER and stored.get(k) != mine[k]
              and not (k == "slimming_lambda" and family == "plain")]
    if differ:
        k = differ[0]
        more = f" (and {', '.join(differ[1:])})" if len(differ) > 1 else ""
        raise UserError(f"--dense-from {path}: that run trained with --{k.replace('_', '-')} {stored.get(k)!r}, "
                        f"this one with {mine[k]!r}{more}: its dense phase is not this run's")
    dense_epochs, _ = split_epochs(cfg.epochs, cfg.finetune_fraction, cfg.method)
    if state.get("arch") or not 0 < state.get("epoch", 0) < dense_epochs:
        raise UserError(f"--dense-from {path}: saved after epoch {state.get('epoch')}, but the dense phase is "
                        f"epochs 1-{dense_epochs} and must not be over (give the dense.pt a run kept with --keep-dense)")
    return state


def start_from_dense(trainer, cfg: RunConfig) -> None:
    """--dense-from: continue `trainer` from another run's dense phase (this run's callbacks and
    config stay its own; the copied epochs' log rows and training seconds count as this run's)."""
    state = load_dense_phase(cfg)
    trainer.load_state(state, where=cfg.dense_from, callbacks=False)
    print(f"dense phase: epochs 1-{state['epoch']} from {cfg.dense_from}", file=sys.stderr)


def config_for_resume(args: argparse.Namespace, stored: dict) -> RunConfig:
    """The stored run's config; flags given now must agree with it (except device/threads/progress)."""
    values = dict(stored)
    values["ignore"] = tuple(values.get("ignore") or ())
    for f in fields(RunConfig):
        given = getattr(args, f.name, None)
        if given is None or f.name == "out":
            continue
        if f.name == "target":
            given = parse_target(given)
        if f.name == "ignore":
            given = tuple(n.strip() for n in given.split(",") if n.strip())
        if f.name in RESUME_MAY_CHANGE:
            values[f.name] = given
        elif given != values.get(f.name):
            raise UserError(f"--resume continues the stored run: --{f.name.replace('_', '-')} {given!r} "
                            f"differs from its {values.get(f.name)!r}")
    values["out"] = args.out
    return RunConfig(**{f.name: values[f.name] for f in fields(RunConfig) if f.name in values})


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    created: Optional[Path] = None   # the work folder this invocation made, removed if it fails early
    resumed: Optional[dict] = None   # the checkpoint --resume continues from
    if argv and argv[0] == "info":
        from compress.info import main as info_main
        return info_main(argv[1:])
    try:
        args = make_parser().parse_args(argv)
        if not args.out:
            raise UserError("--out is required: the run folder to write")
        out = Path(args.out)
        rank = int(os.environ.get("RANK", "0"))
        if args.resume:
            work = prepare_folders(out, resume=True, force=args.force) if rank == 0 else partial_dir(out)
            resumed = load_resume_state(partial_dir(out))
            cfg = config_for_resume(args, resumed["extra"]["config"])
            validate(cfg)
        else:
            cfg = resolve(args)
            work = partial_dir(out)
            if rank == 0:
                prepare_folders(out, resume=False, force=args.force)
                created = work
        if not cfg.name:
            cfg.name = out.name
        run(cfg, work=work, out=out, resumed=resumed)
    except UserError as exc:
        _drop_if_empty(created)
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _drop_if_empty(created)
        print("interrupted: resume with --resume", file=sys.stderr)
        return 130
    except BaseException:
        _drop_if_empty(created)
        raise
    return 0


def _drop_if_empty(work: Optional[Path]) -> None:
    """A run that failed before its first checkpoint leaves nothing to resume: remove its folder."""
    if work is not None and work.is_dir() and not (work / "checkpoint.pt").exists():
        shutil.rmtree(work, ignore_errors=True)


def draw_subsets(data, cfg: RunConfig):
    """--train-subset / --test-subset: seeded draws, kept in their original order."""
    import numpy as np

    rng = np.random.default_rng(cfg.seed)
    changes = {}
    for split, n in (("train", cfg.train_subset), ("test", cfg.test_subset)):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        if n is not None and n < len(y):
            idx = np.sort(rng.choice(len(y), size=n, replace=False))
            changes[f"x_{split}"], changes[f"y_{split}"] = x[idx], y[idx]
    return replace(data, **changes) if changes else data


def run(cfg: RunConfig, *, work: Path, out: Path, resumed: Optional[dict] = None) -> None:
    """Train + prune per `cfg` in `work`, write the run folder, publish it as `out` (main rank);
    `resumed`: the interrupted run's checkpoint (load_resume_state) to continue from."""
    import torch

    from compress import methods, report
    from compress.prune.surgery import arch_of, rebuild
    from compress.train import TrainConfig, Trainer, init_distributed

    if cfg.workers:
        torch.set_num_threads(cfg.workers)
    device = cfg.device
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:   # torchrun: one GPU per rank
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist_info = init_distributed(device)
    started = time.time()
    from compress.data import load_dataset
    full = load_dataset(cfg.dataset, cfg.data_dir, image_size=cfg.image_size)
    num_classes = cfg.num_classes or len(full.classes)
    hw = tuple(full.x_train.shape[1:3])
    input_shape = (1, 3, *hw)
    if resumed is None:   # a resumed run keeps the choices its first session made (they are in its config)
        choose_precision_and_size(cfg, full, num_classes, input_shape, device)
    data = draw_subsets(full, cfg)

    torch.manual_seed(cfg.seed)
    plan = methods.make_plan(cfg, data, num_classes=num_classes, input_shape=input_shape)
    if dist_info.is_main:   # the choices, once the run is known to be valid
        print(f"precision: {'bf16 autocast' if cfg.bf16 else 'fp32'} ({cfg.bf16_reason})", file=sys.stderr)
        if cfg.time_budget_note:
            print(cfg.time_budget_note, file=sys.stderr)
    train_config = TrainConfig(
        epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay, schedule=cfg.schedule, warmup_epochs=cfg.warmup_epochs,
        label_smoothing=cfg.label_smoothing, bf16=cfg.bf16, channels_last=cfg.channels_last, seed=cfg.seed,
        device=device, eval_every=cfg.eval_every, progress=cfg.progress)
    spec = dict(spec=cfg.model, num_classes=num_classes, width=cfg.width)
    trainer = Trainer(plan.model, data, train_config, plan.phases, plan.callbacks, workdir=work,
                      input_shape=input_shape, arch_of=lambda m: arch_of(m, **spec), rebuild=rebuild,
                      dist=dist_info, extra_state={"config": config_as_dict(cfg),
                                                   "latency_table_sha256": table_sha(plan.target)},
                      keep=(plan.phases[0].epochs - 1, DENSE_CHECKPOINT) if cfg.keep_dense else None)
    if resumed is not None:
        check_resumed_table(resumed.get("extra", {}), plan.target)
        trainer.load_state(resumed)
    elif cfg.dense_from:
        start_from_dense(trainer, cfg)
    trainer.fit()
    # The numbers people compare: fp32, on the extracted network (every rank takes part), counted
    # by compress.flops.
    slim = trainer.model.to(trainer.device, memory_format=torch.contiguous_format).eval()
    slim_top1 = trainer.evaluate(slim, bf16=False).top1
    slim.to("cpu")
    if dist_info.enabled:
        torch.distributed.destroy_process_group()
    if not dist_info.is_main:
        return
    dense_top1 = slim_top1 if cfg.method == "none" else plan.dense_top1(trainer.log)
    summary = report.write_run_folder(
        work, slim, name=cfg.name, method=cfg.method, data=data, num_classes=num_classes, target=plan.target,
        dense_counts=plan.dense_counts, dense_top1=dense_top1, slim_top1=slim_top1, arch=arch_of(slim, **spec),
        epochs=cfg.epochs, seconds=trainer.seconds, wall_seconds=time.time() - started,
        config=config_as_dict(cfg), calib=cfg.calib, seed=cfg.seed, pruning=plan.pruning())
    publish(work, out)
    lat = summary.get("latency") or {}
    predicted = "" if lat.get("predicted_ms") is None else \
        f", predicted {lat['predicted_ms']:.4g} ms (budget {lat['budget_ms']:g} ms, dense {lat['dense_predicted_ms']:.4g} ms)"
    print(f"wrote {out}: top1 {slim_top1:.4f}, flops {summary['slim']['flops'] / 1e6:.2f}M "
          f"(-{summary['achieved']['flops_reduction']:.1%}), params {summary['slim']['params'] / 1e6:.3f}M "
          f"(-{summary['achieved']['params_reduction']:.1%}){predicted}")


def choose_precision_and_size(cfg: RunConfig, data, num_classes: int, input_shape: tuple, device: str) -> None:
    """bf16 or fp32 for this hardware (compress/hardware.py), and with --time-budget the number of
    training images per epoch that fits; both printed and recorded in the run's config."""
    import torch

    from compress.hardware import choose_bf16, training_throughput
    from compress.models import build_model

    cfg.bf16, cfg.bf16_reason = choose_bf16(device, cfg.bf16)
    if not cfg.time_budget:
        return
    available = min(cfg.train_subset or len(data.y_train), len(data.y_train))
    model = build_model(cfg.model if cfg.method != "scratch" else json_model(cfg.widths_from), num_classes, cfg.width)
    per_rank = max(cfg.batch_size // int(os.environ.get("WORLD_SIZE", "1")), 1)
    ips = training_throughput(model, input_shape[1:], per_rank, cfg.bf16, cfg.channels_last, device=device)
    # 0.8: pruning overhead, data augmentation and the evaluations are not in the probe.
    import torch.distributed as dist
    if dist.is_initialized():   # every rank must train on the same images: rank 0's measurement decides
        shared = torch.tensor([ips], dtype=torch.float64)
        dist.broadcast(shared, src=0)
        ips = float(shared)
    fits = int(0.8 * cfg.time_budget * 60 * ips / cfg.epochs)
    n = max(min(available, fits), 4 * cfg.batch_size)
    note = f"{ips:.0f} training images/s measured here ({'bf16' if cfg.bf16 else 'fp32'})"
    if n < available:
        cfg.time_budget_note = (f"time budget {cfg.time_budget:g} min: {note}; training on {n:,} of {available:,} "
                                f"images x {cfg.epochs} epochs so it fits")
    else:
        cfg.time_budget_note = f"time budget {cfg.time_budget:g} min: {note}; all {available:,} images fit"
    cfg.train_subset = n if n < len(data.y_train) else cfg.train_subset


def json_model(widths_from: str) -> str:
    import json
    return json.loads((Path(widths_from) / "arch.json").read_text())["model"]


def config_as_dict(cfg: RunConfig) -> dict:
    d = asdict(cfg)
    d["ignore"] = list(cfg.ignore)
    return d
