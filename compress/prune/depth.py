"""Which residual branches go: chosen by how little the network's output moves, at the same budget.

    chooser = DepthChooser(model, groups, cost, calibration_batch)
    removed, record = chooser.choose(select_for, 0.5)   # select_for(removed) -> masks at the reduction

With `remove_branches` a residual branch's inner group may go to width 0: the block becomes its
shortcut plus a constant (surgery.BranchBias), so both of its convs leave the network — on thin
residual nets the only cut that turns FLOPs into latency 1:1 (BENCHMARKS.md, "Depth vs width").
Channel scores cannot decide it: every criterion ranks channels within their layer, so a branch's
last channels always rank high and the greedy never takes a group to 0. The depth is chosen by
measurement instead, once, on a fixed batch of training inputs:

1. Rank: each removable branch alone is switched off (every other channel on) and the output
   distortion D = KL(network now || without it), mean over the batch, is divided by the resource
   its removal saves: cheap-to-lose, expensive-to-run branches first.
2. Candidates: for j = 0, 1, ... the first j branches removed and the rest selected to the target
   as usual (`select_for`, the method's own selection with those groups at 0); D of each whole
   selection is measured. j stops growing at the first j whose branches alone meet the target
   (every other channel kept; more would only cut deeper); a j whose selection cannot reach the
   target (channels alone above a latency floor) is skipped. At that last j, the j-th branch is
   also swapped for each branch ranked after it: one removal can overshoot the target by a
   whole block's cost, and a branch that saves less lands nearer, with more channels kept.
3. The j with the least D wins. j = 0 is the channel-only selection, so depth is taken only
   where it moves the output less than thinning does at the same budget (or where thinning alone
   cannot reach the budget at all).

Every switched-off channel is exactly 0 here (eval mode, running BN statistics), which is what
the cut network computes. The batch is fixed and the arithmetic deterministic, so every DDP rank
given the same batch and scores chooses the same branches.
"""
from __future__ import annotations

import copy
from typing import Callable, Mapping

import torch
from torch import nn

from compress.errors import UserError
from compress.prune.cost import ResourceModel
from compress.prune.graph import ChannelGroup
from compress.prune.masks import ChannelMasker
from compress.prune.surgery import _tensors, _without_masks

Masks = Mapping[str, torch.Tensor]


class DepthChooser:
    def __init__(self, model: nn.Module, groups: list[ChannelGroup], cost: ResourceModel, batch: torch.Tensor,
                 metric: str):
        self.groups, self.cost, self.metric = groups, cost, metric
        self.removable = [g.name for g in groups if g.removable]
        if not self.removable:
            raise UserError("remove_branches: this network has no residual branch that can be removed "
                            "(no group whose channels can all go while the network still depends on its input)")
        if not torch.is_tensor(batch) or batch.dim() < 2 or batch.shape[0] < 1:
            raise UserError("remove_branches needs a calibration batch of training inputs (calibration=, a tensor)")
        self.model, self.batch = model, batch.detach()

    def choose(self, select_for: Callable[[frozenset], Masks], reduction: float) -> tuple[frozenset, dict]:
        """The branches to remove, and a record of the measurement (for report.json). `reduction`:
        the target's, of `metric` (what `select_for` selects to)."""
        limit = self.cost.dense(self.metric) * (1.0 - reduction)   # the most a selection may keep
        with _Probe(self.model, self.groups, self.batch) as probe:
            full = {g.name: torch.ones(g.size, dtype=torch.bool) for g in self.groups}
            dense = self.cost.resource(self.metric, full)
            alone = {}
            for name in self.removable:
                off = dict(full, **{name: torch.zeros_like(full[name])})
                saved = dense - self.cost.resource(self.metric, off)
                alone[name] = probe.distortion(off) / max(saved, 1e-12 * max(dense, 1e-12))
            ranked = sorted(self.removable, key=lambda n: (alone[n], n))
            def measured(removed: frozenset):
                try:
                    return probe.distortion(select_for(removed))
                except UserError:
                    return None   # channels alone cannot reach it (a latency floor), or a joint target missed

            candidates, by_j, swaps = [], [], []
            for j in range(len(ranked) + 1):
                removed = frozenset(ranked[:j])
                d = measured(removed)
                if d is not None:
                    candidates.append((d, j, removed))
                    by_j.append([j, round(d, 6)])
                only = dict(full, **{n: torch.zeros_like(full[n]) for n in removed})
                if j and self.cost.resource(self.metric, only) <= limit:
                    # The j-th branch tipped it, maybe by far: removal is coarse, and the ranking is
                    # per unit saved, not how close to the target it lands. Any other branch in its
                    # place is a candidate too (the selection then keeps more channels elsewhere).
                    for other in ranked[j:]:
                        swapped = frozenset(ranked[:j - 1]) | {other}
                        d = measured(swapped)
                        if d is not None:
                            candidates.append((d, j, swapped))
                            swaps.append([other, round(d, 6)])
                    break   # these branches alone meet the target: more would only cut deeper
        if not candidates:
            raise UserError("remove_branches: no number of removed branches reaches the target")
        best = min(candidates, key=lambda c: (c[0], c[1], sorted(c[2])))
        record = {"removed": sorted(best[2]), "ranked": ranked,
                  "distortion_by_removed": by_j,
                  "last_swapped": swaps, "calibration_images": int(self.batch.shape[0])}
        return best[2], record


class _Probe:
    """The network's logits on the batch with hard masks, on a copy (the model's own hooks and
    masks untouched), in eval mode."""

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], batch: torch.Tensor):
        self.net = _without_masks(copy.deepcopy(model)).float().eval()
        device = next(self.net.parameters()).device
        self.batch = batch.to(device=device, dtype=torch.float32)
        self.masker = ChannelMasker(self.net, groups)
        self.reference = self._log_probs(None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.masker.remove()

    @torch.no_grad()
    def _log_probs(self, masks) -> torch.Tensor:
        self.masker.set(masks)
        out = _tensors(self.net(self.batch))[0]   # the first output: the logits
        return torch.log_softmax(out.flatten(1), dim=1)

    def distortion(self, masks: Masks) -> float:
        """KL(reference || masked), mean over the batch."""
        log_q = self._log_probs(masks)
        p = self.reference.exp()
        return float((p * (self.reference - log_q)).sum(1).mean())

