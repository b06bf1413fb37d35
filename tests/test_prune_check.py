"""Extraction proven: ops that would make pruning change the network are refused before training
(by the op rules and by find_groups' trial cut), zero-preserving ones pass with a tiny measured
diff, and the check after extraction names the layer where a broken cut parts from the masked net."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compress.prune.graph as graph
import compress.prune.surgery as surgery
from compress.errors import UserError
from compress.prune import ChannelMasker, extract, find_groups
from compress.prune.surgery import CHECK_RTOL, check_extraction
from tests.test_prune_models import randomize_bn, zoo

REPO = Path(__file__).resolve().parents[1]
X8 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class Between(nn.Module):
    """conv1 -> bn1 -> <op> -> conv2: the op sits between the mask (bn1) and the layer reading the channels."""

    def __init__(self, op):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act = op if isinstance(op, nn.Module) else None   # a module, or a function of (self, y, x)
        self.op = None if isinstance(op, nn.Module) else op
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.register_buffer("shift", torch.full((1, 8, 1, 1), 0.5))   # per channel
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        y = self.act(y) if self.act is not None else self.op(self, y, x)
        return self.conv2(y)


# What each op makes of a zero channel; every one of these is refused, naming the op.
CHANGING = {
    "sigmoid": (lambda s, y, x: torch.sigmoid(y), "Sigmoid"),
    "sigmoid module": (nn.Sigmoid(), "Sigmoid"),
    "hardsigmoid": (lambda s, y, x: F.hardsigmoid(y), "Hardsigmoid"),
    "hardsigmoid module": (nn.Hardsigmoid(), "Hardsigmoid"),
    "softplus": (nn.Softplus(), "Softplus"),
    "logsigmoid": (lambda s, y, x: F.logsigmoid(y), "LogSigmoid"),
    "exp": (lambda s, y, x: y.exp(), "Exp"),
    "cos": (lambda s, y, x: y.cos(), "Cos"),
    "add constant": (lambda s, y, x: y + 1.0, "Add"),
    "subtract constant": (lambda s, y, x: y - 0.5, "Sub"),
    "constant minus": (lambda s, y, x: 1.0 - y, "Rsub"),
    "add buffer": (lambda s, y, x: y + s.shift, "Add"),
    "add network input": (lambda s, y, x: y + x.repeat(1, 3, 1, 1)[:, :8].contiguous(), "Add"),
    "clamp min > 0": (lambda s, y, x: y.clamp(min=0.1), "Clamp"),
    "clamp_min buffer": (lambda s, y, x: y.clamp_min(s.shift), "ClampMin"),
    "clamp max < 0": (lambda s, y, x: y.clamp(max=-0.1), "Clamp"),
    "hardtanh above 0": (nn.Hardtanh(0.2, 1.0), "Hardtanh"),
}

# Ops that keep a zero channel at zero (or only multiply a masked tensor): pruning through them is exact.
PRESERVING = {
    "relu": nn.ReLU(), "relu6": nn.ReLU6(), "leaky relu": nn.LeakyReLU(0.1), "gelu": nn.GELU(),
    "gelu tanh": nn.GELU("tanh"), "silu": nn.SiLU(), "tanh": nn.Tanh(), "elu": nn.ELU(), "celu": nn.CELU(),
    "selu": nn.SELU(), "hardswish": nn.Hardswish(), "mish": nn.Mish(), "dropout": nn.Dropout(0.3),
    "clamp around 0": (lambda s, y, x: y.clamp(-1, 1)), "hardtanh": nn.Hardtanh(),
    "times constant": (lambda s, y, x: 3 * y), "over constant": (lambda s, y, x: y / 2),
    "times a scalar buffer": (lambda s, y, x: y * s.scale), "softsign": nn.Softsign(),
    "swish by hand": (lambda s, y, x: y * torch.sigmoid(y)),
    "se gate": (lambda s, y, x: y * torch.sigmoid(y.mean((2, 3), keepdim=True) - 1.0)),
    "gate of 1 + sigmoid": (lambda s, y, x: y * (1 + torch.sigmoid(y))),
    "pool and upsample": (lambda s, y, x: F.interpolate(F.avg_pool2d(F.max_pool2d(y, 2), 1), scale_factor=2)),
}


class SqueezeExcite(nn.Module):
    """A residual stage with a squeeze-excitation gate (Linear -> ReLU -> Linear -> Hardsigmoid) on its branch."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.SiLU())
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.GELU())
        self.fc1, self.fc2 = nn.Linear(c, 4), nn.Linear(4, c)
        self.mix = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.conv(x)
        gate = F.hardsigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3))))))[:, :, None, None]
        x = torch.tanh(x + self.mix(y * gate))
        return self.head(x.mean((2, 3)))


