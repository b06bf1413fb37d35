"""The seed method's state machine: warm-up, ramp, target met at every update, masks move, soft
masks, freeze and settle before the cut, resume."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from compress.errors import UserError
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


@pytest.mark.parametrize("by", ["utility", "utility-ratio", "utility-per-cost"])
def test_layer_significance_with_and_without_cost(by):
    """"utility": xi is the mean utility of a layer's kept channels, whatever a channel costs;
    "utility-ratio": that over the mean of all its channels (1 for a flat layer, whatever its width);
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
    elif by == "utility-ratio":
        assert xi.tolist() == pytest.approx([1.0] * len(groups))
        g = groups[0]
        u = torch.linspace(0.0, 1.0, g.size)
        pruner.utility[g.name] = u
        kept = pruner.masks[g.name]
        assert pruner.layer_significance()[0] == pytest.approx(float(u[kept].mean() / u.mean()))
    else:
        for g in groups:
            pruner.utility[g.name].fill_(0.5)
        xi = pruner.layer_significance()
        saving = cost.removal_savings("flops", cost.vector(pruner.budgets))
        order = [int(i) for i in sorted(range(len(groups)), key=lambda i: -saving[i])]
        assert list(xi[order]) == sorted(xi[order])  # dearer channel, lower significance
        assert len(set(xi.round(9))) > 1


def test_bad_knobs_are_one_line_user_errors():
    with pytest.raises(UserError, match="redistribute_by"):
        SeedConfig.for_run("flops", 0.5, 10, 10, redistribute_by="cost")
    with pytest.raises(UserError, match="smoothing"):
        SeedConfig(smoothing=1.0)
    with pytest.raises(UserError, match="--prune-every"):
        SeedConfig(update_every=0)
    with pytest.raises(UserError, match="warm-up"):
        SeedConfig.for_run("flops", 0.5, 10, 10, warmup=0.5, end=0.4)
    with pytest.raises(UserError, match="ramp"):
        SeedConfig.for_run("flops", 0.5, 10, 10, warmup=0.2, ramp=0.7, end=0.8)
    with pytest.raises(UserError, match="too short"):   # one epoch: settling takes all of it
        SeedConfig.for_run("flops", 0.5, 1, 10)


def test_redistribution_every_few_steps_moves_the_budgets_before_a_short_budget_freezes():
    """Once an epoch, a 4-epoch schedule's masks are final (end of epoch 1) before the first
    redistribution: the layer budgets never move. Every few steps they move while masks still can."""
    def redistributions(**fields):
        config = SeedConfig.for_run("flops", 0.5, epochs=4, steps_per_epoch=20, **fields)
        model, groups, cost, pruner = _setup(config)
        calls = []
        real = pruner.redistribute
        pruner.redistribute = lambda: (calls.append(pruner.steps), real())
        _train(model, ChannelMasker(model, groups, record=True), pruner, 80)
        return config, pruner, calls

    config, pruner, calls = redistributions()
    assert config.freeze_at == 20 and config.redistribute_every == 20 and calls == []
    config, pruner, calls = redistributions(redistribute_every=4)
    assert calls == [9, 13, 17] and all(step <= config.freeze_at for step in calls)
    assert pruner.summary()["channel_flips"]["period_steps"] == 4
    with pytest.raises(UserError, match="--redistribute-every"):
        SeedConfig.for_run("flops", 0.5, 4, 20, redistribute_every=-1)


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
    assert config.warmup_steps == 20 and config.ramp_steps == 60 and config.redistribute_every == 10
    assert config.freeze_at == 100 and config.settle_steps == 10 and config.extract_epoch(10) == 11
    assert config.soft and not SeedConfig.for_run("flops", 0.5, 40, 10, soft=False).soft
    # 30 epochs: the warm-up is 5 % of the steps, 1.5 epochs (BENCHMARKS.md says the same)
    config = SeedConfig.for_run("flops", 0.5, epochs=30, steps_per_epoch=195)
    assert config.warmup_steps == round(0.05 * 30 * 195) == 292
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


