"""Pruning methods as schedules over the Trainer, all within the same total epoch budget.

    seed      prune while training (compress.prune.seed): dense warm-up, per-step channel utilities,
              masks that ramp to the target and keep moving until the freeze, a settle period on the
              final masks; then the masked channels are cut out and the compact network finishes the
              same learning-rate cycle (phase "compact"); optionally --finetune-epochs more of plain
              fine-tuning with a new cycle.
    l1        Li et al. 2017: dense training, keep the filters of largest L1 norm, fine-tune.
    slimming  Liu et al. 2017: dense training with an L1 penalty on BN scales, keep the largest |gamma|,
              fine-tune.
    taylor    Molchanov et al. 2017, one-shot: dense training, Taylor significance accumulated over
              --taylor-batches batches, keep the most significant, fine-tune.
    random    dense training, then random channels at the per-layer widths of --widths-from RUN, fine-tune.
    scratch   the compact shape of --widths-from RUN, freshly initialised, trained for the whole budget.
    uniform   what every user has without us: the network uniformly thinner (every prunable layer keeps the
              same share of its channels, the share chosen to meet the target), trained from scratch for
              the whole budget.
    none      dense training: the reference.

The one-shot methods spend (1 - --finetune-fraction) of the epochs training dense and the rest
fine-tuning (default 50/50); the fine-tune phase restarts the learning-rate cycle at the same peak
(learning-rate rewinding, Renda et al. 2020), with fresh momentum. Every pruning method runs
through the Python API (compress.api.Pruner) that users call from their own loops; PruneCallback
drives it from the Trainer, so the CLI and the API are one path.
"""
from __future__ import annotations

import json
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from compress.api import Pruner
from compress.errors import UserError
from compress.flops import Counts, count
from compress.models import build_model, init_weights
from compress.prune.budget import positional_scores, select
from compress.prune.graph import ChannelGroup, find_groups
from compress.prune.seed_config import seed_options
from compress.prune.surgery import extract, rebuild
from compress.train import Callback, Phase, Trainer, steps_per_epoch


@dataclass
class Plan:
    """What a method hands the CLI: the starting model, the phases, the callbacks, and how to get
    the compact network once training is over."""
    model: nn.Module
    phases: list[Phase]
    callbacks: list[Callback]
    dense_counts: Counts                       # the unpruned network, for the report
    target: Optional[dict]                     # {"metric", "reduction"} or None
    dense_top1: Callable[[list[dict]], Optional[float]] = lambda log: None
    pruning: Callable[[], Optional[dict]] = lambda: None   # what report.json records of the pruning


# ---------------------------------------------------------------------------------------------
# the pruning API (compress.api.Pruner) as a trainer callback


class PruneCallback(Callback):
    """Drives a compress.api.Pruner from the Trainer: `step` after every backward (Taylor averaged
    over DDP ranks), and at the end of epoch `at_epoch` (0-based) the cut: the trainer continues on
    the compact network. `make_pruner(trainer)` builds the pruner; the one-shot Taylor criterion
    builds it only at the cut (its hooks would slow every dense step), after `taylor_batches`
    scoring batches with no weight update. One-shot methods record the dense network's top-1 first."""

    def __init__(self, make_pruner: Callable[[Trainer], Pruner], at_epoch: int, *, one_shot: bool,
                 taylor_batches: int = 0, pruner: Optional[Pruner] = None):
        self.make_pruner, self.at_epoch, self.one_shot = make_pruner, at_epoch, one_shot
        self.taylor_batches = taylor_batches
        self.pruner = pruner
        self.extracted = False
        self.dense_top1: Optional[float] = None
        self.summary: Optional[dict] = None

    def after_backward(self, trainer, step):
        if not self.extracted and self.pruner is not None:
            self.pruner.step(reduce=_mean_over_ranks(trainer))

    def on_epoch_end(self, trainer, epoch):
        if self.extracted or epoch != self.at_epoch:
            return
        if self.one_shot:
            self.dense_top1 = trainer.evaluate(bf16=False).top1   # fp32, like the slim top-1
        if self.pruner is None:
            self.pruner = self.make_pruner(trainer)
        if self.taylor_batches:
            _score_batches(trainer, self.pruner, self.taylor_batches)
        trainer.model = self.pruner.extract(check_input=check_batch(trainer))
        self.summary = self.pruner.summary()
        self.extracted = True

    def resources(self, trainer):
        return None if self.extracted or self.pruner is None else self.pruner.resources()

    def state_dict(self):
        return {"extracted": self.extracted, "dense_top1": -1.0 if self.dense_top1 is None else self.dense_top1,
                "pruner": {} if self.pruner is None else self.pruner.state_dict(),
                "summary": json.dumps(self.summary)}

    def load_state_dict(self, state):
        self.extracted = bool(state["extracted"])
        self.dense_top1 = None if state["dense_top1"] < 0 else float(state["dense_top1"])
        self.summary = json.loads(state.get("summary", "null"))
        if self.pruner is not None and not self.extracted and state["pruner"]:
            self.pruner.load_state_dict(state["pruner"])

    def report(self) -> Optional[dict]:
        return self.summary if self.summary is not None else (None if self.pruner is None else self.pruner.summary())