def _every_other(groups):
    return {g.name: torch.arange(g.size) % 2 == 0 for g in groups}


def _masked_output(model, groups, masks, x):
    masker = ChannelMasker(model, groups)
    masker.set(masks)
    with torch.no_grad():
        out = model.eval()(x)
    masker.remove()
    return out


@pytest.mark.parametrize("case", list(CHANGING))
def test_op_that_changes_a_pruned_channel_is_refused_with_its_name(case):
    op, name = CHANGING[case]
    for check in (False, True):  # the op rules alone refuse it; with the trial cut the answer is the same
        with pytest.raises(UserError) as info:
            find_groups(Between(op), X8[:1], check=check)
        message = str(info.value)
        assert "\n" not in message
        assert f"'{name}'" in message and "'bn1'" in message and "'conv2'" in message, message


def test_per_channel_buffer_the_cut_cannot_follow_is_refused_before_training():
    with pytest.raises(UserError, match="the pruned network does not run .*per-channel buffer"):
        find_groups(Between(lambda s, y, x: y * s.shift), X8[:1])


def test_issue_case_conv_bn_sigmoid_conv_is_refused_at_library_level():
    with pytest.raises(UserError, match=r"through 'Sigmoid' after module 'bn1': it maps a pruned \(zero\) "
                                        r"channel to 0.5"):
        find_groups(randomize_bn(Between(nn.Sigmoid())), torch.zeros(2, 3, 8, 8))


@pytest.mark.parametrize("functional", [False, True])
def test_trial_cut_refuses_what_the_op_rules_miss(monkeypatch, functional):
    monkeypatch.setattr(graph, "_check_zero_flow", lambda *args, **kwargs: None)  # an op the rules miss
    model = Between((lambda s, y, x: torch.sigmoid(y)) if functional else nn.Sigmoid())
    with pytest.raises(UserError) as info:
        find_groups(model, X8[:1])
    message = str(info.value)
    assert message.startswith("pruning would change this network: 'conv2' reads up to 0.5 from channels the cut "
                              "removes"), message
    where = "an operation in forward() between 'bn1' and 'conv2'" if functional else "'act' (Sigmoid) after 'bn1'"
    assert where in message and "add 'bn1' to --ignore" in message and "\n" not in message


def test_trial_cut_catches_a_threshold_whose_value_autograd_does_not_record():
    # F.threshold(y, 0.1, 2.0) maps 0 to 2.0, but autograd keeps only the threshold: the op rules let it
    # through and the trial cut, which sees the value, refuses it.
    with pytest.raises(UserError, match="pruning would change this network: 'conv2' reads up to 2 "):
        find_groups(Between(nn.Threshold(0.1, 2.0)), X8[:1])
    assert [g.name for g in find_groups(Between(nn.Threshold(-0.1, 2.0)), X8[:1])] == ["conv1"]


@pytest.mark.parametrize("case", list(PRESERVING))
def test_zero_preserving_op_passes_and_its_cut_is_exact(case):
    model = randomize_bn(Between(PRESERVING[case])).eval()
    groups = find_groups(model, X8[:1])
    assert [g.name for g in groups] == ["conv1"]
    masks = _every_other(groups)
    slim = extract(model, groups, masks, check_input=X8)
    record = slim.extraction_check
    assert record["relative_diff"] <= 1e-5 and record["max_pruned_input"] == 0.0, record
    with torch.no_grad():
        cut = slim.eval()(X8)
    want = _masked_output(model, groups, masks, X8)
    assert (cut - want).abs().max() <= 1e-5 * want.abs().max()
    assert slim.conv2.in_channels == 4


def test_residual_squeeze_excite_with_gelu_silu_tanh_passes_exactly():
    model = randomize_bn(SqueezeExcite()).eval()
    groups = find_groups(model, X8[:1])
    branch = next(g for g in groups if g.name == "conv.0")
    assert "fc2" in branch.outputs  # the gate's Linear carries the branch's channels: masked and cut with them
    masks = _every_other(groups)
    slim = extract(model, groups, masks, check_input=X8)
    assert slim.extraction_check["relative_diff"] <= 1e-5
    assert slim.fc2.out_features == 4 and slim.mix[0].in_channels == 4
    with torch.no_grad():
        assert (slim.eval()(X8) - _masked_output(model, groups, masks, X8)).abs().max() <= 1e-5


