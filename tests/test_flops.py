"""The FLOPs (MACs) counter against the literature, closed forms and thop; the `info` command."""
from __future__ import annotations

import copy
import json
import subprocess

import pytest
import thop
import torch
from thop.vision.basic_hooks import zero_ops
from torch import nn

from compress.flops import count
from compress.info import main as info_main
from compress.models import create_model, list_models

# ----------------------------------------------------------------------------- literature numbers


def test_vgg16_matches_literature():
    c = count(create_model("vgg16"))
    # Li et al. 2017 "Pruning Filters for Efficient ConvNets", Table 1: 3.13e8 FLOPs, 1.5e7 params;
    # Liu et al. 2017 / later work: 313.2 M and 14.72 M (10 classes).
    assert c.flops == pytest.approx(313.2e6, rel=1e-3)
    assert c.params == pytest.approx(14.72e6, rel=1e-3)
    assert (c.flops, c.params) == (313_201_664, 14_728_266)  # the dense numbers in docs/formats.md


def cifar_resnet_macs(depth: int) -> tuple[int, int]:
    """Closed form for a CIFAR ResNet on 32x32: (convs + head MACs, 1x1 projection MACs)."""
    n = (depth - 2) // 6
    macs = 3 * 16 * 9 * 32 * 32                   # stem
    for cin, c, side in ((16, 16, 32), (16, 32, 16), (32, 64, 8)):
        first = cin * c * 9 * side * side       # first conv of the stage (maybe strided)
        macs += first + (2 * n - 1) * c * c * 9 * side * side
    macs += 64 * 10                                # Linear 64 -> 10
    projections = 16 * 32 * 16 * 16 + 32 * 64 * 8 * 8
    return macs, projections


@pytest.mark.parametrize("name,depth,paper_flops,paper_params", [
    ("resnet20", 20, 40.55e6, 269_722),
    ("resnet32", 32, 68.86e6, 464_154),
    ("resnet56", 56, 125.49e6, 853_018),
])
def test_cifar_resnet_counts_and_shortcut_option(name, depth, paper_flops, paper_params):
    """Our ResNets use 1x1 projection shortcuts (option B). The numbers papers quote for ResNet-56
    (125.49 M MACs / 0.85 M params) are option A (zero-padded identity): removing the two
    projections' MACs and parameters from our count must give exactly those numbers."""
    model = create_model(name)
    c = count(model)
    without_projection, projection = cifar_resnet_macs(depth)
    assert c.flops == without_projection + projection

    shortcut = [layer for layer in c.layers if ".shortcut." in layer.name]
    assert [layer.type for layer in shortcut] == ["Conv2d", "BatchNorm2d"] * 2
    option_a_flops = c.flops - sum(layer.flops for layer in shortcut)
    option_a_params = c.params - sum(layer.params for layer in shortcut)
    assert option_a_flops == pytest.approx(paper_flops, rel=1e-3)
    assert option_a_params == paper_params
    # Option B costs 0.26 M MACs and 2,752 params more, whatever the depth.
    assert c.flops - option_a_flops == 262_144 and c.params - option_a_params == 2_752


def test_resnet_headline_numbers():
    """The figures usually quoted: ResNet-56 ~125.5 M / 0.85 M, ResNet-20 ~40.8 M / 0.27 M."""
    r56, r20 = count(create_model("resnet56")), count(create_model("resnet20"))
    assert r56.flops == pytest.approx(125.5e6, rel=3e-3) and r56.params == pytest.approx(0.85e6, rel=1e-2)
    assert r20.flops == pytest.approx(40.8e6, rel=1e-3) and r20.params == pytest.approx(0.27e6, rel=1e-2)


# ----------------------------------------------------------------------------- independent counter


def thop_conv_linear(model: nn.Module, input_shape) -> tuple[int, int]:
    """thop's MACs restricted to what we count. By default thop also charges BatchNorm (4 ops per
    element when affine), ReLU, pooling... (ResNet-56: 127.9 M instead of the conv+linear 125.7 M).
    Mapping every other leaf module type to thop's own zero_ops leaves exactly its Conv/Linear MACs
    (which, like ours, exclude bias). Runs on a copy because thop adds buffers to every module."""
    model = copy.deepcopy(model)
    others = {type(m): zero_ops for m in model.modules()
              if not isinstance(m, (nn.Conv2d, nn.Linear)) and not list(m.children())}
    macs, params = thop.profile(model, inputs=(torch.zeros(input_shape),), custom_ops=others, verbose=False)
    return int(macs), int(params)


@pytest.mark.parametrize("name", list_models())
def test_agrees_with_thop_on_every_zoo_model(name):
    model = create_model(name)
    ours = count(model)
    thop_macs, thop_params = thop_conv_linear(model, (1, 3, 32, 32))
    assert ours.flops == thop_macs
    assert ours.params == thop_params == sum(p.numel() for p in model.parameters())


def test_agrees_with_thop_on_odd_shapes_and_sizes():
    """A 'pruned' network: odd channel counts, grouped conv, a non-square input."""
    model = nn.Sequential(
        nn.Conv2d(3, 7, 3, padding=1), nn.BatchNorm2d(7), nn.ReLU(),
        nn.Conv2d(7, 14, 3, stride=2, groups=7, bias=False), nn.ReLU(),
        nn.Conv2d(14, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3),
    )
    ours = count(model, (2, 3, 21, 17))
    assert (ours.flops, ours.params) == thop_conv_linear(model, (2, 3, 21, 17))


