"""The seed method: prune while training to a FLOPs/params/latency target, with per-layer budgets that move.

Independent of the trainer: it sees one dict of Taylor significances per step and answers with
new masks when they change. `compress.api.Pruner` wires it to a model:

    config = SeedConfig.for_run("flops", 0.76, epochs, steps_per_epoch)   # the schedule, in steps
    pruner = SeedPruner(groups, ResourceModel(model, groups, x), config)
    masker = ChannelMasker(model, groups, record=True)
    ...after each backward:
    new = pruner.step(masker.pop_taylor(reduce=all_reduce_mean))   # None, or masks that changed
    if new is not None: masker.set(new, off=pruner.off_scale)

The schedule over the steps of the pruning phase (shares of its steps; `SCHEDULE` holds the
defaults, the one place they live, and `for_run` turns them into steps):

    dense warm-up | target ramps in | masks keep moving at the target | masks final (settle) | cut
    0        warmup         warmup+ramp                            end            end+settle epochs

What the paper (EURASIP JASP 2021/31) fixes, and what we chose where it is silent:

* Significance Theta (given): first-order Taylor at the BN output, mean over the batch of
  |sum_hw dJ/dz * z|, divided by the layer's max (`masks.ChannelMasker`).
* Utility u, smoothing eps (ours: the exponential moving average u <- eps*u + (1-eps)*Theta,
  u initialised to the first Theta). The predecessor's u <- decay*u + Theta ranks the same in
  steady state, but scales u by 1/(1-decay) for channels that keep running while a channel
  switched off early keeps the small value it had: a bias against channels coming back. The
  average keeps every utility on Theta's [0, 1] scale.
* Only channels that took part in the forward pass are updated; switched-off ones keep their u,
  so they return when a neighbour's utility falls below theirs or their layer gains budget.
* Warm-up with every channel on, as the predecessor's 10 of 200 epochs.
* Target ramp (ours): the reduction asked of each selection grows from 0 to the target over
  `ramp_steps`, as r(t) = R (1 - (1 - t/ramp)^3) (the gradual schedule of Zhu & Gupta 2017), so
  the network is not cut to the target in one step; 0 = the whole target at the first selection.
* Initial layer budgets a^l_0 (`budget_init`): "uniform", every layer keeps the same share of
  its channels (the overall rate p applied per layer, then redistributed by xi and s: our reading
  of the paper's notation), or "global", the channels ranked by utility across all layers (the
  predecessor's global threshold). During the ramp the budgets follow the rule for the reduction
  asked at that step; then only redistribution (and the target) moves them.
* Ranking (ours, measured): by utility alone (`cost_power` = 0); the budget decides how far down
  the ranking to cut (BENCHMARKS.md: 66.9 % vs 57.2 % top-1 for utility per unit of FLOPs saved).
* Layer budgets a^l (channels kept per group) and their redistribution (ours): once per epoch,
  each layer's significance xi^l (`redistribute_by`, below); the half of the layers with the
  lowest xi each give up a proportion s of the channels they hold above the minimum width
  (`redistribute`); the freed resource is shared by the other half in proportion to xi and turned
  into channels at each layer's marginal cost.
  - "utility": mean utility of the layer's kept channels. Utilities are normalised by the
    layer's largest, so a wide layer, with more small values, rates lower for the same shape:
    this rating leans towards thinning wide layers.
  - "utility-ratio": that mean divided by the mean utility of all the layer's channels, which
    cancels the width (a layer whose kept channels stand far above its average needs more).
  - "utility-per-cost": "utility" divided by the relative cost of one of the layer's channels
    (measured worse: 66.9 % vs 68.5 % top-1, -41 % vs -69 % params; BENCHMARKS.md).
* Masks are recomputed every `update_every` steps: each layer keeps its top-utility channels at
  its budget and `budget.select(..., budgets=)` moves the counts the least needed to land on the
  target of that step, so the target holds (reduction >= target, by less than one channel) at
  every update. Budgets then follow the counts actually selected.
* Soft masks (ours, `soft`): a switched-off channel is scaled by a factor that falls linearly
  from 1 at the end of the warm-up to 0 at `freeze_at`, instead of dropping to 0 at once: the
  network learns to do without it while it still contributes, and its weights still learn.
* Hysteresis (ours, `hysteresis`): when masks are recomputed a kept channel's utility counts
  (1 + h): a switched-off channel comes back only when it is clearly better, not on one noisy
  estimate. Measured without it (VGG-16, -90 % FLOPs, 4 epochs): ~9,000 channel flips in the first
  masked epoch for ~1,000 kept channels, i.e. the masks never settled.
* Minimum width: a share of each layer's channels, at least 1 (`min_keep`).
* Freeze: no mask changes after step `freeze_at`; the network is cut at an epoch boundary at
  least `settle_steps` later (one epoch by default), so every channel it keeps has been trained
  in the final structure, and the rest of the learning-rate cycle trains the compact network.

Every rank must pick identical masks under DDP: all-reduce Theta before `step` (the masker's
`pop_taylor(reduce=...)` does it in one call); everything here is then deterministic.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Mapping, Sequence

import numpy as np
import torch

from compress.prune import budget
from compress.prune.cost import ResourceModel
from compress.prune.graph import ChannelGroup
from compress.prune.seed_config import BUDGET_INIT, REDISTRIBUTE_BY, SCHEDULE, SeedConfig  # noqa: F401


class SeedPruner:
    def __init__(self, groups: Sequence[ChannelGroup], cost: ResourceModel, config: SeedConfig):
        self.groups = list(groups)
        self.cost = cost
        self.config = config
        self.utility = {g.name: torch.zeros(g.size) for g in self.groups}
        self.observed = {g.name: torch.zeros(g.size, dtype=torch.bool) for g in self.groups}
        self.masks: dict[str, torch.Tensor] | None = None
        self.budgets: dict[str, int] | None = None
        self.steps = 0
        self.mask_changes = 0     # updates that changed at least one channel
        self.last_change = 0      # step of the last update that changed a channel
        self.flips: list[int] = []  # channels switched on or off per period of `flip_period` steps (churn)
        # Residual branches removed whole (compress.prune.depth): chosen once, at the first selection,
        # by `choose_removed(select_at_target)` when the caller sets it (Pruner, remove_branches=True).
        self.removed: frozenset = frozenset()
        self.depth_record: dict | None = None
        self.choose_removed = None

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

    @property
    def frozen(self) -> bool:
        return self.config.freeze_at is not None and self.steps >= self.config.freeze_at

    @property
    def off_scale(self) -> float:
        """What a switched-off channel is multiplied by now: 0, or with soft masks a share falling
        linearly from 1 after the warm-up to 0 at the freeze."""
        cfg = self.config
        if not cfg.soft or self.masks is None:
            return 0.0
        span = max(cfg.freeze_at - cfg.warmup_steps, 1)
        return max(0.0, 1.0 - (self.steps - cfg.warmup_steps) / span)

    def target_now(self) -> float:
        """The reduction asked of a selection at this step (the ramp, then the target)."""
        cfg = self.config
        if cfg.ramp_steps <= 0:
            return cfg.reduction
        p = min(max((self.steps - cfg.warmup_steps) / cfg.ramp_steps, 0.0), 1.0)
        return max(cfg.reduction * (1.0 - (1.0 - p) ** 3), 1e-6)

    def step(self, theta: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor] | None:
        """One training step: update utilities; return the masks if they changed, else None.
        With soft masks the off scale moves too: `off_scale` says what to apply."""
        if theta:
            self.observe(theta)
        self.steps += 1
        cfg = self.config
        if self.steps <= cfg.warmup_steps:
            return None
        if self.masks is not None and cfg.freeze_at is not None and self.steps > cfg.freeze_at:
            return None
        if self.masks is None:
            if self.choose_removed is not None:
                self.removed, self.depth_record = self.choose_removed(self.select_at_target)
            return self._apply(self._select(first=True))
        since = self.steps - cfg.warmup_steps - 1
        if cfg.redistribute_every and since > 0 and since % cfg.redistribute_every == 0:
            self.redistribute()
            return self._apply(self._select())
        if since % cfg.update_every == 0 or self.steps == cfg.freeze_at:
            return self._apply(self._select())
        return None

    def ramping(self) -> bool:
        return self.steps <= self.config.warmup_steps + self.config.ramp_steps

    def _select(self, first: bool = False, reduction: float | None = None,
                removed: frozenset | None = None) -> dict[str, torch.Tensor]:
        """Masks for the reduction asked now (or `reduction`), with the removed branches at 0."""
        cfg = self.config
        reduction = self.target_now() if reduction is None else reduction
        removed = self.removed if removed is None else removed
        share = reduction / cfg.reduction   # the ramp moves every metric of a joint target alike
        also = {m: max(r * share, 1e-6) for m, r in (cfg.also or {}).items()}
        budgets = None if first else self.budgets
        if cfg.budget_init == "uniform" and (first or self.ramping()):
            # a^l_0: every layer keeps the same share of its channels (the paper's p per layer), for the
            # reduction asked now; redistribution moves the budgets from there once the target is reached.
            budgets = budget.counts(budget.select(budget.positional_scores(self.cost), self.cost, cfg.metric,
                                                  reduction, cfg.min_keep, round_to=cfg.round_to,
                                                  also=also, removed=removed))
        scores = self.utility
        if cfg.hysteresis and self.masks is not None:   # a switched-off channel must beat a kept one clearly
            scores = {n: u * torch.where(self.masks[n], 1.0 + cfg.hysteresis, 1.0) for n, u in self.utility.items()}
        return budget.select(scores, self.cost, cfg.metric, reduction, cfg.min_keep, budgets=budgets,
                             cost_power=cfg.cost_power, round_to=cfg.round_to, also=also, removed=removed)

    def select_at_target(self, removed: frozenset) -> dict[str, torch.Tensor]:
        """What the first selection would keep at the whole target with `removed` gone (the depth
        choice compares these)."""
        return self._select(first=True, reduction=self.config.reduction, removed=removed)

    def _apply(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        flipped = sum(int((masks[n] != self.masks[n]).sum()) for n in masks) if self.masks is not None else 0
        changed = self.masks is None or flipped > 0
        self.masks = masks
        self.budgets = budget.counts(masks)
        period = (self.steps - self.config.warmup_steps - 1) // self.flip_period
        while len(self.flips) <= period:
            self.flips.append(0)
        self.flips[period] += flipped
        if changed:
            self.mask_changes += 1
            self.last_change = self.steps
        if changed or self.config.soft:
            return {n: m.clone() for n, m in masks.items()}
        return None

    @property
    def flip_period(self) -> int:
        """The steps a `flips` entry counts over: the redistribution period (else the mask-update one)."""
        return self.config.redistribute_every or self.config.update_every

    # ------------------------------------------------------------------ budgets

    def layer_significance(self) -> np.ndarray:
        """xi per group (see `redistribute_by` in the module docstring)."""
        by = self.config.redistribute_by
        xi = np.zeros(len(self.groups))
        for i, name in enumerate(self.cost.names):
            kept = self.masks[name]
            u = self.utility[name]
            mean_kept = float(u[kept].mean()) if kept.any() else 0.0
            if by == "utility-ratio":
                mean_all = float(u.mean())
                xi[i] = mean_kept / mean_all if mean_all > 0 else 0.0
            else:
                xi[i] = mean_kept
        if by == "utility-per-cost":
            saving = self._savings(self.cost.vector(self.budgets))
            relative = saving / max(float(saving[saving > 0].mean()) if (saving > 0).any() else 1.0, 1e-12)
            xi = np.where(relative > 0, xi / np.where(relative > 0, relative, 1.0), 0.0)
        return xi

    def _savings(self, k: np.ndarray) -> np.ndarray:
        """Per group, the resource one channel saves at budgets k, at the step the selection can
        take (one channel; a --round-to multiple; a latency plateau)."""
        widths = budget.allowed_widths(self.cost, self.config.min_keep, self.config.round_to, self.removed)
        return budget.step_savings(self.cost, self.config.metric, k, widths)

    def redistribute(self) -> None:
        """Move a proportion s of the low-significance layers' spare channels to the high ones."""
        if self.budgets is None:
            return
        names, cost = self.cost.names, self.cost
        k = cost.vector(self.budgets)
        saving = self._savings(k)
        lowest = budget.min_counts(cost, self.config.min_keep)
        xi = self.layer_significance()
        gone = [self.cost.index[n] for n in self.removed]   # removed branches neither give nor take
        ranked = np.array([g for g in np.argsort(xi, kind="stable") if g not in gone], dtype=np.int64)
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

    # ------------------------------------------------------------------ report, resume

    def summary(self) -> dict:
        """What report.json records of the run's pruning: the config in steps and how masks moved."""
        out = {"config": asdict(self.config), "mask_changes": self.mask_changes, "last_change_step": self.last_change,
               "channel_flips": {"period_steps": self.flip_period, "counts": list(self.flips)}}
        if self.depth_record is not None:
            out["depth"] = self.depth_record
        return out

    def state_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "steps": self.steps,
            "mask_changes": self.mask_changes,
            "last_change": self.last_change,
            "flips": torch.tensor(self.flips, dtype=torch.int64),
            "utility": {n: u.clone() for n, u in self.utility.items()},
            "observed": {n: s.clone() for n, s in self.observed.items()},
            "masks": None if self.masks is None else {n: m.clone() for n, m in self.masks.items()},
            "budgets": None if self.budgets is None else dict(self.budgets),
            "removed": sorted(self.removed),
            "depth_record": json.dumps(self.depth_record),
        }

    def load_state_dict(self, state: dict) -> None:
        if set(state["utility"]) != set(self.utility):
            raise ValueError("checkpoint's pruning groups do not match this model's")
        self.steps = int(state["steps"])
        self.mask_changes = int(state.get("mask_changes", 0))
        self.last_change = int(state.get("last_change", 0))
        self.flips = [int(v) for v in state.get("flips", torch.zeros(0, dtype=torch.int64)).tolist()]
        self.utility = {n: u.clone().float() for n, u in state["utility"].items()}
        self.observed = {n: s.clone().bool() for n, s in state["observed"].items()}
        self.masks = None if state["masks"] is None else {n: m.clone().bool() for n, m in state["masks"].items()}
        self.budgets = None if state["budgets"] is None else {n: int(v) for n, v in state["budgets"].items()}
        self.removed = frozenset(state.get("removed", ()))
        self.depth_record = json.loads(state.get("depth_record", "null"))
