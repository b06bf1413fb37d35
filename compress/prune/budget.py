"""Choose the channels to keep so the network meets a FLOPs or parameter reduction target.

    masks = select(scores, cost, "flops", 0.76, min_keep=0.1)           # global, by score
    masks = select(scores, cost, "flops", 0.76, 0.1, budgets=counts)    # per-group counts, adjusted

Greedy knapsack in two passes, on the exact resource model (`cost.ResourceModel`):

1. Remove: while the network is above the target, drop the channel with the lowest
   score / (resource its removal saves)**cost_power (0, the default: score alone). Savings are recomputed after every removal, since a
   layer's cost is bilinear in the widths of its input and output groups: thinning a layer makes
   its neighbours' channels cheaper. A group never goes below `min_keep`.
2. Fix up: while some removed channel fits in the slack left under the target, put back the one
   with the highest score / (resource it costs). So the result is at or just under the target:
   the reduction reached is >= the target and exceeds it by less than the cheapest channel.

With `budgets` (channels per group, as the seed method's redistribution sets them) each group
keeps its top-scored channels at its budget, then the same two passes move the counts the least
needed to land on the target. Scores are compared across groups as given: criteria normalise.
Ties are broken deterministically, so every DDP rank given the same scores picks the same masks.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch

from compress.errors import UserError
from compress.prune.cost import ResourceModel
from compress.prune.targets import check_target


def min_counts(cost: ResourceModel, min_keep: int | float) -> np.ndarray:
    """The fewest channels each group may keep: an int, or a fraction of the group's size."""
    sizes = cost.sizes
    if isinstance(min_keep, bool) or not isinstance(min_keep, (int, float)):
        raise UserError(f"min_keep must be an integer >= 1 or a fraction in (0, 1], got {min_keep!r}")
    if isinstance(min_keep, int) or (isinstance(min_keep, float) and min_keep > 1 and min_keep.is_integer()):
        if min_keep < 1:
            raise UserError(f"min_keep must be at least 1 channel, got {min_keep}")
        return np.minimum(sizes, int(min_keep)).astype(np.float64)
    if not 0 < min_keep <= 1:
        raise UserError(f"min_keep as a fraction must be in (0, 1], got {min_keep}")
    return np.array([max(1, math.ceil(min_keep * s - 1e-9)) for s in sizes], dtype=np.float64)


def max_reduction(cost: ResourceModel, metric: str, min_keep: int | float, round_to: int = 1) -> float:
    """The largest reduction reachable with every group at its minimum width (rounded up to a
    multiple of `round_to`)."""
    return 1.0 - cost.resource(metric, _lowest(cost, min_keep, round_to)) / cost.dense(metric)


def _lowest(cost: ResourceModel, min_keep: int | float, round_to: int) -> np.ndarray:
    """`min_counts`, rounded up to the first width `round_to` allows."""
    lowest = min_counts(cost, min_keep)
    if round_to > 1:
        lowest = np.array([_valid_counts(s, lo, round_to)[0] for s, lo in zip(cost.sizes, lowest)], dtype=np.float64)
    return lowest


def achieved(cost: ResourceModel, metric: str, masks: Mapping[str, torch.Tensor]) -> float:
    return 1.0 - cost.resource(metric, masks) / cost.dense(metric)


def _addition_costs(cost: ResourceModel, metric: str, k: np.ndarray) -> np.ndarray:
    """Exact resource added by keeping one more channel of each group, at widths `k`."""
    width_in = cost.c_in + cost.a_in @ k
    width_out = cost.c_out + cost.a_out @ k
    ab, b = cost.ab[metric][:, None], cost.b[metric][:, None]
    per_layer = ab * (width_out[:, None] * cost.a_in + cost.a_out * width_in[:, None]
                      + cost.a_out * cost.a_in) + b * cost.a_out
    return per_layer.sum(axis=0)


