"""The zoo (construct, forward, fx, export, channels_last, width) and user factories (module:factory)."""
from __future__ import annotations

import math
import operator
import textwrap
import uuid

import pytest
import torch
from torch import nn

from compress.errors import UserError
from compress.models import build_model, create_model, list_models

ZOO = ["vgg11", "vgg13", "vgg16", "vgg19", "resnet20", "resnet32", "resnet56", "mobilenetv2"]


def convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_list_models_is_the_zoo():
    assert list_models() == ZOO


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_forwards_traces_and_exports(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
    assert eager.shape == (2, 7) and torch.isfinite(eager).all()

    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), eager)

    program = torch.export.export(model, (x[:1],))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x[:1]), eager[:1], rtol=1e-4, atol=1e-5)

    model_cl = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(model_cl(x.to(memory_format=torch.channels_last)), eager,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["vgg16", "resnet20", "mobilenetv2"])
def test_zoo_model_trains_one_step(name):
    torch.manual_seed(0)
    model = create_model(name, width=0.25)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    changed = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert changed == len(before)  # every parameter receives a gradient


def test_standard_init():
    torch.manual_seed(0)
    model = create_model("vgg16")
    for conv in convs(model):
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1] // conv.groups
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.15)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_vgg_shape():
    model = create_model("vgg16", num_classes=100)
    assert [c.out_channels for c in convs(model)] == [64, 64, 128, 128, 256, 256, 256,
                                                      512, 512, 512, 512, 512, 512]
    assert all(c.bias is not None for c in convs(model))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(heads) == 1 and (heads[0].in_features, heads[0].out_features) == (512, 100)


@pytest.mark.parametrize("name,depth", [("resnet20", 20), ("resnet32", 32), ("resnet56", 56)])
def test_resnet_depth_and_projection_shortcuts(name, depth):
    model = create_model(name)
    all_convs = convs(model)
    projections = [c for c in all_convs if c.kernel_size == (1, 1)]
    # depth = stem + 2 convs per block + head; the two 1x1 projections (option B) are extra.
    assert len(all_convs) - len(projections) + 1 == depth
    assert [(p.in_channels, p.out_channels, p.stride) for p in projections] == [(16, 32, (2, 2)), (32, 64, (2, 2))]
    assert {c.out_channels for c in all_convs} == {16, 32, 64}


def residual_adds(model: nn.Module) -> int:
    graph = torch.fx.symbolic_trace(model).graph
    return sum(node.op == "call_function" and node.target in (operator.add, torch.add) for node in graph.nodes)


@pytest.mark.parametrize("name,adds", [("resnet20", 9), ("resnet56", 27), ("mobilenetv2", 10), ("vgg16", 0)])
def test_residual_connections(name, adds):
    # ResNet: one per block; MobileNetV2: every inverted residual whose input and output shapes match.
    assert residual_adds(create_model(name)) == adds


def test_mobilenetv2_is_cifar_variant():
    model = create_model("mobilenetv2")
    depthwise = [c for c in convs(model) if c.groups > 1]
    assert len(depthwise) == 17 and all(c.groups == c.in_channels == c.out_channels for c in depthwise)
    strided = [c for c in convs(model) if c.stride != (1, 1)]
    assert len(strided) == 3  # 32 -> 16 -> 8 -> 4; the stem and the 24-channel stage keep stride 1
    features = model.features(torch.zeros(1, 3, 32, 32))
    assert features.shape == (1, 1280, 4, 4)


@pytest.mark.parametrize("name", ZOO)
def test_width_scales_channels(name):
    full, half = create_model(name), create_model(name, width=0.5)
    n_full = sum(p.numel() for p in full.parameters())
    n_half = sum(p.numel() for p in half.parameters())
    # Conv params scale ~width^2; MobileNetV2 keeps its 1280-wide last layer, so it shrinks less.
    assert n_half < (0.5 if name == "mobilenetv2" else 0.3) * n_full
    for c_full, c_half in zip(convs(full), convs(half)):
        if name == "mobilenetv2":
            assert c_half.out_channels % 8 == 0
        else:
            assert c_half.out_channels == round(c_full.out_channels / 2)


