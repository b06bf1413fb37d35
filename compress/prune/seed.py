"""The seed method: prune while training to a FLOPs/params target, with per-layer budgets that move.

Independent of the trainer: it sees one dict of Taylor significances per step and answers with
new masks when they change. The trainer's callback (compress/methods.py) wires it up:

    masker = ChannelMasker(model, groups, record=True)
    pruner = SeedPruner(groups, ResourceModel(model, groups, x), SeedConfig.for_run("flops", 0.76, epochs, steps))
    ...after each backward:
    new = pruner.step(masker.pop_taylor(reduce=all_reduce_mean))   # None, or masks that changed
    if new is not None: masker.set(new)

What the paper (EURASIP JASP 2021/31) fixes, and what we chose where it is silent:

* Significance Theta (given): first-order Taylor at the BN output, mean over the batch of
  |sum_hw dJ/dz * z|, divided by the layer's max (`masks.ChannelMasker`).
* Utility u, smoothing eps (ours: the exponential moving average u <- eps*u + (1-eps)*Theta,
  eps = 0.9, u initialised to the first Theta). The predecessor's u <- decay*u + Theta ranks the
  same in steady state, but scales u by 1/(1-decay) for channels that keep running while a channel
  switched off early keeps the small value it had: a bias against channels coming back. The
  average keeps every utility on Theta's [0, 1] scale. 0.9 is a ~10-step memory: one mini-batch's
  Taylor estimate is noisy, and masks are recomputed every 10 steps.
* Only channels that took part in the forward pass are updated; switched-off ones keep their u,
  so they return when a neighbour's utility falls below theirs or their layer gains budget.
* Warm-up (ours: 5 % of the epochs, at least one) with every channel on, as the predecessor's
  10 of 200 epochs. Then hard masks, already at the target: the first selection is the global
  budgeted one (`budget.select` on u).
* Ranking (ours, measured): by utility alone (`cost_power` = 0); the budget decides how far down
  the ranking to cut. Utility per unit of FLOPs saved (`cost_power` = 1) thinned the expensive early
  layers and alternated hard-cut and whole layers (bilinear costs reward concentrating the cut):
  57.2 % vs 66.9 % top-1 for VGG-16 at -76 % FLOPs, `--preset demo` (BENCHMARKS.md).
* Layer budgets a^l (channels kept per group) and their redistribution (ours): once per epoch,
  layer significance xi^l = mean utility of the layer's kept channels (`redistribute_by` =
  "utility", measured). The half of the layers with the lowest xi each give up a proportion s of
  the channels they hold above the minimum width (s = 0.1); the freed resource is shared by the
  other half in proportion to xi and turned into channels at each layer's marginal cost.
  "utility-per-cost" divides xi by the relative cost of one of the layer's channels; it kept
  moving channels from the expensive early layers to the cheap late ones (VGG-16 -76 % FLOPs,
  demo preset: 66.9 % top-1, -41 % params; "utility": 68.5 %, -69 %; no redistribution, s = 0:
  66.9 %, -59 %; BENCHMARKS.md).
* Mask changes due at an epoch boundary (the first selection, redistributions) happen on the
  first step of the next epoch, after the end-of-epoch evaluation (see `step`).
* Masks are recomputed every `update_every` = 10 steps: each layer keeps its top-utility
  channels at its budget and `budget.select(..., budgets=)` moves the counts the least needed to
  land on the target, so the target holds (reduction >= target, by less than one channel) at
  every update, not only at the end. Budgets then follow the counts actually selected.
* Minimum width (ours): 10 % of a layer's channels, at least 1 (`min_keep`).
* Freeze (ours): masks stop changing after 75 % of the steps; the rest of the run trains the
  final structure (the predecessor had no separate fine-tune either; this is its in-run version).

Every rank must pick identical masks under DDP: all-reduce Theta before `step` (the masker's
`pop_taylor(reduce=...)` does it in one call); everything here is then deterministic.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from compress.prune import budget
from compress.prune.cost import ResourceModel
from compress.prune.graph import ChannelGroup


@dataclass
class SeedConfig:
    metric: str = "flops"            # "flops" or "params"
    reduction: float = 0.5           # target reduction of `metric`, in (0, 1)
    smoothing: float = 0.9           # eps in u <- eps*u + (1-eps)*Theta
    warmup_steps: int = 0            # steps with every channel on
    update_every: int = 10           # steps between mask updates
    redistribute_every: int = 0      # steps between budget redistributions (0: never)
    redistribute: float = 0.1        # s: share of a donor layer's spare channels moved per redistribution
    min_keep: float = 0.1            # minimum width: fraction of a layer (or an int count)
    freeze_at: int | None = None     # step after which masks no longer change (None: never)
    cost_power: float = 0.0          # rank channels by utility / resource**cost_power (budget.select); measured: 0 beats 1
    redistribute_by: str = "utility"  # layer significance xi: "utility" (measured better) or "utility-per-cost"
    round_to: int = 1                # kept widths in multiples of this (budget.select)

    @classmethod
    def for_run(cls, metric: str, reduction: float, epochs: int, steps_per_epoch: int, **overrides) -> SeedConfig:
        """Our defaults for a run of `epochs` x `steps_per_epoch` (see the module docstring)."""
        warmup_epochs = max(1, round(0.05 * epochs)) if epochs > 1 else 0
        total = epochs * steps_per_epoch
        config = cls(metric=metric, reduction=reduction, warmup_steps=warmup_epochs * steps_per_epoch,
                     redistribute_every=steps_per_epoch, freeze_at=max(warmup_epochs * steps_per_epoch,
                                                                        int(0.75 * total)))
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise TypeError(f"SeedConfig has no field {key!r}")
            setattr(config, key, value)
        budget.check_target(config.metric, config.reduction)
        check_redistribute_by(config.redistribute_by)
        return config


REDISTRIBUTE_BY = ("utility", "utility-per-cost")


def check_redistribute_by(value: str) -> str:
    if value not in REDISTRIBUTE_BY:
        raise ValueError(f"redistribute_by must be one of {', '.join(REDISTRIBUTE_BY)}, got {value!r}")
    return value


class SeedPruner:
    def __init__(self, groups: Sequence[ChannelGroup], cost: ResourceModel, config: SeedConfig):
        budget.check_target(config.metric, config.reduction)
        check_redistribute_by(config.redistribute_by)
        if config.update_every < 1:
            raise ValueError("update_every must be >= 1")
        self.groups = list(groups)
        self.cost = cost
        self.config = config
        self.utility = {g.name: torch.zeros(g.size) for g in self.groups}
        self.observed = {g.name: torch.zeros(g.size, dtype=torch.bool) for g in self.groups}
        self.masks: dict[str, torch.Tensor] | None = None
        self.budgets: dict[str, int] | None = None
        self.steps = 0
        self.mask_changes = 0  # updates that changed at least one channel (for logs and tests)

    # ------------------------------------------------------------------ per step

    def observe(self, theta: Mapping[str, torch.Tensor]) -> None:
        """Fold one batch's Theta into the utilities of the channels that were on."""
        eps = self.config.smoothing
        for name, value in theta.items():
            value = value.detach().float().cpu()
            u, seen = self.utility[name], self.observed[name]
            active = self.masks[name] if self.masks is not None else torch.ones_like(seen)
            first = active & ~seen
            again = active & seen
            u[first] = value[first]
            u[again] = eps * u[again] + (1 - eps) * value[again]
            seen |= active

    def step(self, theta: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor] | None:
        """One training step: update utilities; return the masks if they changed, else None."""
        if theta:
            self.observe(theta)
        self.steps += 1
        cfg = self.config
        if self.steps <= cfg.warmup_steps:
            return None
        if cfg.freeze_at is not None and self.steps > cfg.freeze_at and self.masks is not None:
            return None
        if self.masks is None:
            return self._apply(budget.select(self.utility, self.cost, cfg.metric, cfg.reduction, cfg.min_keep,
                                             cost_power=cfg.cost_power, round_to=cfg.round_to))
        # Counted from the first masked step, so a change due at an epoch boundary (the first
        # selection, each redistribution) lands on the first step of the next epoch, not the last of
        # this one: the evaluation in between would see the new masks through BN running statistics
        # gathered under the old ones (every layer downstream sees different inputs). Measured: the
        # logged top-1 after the first masked epoch fell to chance (0.10) in both full VGG-16 runs.
        since = self.steps - cfg.warmup_steps - 1
        if cfg.redistribute_every and since > 0 and since % cfg.redistribute_every == 0:
            self.redistribute()
            return self._apply(self._select())
        if since % cfg.update_every == 0:
            return self._apply(self._select())
        return None

    def _select(self) -> dict[str, torch.Tensor]:
        cfg = self.config
        return budget.select(self.utility, self.cost, cfg.metric, cfg.reduction, cfg.min_keep, budgets=self.budgets,
                             cost_power=cfg.cost_power, round_to=cfg.round_to)

    def _apply(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        changed = self.masks is None or any(not torch.equal(masks[n], self.masks[n]) for n in masks)
        self.masks = masks
        self.budgets = budget.counts(masks)
        if changed:
            self.mask_changes += 1
            return {n: m.clone() for n, m in masks.items()}
        return None

    # ------------------------------------------------------------------ budgets

    def layer_significance(self) -> np.ndarray:
        """xi per group: mean utility of its kept channels ("utility"), or that per unit of the
        (relative) marginal cost of one of its channels ("utility-per-cost")."""
        if self.config.redistribute_by == "utility":
            return np.array([float(self.utility[n][self.masks[n]].mean()) if self.masks[n].any() else 0.0
                             for n in self.cost.names])
        k = self.cost.vector(self.budgets)
        saving = self.cost.removal_savings(self.config.metric, k)
        relative = saving / max(float(saving[saving > 0].mean()) if (saving > 0).any() else 1.0, 1e-12)
        xi = np.zeros(len(self.groups))
        for i, name in enumerate(self.cost.names):
            kept = self.masks[name]
            mean_u = float(self.utility[name][kept].mean()) if kept.any() else 0.0
            xi[i] = mean_u / relative[i] if relative[i] > 0 else 0.0
        return xi

    def redistribute(self) -> None:
        """Move a proportion s of the low-significance layers' spare channels to the high ones."""
        if self.budgets is None:
            return
        names, cost = self.cost.names, self.cost
        k = cost.vector(self.budgets)
        saving = cost.removal_savings(self.config.metric, k)
        lowest = budget.min_counts(cost, self.config.min_keep)
        xi = self.layer_significance()
        ranked = np.argsort(xi, kind="stable")
        half = len(ranked) // 2
        donors, receivers = ranked[:half], ranked[half:]
        freed = 0.0
        new = k.copy()
        for g in donors:
            give = math.floor(self.config.redistribute * (k[g] - lowest[g]))
            new[g] -= give
            freed += give * saving[g]
        weights = np.array([xi[g] for g in receivers])
        if freed <= 0 or weights.sum() <= 0:
            return
        weights = weights / weights.sum()
        for g, w in zip(receivers, weights):
            if saving[g] <= 0:
                continue
            new[g] = min(cost.sizes[g], new[g] + math.floor(freed * w / saving[g]))
        self.budgets = {n: int(new[i]) for i, n in enumerate(names)}

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "steps": self.steps,
            "mask_changes": self.mask_changes,
            "utility": {n: u.clone() for n, u in self.utility.items()},
            "observed": {n: s.clone() for n, s in self.observed.items()},
            "masks": None if self.masks is None else {n: m.clone() for n, m in self.masks.items()},
            "budgets": None if self.budgets is None else dict(self.budgets),
        }

    def load_state_dict(self, state: dict) -> None:
        if set(state["utility"]) != set(self.utility):
            raise ValueError("checkpoint's pruning groups do not match this model's")
        self.steps = int(state["steps"])
        self.mask_changes = int(state.get("mask_changes", 0))
        self.utility = {n: u.clone().float() for n, u in state["utility"].items()}
        self.observed = {n: s.clone().bool() for n, s in state["observed"].items()}
        self.masks = None if state["masks"] is None else {n: m.clone().bool() for n, m in state["masks"].items()}
        self.budgets = None if state["budgets"] is None else {n: int(v) for n, v in state["budgets"].items()}
