"""ChannelMasker: hard masks where extraction cuts, and Taylor significance as the method defines it."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from compress.prune import ChannelMasker, find_groups
from compress.prune.importance import bn_scale, l1_filter, random_scores, taylor
from tests.test_prune_models import ConcatNet, randomize_bn, zoo

X8 = torch.randn(4, 3, 8, 8)


def test_taylor_matches_definition():
    torch.manual_seed(0)
    model = randomize_bn(ConcatNet()).train()
    groups = find_groups(model, X8[:1])
    masker = ChannelMasker(model, groups, record=True)
    masks = {g.name: torch.arange(g.size) % 3 != 0 for g in groups}
    masker.set(masks)

    # Reference: keep each producer's (masked) output and its gradient, compute Theta by hand.
    seen = {}

    def keep(name):
        def hook(module, inputs, output):
            output.retain_grad()
            seen[name] = output
        return hook

    modules = dict(model.named_modules())
    for g in groups:
        for name in g.outputs:
            modules[name].register_forward_hook(keep(name))  # runs after the masker's hook
    y = torch.randint(0, 10, (4,))
    F.cross_entropy(model(X8), y).backward()
    theta = masker.pop_taylor()

    for g in groups:
        per_sample = torch.zeros(4, g.size)
        for member in g.members:
            if member.module in g.outputs:
                z = seen[member.module]
                s = (z.grad * z).flatten(2).sum(2) if z.dim() == 4 else z.grad * z
                per_sample[:, member.channels] += s[:, member.idxs].detach()
        expected = per_sample.abs().mean(0)
        expected = expected / expected.max()
        assert torch.allclose(theta[g.name], expected, atol=1e-5), g.name
        assert (theta[g.name][~masks[g.name]] == 0).all()  # a switched-off channel earns nothing
    # the right branch has two producers (1x1 conv's BN and the depthwise conv's BN): both counted
    assert len(next(g for g in groups if g.name == "right.0").outputs) == 2


def test_masks_zero_channels_in_bf16_channels_last_training():
    model = zoo("resnet20", 0.25).train().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    groups = find_groups(model, x[:1])
    masker = ChannelMasker(model, groups, record=True)
    masks = {g.name: torch.arange(g.size) % 2 == 0 for g in groups}
    masker.set(masks)
    stream = next(g for g in groups if len(g.outputs) > 1)
    outputs = {}
    modules = dict(model.named_modules())
    for name in stream.outputs:
        modules[name].register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o.detach().clone()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().logsumexp(1).mean()
    loss.backward()
    for name, out in outputs.items():
        assert out[:, ~masks[stream.name]].abs().max() == 0, name
        assert out[:, masks[stream.name]].abs().max() > 0, name
    calls = []

    def reduce(flat):
        calls.append(flat.numel())
        return flat * 2  # e.g. a sum over two identical ranks

    theta = masker.pop_taylor(reduce=reduce)
    assert calls == [sum(g.size for g in groups) + len(groups)]
    for g in groups:
        assert torch.isfinite(theta[g.name]).all() and theta[g.name].max() == 1.0
        assert (theta[g.name][~masks[g.name]] == 0).all()
    assert set(taylor(masker)) == {g.name for g in groups}
    assert masker.pop_taylor() == {}  # nothing new since the last pop


def test_no_masking_after_set_none_and_remove():
    model = zoo("vgg11", 0.25).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        dense = model(x)
    groups = find_groups(model, x[:1])
    masker = ChannelMasker(model, groups)
    masker.set({g.name: torch.zeros(g.size, dtype=torch.bool).index_fill_(0, torch.tensor([0]), True)
                for g in groups})
    with torch.no_grad():
        assert not torch.allclose(model(x), dense)
        masker.set(None)
        assert torch.equal(model(x), dense)
        masker.set({groups[0].name: torch.zeros(groups[0].size, dtype=torch.bool)})
        masker.remove()
        assert torch.equal(model(x), dense)


def test_criteria():
    model = zoo("resnet20", 0.5)
    groups = find_groups(model, torch.randn(1, 3, 32, 32))
    l1 = l1_filter(model, groups, normalized=False)
    stream = next(g for g in groups if len(g.outputs) > 1)
    convs = [m.module for m in stream.members if m.kind == "out" and "bn" not in m.module
             and "shortcut.1" not in m.module]
    modules = dict(model.named_modules())
    expected = sum(modules[c].weight.abs().flatten(1).sum(1) for c in convs)
    assert torch.allclose(l1[stream.name], expected)
    assert all(s.max() == 1 for s in l1_filter(model, groups).values())
    bn = bn_scale(model, groups)
    inner = groups[1]
    assert torch.allclose(bn[inner.name], modules[inner.norm].weight.abs())
    a, b = random_scores(groups, 7), random_scores(groups, 7)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_recording_keeps_no_activation_alive_after_backward():
    """Regression: the Taylor hook once captured the tensor it was registered on, a reference
    cycle through C++ that gc cannot break, so every batch's activations leaked (a demo run was
    OOM-killed at 24 GB). After backward and `del`, no BN output may survive."""
    import gc
    import weakref

    model = ConcatNet().train()
    x = torch.randn(2, 3, 8, 8)
    groups = find_groups(model, x[:1])
    masker = ChannelMasker(model, groups, record=True)
    alive = []
    probe = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    handle = probe.register_forward_hook(lambda m, i, out: alive.append(weakref.ref(out)))
    for _ in range(3):
        loss = model(x).square().mean()
        loss.backward()
        masker.pop_taylor()
        del loss
    handle.remove()
    gc.collect()
    assert alive and all(ref() is None for ref in alive)


def test_soft_masks_scale_switched_off_channels():
    """set(masks, off=s): a switched-off channel's output is s times what it would be; 0 cuts it."""
    torch.manual_seed(0)
    model = randomize_bn(ConcatNet()).eval()
    groups = find_groups(model, X8[:1])
    masker = ChannelMasker(model, groups)
    seen = {}
    name = groups[0].outputs[0]
    dict(model.named_modules())[name].register_forward_hook(lambda m, i, o: seen.__setitem__("z", o))
    masks = {groups[0].name: torch.arange(groups[0].size) % 2 == 0}
    masker.set(None)
    model(X8)
    full = seen["z"].clone()
    for off in (0.3, 0.0):
        masker.set(masks, off=off)
        model(X8)
        keep = masks[groups[0].name]
        assert torch.allclose(seen["z"][:, keep], full[:, keep])
        assert torch.allclose(seen["z"][:, ~keep], off * full[:, ~keep])
