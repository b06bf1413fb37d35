"""Pruning methods as schedules over the Trainer, all within the same total epoch budget.

    seed      prune while training (compress.prune.seed): dense warm-up (--prune-warmup of the epochs),
              per-step channel utilities, hard masks at the target that keep moving until --prune-end
              of the epochs; then the masked channels are cut out and the compact network finishes
              the same learning-rate cycle (phase "compact"); optionally --finetune-epochs more of
              plain fine-tuning with a new cycle.
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
(learning-rate rewinding, Renda et al. 2020), with fresh momentum. A criterion is a small object
with `scores()` (and optionally `after_backward()`); adding one needs no change to the trainer.
"""
from __future__ import annotations

import json
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from compress.errors import UserError
from compress.flops import Counts, count
from compress.models import build_model, init_weights
from compress.prune import importance
from compress.prune.budget import max_reduction, select
from compress.prune.cost import ResourceModel
from compress.prune.graph import ChannelGroup, find_groups
from compress.prune.masks import ChannelMasker
from compress.prune.seed import SeedConfig, SeedPruner
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
    finish: Callable[[Trainer], nn.Module] = lambda trainer: trainer.model
    dense_top1: Callable[[list[dict]], Optional[float]] = lambda log: None
    pruning: Callable[[], Optional[dict]] = lambda: None   # what report.json records of the pruning


# ---------------------------------------------------------------------------------------------
# criteria: how a channel scores (higher = keep)