def test_extraction_check_records_a_json_record_and_leaves_the_model_alone():
    model = randomize_bn(zoo("resnet20")).train()
    x = torch.randn(4, 3, 32, 32)
    groups = find_groups(model, x[:1])
    masks = _every_other(groups)
    other = ChannelMasker(model, groups)   # a masker left on the model: the check brings its own
    other.set({name: ~m for name, m in masks.items()})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    slim = extract(model, groups, masks, check_input=x)
    record = json.loads(json.dumps(slim.extraction_check))
    assert set(record) == {"max_abs_diff", "output_scale", "relative_diff", "tolerance", "rtol", "samples",
                           "max_pruned_input"}
    assert record["samples"] == 4 and record["rtol"] == CHECK_RTOL and record["output_scale"] > 0
    assert record["max_abs_diff"] <= record["tolerance"] and record["relative_diff"] <= 1e-5
    assert model.training and slim.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    other.remove()
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    model.layer1.eval()
    extract(model, groups, masks, check_input=x)   # no masker on the model: the check runs it in place
    assert hooks == [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    assert model.training and not model.layer1.training and model.layer2.training
    assert not hasattr(extract(model, groups, masks), "extraction_check")  # nothing to check with
    program = torch.export.export(slim.eval(), (x,))  # the record does not get in the way of export
    with torch.no_grad():
        assert torch.allclose(program.module()(x), slim(x), atol=1e-5)


def test_check_names_the_layer_where_a_broken_cut_parts(monkeypatch):
    model = randomize_bn(zoo("vgg11")).eval()
    x = torch.randn(2, 3, 32, 32)
    groups = find_groups(model, x[:1])
    real_cut = surgery._cut

    def off_by_one(layer, kind, idxs):  # every BN cuts its neighbours' channels: shapes fit, values do not
        real_cut(layer, kind, [i - 1 for i in idxs] if isinstance(layer, nn.BatchNorm2d) else idxs)

    monkeypatch.setattr(surgery, "_cut", off_by_one)
    with pytest.raises(UserError) as info:
        extract(model, groups, _every_other(groups), check_input=x)
    message = str(info.value)
    assert message.startswith("the pruned network does not compute what the masked one did: they first part at "
                              f"the output of '{groups[0].norm}' (BatchNorm2d)"), message
    assert "\n" not in message


def test_check_names_the_reader_of_a_channel_the_masks_left_on():
    # A producer left out of a residual group's outputs: its branch is not masked, so the cut removes
    # channels that were not zero in the masked network. The check names who read them.
    model = randomize_bn(zoo("resnet20")).eval()
    x = torch.randn(2, 3, 32, 32)
    groups = find_groups(model, x[:1])
    stream = next(g for g in groups if "layer1.1.bn2" in g.outputs)
    stream.outputs.remove("layer1.1.bn2")
    masks = _every_other(groups)
    slim = extract(model, groups, masks)
    with pytest.raises(UserError) as info:
        check_extraction(model, slim, groups, masks, x)
    message = str(info.value)
    assert "reads up to" in message and "from channels the cut removes" in message, message
    assert "'layer1.1.bn2'" in message, message


def test_cli_refuses_the_issue_model_before_training(tmp_path: Path, small_cifar_dir: Path):
    (tmp_path / "sig_net.py").write_text(textwrap.dedent("""
        from torch import nn

        def make(num_classes=10, width=1.0):
            return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Sigmoid(),
                                 nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
    """))
    out = tmp_path / "runs" / "sig"
    proc = subprocess.run([sys.executable, "-m", "compress", "--model", str(tmp_path / "sig_net.py") + ":make",
                           "--target", "flops=0.3", "--method", "seed", "--preset", "smoke", "--epochs", "2",
                           "--train-subset", "64", "--test-subset", "64", "--data-dir", str(small_cifar_dir),
                           "--no-progress", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot prune channels through 'Sigmoid'"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not (tmp_path / "runs" / "sig.partial").exists()


def test_extraction_diff_benchmark_smoke(tmp_path: Path):
    script = [sys.executable, str(REPO / "benchmarks" / "extraction_diff.py")]
    proc = subprocess.run([*script, "--models", "resnet20", "--widths", "0.25", "--reductions", "0.5", "--seeds", "1",
                           "--batch", "2", "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "extraction_diff.json").read_text())
    assert 0 <= result["worst_relative_diff"] < result["rtol"] == CHECK_RTOL
    assert result["cost"][0]["trial_cut_s"] > 0 and (tmp_path / "out" / "extraction_diff.png").stat().st_size > 0
    bad = subprocess.run([*script, "--reductions", "1.5", "--out", str(tmp_path / "bad")], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--reductions" in bad.stderr
    assert not (tmp_path / "bad").exists()
