"""Channel importance criteria: each returns {group name: float tensor of its channels' scores}.

    l1_filter(model, groups)     Li et al. 2017: L1 norm of the channel's filters
    bn_scale(model, groups)      Liu et al. 2017 (Network Slimming): |gamma| of the channel's BN
    taylor(masker)               Molchanov et al. 2017: mean first-order Taylor significance so far
    random_scores(groups, seed)  the control: uniform random
    seed_utility(pruner)         the seed method's smoothed utilities

For a coupled group (residual sum, depthwise pair) the criterion sums over every layer that
produces the channel. Larger is more important. `budget.select` compares scores across groups
as given, so each criterion decides its scale: L1 norms are divided by the group's largest
(filters of a 3x3x512 conv and of a 3x3x3 conv are not comparable otherwise, and Li et al. rank
within a layer); |gamma| stays raw, since Network Slimming's point is one global threshold on
gamma; Taylor is already normalised per layer by the masker.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from compress.prune.graph import ChannelGroup
from compress.prune.masks import ChannelMasker


def _per_channel(group: ChannelGroup, member, values: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(group.size, dtype=torch.float32)
    out.index_add_(0, torch.tensor(member.channels), values[torch.tensor(member.idxs)].float().cpu())
    return out


def normalize(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each group's scores divided by its largest (all-zero groups left as they are)."""
    return {n: s / s.max() if s.max() > 0 else s for n, s in scores.items()}


@torch.no_grad()
def l1_filter(model: nn.Module, groups: Sequence[ChannelGroup], normalized: bool = True) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    scores = {}
    for group in groups:
        total = torch.zeros(group.size)
        for member in group.members:
            layer = modules[member.module]
            if member.kind != "out" or not isinstance(layer, (nn.Conv2d, nn.Linear)):
                continue
            norms = layer.weight.detach().abs().flatten(1).sum(1)
            total += _per_channel(group, member, norms)
        scores[group.name] = total
    return normalize(scores) if normalized else scores


@torch.no_grad()
def bn_scale(model: nn.Module, groups: Sequence[ChannelGroup]) -> dict[str, torch.Tensor]:
    """|gamma| summed over the group's BNs; groups without BN fall back to normalised L1."""
    modules = dict(model.named_modules())
    scores, missing = {}, []
    for group in groups:
        total, found = torch.zeros(group.size), False
        for member in group.members:
            layer = modules[member.module]
            if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.affine:
                total += _per_channel(group, member, layer.weight.detach().abs())
                found = True
        if found:
            scores[group.name] = total
        else:
            missing.append(group)
    if missing:
        scores.update(l1_filter(model, missing))
    return scores


def taylor(masker: ChannelMasker) -> dict[str, torch.Tensor]:
    return {n: s.detach().float().cpu() for n, s in masker.accumulated().items()}


def random_scores(groups: Sequence[ChannelGroup], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(int(seed))
    return {g.name: torch.rand(g.size, generator=gen) for g in groups}


def seed_utility(pruner) -> dict[str, torch.Tensor]:
    return {n: u.detach().float().cpu() for n, u in pruner.utility.items()}
