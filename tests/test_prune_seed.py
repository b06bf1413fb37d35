"""The seed method's state machine: warm-up, target met at every update, masks move, resume."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from compress.prune import ChannelMasker, ResourceModel, SeedConfig, SeedPruner, achieved, find_groups
from compress.prune.importance import seed_utility
from tests.test_prune_models import ConcatNet


def _setup(config):
    torch.manual_seed(0)
    model = ConcatNet(width=2.0).train()  # 16/32-channel branches: enough room for masks to move
    x = torch.randn(1, 3, 8, 8)
    groups = find_groups(model, x)
    cost = ResourceModel(model, groups, x)
    return model, groups, cost, SeedPruner(groups, cost, config)


def _train(model, masker, pruner, steps, data_seed=0, log=None):
    gen = torch.Generator().manual_seed(data_seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        x = torch.randn(8, 3, 8, 8, generator=gen)
        y = torch.randint(0, 10, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        theta = masker.pop_taylor()
        new = pruner.step(theta)
        if new is not None:
            masker.set(new)
        if log is not None:
            log.append((pruner.steps, theta, None if pruner.masks is None else {n: m.clone() for n, m in pruner.masks.items()}))
        opt.step()


def test_masks_meet_target_at_every_update_and_change():
    config = SeedConfig(metric="flops", reduction=0.5, warmup_steps=4, update_every=3, redistribute_every=9,
                        redistribute=0.2, min_keep=0.1)
    model, groups, cost, pruner = _setup(config)
    masker = ChannelMasker(model, groups, record=True)
    log = []
    _train(model, masker, pruner, 40, log=log)
    assert all(masks is None for step, _, masks in log if step <= 4)  # warm-up: 4 steps with everything on
    updates = [masks for step, _, masks in log if step > 4]
    assert all(m is not None for m in updates)
    for masks in updates:
        assert 0.5 <= achieved(cost, "flops", masks) <= 0.51
        assert all(masks[g.name].sum() >= max(1, round(0.1 * g.size)) for g in groups)
    distinct = {tuple(torch.cat([m[g.name] for g in groups]).tolist()) for m in updates}
    assert len(distinct) >= 2 and pruner.mask_changes >= 2
    # utilities of switched-off channels are frozen, not decayed
    off_before = {n: (~m, pruner.utility[n].clone()) for n, m in pruner.masks.items()}
    pruner.config.update_every = 10**6
    pruner.config.redistribute_every = 0
    _train(model, masker, pruner, 2, data_seed=5)
    for n, (off, before) in off_before.items():
        assert torch.equal(pruner.utility[n][off], before[off])
    assert set(seed_utility(pruner)) == {g.name for g in groups}


def test_redistribution_moves_budget_and_keeps_target():
    config = SeedConfig(metric="params", reduction=0.6, warmup_steps=0, update_every=1, redistribute=0.5)
    model, groups, cost, pruner = _setup(config)
    pruner.step({g.name: torch.rand(g.size) for g in groups})
    before = dict(pruner.budgets)
    # make one group look very significant: its kept channels' utility high, others low
    for g in groups:
        pruner.utility[g.name].fill_(0.01)
    star = groups[1].name
    pruner.utility[star].fill_(1.0)
    pruner.redistribute()
    moved = pruner._select()
    assert 0.6 <= achieved(cost, "params", moved) <= 0.61
    assert pruner.budgets != before
    assert pruner.budgets[star] >= before[star]


@pytest.mark.parametrize("by", ["utility", "utility-per-cost"])
def test_layer_significance_with_and_without_cost(by):
    """"utility": xi is the mean utility of a layer's kept channels, whatever a channel costs;
    "utility-per-cost" divides it by the layer's relative marginal cost, so equal utilities rank
    the cheap layers first."""
    config = SeedConfig(metric="flops", reduction=0.5, warmup_steps=0, update_every=1, redistribute_by=by)
    model, groups, cost, pruner = _setup(config)
    pruner.step({g.name: torch.rand(g.size) for g in groups})
    for i, g in enumerate(groups):
        pruner.utility[g.name].fill_(0.1 * (i + 1))
    xi = pruner.layer_significance()
    if by == "utility":
        assert xi.tolist() == pytest.approx([0.1 * (i + 1) for i in range(len(groups))])
    else:
        for g in groups:
            pruner.utility[g.name].fill_(0.5)
        xi = pruner.layer_significance()
        saving = cost.removal_savings("flops", cost.vector(pruner.budgets))
        order = [int(i) for i in sorted(range(len(groups)), key=lambda i: -saving[i])]
        assert list(xi[order]) == sorted(xi[order])  # dearer channel, lower significance
        assert len(set(xi.round(9))) > 1


def test_redistribute_by_is_checked():
    with pytest.raises(ValueError, match="redistribute_by"):
        SeedConfig.for_run("flops", 0.5, 10, 10, redistribute_by="cost")


def test_resume_gives_identical_masks():
    config = SeedConfig(metric="flops", reduction=0.4, warmup_steps=3, update_every=2, redistribute_every=6)
    model, groups, cost, pruner = _setup(config)
    masker = ChannelMasker(model, groups, record=True)
    _train(model, masker, pruner, 10)
    buffer = io.BytesIO()
    torch.save(pruner.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed = SeedPruner(groups, cost, config)
    resumed.load_state_dict(state)
    gen = torch.Generator().manual_seed(9)
    for _ in range(12):
        theta = {g.name: torch.rand(g.size, generator=gen) for g in groups}
        a, b = pruner.step(theta), resumed.step(theta)
        assert (a is None) == (b is None)
        assert all(torch.equal(pruner.masks[n], resumed.masks[n]) for n in pruner.masks)
    assert resumed.steps == pruner.steps


def test_freeze_and_for_run_defaults():
    config = SeedConfig.for_run("flops", 0.5, epochs=40, steps_per_epoch=10)
    assert config.warmup_steps == 20 and config.redistribute_every == 10 and config.freeze_at == 300
    with pytest.raises(TypeError):
        SeedConfig.for_run("flops", 0.5, 10, 10, smoothnes=0.5)
    config = SeedConfig(reduction=0.5, warmup_steps=0, update_every=1, freeze_at=3)
    _, groups, _, pruner = _setup(config)
    for step in range(8):
        new = pruner.step({g.name: torch.rand(g.size) for g in groups})
        if step >= 3:
            assert new is None


def test_epoch_boundary_changes_land_on_the_first_step_of_an_epoch():
    """Epochs of 5 steps, 2 of them warm-up: the first selection (step 11) and every redistribution
    (16) happen on the first step of an epoch, never on the last one, which the evaluation follows."""
    config = SeedConfig(metric="flops", reduction=0.5, warmup_steps=10, update_every=10**6, redistribute_every=5,
                        redistribute=0.5)
    _, groups, _, pruner = _setup(config)
    gen = torch.Generator().manual_seed(3)
    budget_moves, first = [], None
    for _ in range(20):
        before = pruner.budgets
        pruner.step({g.name: torch.rand(g.size, generator=gen) for g in groups})
        if pruner.masks is not None and first is None:
            first = pruner.steps
        elif before is not None and pruner.budgets != before:
            budget_moves.append(pruner.steps)
    assert first == 11
    assert budget_moves and all((step - 1) % 5 == 0 for step in budget_moves)