def _mean_over_ranks(trainer: Trainer):
    world = trainer.dist.world_size
    return (lambda t: trainer.all_reduce_sum(t) / world) if world > 1 else None


def check_batch(trainer: Trainer, n: int = 32) -> torch.Tensor:
    """A batch of real test images, preprocessed, for the masked-vs-extracted check."""
    from compress.data import batches as make_batches
    d, c = trainer.data, trainer.config
    x, _ = next(iter(make_batches(d.x_test[:n], d.y_test[:n], n, train=False, seed=c.seed, epoch=0, mean=d.mean,
                                  std=d.std, device=trainer.device, channels_last=False)))
    return x


def calibration_batch(data, n: int = 256) -> torch.Tensor:
    """`n` training images drawn with a fixed seed (a class-sorted dataset still gives a mix),
    preprocessed without augmentation: the batch on which compress.prune.depth measures which
    residual branches can go."""
    import numpy as np

    from compress.data import batches as make_batches
    idx = np.sort(np.random.default_rng(0).permutation(len(data.y_train))[:n])
    x, _ = next(iter(make_batches(data.x_train[idx], data.y_train[idx], len(idx), train=False, seed=0, epoch=0,
                                  mean=data.mean, std=data.std, device="cpu", channels_last=False)))
    return x


