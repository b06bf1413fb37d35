"""export: every format from a small trained model, checked by reading the files the bundle holds
and running them with their real runtimes -- not by trusting the manifest."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.run_fixture import WIDTHS

FILES = {"onnx": "model.onnx", "onnx-int8": "model_int8.onnx", "tflite": "model.tflite",
         "tflite-int8": "model_int8.tflite"}
# int8 may lose this much top-1 vs fp32 on the fixture's 500 test images. One image is 0.2 pp and the
# few-second model (~45 % top-1) has many near-ties, so a handful of flips is normal; 3 pp (15 images)
# still catches broken quantization (wrong ranges or scales land near 10 %). Real models: 1 pp, enforced
# by the exporter's own check and --strict.
INT8_TEST_BOUND = 0.03


# ---------------------------------------------------------------- helpers (independent of export/)

def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


@functools.cache
def reference(run: Path):
    """(torch logits of the whole test set, labels, test images, conv weight shapes of the program)."""
    import torch

    program = torch.export.load(str(run / "model.pt2"))  # our own fixture file: trusted
    module = program.module()
    report = json.loads((run / "report.json").read_text())
    with np.load(run / "test.npz") as z:
        x, y = z["x"], z["y"]
    with torch.no_grad():
        logits = module(torch.from_numpy(normalise(x, report).transpose(0, 3, 1, 2).copy())).numpy()
    convs = []
    for node in module.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.conv2d.default:
            weight = functools.reduce(getattr, node.args[1].target.split("."), module)
            convs.append(list(weight.shape))  # (O, I, kH, kW)
    return logits, y, x, convs


def normalise(x: np.ndarray, report: dict) -> np.ndarray:
    inp = report["input"]
    return ((x.astype(np.float32) * inp["scale"] - np.float32(inp["mean"])) / np.float32(inp["std"])).astype(np.float32)


def run_onnx(file: Path, x_nhwc: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))})[0]


def run_tflite(file: Path, x_nhwc: np.ndarray) -> np.ndarray:
    """One image at a time, as a board runs it; quantizes int8 input and dequantizes int8 output."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(file))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    rows = []
    for img in x_nhwc:
        x = img[None]
        if inp["dtype"] == np.int8:
            s, z = inp["quantization"]
            x = np.clip(np.round(x / s) + z, -128, 127).astype(np.int8)
        it.set_tensor(inp["index"], x)
        it.invoke()
        y = it.get_tensor(out["index"])
        if out["dtype"] == np.int8:
            s, z = out["quantization"]
            y = (y.astype(np.float32) - z) * s
        rows.append(y[0])
    return np.stack(rows)


def tflite_graph(file: Path):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=str(file),
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    return it, it._get_ops_details(), {t["index"]: t for t in it.get_tensor_details()}


def logits_of(bundle: Path, fmt: str, x_nhwc: np.ndarray) -> np.ndarray:
    runner = run_onnx if fmt.startswith("onnx") else run_tflite
    return runner(bundle / FILES[fmt], x_nhwc)


# ---------------------------------------------------------------- the bundle