def test_width_examples_and_minimum_channels():
    assert [c.out_channels for c in convs(create_model("resnet20", width=0.25))][:1] == [4]
    assert convs(create_model("vgg16", width=1.5))[-1].out_channels == 768
    mnv2 = create_model("mobilenetv2", width=0.35)
    assert [c.out_channels for c in convs(mnv2)][:2] == [16, 16] and convs(mnv2)[-1].out_channels == 1280
    assert convs(create_model("mobilenetv2", width=1.4))[-1].out_channels == 1792
    tiny = create_model("vgg11", width=0.001)  # never zero channels: still a working network
    assert min(c.out_channels for c in convs(tiny)) == 1
    assert tiny(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert min(c.out_channels for c in convs(create_model("mobilenetv2", width=0.01))) == 8


def test_create_model_forgiving_names():
    assert isinstance(create_model("ResNet-56"), type(create_model("resnet56")))
    assert isinstance(create_model("mobilenet_v2"), type(create_model("mobilenetv2")))


def test_create_model_errors():
    with pytest.raises(UserError, match="unknown model .VGG-17..*vgg16.*resnet56.*mobilenetv2"):
        create_model("VGG-17")
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(UserError, match="width must be a positive number"):
            create_model("vgg11", width=bad)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(UserError, match="num_classes must be a positive integer"):
            create_model("vgg11", num_classes=bad)


# ----------------------------------------------------------------------------- user factories

FACTORIES = """
    import torch
    from torch import nn

    def make(num_classes=10, width=1.0):
        c = max(1, int(8 * width))
        return nn.Sequential(nn.Conv2d(3, c, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))

    def fixed():
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 5))

    def kwargs_only(**kw):
        assert "width" not in kw, "width passed though not asked for"
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, kw["num_classes"]))

    def kwargs_width(**kw):
        return nn.Linear(4, max(1, int(8 * kw["width"])))

    class Nets:
        @staticmethod
        def tiny(num_classes=10):
            return nn.Linear(4, num_classes)

    def broken(num_classes=10):
        raise ValueError("bad\\nconfig")

    def not_a_module(num_classes=10):
        return {"conv": 1}

    NOT_CALLABLE = 3
"""


@pytest.fixture
def user_file(tmp_path):
    """A user's model file in its own folder, with a unique module name."""
    name = f"usernets_{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(FACTORIES))
    return path


def heads(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def test_build_model_zoo_name():
    model = build_model("resnet20", num_classes=3, width=0.5)
    assert heads(model)[0].out_features == 3 and convs(model)[0].out_channels == 8


def test_build_model_from_file_path(user_file):
    model = build_model(f"{user_file}:make", num_classes=4, width=2.0)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    assert convs(model)[0].out_channels == 16
    assert heads(build_model(f"{user_file}:fixed", num_classes=4))[0].out_features == 5  # takes no num_classes
    assert heads(build_model(f"{user_file}:kwargs_only", num_classes=6))[0].out_features == 6
    assert heads(build_model(f"{user_file}:Nets.tiny", num_classes=2))[0].out_features == 2
    assert build_model(f"{user_file}:kwargs_width", width=0.5).out_features == 4


def test_build_model_from_module_on_sys_path(user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(user_file.parent))
    model = build_model(f"{user_file.stem}:make", num_classes=9)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 9)


def test_file_may_import_its_neighbours(tmp_path):
    helper = f"helper_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{helper}.py").write_text("from torch import nn\nWIDTH = 6\n")
    main = tmp_path / "net.py"
    main.write_text(f"from torch import nn\nimport {helper}\n"
                    f"def make(num_classes):\n    return nn.Linear({helper}.WIDTH, num_classes)\n")
    assert build_model(f"{main}:make", num_classes=2).in_features == 6


@pytest.mark.parametrize("spec_tail,message", [
    (":broken", r"factory '.*:broken' raised ValueError: bad config"),
    (":not_a_module", r"returned dict, not a torch.nn.Module"),
    (":missing", r"has no attribute 'missing'"),
    (":Nets.missing", r"has no attribute 'Nets.missing'"),
    (":NOT_CALLABLE", r"names a int, not a callable factory"),
    (":", r"not a zoo name and not of the form package.module:factory"),
])
def test_build_model_factory_errors(user_file, spec_tail, message):
    with pytest.raises(UserError, match=message) as err:
        build_model(f"{user_file}{spec_tail}")
    assert "\n" not in str(err.value)


def test_build_model_width_not_accepted(user_file):
    with pytest.raises(UserError, match="takes no width= argument"):
        build_model(f"{user_file}:fixed", width=0.5)


def test_build_model_import_errors(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = {
        "not_a_module_anywhere_x:make": "module 'not_a_module_anywhere_x' not found on sys.path",
        "nopkg_x.sub:make": "module 'nopkg_x.sub' not found",
        f"{tmp_path}/absent.py:make": "model file .*absent.py' not found",
        "vgg16x": "unknown model 'vgg16x'",
        ":make": "not a zoo name and not of the form",
    }
    syntax = tmp_path / f"syntax_{uuid.uuid4().hex[:8]}.py"
    syntax.write_text("def make(:\n")
    cases[f"{syntax}:make"] = "importing .*syntax_.*failed: SyntaxError"
    deps = f"deps_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{deps}.py").write_text("import a_dependency_that_is_not_installed\n")
    cases[f"{deps}:make"] = f"importing '{deps}' failed: ModuleNotFoundError: .*a_dependency_that_is_not_installed"
    cases[f"{tmp_path / deps}.py:make"] = "failed: ModuleNotFoundError: .*a_dependency_that_is_not_installed"
    for spec, message in cases.items():
        with pytest.raises(UserError, match=message) as err:
            build_model(spec)
        assert "\n" not in str(err.value), spec