# ----------------------------------------------------------------------------- the convention


def test_conv_and_linear_conventions():
    # Grouped conv: out_h*out_w*k_h*k_w*(in/groups)*out. 10x10, stride 2, pad 1 -> 5x5.
    grouped = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4)
    assert count(grouped, (1, 8, 10, 10)).flops == 5 * 5 * 3 * 3 * (8 // 4) * 16
    # Depthwise, and bias is free: same MACs with or without it.
    dw_bias, dw_plain = nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
    assert count(dw_bias, (1, 6, 4, 4)).flops == count(dw_plain, (1, 6, 4, 4)).flops == 4 * 4 * 9 * 6
    # Linear on a (batch, tokens, features) input: every row costs in*out.
    assert count(nn.Linear(5, 3), (2, 4, 5)).flops == 2 * 4 * 5 * 3
    # The count is for the whole input shape given.
    assert count(grouped, (3, 8, 10, 10)).flops == 3 * count(grouped, (1, 8, 10, 10)).flops
    # Transposed conv: each input pixel scatters k*k*(out/groups) MACs.
    assert count(nn.ConvTranspose2d(4, 6, 2, stride=2), (1, 4, 3, 3)).flops == 3 * 3 * 4 * 6 * 2 * 2


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(1))   # owned by a non-leaf module: still a param

    def forward(self, x):
        return self.conv(self.conv(x)) * self.scale


def test_shared_layer_counted_per_call_and_all_params():
    c = count(Shared(), (1, 4, 5, 5))
    assert c.flops == 2 * 5 * 5 * 9 * 4 * 4
    assert c.params == 4 * 4 * 9 + 4 + 1
    assert [(layer.name, layer.type, layer.out_channels) for layer in c.layers] == [("conv", "Conv2d", 4)]


def test_layers_and_side_effects():
    model = create_model("resnet20", width=0.5).to(memory_format=torch.channels_last).train()
    bn = model.bn1
    model.layer1.eval()  # a frozen part stays frozen, the rest stays in training
    mean_before = bn.running_mean.clone()
    c = count(model, (1, 3, 64, 64))
    assert model.training and model.layer2[0].bn1.training and not model.layer1[0].bn1.training
    assert torch.equal(bn.running_mean, mean_before)  # ran in eval: BN statistics untouched
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed
    assert sum(layer.params for layer in c.layers) == c.params
    assert sum(layer.flops for layer in c.layers) == c.flops
    assert c.layers[0].name == "conv1" and c.layers[-1].name == "fc" and c.layers[-1].out_channels == 10
    # 4x the pixels: 4x the conv MACs, same head.
    assert c.flops - 32 * 10 == 4 * (count(model).flops - 32 * 10)


# ----------------------------------------------------------------------------- info command


def test_info_prints_one_json_object(capsys):
    assert info_main(["--model", "resnet56", "--width", "0.5", "--num-classes", "100"]) == 0
    out = json.loads(capsys.readouterr().out)
    model = create_model("resnet56", num_classes=100, width=0.5)
    expected = count(model)
    assert (out["flops"], out["params"]) == (expected.flops, expected.params)
    assert isinstance(out["flops"], int) and isinstance(out["params"], int)
    assert (out["model"], out["width"], out["num_classes"], out["input_shape"]) == ("resnet56", 0.5, 100, [1, 3, 32, 32])
    assert out["layers"][0] == {"name": "conv1", "type": "Conv2d", "flops": 3 * 8 * 9 * 32 * 32,
                                "params": 3 * 8 * 9, "out_channels": 8}
    assert len(out["layers"]) == len(expected.layers)


def test_info_user_factory_and_input_size(tmp_path, capsys):
    net = tmp_path / "net.py"
    net.write_text("from torch import nn\n"
                   "def make(num_classes=10):\n"
                   "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, num_classes))\n")
    assert info_main(["--model", f"{net}:make", "--input-size", "8", "--num-classes", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["flops"] == 8 * 8 * 9 * 3 * 4 + 256 * 2 and out["input_shape"] == [1, 3, 8, 8]


@pytest.mark.parametrize("argv,message", [
    (["--model", "vgg17"], "unknown model 'vgg17'"),
    (["--model", "vgg16", "--input-size", "16"], "fails on input [1, 3, 16, 16]"),
    (["--model", "vgg16", "--input-size", "0"], "must be positive"),
    (["--model", "vgg16", "--width", "x"], "invalid float value"),
    (["--model", "vgg16", "--width", "-1"], "width must be a positive number"),
    (["--model", "nowhere_module:make"], "module 'nowhere_module' not found"),
    ([], "required: --model"),
])
def test_info_errors_one_line_exit_2(argv, message, capsys):
    assert info_main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and message in captured.err
    assert captured.err.count("\n") == 1


def test_info_as_a_process(python_exe, repo_root):
    code = "import sys; from compress.info import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([python_exe, "-c", code, "--model", "vgg16"], cwd=repo_root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert (out["flops"], out["params"]) == (313_201_664, 14_728_266)
