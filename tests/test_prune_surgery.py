"""Extraction gives a dense smaller network equal to the masked one; arch.json round trips."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from compress.errors import UserError
from compress.flops import count
from compress.prune import ChannelMasker, ResourceModel, arch_of, extract, find_groups, rebuild, select
from compress.prune.importance import random_scores
from tests.test_prune_models import ZOO_SMALL, ConcatNet, randomize_bn, zoo


def _masked_and_extracted(model, x, reduction=0.5, seed=0):
    model = randomize_bn(model).eval()
    groups = find_groups(model, x[:1])
    cost = ResourceModel(model, groups, x[:1])
    masks = select(random_scores(groups, seed), cost, "flops", reduction, 0.01)
    masker = ChannelMasker(model, groups)
    masker.set(masks)
    with torch.no_grad():
        masked = model(x)
    slim = extract(model, groups, masks, x[:1]).eval()  # while the masker is still attached
    masker.remove()
    with torch.no_grad():
        dense = model(x)
    with torch.no_grad():
        cut = slim(x)
    return dense, masked, cut, slim, groups, masks, cost


@pytest.mark.parametrize("name", ZOO_SMALL)
def test_extracted_equals_masked_on_zoo(name):
    x = torch.randn(2, 3, 32, 32)
    dense, masked, cut, slim, groups, masks, cost = _masked_and_extracted(zoo(name), x)
    assert (masked - cut).abs().max().item() <= 1e-4
    assert (dense - masked).abs().max().item() > 1e-3  # the masks did something
    counted = count(slim, (1, 3, 32, 32))
    assert (counted.flops, counted.params) == (cost.flops(masks), cost.params(masks))
    assert not any(isinstance(p.grad, torch.Tensor) for p in slim.parameters())


def test_extracted_equals_masked_on_concat_model():
    x = torch.randn(4, 3, 8, 8)
    dense, masked, cut, slim, groups, masks, _ = _masked_and_extracted(ConcatNet(), x, 0.6)
    assert (masked - cut).abs().max().item() <= 1e-4
    right, left = masks["right.0"], masks["left.0"]
    assert slim.mix.in_channels == int(left.sum()) + int(right.sum())
    assert slim.fc.in_features == 4 * int(masks["mix"].sum())
    assert slim.head.out_features == 10


def test_extract_leaves_original_alone():
    model = zoo("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 32, 32)
    groups = find_groups(model, x)
    extract(model, groups, {g.name: torch.arange(g.size) < g.size // 2 for g in groups})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_hard_coded_reshape_is_a_user_error():
    class HardView(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)).view(-1, 8))

    model, x = HardView(), torch.randn(1, 3, 8, 8)
    with pytest.raises(UserError, match="does not run"):
        find_groups(model, x)  # refused before any training: its trial cut runs the cut network
    groups = find_groups(model, x, check=False)
    with pytest.raises(UserError, match="does not run"):
        extract(model, groups, {groups[0].name: torch.arange(8) < 4}, x)


@pytest.mark.parametrize("spec", ["resnet20", "mobilenetv2", "tests.test_prune_models:concat_net"])
def test_arch_safetensors_round_trip_and_export(tmp_path, spec):
    shape = (2, 3, 8, 8) if "concat" in spec else (2, 3, 32, 32)
    model = ConcatNet() if "concat" in spec else zoo(spec, 1.0)
    x = torch.randn(shape)
    _, masked, cut, slim, *_ = _masked_and_extracted(model, x, 0.7)
    arch = arch_of(slim, spec, 10, 1.0)
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    save_file({k: v.contiguous() for k, v in slim.state_dict().items()}, tmp_path / "weights.safetensors")

    again = rebuild(json.loads((tmp_path / "arch.json").read_text()))
    again.load_state_dict(load_file(tmp_path / "weights.safetensors"), strict=True)
    again.eval()
    with torch.no_grad():
        assert torch.allclose(again(x), cut, atol=1e-5)
    assert arch_of(again, spec, 10, 1.0) == arch

    program = torch.export.export(again, (x,))
    with torch.no_grad():
        assert torch.allclose(program.module()(x), cut, atol=1e-5)


def test_rebuild_rejects_mismatched_arch():
    arch = arch_of(zoo("vgg11"), "vgg11", 10, 0.5)
    arch["modules"]["features.99"] = {"type": "Conv2d", "in": 3, "out": 4, "groups": 1}
    with pytest.raises(UserError, match="features.99"):
        rebuild(arch)
    with pytest.raises(UserError, match="missing"):
        rebuild({"model": "vgg11"})