def select(scores: Mapping[str, torch.Tensor], cost: ResourceModel, metric: str, reduction: float,
           min_keep: int | float, budgets: Mapping[str, int] | None = None,
           cost_power: float = 0.0, round_to: int = 1) -> dict[str, torch.Tensor]:
    """Boolean keep-masks per group meeting `reduction` of `metric` (see the module docstring).
    Channels are ranked by score / resource**cost_power: 1 = score per unit of FLOPs/params saved
    (thins the layers where a channel is expensive), 0 = score alone (the predecessor's global
    ranking; the budget only decides how far down the ranking to cut). 0 is the default: 1 cut
    whole layers in turn and lost 5-10 points of top-1 on VGG-16 (BENCHMARKS.md)."""
    reduction = check_target(metric, reduction)
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise UserError(f"round_to must be an integer >= 1, got {round_to!r}")
    lowest = _lowest(cost, min_keep, round_to)
    reachable = 1.0 - cost.resource(metric, lowest) / cost.dense(metric)   # max_reduction, from `lowest`
    if reduction > reachable + 1e-12:
        raise UserError(f"a {reduction:.1%} {metric} reduction is out of reach: with at least "
                        f"{min_keep} channel(s) kept per layer the most is {reachable:.1%} "
                        f"(lower the target or the minimum width)")
    target = cost.dense(metric) * (1.0 - reduction)

    # Channels of each group in the order they go (lowest score first; ties by index).
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
        ranked.append(s[idx])

    if round_to > 1:
        k = _select_rounded(ranked, cost, metric, target, lowest, budgets, cost_power, round_to)
        return _masks(cost, order, k)

    sizes = cost.sizes.astype(np.float64)
    if budgets is None:
        k = sizes.copy()
    else:
        k = np.array([float(budgets.get(name, cost.sizes[i])) for i, name in enumerate(cost.names)])
        k = np.clip(np.round(k), lowest, sizes)

    def removable_priority(k):
        saving = cost.removal_savings(metric, k)
        gone = (sizes - k).astype(int)
        next_score = np.array([r[g] if g < len(r) else np.inf for r, g in zip(ranked, gone)])
        ok = (k > lowest) & (saving > 0)
        return np.where(ok, next_score / np.where(saving > 0, saving, 1.0) ** cost_power, np.inf), saving

    def remove_to_target(k, frozen=None):
        current = cost.resource(metric, k)
        while current > target:
            priority, saving = removable_priority(k)
            if frozen is not None:
                priority[frozen] = np.inf
            if not np.isfinite(priority).any():
                break  # cannot happen when the target is reachable; guards against a silent loop
            best = np.flatnonzero(priority == priority.min())
            g = best[np.argmax(saving[best])]  # equal priority: the bigger saving first
            k[g] -= 1
            current = cost.resource(metric, k)
        return k

    def fill_slack(k):  # spend the slack under the target on the best channels that still fit
        current = cost.resource(metric, k)
        while True:
            add = _addition_costs(cost, metric, k)
            gone = (sizes - k).astype(int)
            fits = (k < sizes) & (current + add <= target)
            if not fits.any():
                return k
            next_score = np.array([r[g - 1] if g > 0 else -np.inf for r, g in zip(ranked, gone)])
            value = np.where(fits, next_score / np.maximum(add, 1e-12) ** cost_power, -np.inf)
            k[int(np.argmax(value))] += 1
            current = cost.resource(metric, k)

    k = fill_slack(remove_to_target(k))
    k = _tighten(k, cost, metric, target, sizes, lambda k, g: fill_slack(remove_to_target(k, frozen=g)))

    return _masks(cost, order, k)


def _masks(cost: ResourceModel, order: list, k: np.ndarray) -> dict[str, torch.Tensor]:
    masks = {}
    for i, name in enumerate(cost.names):
        keep = torch.ones(int(cost.sizes[i]), dtype=torch.bool)
        removed = order[i][: int(cost.sizes[i] - k[i])]
        keep[torch.as_tensor(removed, dtype=torch.long)] = False
        masks[name] = keep
    return masks