@pytest.mark.parametrize("epochs,steps,shares", [
    (5, 97, {}),                                       # --epochs 5 --batch-size 512 on CIFAR-10
    (4, 195, {}), (4, 195, {"warmup": 0.05, "ramp": 0.15, "end": 0.25}), (3, 7, {"end": 1.0}),
    (30, 13, {"warmup": 0.1, "end": 0.9, "settle_epochs": 2}), (6, 5, {"ramp": 0.3, "end": 0.6}),
])
def test_no_mask_change_within_the_settle_period_before_the_cut(epochs, steps, shares):
    """Every channel the cut network keeps has trained in the final structure: the last mask change
    is at least `settle_steps` (one epoch by default) before the end of the epoch the network is cut at,
    whatever the budget. (The masks used to be able to change on the very step before the cut.)"""
    config = SeedConfig.for_run("flops", 0.5, epochs, steps, update_every=1, redistribute=0.3, **shares)
    _, groups, _, pruner = _setup(config)
    cut = config.extract_epoch(steps) * steps
    assert cut <= epochs * steps and config.settle_steps == shares.get("settle_epochs", 1) * steps
    gen = torch.Generator().manual_seed(1)
    changes = []
    for _ in range(cut):
        if pruner.step({g.name: torch.rand(g.size, generator=gen) for g in groups}) is not None:
            changes.append(pruner.steps)
    # (with soft masks, the default, the pruner also answers when only the fade moves, up to the freeze)
    assert changes and pruner.last_change <= changes[-1] <= config.freeze_at
    assert cut - changes[-1] >= config.settle_steps


def test_ramp_asks_for_a_growing_reduction_and_reaches_the_target():
    config = SeedConfig(metric="flops", reduction=0.6, warmup_steps=2, ramp_steps=12, update_every=2,
                        freeze_at=30)
    _, groups, cost, pruner = _setup(config)
    gen = torch.Generator().manual_seed(4)
    selections = []   # (asked, reached) at every update that handed out masks
    for _ in range(30):
        new = pruner.step({g.name: torch.rand(g.size, generator=gen) for g in groups})
        if new is not None:
            selections.append((pruner.target_now(), achieved(cost, "flops", new)))
    asked = [a for a, _ in selections]
    assert asked[0] == pytest.approx(0.6 * (1 - (1 - 1 / 12) ** 3)) and asked[-1] == 0.6
    assert all(b >= a for a, b in zip(asked, asked[1:]))
    assert all(r >= a - 1e-9 and r <= a + 0.02 for a, r in selections)   # each selection lands on its step's target
    assert selections[0][1] < 0.2 and 0.6 <= selections[-1][1] <= 0.61


def test_soft_masks_fade_switched_off_channels_to_zero_at_the_freeze():
    config = SeedConfig(metric="flops", reduction=0.5, warmup_steps=2, update_every=1, freeze_at=12, soft=True)
    model, groups, cost, pruner = _setup(config)
    scales = []
    gen = torch.Generator().manual_seed(2)
    for _ in range(16):
        new = pruner.step({g.name: torch.rand(g.size, generator=gen) for g in groups})
        scales.append((pruner.steps, pruner.off_scale, new is not None))
    by_step = {s: (scale, changed) for s, scale, changed in scales}
    assert by_step[1][0] == 0.0 and not by_step[1][1]                # warm-up: no masks yet
    assert by_step[3][0] == pytest.approx(0.9) and by_step[3][1]     # every update hands on the new scale
    assert all(a >= b for (_, a, _), (_, b, _) in zip(scales[2:], scales[3:]))
    assert by_step[12][0] == 0.0 and all(not by_step[s][1] for s in range(13, 17))   # frozen at 0
    with pytest.raises(UserError, match="freeze"):
        SeedConfig(soft=True)


def test_the_channels_that_matter_are_the_ones_kept():
    """Channels whose Taylor significance is consistently high survive, whatever the noise: the
    method's point, not just that it runs."""
    config = SeedConfig(metric="flops", reduction=0.5, warmup_steps=3, update_every=2, redistribute_every=0,
                        freeze_at=40, hysteresis=0.2)
    _, groups, cost, pruner = _setup(config)
    gen = torch.Generator().manual_seed(5)
    important = {g.name: torch.arange(g.size) % 3 == 0 for g in groups}   # a third of every group
    for _ in range(40):
        theta = {g.name: torch.where(important[g.name], 0.6, 0.1) + 0.3 * torch.rand(g.size, generator=gen)
                 for g in groups}
        pruner.step(theta)
    for g in groups:
        kept, vital = pruner.masks[g.name], important[g.name]
        assert kept[vital].float().mean() >= 0.9 or kept.sum() < vital.sum()   # the vital ones first
        if kept.sum() >= vital.sum():
            assert (kept & ~vital).sum() <= kept.sum() - vital.sum() + 1
