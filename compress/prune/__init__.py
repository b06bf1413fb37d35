"""Channel pruning: coupling graph, resource model, budgeted selection, masks, criteria, surgery.

The split follows Torch-Pruning: *which channels are coupled* (graph), *what they cost* (cost),
*how they score* (importance), *which to keep* (budget, seed), *the cut* (surgery).
"""
from compress.prune.budget import achieved, max_reduction, select
from compress.prune.cost import ResourceModel
from compress.prune.graph import ChannelGroup, Member, find_groups
from compress.prune.masks import ChannelMasker
from compress.prune.seed import SeedConfig, SeedPruner
from compress.prune.surgery import arch_of, extract, rebuild

__all__ = [
    "ChannelGroup", "ChannelMasker", "Member", "ResourceModel", "SeedConfig", "SeedPruner",
    "achieved", "arch_of", "extract", "find_groups", "max_reduction", "rebuild", "select",
]