def _valid_counts(size: int, lowest: float, round_to: int) -> list[int]:
    """Widths a group may keep with `round_to`: multiples of it from the minimum width up, and
    the whole group (whatever its size)."""
    first = max(round_to, math.ceil(lowest / round_to) * round_to)
    return sorted({c for c in range(first, int(size), round_to)} | {int(size)})


def _select_rounded(ranked, cost, metric, target, lowest, budgets, cost_power, round_to) -> np.ndarray:
    """Widths in multiples of `round_to` (vector units fill better; see BENCHMARKS.md, ResNet-56).
    The same greedy as `select` in steps of one multiple: remove the step whose dropped channels
    have the lowest mean score per resource saved**cost_power until under the target, then put
    back the best steps that still fit. Lands at or under the target by less than one step."""
    valid = [_valid_counts(s, lo, round_to) for s, lo in zip(cost.sizes, lowest)]
    if budgets is None:
        k = cost.sizes.astype(np.float64)
    else:   # the nearest allowed width to each budget
        k = np.array([min(v, key=lambda c: (abs(c - budgets.get(n, v[-1])), c))
                      for n, v in zip(cost.names, valid)], dtype=np.float64)

    def step_to(g: int, k: np.ndarray, down: bool) -> int | None:
        v = valid[g]
        i = v.index(int(k[g]))
        j = i - 1 if down else i + 1
        return v[j] if 0 <= j < len(v) else None

    def value(g: int, k: np.ndarray, new: int) -> tuple[float, float]:
        """(mean score of the channels the step moves, resource it changes)."""
        gone_now, gone_new = int(cost.sizes[g] - k[g]), int(cost.sizes[g] - new)
        lo, hi = sorted((gone_now, gone_new))
        trial = k.copy()
        trial[g] = new
        delta = abs(cost.resource(metric, k) - cost.resource(metric, trial))
        return float(np.mean(ranked[g][lo:hi])), float(delta)

    def steps(k: np.ndarray, down: bool):
        """(group, new width, mean score of the channels moved, resource changed) per possible step."""
        for g in range(len(valid)):
            new = step_to(g, k, down)
            if new is not None:
                yield (g, new, *value(g, k, new))

    while cost.resource(metric, k) > target:
        options = [(score / saved ** cost_power, -saved, g, new)
                   for g, new, score, saved in steps(k, down=True) if saved > 0]
        if not options:
            break   # cannot happen when the target is reachable
        _, _, g, new = min(options, key=lambda o: o[:2])
        k[g] = new
    while True:   # spend the slack on the best steps that still fit
        current = cost.resource(metric, k)
        options = [(score / max(added, 1e-12) ** cost_power, g, new)
                   for g, new, score, added in steps(k, down=False) if current + added <= target]
        if not options:
            return k
        _, g, new = max(options, key=lambda o: o[0])
        k[g] = new


def _tighten(k, cost, metric, target, sizes, settle, rounds: int = 20, good_enough: float = 0.001):
    """Small networks: when one channel is a large share of the total, the greedy passes can stop
    well under the target. Try keeping one more channel somewhere and re-settling; keep the
    change when it lands closer to the target. Large networks are already within 0.1 pp."""
    dense = cost.dense(metric)
    slack = target - cost.resource(metric, k)
    for _ in range(rounds):
        if slack <= good_enough * dense:
            break
        best = None
        for g in np.flatnonzero(k < sizes):
            trial = k.copy()
            trial[g] += 1
            trial = settle(trial, g)
            trial_slack = target - cost.resource(metric, trial)
            if 0 <= trial_slack < slack and (best is None or trial_slack < best[0]):
                best = (trial_slack, trial)
        if best is None:
            break
        slack, k = best
    return k


def counts(masks: Mapping[str, torch.Tensor]) -> dict[str, int]:
    return {name: int(torch.as_tensor(m).sum()) for name, m in masks.items()}
