"""Choose the channels to keep so the network meets a FLOPs, parameter or latency target.

    masks = select(scores, cost, "flops", 0.76, min_keep=0.1)           # global, by score
    masks = select(scores, cost, "flops", 0.76, 0.1, budgets=counts)    # per-group counts, adjusted
    masks = select(scores, cost, "flops", 0.76, 0.1, round_to=8)        # widths in multiples of 8
    masks = select(scores, cost, "latency", 0.4, 0.1)                   # cost.attach_latency(entry) first:
                                                                        # -40 % of the dense predicted ms

One greedy knapsack in two passes, on the exact resource model (`cost.ResourceModel`), over the
widths each group may take (any count from its minimum width up; with `round_to`, multiples of it
and the whole group; with a latency table, the widths where the runtime gets faster):

1. Remove: while the network is above the target, take the step down (to a group's next allowed
   width) whose removed channels have the lowest mean score / (resource the step saves)**cost_power
   (0, the default: score alone); equal priority: the bigger saving first. Savings are recomputed
   after every step, since a layer's cost is bilinear in the widths of its input and output groups.
   A latency table's steps are where a layer gets faster at its neighbours' dense widths; where a
   group's next step saves nothing at the current widths, its step is to the nearest width that does.
2. Fill: while some step up fits in the slack left under the target, take the one whose channels
   have the highest mean score / (resource it costs)**cost_power. So the result is at or just under
   the target: the reduction reached is >= the target and exceeds it by less than the cheapest step.

A joint target (`also={"params": 0.92}` beside flops=0.76) adds constraints: all must be met.
Once the first is met, the remove pass ranks by score per unit of the still-unmet resource saved
(a channel that saves parameters but few FLOPs goes first), and an exchange pass then trades:
put back the best step that costs the most of the resource with slack per unit of the tight
one, take away the cheapest steps that restore the tight one, while that brings the loose
resource closer to its target. Where a metric is still more than 1 pp past its target (coarse
steps: small networks, latency plateaus), one step more in some group and a second settle, as a
single target gets below. Both land within 1 pp when the model's widths allow it and these passes
find it. When they miss and the allowed widths give few selections (<= EXHAUSTIVE_LIMIT: a few
groups with coarse steps), every selection is tried and the best-scoring one that meets the target
kept; otherwise `select` raises UserError naming what was reached. A latency budget is a ceiling:
it is met at or under the budget (the other metrics of the target still land within 1 pp).

With `budgets` (channels per group, as the seed method's redistribution sets them) each group
starts at its budget (its nearest allowed width), then the same passes move the counts the least
needed to land on the target. Each group keeps its top-scored channels. Scores are compared across
groups as given: criteria normalise. Ties are broken deterministically, so every DDP rank given the
same scores picks the same masks.
"""
from __future__ import annotations

import math
from typing import Collection, Mapping

import numpy as np
import torch

from compress.errors import UserError
from compress.prune.cost import ResourceModel
from compress.prune.targets import check_target


def min_counts(cost: ResourceModel, min_keep: float) -> np.ndarray:
    """The fewest channels each group may keep: the share `min_keep` of it, and at least one."""
    if isinstance(min_keep, bool) or not isinstance(min_keep, (int, float)) or not 0 < min_keep <= 1:
        raise UserError(f"min_keep is the share of each layer's channels always kept, in (0, 1] "
                        f"(at least 1 channel is kept in any case), got {min_keep!r}")
    return np.array([max(1, math.ceil(min_keep * s - 1e-9)) for s in cost.sizes], dtype=np.float64)


def allowed_widths(cost: ResourceModel, min_keep: float, round_to: int = 1,
                   removed: Collection[str] = ()) -> list[np.ndarray]:
    """Per group, the widths it may keep, ascending: every count from its minimum width up, or with
    `round_to` > 1 the multiples of it (from the minimum width rounded up) and the whole group.
    With a latency table attached (learned rounding): the counts where the table says the
    runtime gets faster (the plateau tops, GroupLatency.step_counts) from the minimum width up;
    on a plateau fewer channels save nothing, so no width inside one is ever kept.
    A group named in `removed` (a residual branch chosen to go, compress.prune.depth) keeps 0."""
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise UserError(f"round_to must be an integer >= 1, got {round_to!r}")
    if cost.latency is not None:
        if round_to > 1:
            raise UserError("a latency target rounds widths to the latency table's steps: drop --round-to (round_to=)")
        steps = cost.latency.step_counts()
        out = [w[w >= low] for w, low in zip(steps, min_counts(cost, min_keep))]
    else:
        out = []
        for size, low in zip(cost.sizes, min_counts(cost, min_keep)):
            first = max(round_to, math.ceil(low / round_to) * round_to) if round_to > 1 else int(low)
            widths = set(range(first, int(size), round_to)) | {int(size)}
            out.append(np.array(sorted(widths), dtype=np.float64))
    unknown = set(removed) - {n for n, ok in zip(cost.names, cost.removable) if ok}
    if unknown:
        raise UserError(f"cannot remove {sorted(unknown)[0]!r}: not a removable residual branch")
    return [np.zeros(1) if n in removed else w for n, w in zip(cost.names, out)]