def test_bundle_files_and_manifest(bundle_dir, trained_run):
    m = manifest_of(bundle_dir)
    report = json.loads((trained_run / "report.json").read_text())
    assert m["schema_version"] == 1 and m["name"] == report["name"]
    assert m["classes"] == report["classes"]
    assert m["preprocess"] == {"scale": report["input"]["scale"], "mean": report["input"]["mean"],
                               "std": report["input"]["std"], "color": "RGB", "height": 32, "width": 32}
    assert set(m["artifacts"]) == set(FILES)
    for fmt, art in m["artifacts"].items():
        file = bundle_dir / art["file"]
        assert art["file"] == FILES[fmt]
        assert art["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
        assert art["bytes"] == file.stat().st_size
        assert art["output"]["kind"] == "logits" and art["output"]["shape"][-1] == 10
        assert art["eval_images"] == 500
        assert ("top1_drop_vs_fp32" in art) == fmt.endswith("int8")
        assert ("max_abs_diff" in art) != fmt.endswith("int8")
    assert m["source"]["slim"] == report["slim"] and m["source"]["layers"] == report["layers"]
    assert m["source"]["method"] == report["method"] and m["source"]["target"] == report["target"]
    for tool in ("torch", "onnx", "onnxruntime", "litert-torch", "ai-edge-litert", "python"):
        assert m["toolchain"][tool]
    assert sorted(p.name for p in bundle_dir.iterdir()) == sorted([*FILES.values(), "manifest.json", "samples.npz"])


def test_samples_need_no_torch_and_hold_torch_logits(bundle_dir, trained_run):
    m = manifest_of(bundle_dir)
    file = bundle_dir / "samples.npz"
    assert m["samples"] == {"file": "samples.npz", "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
                            "count": 64}
    with np.load(file, allow_pickle=False) as z:
        x, y, logits = z["x"], z["y"], z["logits"]
    ref_logits, ref_y, ref_x, _ = reference(trained_run)
    assert x.dtype == np.uint8 and x.shape == (64, 32, 32, 3) and logits.dtype == np.float32
    np.testing.assert_array_equal(x, ref_x[:64])
    np.testing.assert_array_equal(y, ref_y[:64])
    np.testing.assert_allclose(logits, ref_logits[:64], atol=1e-5)


def test_tar_equals_folder(bundle_dir):
    tar = bundle_dir.parent / f"{bundle_dir.name}.tar.gz"
    with tarfile.open(tar) as t:
        members = {mem.name: t.extractfile(mem).read() for mem in t.getmembers() if mem.isfile()}
    assert members == {f"{bundle_dir.name}/{p.name}": p.read_bytes() for p in bundle_dir.iterdir()}
    assert sorted(p.name for p in bundle_dir.parent.iterdir()) == [bundle_dir.name, tar.name]  # no leftovers


# ---------------------------------------------------------------- numbers, re-measured here

@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_fp32_logits_match_torch(bundle_dir, trained_run, fmt):
    ref_logits, _, x, _ = reference(trained_run)
    report = json.loads((trained_run / "report.json").read_text())
    got = logits_of(bundle_dir, fmt, normalise(x[:256], report))
    assert np.abs(got - ref_logits[:256]).max() <= 1e-4
    assert manifest_of(bundle_dir)["artifacts"][fmt]["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("fmt", ["onnx", "onnx-int8", "tflite", "tflite-int8"])
def test_top1_on_full_test_set(bundle_dir, trained_run, fmt):
    ref_logits, y, x, _ = reference(trained_run)
    report = json.loads((trained_run / "report.json").read_text())
    top1 = float((logits_of(bundle_dir, fmt, normalise(x, report)).argmax(1) == y).mean())
    fp32 = float((ref_logits.argmax(1) == y).mean())
    art = manifest_of(bundle_dir)["artifacts"][fmt]
    assert art["top1"] == pytest.approx(top1, abs=0.002)  # recorded = what the runtime gives (1 image slack)
    assert fp32 == pytest.approx(report["slim"]["top1"])
    if fmt.endswith("int8"):
        assert top1 >= fp32 - INT8_TEST_BOUND
        assert art["top1_drop_vs_fp32"] == pytest.approx(fp32 - art["top1"])
    else:
        assert top1 == pytest.approx(fp32, abs=0.002)
    assert top1 > 0.3  # far above chance: the model really is trained


def test_checks_recorded(bundle_dir):
    checks = manifest_of(bundle_dir)["checks"]
    assert {c["name"].split()[0] for c in checks} == set(FILES)
    for c in checks:
        assert c["passed"] == (c["value"] <= c["limit"] if "limit" in c else True)
    assert len([c for c in checks if "conv channels" in c["name"]]) == 4


# ---------------------------------------------------------------- graphs, read from the files

@pytest.mark.parametrize("fmt", ["onnx", "onnx-int8"])
def test_onnx_convs_have_slim_channel_counts(bundle_dir, trained_run, fmt):
    import onnx

    model = onnx.load(str(bundle_dir / FILES[fmt]))
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    shapes = []
    for node in (n for n in model.graph.node if n.op_type == "Conv"):
        name = node.input[1]
        if fmt == "onnx-int8":  # Conv <- DequantizeLinear(int8 weight, per-channel scale, axis 0)
            dq = producer[name]
            assert dq.op_type == "DequantizeLinear"
            weight, scale = inits[dq.input[0]], inits[dq.input[1]]
            assert weight.data_type == onnx.TensorProto.INT8
            assert list(scale.dims) == [weight.dims[0]]  # per-channel
            name = dq.input[0]
        shapes.append(list(inits[name].dims))
    convs = reference(trained_run)[3]
    assert shapes == convs
    assert [s[0] for s in shapes] == list(WIDTHS)


@pytest.mark.parametrize("fmt", ["tflite", "tflite-int8"])
def test_tflite_convs_have_slim_channel_counts_nhwc_no_transpose(bundle_dir, trained_run, fmt):
    it, ops, tensors = tflite_graph(bundle_dir / FILES[fmt])
    names = [op["op_name"] for op in ops]
    assert "TRANSPOSE" not in names
    filters = [list(tensors[op["inputs"][1]]["shape"]) for op in ops if op["op_name"] == "CONV_2D"]
    # TFLite filters are OHWI; torch weights OIHW.
    assert filters == [[o, kh, kw, i] for o, i, kh, kw in reference(trained_run)[3]]
    inp = it.get_input_details()[0]
    assert list(inp["shape"]) == [1, 32, 32, 3]
    art = manifest_of(bundle_dir)["artifacts"][fmt]
    assert art["input"]["layout"] == "NHWC" and art["input"]["shape"] == [1, 32, 32, 3]


def test_tflite_int8_is_full_integer(bundle_dir):
    it, ops, tensors = tflite_graph(bundle_dir / "model_int8.tflite")
    assert it.get_input_details()[0]["dtype"] == np.int8
    assert it.get_output_details()[0]["dtype"] == np.int8
    assert {np.dtype(t["dtype"]).name for t in tensors.values()} <= {"int8", "int32"}  # int32: biases, shapes
    assert "DEQUANTIZE" not in [op["op_name"] for op in ops]
    art = manifest_of(bundle_dir)["artifacts"]["tflite-int8"]
    scale, zp = it.get_input_details()[0]["quantization"]
    assert art["input"]["quantization"] == {"scale": pytest.approx(scale), "zero_point": zp}
    assert art["input"]["dtype"] == art["output"]["dtype"] == "int8"


def test_onnx_is_one_file_opset17_dynamic_batch(bundle_dir, trained_run):
    import onnx

    for fmt in ("onnx", "onnx-int8"):
        file = bundle_dir / FILES[fmt]
        model = onnx.load(str(file), load_external_data=False)
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        onnx.checker.check_model(str(file), full_check=True)
        batch = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert batch.dim_param and not batch.dim_value
    report = json.loads((trained_run / "report.json").read_text())
    x = normalise(reference(trained_run)[2][:3], report)
    assert run_onnx(bundle_dir / "model.onnx", x).shape == (3, 10)
    assert run_onnx(bundle_dir / "model.onnx", x[:1]).shape == (1, 10)


# ---------------------------------------------------------------- errors: one line, exit 2, nothing written

def copy_run(trained_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


def export_main(argv, capsys):
    from export.cli import main

    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def evil_pickle(marker: Path) -> bytes:
    class Payload:  # unpickling it with the full unpickler would create `marker`
        def __reduce__(self):
            return os.mkdir, (str(marker),)
    return pickle.dumps(Payload())


def rewrite_member(pt2: Path, suffix: str, data: bytes) -> None:
    with zipfile.ZipFile(pt2) as z:
        members = {n: z.read(n) for n in z.namelist()}
    (name,) = [n for n in members if n.endswith(suffix)]
    members[name] = data
    with zipfile.ZipFile(pt2, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)


BREAKAGES = {
    "missing report": lambda run: (run / "report.json").unlink(),
    "garbled report": lambda run: (run / "report.json").write_text("{not json"),
    "report without input": lambda run: (run / "report.json").write_text(json.dumps({"name": "x"})),
    "missing model": lambda run: (run / "model.pt2").unlink(),
    "model not a zip": lambda run: (run / "model.pt2").write_bytes(b"\x80\x04garbage" * 100),
    "model truncated": lambda run: (run / "model.pt2").write_bytes((run / "model.pt2").read_bytes()[:5000]),
    "zip but not pt2": lambda run: zipfile.ZipFile(run / "model.pt2", "w").writestr("hello.txt", "hi"),
    "corrupt test.npz": lambda run: (run / "test.npz").write_bytes(b"PK\x03\x04 broken"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_corrupt_run_is_refused(trained_run, tmp_path, capsys, breakage):
    run = copy_run(trained_run, tmp_path)
    BREAKAGES[breakage](run)
    code, err = export_main([run, "--out", tmp_path / "dist" / "b", "--formats", "onnx"], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not (tmp_path / "dist").exists()


def test_pickled_code_in_model_is_never_run(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path)
    marker = tmp_path / "pwned"
    # torch.export.load would retry this member with weights_only=False and run the payload.
    rewrite_member(run / "model.pt2", "data/sample_inputs/model.pt", evil_pickle(marker))
    code, err = export_main([run, "--out", tmp_path / "dist" / "b"], capsys)
    assert code == 2 and len(err) == 1 and "refusing to unpickle" in err[0]
    assert not marker.exists()
    assert not (tmp_path / "dist").exists()


def test_missing_run_and_unknown_format(trained_run, tmp_path, capsys):
    code, err = export_main([tmp_path / "nope", "--out", tmp_path / "dist" / "b"], capsys)
    assert code == 2 and len(err) == 1 and "does not exist" in err[0]
    code, err = export_main([trained_run, "--out", tmp_path / "dist" / "b", "--formats", "onnx,coreml"], capsys)
    assert code == 2 and len(err) == 1 and "coreml" in err[0]
    assert not (tmp_path / "dist").exists()


def test_missing_calibration_data(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path)
    (run / "calib.npz").unlink()
    code, err = export_main([run, "--out", tmp_path / "dist" / "b", "--formats", "onnx,tflite-int8"], capsys)
    assert code == 2 and len(err) == 1 and "calib" in err[0]
    assert not (tmp_path / "dist").exists()


def test_data_dir_replaces_missing_images(trained_run, small_cifar_dir, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path)
    (run / "calib.npz").unlink()
    (run / "test.npz").unlink()
    out = tmp_path / "dist" / "b"
    code, _ = export_main([run, "--out", out, "--formats", "onnx", "--data-dir", small_cifar_dir], capsys)
    assert code == 0
    art = manifest_of(out)["artifacts"]["onnx"]
    assert art["eval_images"] == 500 and art["max_abs_diff"] <= 1e-4


def test_existing_output_untouched_without_force_replaced_with_force(trained_run, tmp_path, capsys):
    out = tmp_path / "dist" / "b"
    out.mkdir(parents=True)
    (out / "mine.txt").write_text("keep me")
    tar = out.parent / "b.tar.gz"
    tar.write_bytes(b"old tar")
    code, err = export_main([trained_run, "--out", out, "--formats", "onnx"], capsys)
    assert code == 2 and len(err) == 1 and "--force" in err[0]
    assert (out / "mine.txt").read_text() == "keep me" and tar.read_bytes() == b"old tar"

    code, _ = export_main([trained_run, "--out", out, "--formats", "onnx", "--force"], capsys)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "samples.npz"]
    assert tarfile.is_tarfile(tar)
    assert sorted(p.name for p in out.parent.iterdir()) == ["b", "b.tar.gz"]


def test_failed_export_keeps_the_old_bundle(trained_run, tmp_path, capsys):
    """--force with a run that turns out to be broken: the old bundle stays, no partial folder is left."""
    run = copy_run(trained_run, tmp_path)
    out = tmp_path / "dist" / "b"
    out.mkdir(parents=True)
    (out / "mine.txt").write_text("keep me")
    rewrite_member(run / "model.pt2", "models/model.json", b'{"broken": true}')
    code, err = export_main([run, "--out", out, "--formats", "onnx", "--force"], capsys)
    assert code == 2 and len(err) == 1
    assert (out / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.parent.iterdir()) == ["b"]


def test_cli_subprocess_error_is_one_line(trained_run, tmp_path, python_exe, repo_root):
    proc = subprocess.run([python_exe, "-m", "export", str(trained_run), "--out", str(tmp_path / "b"),
                           "--formats", "tflite-fp16"], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "tflite-fp16" in proc.stderr


# ---------------------------------------------------------------- the checks fail loudly

def test_parity_and_strict_int8_failures(trained_run, tmp_path):
    from export.errors import ExportError
    from export.pipeline import Options, build_bundle
    from export.run import open_run

    run = open_run(trained_run)
    for n, options in enumerate([Options(formats=["onnx"], max_abs_diff=-1.0),  # impossible: always exceeded
                                 Options(formats=["onnx-int8"], max_int8_drop=-1.0, strict=True)]):
        folder = tmp_path / f"f{n}"
        folder.mkdir()
        with pytest.raises(ExportError):
            build_bundle(run, folder, options, tmp_path)
    # Without --strict an int8 miss is recorded, not fatal.
    folder = tmp_path / "lenient"
    folder.mkdir()
    manifest = build_bundle(run, folder, Options(formats=["onnx-int8"], max_int8_drop=-1.0), tmp_path)
    assert [c["passed"] for c in manifest["checks"] if "limit" in c] == [False]


# ---------------------------------------------------------------- channel-last rewrite

def test_flatten_of_feature_map_converts_without_transpose(tmp_path):
    """A classifier that flattens a 4x4 map: plain conversion needs a TRANSPOSE, the rewrite does not,
    and the TFLite logits still match torch."""
    import litert_torch
    import torch
    from torch import nn

    from export.layout import flatten_channels_last

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 7, 3, padding=1), nn.ReLU(), nn.MaxPool2d(8), nn.Flatten(),
                          nn.Linear(7 * 4 * 4, 10)).eval()
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("b", min=1, max=64)},))
    nhwc = x.permute(0, 2, 3, 1).contiguous()
    ops = {}
    for rewrite in (False, True):
        module = program.module()
        if rewrite:
            assert flatten_channels_last(module) == 1
        file = tmp_path / f"m{rewrite}.tflite"
        litert_torch.convert(litert_torch.to_channel_last_io(module, args=[0]), (nhwc[:1],)).export(str(file))
        ops[rewrite] = [op["op_name"] for op in tflite_graph(file)[1]]
        with torch.no_grad():
            np.testing.assert_allclose(run_tflite(file, nhwc.numpy()), model(x).numpy(), atol=1e-5)
    assert "TRANSPOSE" in ops[False] and "TRANSPOSE" not in ops[True]


def test_export_runs_no_interpreter_of_its_own():
    """One implementation: export measures through runtime and has no interpreter, preprocessing or
    quantisation code of its own (a copy would let the manifest's numbers drift from the board's)."""
    root = Path(__file__).resolve().parents[1] / "export"
    forbidden = ("Interpreter(", "InferenceSession(", "ai_edge_litert", "tflite_runtime", "np.rint", "np.round",
                 ".mean, np.float32", "def quantize", "def dequantize")
    found = [(f.name, word) for f in sorted(root.glob("*.py")) for word in forbidden if word in f.read_text()]
    assert found == []


def test_onnx_int8_falls_back_to_histogram_calibration(trained_run, tmp_path, monkeypatch):
    """When MinMax loses too much on the calibration images, Percentile and Entropy are tried and the
    best on the calibration images is kept (forced here with an impossible tolerance)."""

    from export import formats
    from export.run import open_run

    monkeypatch.setattr(formats, "INT8_MAX_CALIB_DROP", -1.0)
    run = open_run(trained_run)
    ctx = formats.Context(run=run, program=run.load_program()[0],
                          calib_x=run.calib.x[:256], calib_y=run.calib.y[:256], scratch=tmp_path)
    info = formats.build_onnx_int8(ctx, tmp_path / "q.onnx")["calibration"]
    assert set(info["calib_top1"]) == {"minmax", "percentile", "entropy"}
    assert info["calib_top1"][info["method"]] == max(info["calib_top1"].values())
    _, y, x, _ = reference(trained_run)
    report = json.loads((trained_run / "report.json").read_text())
    assert float((run_onnx(tmp_path / "q.onnx", normalise(x, report)).argmax(1) == y).mean()) > 0.3


@pytest.mark.slow
def test_residual_depthwise_model_is_full_integer(small_cifar_dir, tmp_path, capsys):
    """Depthwise conv, ReLU6, and a residual add closed by a ReLU module: the TFLite formats export, and
    the add is int8 (a program re-exported from model.pt2 loses what PT2E needs to find it)."""
    from tests.run_fixture import write_trained_run

    run = write_trained_run(tmp_path / "res", small_cifar_dir / "cifar10.npz", arch="residual", epochs=3,
                            n_calib=128, name="tiny-residual")
    out = tmp_path / "dist" / "res"
    code, err = export_main([run, "--out", out, "--formats", "tflite,tflite-int8"], capsys)
    assert code == 0, err
    ref_logits, y, x, convs = reference(run)
    assert convs == [[11, 3, 3, 3], [11, 1, 3, 3], [11, 11, 1, 1]]
    for fmt in ("tflite", "tflite-int8"):
        _, ops, tensors = tflite_graph(out / FILES[fmt])
        names = [op["op_name"] for op in ops]
        assert "TRANSPOSE" not in names and "DEPTHWISE_CONV_2D" in names and "ADD" in names
    _, ops, tensors = tflite_graph(out / FILES["tflite-int8"])
    assert {np.dtype(t["dtype"]).name for t in tensors.values()} <= {"int8", "int32"}
    assert "DEQUANTIZE" not in [op["op_name"] for op in ops]
    report = json.loads((run / "report.json").read_text())
    assert np.abs(logits_of(out, "tflite", normalise(x[:64], report)) - ref_logits[:64]).max() <= 1e-4
    for art in manifest_of(out)["artifacts"].values():
        assert art["eval_images"] == 500 and art["top1"] > 0.18  # 3 short epochs; chance is 0.10
