"""Coupled channel groups, found from the model itself: zoo, a concat model, refusals, --ignore."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.errors import UserError
from compress.prune import extract, find_groups
from tests.test_prune_models import (
    ZOO_SMALL,
    ConcatNet,
    LayerNormNet,
    PadShortcutNet,
    SharedConvNet,
    ShuffleNet,
    zoo,
)

X32 = torch.randn(1, 3, 32, 32)
X8 = torch.randn(1, 3, 8, 8)


def _check_consistent(model, groups):
    """Every member index is in range, every group channel is covered, no layer output in two groups."""
    modules = dict(model.named_modules())
    owner = {}
    for g in groups:
        assert g.name in modules and g.size > 0 and g.outputs
        for m in g.members:
            layer = modules[m.module]
            width = {"out": getattr(layer, "out_channels", getattr(layer, "out_features", getattr(layer, "num_features", 0))),
                     "in": getattr(layer, "in_channels", getattr(layer, "in_features", getattr(layer, "num_features", 0)))}[m.kind]
            assert len(m.idxs) == len(m.channels) and max(m.idxs) < width
            assert set(m.channels) == set(range(g.size)), (g.name, m.module)
            if m.kind == "out":
                for i in m.idxs:
                    assert (m.module, i) not in owner, f"{m.module}[{i}] in {owner.get((m.module, i))} and {g.name}"
                    owner[(m.module, i)] = g.name


@pytest.mark.parametrize("name", ZOO_SMALL)
def test_groups_on_zoo(name):
    model = zoo(name)
    groups = find_groups(model, X32)
    _check_consistent(model, groups)
    head = "classifier" if "resnet" not in name else "fc"
    assert all(not (m.module == head and m.kind == "out") for g in groups for m in g.members)
    assert all(g.norm is not None for g in groups)  # every zoo conv has a BN


def test_resnet_groups_follow_residual_stages():
    groups = find_groups(zoo("resnet20", 1.0), X32)
    # 3 residual streams (16/32/64 channels, each shared by every block of the stage) + 9 inner convs
    assert len(groups) == 12
    streams = [g for g in groups if len(g.outputs) > 1]
    assert sorted(g.size for g in streams) == [16, 32, 64]
    stage1 = next(g for g in streams if g.size == 16)
    assert set(stage1.outputs) == {"bn1", "layer1.0.bn2", "layer1.1.bn2", "layer1.2.bn2"}


def test_mobilenet_depthwise_in_its_expansion_group():
    groups = find_groups(zoo("mobilenetv2"), X32)
    g = next(g for g in groups if g.name == "features.2.conv.0.0")
    assert {m.module for m in g.members} >= {"features.2.conv.0.0", "features.2.conv.1.0", "features.2.conv.2.0"}
    assert g.outputs == ["features.2.conv.0.1", "features.2.conv.1.1"]  # both BNs carry the mask


def test_concat_offsets_and_flatten_features():
    groups = {g.name: g for g in find_groups(ConcatNet(), X8)}
    assert set(groups) == {"stem.0", "left.0", "right.0", "mix", "fc"}  # the head keeps its outputs
    mix_from_right = next(m for m in groups["right.0"].members if m.module == "mix")
    assert mix_from_right.kind == "in" and mix_from_right.idxs == list(range(8, 24))
    fc_in = next(m for m in groups["mix"].members if m.module == "fc")
    assert len(fc_in.idxs) == 16 * 4 and fc_in.channels[:8] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert groups["mix"].norm is None and groups["mix"].outputs == ["mix"]


@pytest.mark.parametrize("model, words", [
    (PadShortcutNet(), ["ConstantPadNd", "conv1"]),
    (ShuffleNet(), ["Transpose", "conv1"]),
    (LayerNormNet(), ["GroupNorm", "norm"]),
    (SharedConvNet(), ["shared", "2 times"]),
])
def test_unsupported_ops_refused_with_module_named(model, words):
    with pytest.raises(UserError) as info:
        find_groups(model, X8)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words)


def test_refused_op_can_be_ignored():
    assert find_groups(PadShortcutNet(), X8, ignore=["conv1"]) == []
    assert [g.name for g in find_groups(SharedConvNet(), X8, ignore=["shared"])] == []


def test_ignore_missing_layer_is_user_error():
    with pytest.raises(UserError, match="does not exist: 'features.99'"):
        find_groups(zoo("vgg11"), X32, ignore=["features.99"])


def test_ignore_keeps_layer_whole():
    model = zoo("resnet20")
    groups = find_groups(model, X32, ignore=["layer2.0.conv1", "layer3"])
    names = {m.module for g in groups for m in g.members}
    assert "layer2.0.conv1" not in names
    assert not any(n.startswith("layer3.") for n in names)
    masks = {g.name: torch.arange(g.size) % 2 == 0 for g in groups}
    slim = extract(model, groups, masks, X32)
    original, cut = dict(model.named_modules()), dict(slim.named_modules())
    for name in ["layer2.0.conv1", "layer3.1.conv1", "layer3.2.conv2"]:
        assert cut[name].weight.shape == original[name].weight.shape
    assert cut["layer1.0.conv1"].out_channels < original["layer1.0.conv1"].out_channels


def test_groups_do_not_change_the_model():
    model = zoo("vgg11").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    find_groups(model, X32)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.classifier, nn.Linear)