def max_reduction(cost: ResourceModel, metric: str, min_keep: float, round_to: int = 1,
                  removed: Collection[str] = ()) -> float:
    """The largest reduction reachable with every group at its smallest allowed width."""
    lowest = np.array([w[0] for w in allowed_widths(cost, min_keep, round_to, removed)])
    return 1.0 - cost.resource(metric, lowest) / cost.dense(metric)


def achieved(cost: ResourceModel, metric: str, masks: Mapping[str, torch.Tensor]) -> float:
    return 1.0 - cost.resource(metric, masks) / cost.dense(metric)


def select(scores: Mapping[str, torch.Tensor], cost: ResourceModel, metric: str, reduction: float,
           min_keep: float, budgets: Mapping[str, int] | None = None,
           cost_power: float = 0.0, round_to: int = 1,
           also: Mapping[str, float] | None = None, removed: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """Boolean keep-masks per group meeting `reduction` of `metric` (see the module docstring);
    the groups in `removed` (residual branches, compress.prune.depth) lose every channel.
    Channels are ranked by score / resource**cost_power: 1 = score per unit of FLOPs/params saved
    (thins the layers where a channel is expensive), 0 = score alone (the predecessor's global
    ranking; the budget only decides how far down the ranking to cut). 0 is the default: 1 cut
    whole layers in turn and lost 5-10 points of top-1 on VGG-16 (BENCHMARKS.md)."""
    targets = {metric: check_target(metric, reduction)}
    for m, r in (also or {}).items():
        if m in targets:
            raise UserError(f"the target names {m} twice")
        targets[m] = check_target(m, r)
    widths = allowed_widths(cost, min_keep, round_to, removed)
    lowest = np.array([w[0] for w in widths])
    for m, r in targets.items():
        reachable = 1.0 - cost.resource(m, lowest) / cost.dense(m)
        if r > reachable + 1e-12:
            if m == "latency":
                raise UserError(f"a latency of {cost.dense(m) * (1 - r):.4g} ms is out of reach: with at least "
                                f"{min_keep:g} of every layer's channels kept the fastest is "
                                f"{cost.resource(m, lowest):.4g} ms (raise the budget or lower the minimum width)")
            raise UserError(f"a {r:.1%} {m} reduction is out of reach: with at least "
                            f"{min_keep:g} of every layer's channels kept the most is {reachable:.1%} "
                            f"(lower the target or the minimum width)")
    limits = {m: cost.dense(m) * (1.0 - r) for m, r in targets.items()}
    order, ranked = _rank(scores, cost)
    if budgets is None:   # every group whole, the removed ones at 0
        k = np.array([w[-1] for w in widths])
    else:   # each group's nearest allowed width to its budget
        k = np.array([w[np.argmin(np.abs(w - budgets.get(n, w[-1])))] for n, w in zip(cost.names, widths)])
    greedy = _Greedy(ranked, widths, cost, limits, cost_power)
    k = greedy.fill(greedy.remove(k))
    if len(limits) > 1:
        k = greedy.exchange(k)

        def missed_now(k):   # a latency budget is a ceiling: anything at or under it is met
            return [m for m, r in targets.items() if m != "latency" and achieved_k(cost, m, k) > r + JOINT_TOLERANCE]

        for m in missed_now(k):   # small networks, coarse steps: one step more somewhere, then settle again
            k = _tighten(k, cost, m, limits[m], greedy)
        missed = missed_now(k)
        if missed:
            best = _exhaustive(cost, widths, targets, limits, ranked)
            if best is not None:
                return _masks(cost, order, best)
            got = ", ".join(f"{m} -{achieved_k(cost, m, k):.1%}" for m in targets)
            raise UserError(f"cannot hit {', '.join(f'{m}={r:g}' for m, r in targets.items())} within "
                            f"{JOINT_TOLERANCE:.0%} at once with these minimum widths: the closest selection "
                            f"removes {got}")
    elif greedy.contiguous:   # _tighten moves one channel at a time
        k = _tighten(k, cost, metric, limits[metric], greedy)
    if greedy._over(k):   # e.g. a latency table whose steps save nothing past some width
        best = _exhaustive(cost, widths, targets, limits, ranked)
        if best is not None:
            return _masks(cost, order, best)
        raise UserError(f"cannot reach {metric}: the widths allowed stop saving before the target "
                        f"(reached {achieved_k(cost, metric, k):.1%} of the {targets[metric]:.1%} asked)")
    return _masks(cost, order, k)


JOINT_TOLERANCE = 0.01   # a joint target: every metric within 1 pp above its target


def achieved_k(cost: ResourceModel, metric: str, k: np.ndarray) -> float:
    return 1.0 - cost.resource(metric, k) / cost.dense(metric)


def _rank(scores: Mapping[str, torch.Tensor], cost: ResourceModel) -> tuple[list, list]:
    """Per group: its channels in the order they go (lowest score first; ties by index), and their
    scores in that order, with cumulative sums for the mean score of any step."""
    order, ranked = [], []
    for name in cost.names:
        if name not in scores:
            raise KeyError(f"no scores for group {name!r}")
        s = torch.as_tensor(scores[name]).detach().float().cpu().numpy().astype(np.float64)
        s = np.nan_to_num(s, nan=0.0, posinf=np.finfo(np.float64).max, neginf=0.0)  # a NaN never wins
        if s.shape != (cost.sizes[cost.index[name]],):
            raise ValueError(f"scores for group {name!r} have shape {s.shape}, expected ({cost.sizes[cost.index[name]]},)")
        idx = np.argsort(s, kind="stable")
        order.append(idx)
        ranked.append(np.concatenate([[0.0], np.cumsum(s[idx])]))
    return order, ranked


class _Greedy:
    """The two passes of the module docstring over allowed widths, vectorised over the groups."""

    def __init__(self, cumulative, widths, cost: ResourceModel, limits: Mapping[str, float], cost_power: float):
        self.cumulative, self.widths, self.cost = cumulative, widths, cost
        self.limits, self.power = dict(limits), cost_power
        self.sizes = cost.sizes.astype(np.float64)
        self.lowest = np.array([w[0] for w in widths])
        # every count allowed, up to the whole group: steps of 1
        self.contiguous = all(len(w) == w[-1] - w[0] + 1 and w[-1] == s for w, s in zip(widths, self.sizes))

    def _neighbours(self, k: np.ndarray, down: bool) -> np.ndarray:
        if self.contiguous:
            return np.where(k > self.lowest, k - 1, np.nan) if down else np.where(k < self.sizes, k + 1, np.nan)
        return neighbours(self.widths, k, down)

    def _mean_score(self, k: np.ndarray, new: np.ndarray) -> np.ndarray:
        """Mean score of the channels between widths k and new in each group (its ranking's slice)."""
        out = np.full(len(k), np.nan)
        for g in np.flatnonzero(~np.isnan(new)):
            lo, hi = sorted((int(self.sizes[g] - k[g]), int(self.sizes[g] - new[g])))
            out[g] = (self.cumulative[g][hi] - self.cumulative[g][lo]) / (hi - lo)
        return out

    def _over(self, k: np.ndarray) -> list[str]:
        return [m for m, limit in self.limits.items() if self.cost.resource(m, k) > limit]

    def _fits(self, k: np.ndarray, changes: dict) -> np.ndarray:
        return np.logical_and.reduce([self.cost.resource(m, k) + changes[m] <= limit
                                      for m, limit in self.limits.items()])

    def remove(self, k: np.ndarray, frozen=None) -> np.ndarray:
        """The remove pass; `frozen`: a group index (or array of them) that must not shrink."""
        k = k.copy()
        over = self._over(k)
        while over:
            new = self._neighbours(k, down=True)
            if frozen is not None:
                new[frozen] = np.nan
            saving = self._saving(k, new, over)
            stalled = ~np.isnan(new) & (saving <= 0)
            if stalled.any():
                new, saving = self._past_plateaus(k, new, saving, stalled, over)
            power = self.power if len(over) == len(self.limits) else max(self.power, 1.0)
            ok = ~np.isnan(new) & (saving > 0)
            if not ok.any():
                break   # cannot happen when the target is reachable; guards against a silent loop
            priority = np.where(ok, self._mean_score(k, new) / np.where(ok, saving, 1.0) ** power, np.inf)
            best = np.flatnonzero(priority == priority.min())
            g = best[np.argmax(saving[best])]
            k[g] = new[g]
            over = self._over(k)
        return k

    def _saving(self, k: np.ndarray, new: np.ndarray, over: list[str]) -> np.ndarray:
        """Saving of each group's move from k to `new` on the resources still over their limit
        (relative to dense when there are several; once another is met, the lagging one steers)."""
        step = np.nan_to_num(new - k)
        return sum(-self.cost.change(m, k, step) / (self.cost.dense(m) if len(self.limits) > 1 else 1.0)
                   for m in over)

    def _past_plateaus(self, k, new, saving, stalled, over):
        """A latency table's steps are where a layer gets faster at the dense widths of its
        neighbours; at other widths a group's next step down can save nothing while a lower one does
        (the remove pass stalled there with the budget in reach). Such a group steps down to its
        nearest width that saves."""
        new, saving, stalled = new.copy(), saving.copy(), stalled.copy()
        further = new.copy()
        while stalled.any():
            further = np.where(stalled, neighbours(self.widths, further, down=True), further)
            stalled &= ~np.isnan(further)
            trial = self._saving(k, np.where(stalled, further, k), over)
            found = stalled & (trial > 0)
            new[found], saving[found] = further[found], trial[found]
            stalled &= ~found
        return new, saving

    def fill(self, k: np.ndarray) -> np.ndarray:
        k = k.copy()
        metric = next(iter(self.limits))
        while True:
            new = self._neighbours(k, down=False)
            step = np.nan_to_num(new - k)
            changes = {m: self.cost.change(m, k, step) for m in self.limits}
            fits = ~np.isnan(new) & self._fits(k, changes)
            if not fits.any():
                return k
            value = np.where(fits, self._mean_score(k, new) / np.maximum(changes[metric], 1e-12) ** self.power, -np.inf)
            g = int(np.argmax(value))
            k[g] = new[g]

    def exchange(self, k: np.ndarray, rounds: int = 2000) -> np.ndarray:
        """Joint targets: while the resource with the most slack is more than half a point under its
        limit, put back the step that spends most of it per unit of the tightest resource, then remove
        what restores the tight one; keep the trade only if the loose resource got closer."""
        dense = {m: self.cost.dense(m) for m in self.limits}

        def slack(m, k):
            return (self.limits[m] - self.cost.resource(m, k)) / dense[m]

        for _ in range(rounds):
            loose = max(self.limits, key=lambda m: slack(m, k))
            if slack(loose, k) <= JOINT_TOLERANCE / 2:
                break
            tight = min(self.limits, key=lambda m: slack(m, k))
            new = self._neighbours(k, down=False)
            step = np.nan_to_num(new - k)
            spend = self.cost.change(loose, k, step) / dense[loose]
            cost = np.maximum(self.cost.change(tight, k, step) / dense[tight], 1e-12)
            ratio = np.where(~np.isnan(new) & (spend > 0), spend / cost, -np.inf)
            down = self._neighbours(k, down=True)
            d_step = np.nan_to_num(down - k)
            back = -self.cost.change(loose, k, d_step) / dense[loose]          # loose resource a removal gives back
            freed = np.maximum(-self.cost.change(tight, k, d_step) / dense[tight], 1e-12)
            back_ratio = np.where(np.isnan(down), np.inf, back / freed)
            for g in np.argsort(-ratio, kind="stable"):   # the best trade that works
                if not np.isfinite(ratio[g]):
                    return self.fill(k)
                trial = k.copy()
                trial[g] = new[g]
                # take back only from groups that spend less of the loose resource per unit of the tight one
                trial = self.remove(trial, frozen=np.flatnonzero((back_ratio >= ratio[g]) | (np.arange(len(k)) == g)))
                if not self._over(trial) and 0 <= slack(loose, trial) < slack(loose, k):
                    k = trial
                    break
            else:
                break
        return self.fill(k)


def neighbours(widths: list[np.ndarray], k: np.ndarray, down: bool) -> np.ndarray:
    """Each group's next allowed width below (or above) k; NaN where there is none."""
    out = np.full(len(k), np.nan)
    for g, w in enumerate(widths):
        i = np.searchsorted(w, k[g])
        j = i - 1 if down else (i + 1 if i < len(w) and w[i] == k[g] else i)
        if 0 <= j < len(w):
            out[g] = w[j]
    return out


def step_savings(cost: ResourceModel, metric: str, k: np.ndarray, widths: list[np.ndarray]) -> np.ndarray:
    """Resource saved per channel by each group's step down to its next allowed width (0 where
    there is none): the exact one-channel saving when every width is allowed; on a latency
    table's plateaus one channel alone saves nothing, the step to the plateau below does."""
    down = neighbours(widths, k, down=True)
    step = np.nan_to_num(down - k)
    return np.where(step < 0, -cost.change(metric, k, step) / np.where(step < 0, -step, 1.0), 0.0)


def _tighten(k, cost, metric, limit, greedy: _Greedy, rounds: int = 20, good_enough: float = 0.001):
    """Small networks: when one channel (or one allowed step) is a large share of the total, the
    greedy passes can stop well under the target of `metric`. Try keeping one step more somewhere
    and re-settling (every limit of `greedy` still met); keep the change when it lands closer to
    the target. Large networks are already within 0.1 pp."""
    dense = cost.dense(metric)
    slack = limit - cost.resource(metric, k)
    for _ in range(rounds):
        if slack <= good_enough * dense:
            break
        best = None
        up = greedy._neighbours(k, down=False)
        for g in np.flatnonzero(~np.isnan(up)):
            trial = k.copy()
            trial[g] = up[g]
            trial = greedy.fill(greedy.remove(trial, frozen=g))
            trial_slack = limit - cost.resource(metric, trial)
            if 0 <= trial_slack < slack and not greedy._over(trial) and (best is None or trial_slack < best[0]):
                best = (trial_slack, trial)
        if best is None:
            break
        slack, k = best
    return k


EXHAUSTIVE_LIMIT = 200_000   # selections scored at once: ~0.1 s, a few MB


def _exhaustive(cost: ResourceModel, widths: list[np.ndarray], targets: Mapping[str, float],
                limits: Mapping[str, float], cumulative: list[np.ndarray]) -> np.ndarray | None:
    """When the greedy passes miss a target (coarse latency steps, a few groups) and the allowed
    widths give at most EXHAUSTIVE_LIMIT selections: try them all and keep the one with the highest
    total kept score that meets every limit (with a joint target, every metric but a latency
    ceiling within JOINT_TOLERANCE of its target). None when there are more or none meets it."""
    if math.prod(len(w) for w in widths) > EXHAUSTIVE_LIMIT:
        return None
    ks = np.stack(np.meshgrid(*widths, indexing="ij"), axis=-1).reshape(-1, len(widths))
    ok = np.ones(len(ks), dtype=bool)
    for m, r in targets.items():
        used = cost.resources(m, ks)
        ok &= used <= limits[m] + 1e-9 * cost.dense(m)
        if len(targets) > 1 and m != "latency":
            ok &= used >= cost.dense(m) * (1.0 - r - JOINT_TOLERANCE)
    if not ok.any():
        return None
    sizes = cost.sizes.astype(np.int64)
    kept_score = sum(c[-1] - c[sizes[g] - ks[:, g].astype(np.int64)] for g, c in enumerate(cumulative))
    return ks[np.flatnonzero(ok)[np.argmax(kept_score[ok])]]


def _masks(cost: ResourceModel, order: list, k: np.ndarray) -> dict[str, torch.Tensor]:
    masks = {}
    for i, name in enumerate(cost.names):
        keep = torch.ones(int(cost.sizes[i]), dtype=torch.bool)
        removed = order[i][: int(cost.sizes[i] - k[i])]
        keep[torch.as_tensor(removed, dtype=torch.long)] = False
        masks[name] = keep
    return masks


def positional_scores(cost: ResourceModel) -> dict[str, torch.Tensor]:
    """Scores that make `select` thin every group at the same rate: each channel scores by its relative
    position in its group (first highest), so the highest relative position goes first everywhere."""
    return {n: 1.0 - (torch.arange(int(s), dtype=torch.float64) + 0.5) / int(s) for n, s in zip(cost.names, cost.sizes)}


def counts(masks: Mapping[str, torch.Tensor]) -> dict[str, int]:
    return {name: int(torch.as_tensor(m).sum()) for name, m in masks.items()}
