"""Channel pruning: coupling graph, resource model, budgeted selection, masks, criteria, surgery.

The split follows Torch-Pruning: *which channels are coupled* (graph), *what they cost* (cost),
*how they score* (importance), *which to keep* (budget, seed), *the cut* (surgery).
Names are imported on first use, so the torch-free parts (targets, seed_config) load without torch.
"""
from importlib import import_module

_WHERE = {
    "achieved": "budget", "max_reduction": "budget", "select": "budget",
    "ResourceModel": "cost",
    "ChannelGroup": "graph", "Member": "graph", "find_groups": "graph",
    "ChannelMasker": "masks",
    "SeedPruner": "seed", "SeedConfig": "seed_config",
    "arch_of": "surgery", "extract": "surgery", "rebuild": "surgery",
}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(import_module(f"compress.prune.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'compress.prune' has no attribute {name!r}")