class Criterion:
    def setup(self, trainer: Trainer, groups: list[ChannelGroup]) -> None: ...

    def after_backward(self, trainer: Trainer) -> None: ...

    def scores(self, trainer: Trainer, groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class L1Norm(Criterion):
    """Li et al. 2017: the L1 norm of each filter of the group's first conv."""

    def scores(self, trainer, groups):
        return importance.l1_filter(trainer.model, groups)


class BNScale(Criterion):
    """Liu et al. 2017 (network slimming): |gamma| of the group's BN; sparsified during training
    by adding lam * sign(gamma) to gamma's gradient (the subgradient of lam * |gamma|)."""

    def __init__(self, lam: float):
        self.lam = lam
        self.gammas: list[nn.Parameter] = []

    def setup(self, trainer, groups):
        modules = dict(trainer.model.named_modules())
        names = sorted({o for g in groups for o in g.outputs
                        if isinstance(modules[o], nn.modules.batchnorm._BatchNorm)})
        self.gammas = [modules[n].weight for n in names if modules[n].weight is not None]

    def after_backward(self, trainer):
        for gamma in self.gammas:
            if gamma.grad is not None:
                gamma.grad.add_(torch.sign(gamma.detach()), alpha=self.lam)

    def scores(self, trainer, groups):
        return importance.bn_scale(trainer.model, groups)


class Taylor(Criterion):
    """Molchanov et al. 2017: |activation x gradient| per channel, averaged over `batches`
    training batches after dense training (no weight update), combined over DDP ranks."""

    def __init__(self, batches: int):
        self.batches = batches

    def scores(self, trainer, groups):
        from compress.data import batches as make_batches
        c, d = trainer.config, trainer.data
        masker = ChannelMasker(trainer.model, groups, record=True)
        per_rank = max(c.batch_size // trainer.dist.world_size, 1)
        criterion = nn.CrossEntropyLoss()
        world = trainer.dist.world_size

        def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
            return trainer.all_reduce_sum(t) / world

        trainer.net.train()
        it = make_batches(d.x_train, d.y_train, per_rank, train=True, seed=c.seed + 1, epoch=trainer.epoch,
                          mean=d.mean, std=d.std, device=trainer.device, channels_last=c.channels_last,
                          rank=trainer.dist.rank, world_size=world)
        # Only activation gradients are needed: no weight-gradient all-reduce under DDP.
        no_sync = trainer.net.no_sync if hasattr(trainer.net, "no_sync") else nullcontext
        try:
            for i, (x, y) in enumerate(it):
                if i >= self.batches:
                    break
                with no_sync():
                    with trainer.autocast():
                        loss = criterion(trainer.net(x).float(), y)
                    loss.backward()
                masker.pop_taylor(reduce=mean_over_ranks)
        finally:
            masker.remove()
            trainer.model.zero_grad(set_to_none=True)
        return importance.taylor(masker)


class RandomScores(Criterion):
    """Random channels: a seeded draw, the same on every rank."""

    def __init__(self, seed: int):
        self.seed = seed

    def scores(self, trainer, groups):
        return importance.random_scores(groups, self.seed)


# ---------------------------------------------------------------------------------------------
# one-shot pruning at the end of the dense phase


@dataclass
class OneShotPrune(Callback):
    """Train dense; at the end of epoch `at_epoch`, score, select to the target (or to fixed
    per-group `budgets`), cut the channels out and let the trainer continue on the slim model."""
    criterion: Criterion
    at_epoch: int
    groups: list[ChannelGroup]               # found on the dense model before training starts
    cost: ResourceModel
    example_input: torch.Tensor
    metric: Optional[str] = None
    reduction: Optional[float] = None
    min_keep: float = 0.05
    cost_power: float = 0.0                  # budget.select: 0 ranks by score alone, as the papers do
    round_to: int = 1                        # budget.select: kept widths in multiples of this
    budgets: Optional[dict[str, int]] = None
    pruned: bool = False
    dense_top1: Optional[float] = None
    kept: dict = field(default_factory=dict)

    def on_train_start(self, trainer):
        if not self.pruned:
            self.criterion.setup(trainer, self.groups)

    def after_backward(self, trainer, step):
        if not self.pruned:
            self.criterion.after_backward(trainer)

    def on_epoch_end(self, trainer, epoch):
        if self.pruned or epoch != self.at_epoch:
            return
        self.dense_top1 = trainer.evaluate(bf16=False).top1   # fp32, like the slim top-1
        scores = self.criterion.scores(trainer, self.groups)
        if self.budgets is not None:
            masks = masks_from_budgets(scores, self.budgets)
        else:
            masks = select(scores, self.cost, self.metric, self.reduction, self.min_keep, cost_power=self.cost_power,
                           round_to=self.round_to)
        # Weight-based scores agree across ranks already; make sure every rank cuts the same channels.
        masks = {name: trainer.broadcast(m.to(trainer.device).to(torch.uint8)).bool().cpu()
                 for name, m in masks.items()}
        self.kept = {name: int(m.sum()) for name, m in masks.items()}
        self.masks = masks
        trainer.model = extract(trainer.model, self.groups, masks, self.example_input.to(trainer.device))
        self.pruned = True

    def state_dict(self):
        return {"pruned": self.pruned, "dense_top1": -1.0 if self.dense_top1 is None else self.dense_top1,
                "kept": dict(self.kept)}

    def load_state_dict(self, state):
        self.pruned = bool(state["pruned"])
        self.dense_top1 = None if state["dense_top1"] < 0 else float(state["dense_top1"])
        self.kept = dict(state["kept"])


def masks_from_budgets(scores: dict[str, torch.Tensor], budgets: dict[str, int]) -> dict[str, torch.Tensor]:
    """Keep exactly budgets[g] top-scoring channels of each group named (the others stay whole)."""
    masks = {}
    for name, s in scores.items():
        keep = budgets.get(name, len(s))
        mask = torch.zeros(len(s), dtype=torch.bool)
        mask[torch.topk(s.float().cpu(), keep).indices] = True
        masks[name] = mask
    return masks


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


def check_reachable(cost: ResourceModel, metric: str, reduction: float, min_keep: float, round_to: int = 1) -> None:
    best = max_reduction(cost, metric, min_keep, round_to)
    if reduction > best - 0.005:
        rounded = f" rounded up to multiples of --round-to {round_to}" if round_to > 1 else ""
        raise UserError(f"target {metric}={reduction:g} is unreachable for this model: keeping only "
                        f"--min-keep {min_keep:g} of every prunable group{rounded} removes {best:.1%} of the "
                        f"{metric} (layers that cannot be pruned keep the rest)")


def make_plan(cfg, data, *, num_classes: int, input_shape: tuple) -> Plan:
    """The Plan for `cfg.method` (cfg: compress.cli.RunConfig)."""
    example = torch.zeros(2, *input_shape[1:])
    method = cfg.method
    target = None if cfg.target is None else {"metric": cfg.target_metric, "reduction": cfg.target_reduction}

    if method == "scratch":
        arch, seed_target = read_widths_run(cfg.widths_from)
        dense = build_model(arch["model"], arch["num_classes"], arch["width"])
        model = rebuild(arch)
        init_weights(model)
        return Plan(model, [Phase("train", cfg.epochs)], [], count(dense, input_shape), target or seed_target)

    model = build_model(cfg.model, num_classes, cfg.width)
    if cfg.init:
        _load_init(model, cfg.init)
    dense_counts = count(model, input_shape)
    if method == "none":
        return Plan(model, [Phase("train", cfg.epochs)], [], dense_counts, None,
                    dense_top1=lambda log: _last_test_top1(log, "train"))

    if method == "uniform":
        return Plan(uniform_model(model, example, target, cfg), [Phase("train", cfg.epochs)], [], dense_counts,
                    target)

    if method == "seed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        steps = steps_per_epoch(len(data.y_train), cfg.batch_size, world)
        return _seed_plan(cfg, model, dense_counts, target, example, steps)

    dense_epochs, finetune_epochs = split_epochs(cfg.epochs, cfg.finetune_fraction, method)
    phases = [Phase("dense", dense_epochs), Phase("finetune", finetune_epochs)]
    # Groups are found on the dense model as built (plain memory format, CPU), before the trainer
    # moves it; they name modules, so they hold for the moved model too.
    groups = find_groups(model, example, cfg.ignore)
    cost = ResourceModel(model, groups, example)
    budgets = None
    if method == "random":
        arch, seed_target = read_widths_run(cfg.widths_from)
        target = target or seed_target
        budgets = budgets_from_arch(groups, arch)
        criterion: Criterion = RandomScores(cfg.seed)
    else:
        criterion = {"l1": lambda: L1Norm(), "slimming": lambda: BNScale(cfg.slimming_lambda),
                     "taylor": lambda: Taylor(cfg.taylor_batches)}[method]()
        check_reachable(cost, target["metric"], target["reduction"], cfg.min_keep, cfg.round_to)
    pruner = OneShotPrune(criterion, dense_epochs - 1, groups, cost, example,
                          metric=target and target["metric"], reduction=target and target["reduction"],
                          min_keep=cfg.min_keep, cost_power=cfg.cost_power, round_to=cfg.round_to, budgets=budgets)
    return Plan(model, phases, [pruner], dense_counts, target, dense_top1=lambda log: pruner.dense_top1)


def uniform_model(model: nn.Module, example: torch.Tensor, target: dict, cfg) -> nn.Module:
    """`model` with every prunable group thinned by the same share, freshly initialised.

    The share is found by the budgeted selection itself: each channel scores by its position in its
    group (the first channels score highest), so the greedy removes the highest relative position
    across all groups first, i.e. thins every group at the same rate, and stops at the target (one
    width multiplier; the slack under the target is filled a channel at a time, so widths differ from
    the common share by at most a channel or a --round-to step)."""
    groups = find_groups(model, example, cfg.ignore)
    cost = ResourceModel(model, groups, example)
    check_reachable(cost, target["metric"], target["reduction"], cfg.min_keep, cfg.round_to)
    positional = {g.name: 1.0 - (torch.arange(g.size, dtype=torch.float64) + 0.5) / g.size for g in groups}
    masks = select(positional, cost, target["metric"], target["reduction"], cfg.min_keep, round_to=cfg.round_to)
    slim = extract(model, groups, masks, example)
    init_weights(slim)
    return slim


def budgets_from_arch(groups: list[ChannelGroup], arch: dict) -> dict[str, int]:
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


# ---------------------------------------------------------------------------------------------
# the seed method: prune while training


class SeedPrune(Callback):
    """Wires compress.prune.seed.SeedPruner into the trainer: after every backward the masker's
    Taylor significances (averaged over DDP ranks) feed the pruner, whose new masks take effect on
    the next forward; at the end of epoch `extract_at` (0-based) the masked channels are cut out."""

    def __init__(self, groups: list[ChannelGroup], cost: ResourceModel, config: SeedConfig, extract_at: int,
                 example_input: torch.Tensor):
        self.groups, self.cost, self.extract_at, self.example_input = groups, cost, extract_at, example_input
        self.pruner = SeedPruner(groups, cost, config)
        self.masker: Optional[ChannelMasker] = None
        self.extracted = False

    def on_train_start(self, trainer):
        if self.extracted:
            return
        self.masker = ChannelMasker(trainer.model, self.groups, record=not self.pruner.frozen)
        self.masker.set(self.pruner.masks, off=self.pruner.off_scale)

    def after_backward(self, trainer, step):
        if self.extracted:
            return
        world = trainer.dist.world_size
        theta = self.masker.pop_taylor(reduce=lambda t: trainer.all_reduce_sum(t) / world) if self.masker.record else None
        new = self.pruner.step(theta)
        if new is not None:
            self.masker.set(new, off=self.pruner.off_scale)
        self.masker.record = not self.pruner.frozen   # the structure is final: stop paying for Taylor

    def on_epoch_end(self, trainer, epoch):
        if self.extracted or epoch != self.extract_at:
            return
        masks = self.pruner.masks
        self.masker.remove()
        self.masker = None
        trainer.model = extract(trainer.model, self.groups, masks, self.example_input.to(trainer.device))
        self.extracted = True

    def resources(self, trainer):
        if self.extracted or self.pruner.masks is None:
            return None
        return self.cost.flops(self.pruner.masks), self.cost.params(self.pruner.masks)

    def state_dict(self):
        return {"extracted": self.extracted, "pruner": self.pruner.state_dict()}

    def load_state_dict(self, state):
        self.extracted = bool(state["extracted"])
        self.pruner.load_state_dict(state["pruner"])


def seed_config(cfg, target: dict, epochs: int, steps_per_epoch: int) -> SeedConfig:
    """The seed method's config for a run: the CLI's knobs where given, seed.py's defaults otherwise."""
    knobs = {"smoothing": cfg.prune_smoothing, "update_every": cfg.prune_every, "redistribute": cfg.redistribute,
             "redistribute_by": cfg.redistribute_by, "soft": cfg.soft_masks}
    return SeedConfig.for_run(target["metric"], target["reduction"], epochs, steps_per_epoch,
                              warmup=cfg.prune_warmup, ramp=cfg.prune_ramp, end=cfg.prune_end,
                              settle_epochs=cfg.prune_settle, min_keep=cfg.min_keep, cost_power=cfg.cost_power,
                              round_to=cfg.round_to, **{k: v for k, v in knobs.items() if v is not None})


def _seed_plan(cfg, model, dense_counts, target, example, steps_per_epoch: int) -> Plan:
    groups = find_groups(model, example, cfg.ignore)
    cost = ResourceModel(model, groups, example)
    check_reachable(cost, target["metric"], target["reduction"], cfg.min_keep, cfg.round_to)
    prune_epochs = cfg.epochs - cfg.finetune_epochs
    config = seed_config(cfg, target, prune_epochs, steps_per_epoch)
    cut = config.extract_epoch(steps_per_epoch)
    callback = SeedPrune(groups, cost, config, cut - 1, example)
    # One learning-rate cycle over the prune epochs, whether the network is masked or already cut.
    phases = [Phase("seed", cut, cycle_epochs=prune_epochs)]
    if cut < prune_epochs:
        phases.append(Phase("compact", prune_epochs - cut, cycle_start=cut, cycle_epochs=prune_epochs))
    if cfg.finetune_epochs:
        phases.append(Phase("finetune", cfg.finetune_epochs))
    return Plan(model, phases, [callback], dense_counts, target, pruning=callback.pruner.summary)