def _score_batches(trainer: Trainer, pruner: Pruner, count: int) -> None:
    """Forward + backward on `count` training batches for a Taylor score; no weight update."""
    from compress.data import batches as make_batches
    c, d = trainer.config, trainer.data
    world = trainer.dist.world_size
    criterion = nn.CrossEntropyLoss()
    trainer.net.train()
    it = make_batches(d.x_train, d.y_train, max(c.batch_size // world, 1), train=True, seed=c.seed + 1,
                      epoch=trainer.epoch, mean=d.mean, std=d.std, device=trainer.device,
                      channels_last=c.channels_last, rank=trainer.dist.rank, world_size=world)
    # Only activation gradients are needed: no weight-gradient all-reduce under DDP.
    no_sync = trainer.net.no_sync if hasattr(trainer.net, "no_sync") else nullcontext
    try:
        for i, (x, y) in enumerate(it):
            if i >= count:
                break
            with no_sync():
                with trainer.autocast():
                    loss = criterion(trainer.net(x).float(), y)
                loss.backward()
            pruner.step(reduce=_mean_over_ranks(trainer))
    finally:
        trainer.model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------
# building a plan from the run configuration


def _load_init(model: nn.Module, path: str) -> None:
    from safetensors.torch import load_file
    try:
        tensors = load_file(path)
    except Exception as exc:
        raise UserError(f"--init {path}: not a readable safetensors file ({type(exc).__name__})") from exc
    missing, unexpected = [], []
    own = model.state_dict()
    for k in own:
        if k not in tensors:
            missing.append(k)
        elif tensors[k].shape != own[k].shape:
            raise UserError(f"--init {path}: {k} has shape {tuple(tensors[k].shape)}, the model wants "
                            f"{tuple(own[k].shape)}")
    unexpected = [k for k in tensors if k not in own]
    if missing or unexpected:
        raise UserError(f"--init {path}: does not match the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    model.load_state_dict(tensors)


def read_widths_run(folder: str) -> tuple[dict, Optional[dict]]:
    """arch.json (and the target in report.json, if any) of a finished run."""
    arch_path = Path(folder) / "arch.json"
    try:
        arch = json.loads(arch_path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"--widths-from {folder}: cannot read arch.json ({type(exc).__name__})") from exc
    if not isinstance(arch, dict) or "modules" not in arch or "model" not in arch:
        raise UserError(f"--widths-from {folder}: arch.json has no model/modules")
    target = None
    try:
        target = json.loads((Path(folder) / "report.json").read_text()).get("target")
    except (OSError, ValueError):
        pass
    return arch, target


def split_epochs(epochs: int, finetune_fraction: float, method: str) -> tuple[int, int]:
    if epochs < 2:
        raise UserError(f"--method {method} trains dense then fine-tunes: it needs --epochs >= 2")
    finetune = min(max(int(round(epochs * finetune_fraction)), 1), epochs - 1)
    return epochs - finetune, finetune


def make_plan(cfg, data, *, num_classes: int, input_shape: tuple) -> Plan:
    """The Plan for `cfg.method` (cfg: compress.cli.RunConfig)."""
    example = torch.zeros(2, *input_shape[1:])
    method = cfg.method
    target = cfg.target_spec

    if method == "scratch":
        if cfg.remove_branches:
            raise UserError("--remove-branches: scratch trains the widths of --widths-from; it chooses no branches")
        arch, seed_target = read_widths_run(cfg.widths_from)
        dense = build_model(arch["model"], arch["num_classes"], arch["width"])
        model = rebuild(arch)
        init_weights(model)
        return Plan(model, [Phase("train", cfg.epochs)], [], count(dense, input_shape), target or seed_target)

    latency = dict(latency_table=cfg.latency_table, format=cfg.latency_format, threads=cfg.latency_threads) \
        if cfg.latency_table else {}
    if latency:   # a table for another model is refused by name before anything is built on it
        _check_table_model(cfg.latency_table, cfg.model, num_classes, cfg.width)
    model = build_model(cfg.model, num_classes, cfg.width)
    if cfg.init:
        _load_init(model, cfg.init)
    dense_counts = count(model, input_shape)
    if method == "none":
        return Plan(model, [Phase("train", cfg.epochs)], [], dense_counts, None,
                    dense_top1=lambda log: _last_test_top1(log, "train"))
    if cfg.remove_branches and method in ("none", "uniform"):
        raise UserError(f"--remove-branches is for the pruning methods; {method} trains a fixed network")
    if method == "uniform":
        slim, target = uniform_model(model, example, target, cfg, **latency)
        return Plan(slim, [Phase("train", cfg.epochs)], [], dense_counts, target)
    if cfg.remove_branches and method == "random":
        raise UserError("--remove-branches: random keeps the widths of --widths-from; it chooses no branches")
    common = dict(min_keep=cfg.min_keep, round_to=cfg.round_to, cost_power=cfg.cost_power, ignore=cfg.ignore,
                  seed=cfg.seed, **latency)
    if cfg.remove_branches:   # the same fixed batch on every rank, so every rank removes the same branches
        common.update(remove_branches=True, calibration=calibration_batch(data))

    if method == "seed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        steps = steps_per_epoch(len(data.y_train), cfg.batch_size, world)
        prune_epochs = cfg.epochs - cfg.finetune_epochs
        pruner = Pruner(model, example, target, "seed", epochs=prune_epochs, steps_per_epoch=steps, **common,
                        **seed_options(cfg))
        cut = pruner.extract_epoch
        target = pruner.target   # a latency budget with its reduction and table resolved
        callback = PruneCallback(lambda trainer: pruner, cut - 1, one_shot=False, pruner=pruner)
        # One learning-rate cycle over the prune epochs, whether the network is masked or already cut.
        phases = [Phase("seed", cut, cycle_epochs=prune_epochs)]
        if cut < prune_epochs:
            phases.append(Phase("compact", prune_epochs - cut, cycle_start=cut, cycle_epochs=prune_epochs))
        if cfg.finetune_epochs:
            phases.append(Phase("finetune", cfg.finetune_epochs))
        return Plan(model, phases, [callback], dense_counts, target, pruning=callback.report)

    dense_epochs, finetune_epochs = split_epochs(cfg.epochs, cfg.finetune_fraction, method)
    phases = [Phase("dense", dense_epochs), Phase("finetune", finetune_epochs)]
    widths = None
    if method == "random":
        arch, seed_target = read_widths_run(cfg.widths_from)
        target = target or seed_target
        groups = find_groups(model, example, cfg.ignore)
        widths = widths_from_arch(groups, arch)
    kind = {"random": "random", "l1": "l1", "slimming": "slimming", "taylor": "taylor"}[method]
    options = dict(common, slimming_lambda=cfg.slimming_lambda)

    def make(trainer: Trainer) -> Pruner:
        return Pruner(trainer.model, example.to(trainer.device), None if widths else target, kind, widths=widths,
                      **options)

    # Built now: slimming needs every dense step, and every method checks its target before training.
    pruner = Pruner(model, example, None if widths else target, kind, widths=widths, **options)
    target = pruner.target or target
    if method == "taylor":
        pruner.masker.remove()   # its hooks would slow every dense step: it is rebuilt at the cut
        pruner = None
    callback = PruneCallback(make, dense_epochs - 1, one_shot=True, pruner=pruner,
                             taylor_batches=cfg.taylor_batches if method == "taylor" else 0)
    return Plan(model, phases, [callback], dense_counts, target, dense_top1=lambda log: callback.dense_top1,
                pruning=callback.report)


def _check_table_model(path: str, spec: str, num_classes: int, width: float) -> None:
    """UserError when the latency table at `path` was profiled for another model."""
    from device_bench.latency_table import TableError, load_table
    try:
        table = load_table(path)
        table.check_model(spec, num_classes)
    except TableError as e:
        raise UserError(str(e)) from None
    if table.model.get("width") not in (None, float(width)):
        raise UserError(f"latency table {table.path.name} is for {spec} at width {table.model['width']:g}, "
                        f"not {width:g}")


def uniform_model(model: nn.Module, example: torch.Tensor, target: dict, cfg,
                  **latency) -> tuple[nn.Module, dict]:
    """`model` with every prunable group thinned by the same share, freshly initialised, and the
    target (a latency budget resolved against its table, `latency`: Pruner's latency_table/format/threads).

    The share is found by the budgeted selection itself: each channel scores by its position in its
    group (the first channels score highest), so the greedy removes the highest relative position
    across all groups first, i.e. thins every group at the same rate, and stops at the target (one
    width multiplier; the slack under the target is filled a channel at a time, so widths differ from
    the common share by at most a channel or a --round-to step)."""
    # The Pruner checks the target (and prices a latency budget) as for every method; the widths
    # then come from positional scores, not from a criterion.
    pruner = Pruner(model, example, target, "random", min_keep=cfg.min_keep, round_to=cfg.round_to,
                    ignore=cfg.ignore, **latency)
    target, cost = pruner.target, pruner.cost
    masks = select(positional_scores(cost), cost, target["metric"], target["reduction"], cfg.min_keep, round_to=cfg.round_to,
                   also=target.get("also"))
    slim = extract(model, pruner.groups, masks, example)
    init_weights(slim)
    return slim, target


def widths_from_arch(groups: list[ChannelGroup], arch: dict) -> dict[str, int]:
    """Per-group channel counts of a pruned run, read from its arch.json by each group's first conv."""
    budgets = {}
    for g in groups:
        shape = arch["modules"].get(g.name)
        if shape is None:
            raise UserError(f"--widths-from: arch.json has no layer {g.name!r}; was it pruned from {arch['model']}?")
        if not 1 <= int(shape["out"]) <= g.size:
            raise UserError(f"--widths-from: layer {g.name!r} has {shape['out']} channels there, "
                            f"this model has {g.size}")
        budgets[g.name] = int(shape["out"])
    return budgets


def _last_test_top1(log: list[dict], phase: str) -> Optional[float]:
    rows = [r for r in log if r["phase"] == phase and r["test_top1"] != ""]
    return float(rows[-1]["test_top1"]) if rows else None
