"""The resource model is exact: it agrees with compress.flops.count on the extracted network."""
from __future__ import annotations

import pytest
import torch

from compress.flops import count
from compress.prune import ResourceModel, extract, find_groups
from tests.test_prune_models import ConcatNet, zoo


def _random_masks(groups, seed):
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for g in groups:
        keep = torch.rand(g.size, generator=gen) < torch.rand((), generator=gen).clamp(0.1, 0.9)
        keep[torch.randint(g.size, (1,), generator=gen)] = True
        masks[g.name] = keep
    return masks


def _check_exact(model, shape, trials=2):
    x = torch.randn(shape)
    groups = find_groups(model, x)
    cost = ResourceModel(model, groups, x)
    dense = count(model, shape)
    assert (cost.dense_flops, cost.dense_params) == (dense.flops, dense.params)
    for seed in range(trials):
        masks = _random_masks(groups, seed)
        slim = count(extract(model, groups, masks), shape)
        assert cost.flops(masks) == slim.flops
        assert cost.params(masks) == slim.params
        keep = {n: int(m.sum()) for n, m in masks.items()}
        assert cost.flops(keep) == slim.flops  # counts work as well as masks


@pytest.mark.parametrize("name", ["vgg11", "resnet20", "mobilenetv2"])  # all zoo: test_prune_surgery
def test_exact_on_zoo(name):
    _check_exact(zoo(name, 0.5), (1, 3, 32, 32))


def test_exact_on_concat_model():
    _check_exact(ConcatNet(), (1, 3, 8, 8), trials=4)


def test_batch_size_of_example_does_not_matter():
    model = zoo("resnet20")
    groups = find_groups(model, torch.randn(1, 3, 32, 32))
    one = ResourceModel(model, groups, torch.randn(1, 3, 32, 32))
    four = ResourceModel(model, groups, torch.randn(4, 3, 32, 32))
    keep = {g.name: g.size // 2 for g in groups}
    assert one.flops(keep) == four.flops(keep) and one.params(keep) == four.params(keep)


def test_removal_savings_are_exact_differences():
    model = ConcatNet()
    x = torch.randn(1, 3, 8, 8)
    cost = ResourceModel(model, find_groups(model, x), x)
    k = cost.vector({n: 3 for n in cost.names})
    for metric in ("flops", "params"):
        savings = cost.removal_savings(metric, k)
        for i in range(len(k)):
            fewer = k.copy()
            fewer[i] -= 1
            assert cost.resource(metric, k) - cost.resource(metric, fewer) == pytest.approx(savings[i])
