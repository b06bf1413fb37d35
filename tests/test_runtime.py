"""runtime/: load a real exported bundle (conftest `bundle_dir`: all four formats from a small
trained CNN) and run it with each installed backend, against the torch model it came from.

The torch reference is the run's own model.pt2; the runtime never imports torch (checked in a
subprocess). Bad bundles are real bundles copied and then damaged.
"""
from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime import BundleError, InputError, load
from runtime.backends import installed_backends
from runtime.images import read_png
from runtime.model import quantize

REPO = Path(runtime.__file__).resolve().parents[1]  # the checkout whose runtime/ is tested
FP32 = ("tflite", "onnx")


def runnable(fmt: str) -> list:
    """The installed backends that run `fmt`."""
    kind = "tflite" if fmt.startswith("tflite") else "onnx"
    return [b for b in installed_backends() if (b == "onnxruntime") == (kind == "onnx")]


PAIRS = [(f, b) for f in runtime.FORMATS for b in runnable(f)]


def cli(python_exe, *args, cwd=REPO, env=None, timeout=300):
    return subprocess.run([python_exe, "-m", "runtime", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, code=2, contains=""):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert contains.lower() in err[0].lower(), err[0]
    return err[0]


@pytest.fixture(scope="module")
def test_images(trained_run):
    with np.load(trained_run / "test.npz", allow_pickle=False) as z:
        return z["x"], z["y"].astype(np.int64)


@pytest.fixture(scope="module")
def torch_logits(trained_run, test_images):
    """The trained torch model's logits on the run's test images (tests may import torch)."""
    import torch

    from tests.run_fixture import normalise

    net = torch.export.load(str(trained_run / "model.pt2")).module()
    with torch.no_grad():
        return np.concatenate([net(normalise(test_images[0][i:i + 250])).numpy()
                               for i in range(0, len(test_images[0]), 250)])


@pytest.fixture()
def bundle_copy(bundle_dir, tmp_path):
    """A private copy of the bundle a test may damage."""
    dst = tmp_path / bundle_dir.name
    shutil.copytree(bundle_dir, dst)
    return dst


def edit_manifest(bundle: Path, change) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    change(m)
    (bundle / "manifest.json").write_text(json.dumps(m))


# --------------------------------------------------------------------------- against torch

@pytest.mark.parametrize("fmt,backend", PAIRS)
def test_predictions_match_the_torch_model(bundle_dir, test_images, torch_logits, fmt, backend):
    x, y = test_images
    model = load(bundle_dir, format=fmt, backend=backend, threads=1)
    assert (model.format, model.backend) == (fmt, backend) and model.backend_version
    probs = model.predict(x)
    assert probs.dtype == np.float32 and probs.shape == (len(x), len(model.classes))
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    agree = float((probs.argmax(1) == torch_logits.argmax(1)).mean())
    if fmt in FP32:
        assert agree >= 0.99, agree
        np.testing.assert_allclose(model.logits(x), torch_logits, atol=1e-4 * max(1.0, np.abs(torch_logits).max()))
    else:  # int8 changes logits by design; the decisions must still mostly agree
        assert agree >= 0.9, agree


@pytest.mark.parametrize("fmt", runtime.FORMATS)
def test_manifest_top1_is_what_the_runtime_gives(bundle_dir, test_images, fmt):
    """export measures every format through the runtime, so loading the artifact with the
    interpreter and threads it recorded and predicting the same test images gives the manifest's
    top-1 exactly: not within a tolerance, to the image."""
    x, y = test_images
    art = json.loads((bundle_dir / "manifest.json").read_text())["artifacts"][fmt]
    used = art["measured_with"]
    if used["backend"] not in runnable(fmt):
        pytest.skip(f"{used['backend']} (which export measured {fmt} with) is not installed here")
    model = load(bundle_dir, format=fmt, backend=used["backend"], threads=used["threads"])
    assert model.backend_version == used["backend_version"]
    assert art["eval_images"] == len(x)
    correct = int((model.predict(x).argmax(1) == y).sum())
    assert correct == round(art["top1"] * len(x)) and correct / len(x) == art["top1"]


def test_preprocess_is_the_training_normalisation(bundle_dir, test_images):
    import torch  # noqa: F401  (the reference below is torch code)

    from tests.run_fixture import normalise

    x = test_images[0][:5]
    ref = normalise(x).numpy()
    onnx = load(bundle_dir, format="onnx", threads=1)
    np.testing.assert_allclose(onnx.preprocess(x), ref, atol=1e-6)
    tfl = load(bundle_dir, format="tflite", threads=1)
    np.testing.assert_allclose(tfl.preprocess(x), ref.transpose(0, 2, 3, 1), atol=1e-6)
    q = load(bundle_dir, format="tflite-int8", threads=1)
    spec = q.manifest["artifacts"]["tflite-int8"]["input"]["quantization"]
    xq = q.preprocess(x)
    assert xq.dtype == np.int8 and xq.shape == (5, 32, 32, 3)
    expect = np.clip(np.rint(ref.transpose(0, 2, 3, 1) / spec["scale"]) + spec["zero_point"], -128, 127)
    assert np.abs(xq.astype(int) - expect).max() <= 1  # float32 vs float64 division at .5 ties only
    # a single HWC image is a batch of one
    assert onnx.preprocess(x[0]).shape == (1, 3, 32, 32)


def test_quantize_rounds_half_to_even_and_clips():
    scale = 0.5
    x = np.array([0.25, 0.75, 1.25, -0.25, -0.75, 100.0, -100.0], np.float32)  # /0.5 = .5, 1.5, 2.5, ...
    np.testing.assert_array_equal(quantize(x, scale, 0, np.int8), [0, 2, 2, 0, -2, 127, -128])
    np.testing.assert_array_equal(quantize(x, scale, 10, np.int8), [10, 12, 12, 10, 8, 127, -128])  # -190 clips
    assert quantize(x, scale, 0, np.uint8).dtype == np.uint8


def test_run_is_one_raw_invoke(bundle_dir, test_images):
    x = test_images[0][:4]
    q = load(bundle_dir, format="tflite-int8", threads=1)
    assert q.fixed_batch == 1  # exported with batch 1: predict loops, run takes one image
    raw = q.run(q.preprocess(x[:1]))
    assert raw.dtype == np.int8 and raw.shape == (1, 10)
    np.testing.assert_allclose(runtime.softmax(q.dequantize(raw)), q.predict(x[:1]), atol=1e-6)
    with pytest.raises(InputError, match="batch of exactly 1"):
        q.run(q.preprocess(x))
    with pytest.raises(InputError, match="int8"):
        q.run(np.zeros((1, 32, 32, 3), np.float32))
    onnx = load(bundle_dir, format="onnx", threads=1)
    assert onnx.fixed_batch is None and onnx.run(onnx.preprocess(x)).shape == (4, 10)
    with pytest.raises(InputError, match="shaped"):
        onnx.run(np.zeros((1, 32, 32, 3), np.float32))  # NHWC into an NCHW model
    bad = onnx.preprocess(x[:1])
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        onnx.run(bad)


@pytest.mark.parametrize("fmt", runtime.FORMATS)
def test_file_specs_write_what_read_bundle_reads(bundle_dir, fmt):
    """export writes each artifact's input/output from file_specs (what the interpreter reports)
    and the preprocess block from Preprocess.as_manifest; read_bundle parses both back unchanged."""
    from runtime.bundle import read_bundle
    from runtime.model import file_specs

    if not runnable(fmt):
        pytest.skip(f"no backend for {fmt} here")
    bundle = read_bundle(bundle_dir)
    art = bundle.artifacts[fmt]
    inp, out = file_specs(art.path, fmt)
    assert (inp, out) == (art.input, art.output)
    assert inp.as_manifest() == art.info["input"] and out.as_manifest() == art.info["output"]
    assert bundle.preprocess.as_manifest() == bundle.manifest["preprocess"]


def test_load_says_where_its_time_went(bundle_dir):
    import time

    started = time.perf_counter()
    model = load(bundle_dir, format="tflite", threads=1)
    wall = time.perf_counter() - started
    parts = model.load_seconds
    assert set(parts) == {"bundle", "backend_import", "interpreter"}
    assert all(v >= 0 for v in parts.values()) and sum(parts.values()) <= wall


@pytest.mark.parametrize("fmt", ["tflite", "tflite-int8", "onnx"])
def test_a_batch_equals_one_image_at_a_time(bundle_dir, test_images, fmt):
    model = load(bundle_dir, format=fmt, threads=1)
    x = test_images[0][:7]
    one_by_one = np.concatenate([model.predict(im) for im in x])
    np.testing.assert_allclose(model.predict(x, batch_size=3), one_by_one, atol=1e-6)


def test_classify_takes_arrays_png_and_npy(bundle_dir, test_images, tmp_path):
    from PIL import Image

    x = test_images[0]
    model = load(bundle_dir, format="onnx", threads=1)
    Image.fromarray(x[3]).save(tmp_path / "a.png")
    np.save(tmp_path / "a.npy", x[3])
    label, p = model.classify(x[3])
    assert label in model.classes and 0 < p <= 1
    assert model.classify(tmp_path / "a.png") == (label, p)
    assert model.classify(str(tmp_path / "a.npy")) == (label, p)
    np.testing.assert_array_equal(model.predict([tmp_path / "a.png", x[4]]), model.predict(x[3:5]))
    with pytest.raises(InputError, match="one image"):
        model.classify(x[:2])


# --------------------------------------------------------------------------- concurrency

@pytest.mark.parametrize("fmt,backend", PAIRS)
def test_predict_from_8_threads_equals_serial(bundle_dir, test_images, fmt, backend):
    """8 threads x 1,000 predict calls on one Model give exactly the serial results (TFLite: one
    interpreter behind a lock; onnxruntime: concurrent session.run)."""
    model = load(bundle_dir, format=fmt, backend=backend, threads=1)
    images = test_images[0][:64]
    serial = np.stack([model.predict(im)[0] for im in images])
    results = np.zeros((8, 1000, serial.shape[1]), np.float32)
    errors = []
    start = threading.Barrier(8)

    def worker(t):
        try:
            start.wait()
            for i in range(1000):
                results[t, i] = model.predict(images[(7 * t + i) % 64])[0]
        except Exception as e:  # surfaced below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:3]
    expect = np.stack([serial[(7 * t + np.arange(1000)) % 64] for t in range(8)])
    np.testing.assert_array_equal(results, expect)


# --------------------------------------------------------------------------- bad bundles

def test_checksum_mismatch_is_refused(bundle_copy, python_exe):
    f = bundle_copy / "model_int8.tflite"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        load(bundle_copy, format="tflite-int8")
    load(bundle_copy, format="onnx")  # the other files are still fine
    assert_one_line_error(cli(python_exe, "predict", bundle_copy, "x.png", "--format", "tflite-int8"),
                          contains="sha256")
    proc = cli(python_exe, "verify", bundle_copy, "--threads", "1")
    assert proc.returncode == 1 and "FAILED" in proc.stdout and "sha256 mismatch" in proc.stdout
    (bundle_copy / "samples.npz").write_bytes(b"damaged")
    proc = cli(python_exe, "verify", bundle_copy, "--threads", "1")
    assert proc.returncode == 1 and "samples.npz" in proc.stdout and "not run" in proc.stdout, proc.stdout


def test_truncated_model_is_refused_even_with_matching_checksum(bundle_copy):
    import hashlib

    for fmt, name in (("tflite", "model.tflite"), ("onnx", "model.onnx")):
        if not runnable(fmt):  # (when this file runs in a device venv with one backend)
            continue
        f = bundle_copy / name
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
        with pytest.raises(BundleError, match="bytes"):  # the manifest's size catches it first
            load(bundle_copy, format=fmt)

        def fix(m, fmt=fmt, f=f):  # a manifest rewritten to match: the interpreter must refuse it
            m["artifacts"][fmt].update(sha256=hashlib.sha256(f.read_bytes()).hexdigest(), bytes=f.stat().st_size)

        edit_manifest(bundle_copy, fix)
        with pytest.raises(BundleError, match="not a model"):
            load(bundle_copy, format=fmt)


@pytest.mark.parametrize("name", ["model.tflite", "model_int8.tflite"])
def test_every_truncation_of_a_tflite_file_is_caught_before_the_interpreter(bundle_dir, name):
    """tflite-runtime segfaults on a truncated flatbuffer; the structure check must refuse them all."""
    from runtime.backends import check_tflite_structure

    data = (bundle_dir / name).read_bytes()
    check_tflite_structure(data)
    for cut in range(0, len(data), max(1, len(data) // 500)):
        with pytest.raises(ValueError):
            check_tflite_structure(data[:cut])
    with pytest.raises(ValueError, match="TFL3"):
        check_tflite_structure((bundle_dir / "model.onnx").read_bytes())


@pytest.mark.parametrize("change,match", [
    (lambda m: m.pop("preprocess"), "missing field preprocess"),
    (lambda m: m["preprocess"].pop("mean"), "preprocess.mean"),
    (lambda m: m["artifacts"]["onnx"].pop("sha256"), "artifacts.onnx.sha256"),
    (lambda m: m["artifacts"]["onnx"]["input"].update(layout="NHWC"), "layout"),
    (lambda m: m["artifacts"]["onnx"].update(file="../model.onnx"), "inside the bundle"),
    (lambda m: m.update(schema_version=2), "schema_version 2"),
    (lambda m: m["preprocess"].update(std=[0.2, 0.0, 0.2]), "std"),
    (lambda m: m["preprocess"].update(height=64), "does not match preprocess"),
    (lambda m: m.update(classes=["a", "b"]), "classes"),
    (lambda m: m["artifacts"]["tflite-int8"]["input"]["quantization"].update(zero_point=99), "quantisation"),
])
def test_bad_manifest_is_one_clear_error(bundle_copy, python_exe, change, match):
    edit_manifest(bundle_copy, change)
    fmt = "tflite-int8" if "quantisation" in match else "onnx"
    with pytest.raises(BundleError, match=match):
        load(bundle_copy, format=fmt)
    line = assert_one_line_error(cli(python_exe, "predict", bundle_copy, "x.png", "--format", fmt))
    assert re.search(match, line), line


def test_unknown_format_backend_and_missing_bundle(bundle_dir, tmp_path, python_exe):
    with pytest.raises(BundleError, match="unknown format"):
        load(bundle_dir, format="tflite-fp16")
    with pytest.raises(BundleError, match="cannot run"):
        load(bundle_dir, format="onnx", backend="ai-edge-litert")
    with pytest.raises(BundleError, match="no manifest.json"):
        load(tmp_path)
    with pytest.raises(BundleError, match="does not exist"):
        load(tmp_path / "nope")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load(tmp_path)
    archive = bundle_dir.parent / (bundle_dir.name + ".tar.gz")
    if archive.is_file():
        with pytest.raises(BundleError, match="extract it first"):
            load(archive)
    if "tflite-runtime" not in installed_backends():
        with pytest.raises(BundleError, match="pip install"):
            load(bundle_dir, format="tflite", backend="tflite-runtime")
    assert cli(python_exe, "verify", bundle_dir, "--format", "tflite-fp16").returncode == 2  # argparse
    assert_one_line_error(cli(python_exe, "info", tmp_path / "nope"), contains="does not exist")


# --------------------------------------------------------------------------- bad images

@pytest.mark.parametrize("make,match", [
    (lambda x: x[0, :16], "the model takes 32x32"),
    (lambda x: x[0, ..., 0], "must be an HxWx3"),
    (lambda x: np.concatenate([x[0], x[0, ..., :1]], axis=2), "4 channels"),
    (lambda x: x[0].transpose(2, 0, 1), "channels-first"),
    (lambda x: x[0].astype(np.float32) / 255, "must be uint8"),
    (lambda x: np.full((32, 32, 3), np.nan, np.float32), "NaN"),
    (lambda x: np.full((32, 32, 3), np.inf, np.float64), "NaN or Inf"),
    (lambda x: x[0].astype(np.int64), "astype"),
    (lambda x: x[:0], "empty"),
    (lambda x: x[0].tolist(), "numpy array"),
    (lambda x: "no-such-file.png", "no such file"),
])
def test_bad_images_are_one_clear_error(bundle_dir, test_images, make, match):
    model = load(bundle_dir, format="onnx", threads=1)
    with pytest.raises(InputError, match=match):
        model.predict(make(test_images[0]))


def test_resize_only_when_asked(bundle_dir, test_images):
    big = np.repeat(np.repeat(test_images[0][:2], 2, axis=1), 2, axis=2)  # 64x64
    with pytest.raises(InputError, match="resize=True"):
        load(bundle_dir, format="onnx", threads=1).predict(big)
    model = load(bundle_dir, format="onnx", threads=1, resize=True)
    seen = model.images(big)
    assert seen.shape == (2, 32, 32, 3) and seen.dtype == np.uint8
    # upsampling by 2 and resizing back (bilinear) lands near the original pixels
    assert np.abs(seen.astype(int) - test_images[0][:2]).mean() < 8  # (unrelated images: ~60)
    np.testing.assert_array_equal(model.predict(big), load(bundle_dir, format="onnx", threads=1).predict(seen))


def _png(pixels: np.ndarray, color: int, filters: list, palette: bytes = b"") -> bytes:
    """A PNG with the given per-row filter types (so the decoder's every filter is exercised)."""
    h, w = pixels.shape[:2]
    flat = pixels.reshape(h, -1).astype(np.int32)
    bpp = pixels.shape[2] if pixels.ndim == 3 else 1
    rows = []
    for y in range(h):
        kind = filters[y % len(filters)]
        cur, up = flat[y], flat[y - 1] if y else np.zeros_like(flat[0])
        left = np.concatenate([np.zeros(bpp, np.int32), cur[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), up[:-bpp]])
        if kind == 4:
            p = left + up - upleft
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        else:
            pred = [np.zeros_like(cur), left, up, (left + up) // 2][kind]
        rows.append(bytes([kind]) + ((cur - pred) % 256).astype(np.uint8).tobytes())

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
            + (chunk(b"PLTE", palette) if palette else b"")
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


@pytest.mark.parametrize("color,channels", [(2, 3), (6, 4), (0, 1), (4, 2), (3, 1)])
def test_png_decoder_without_pillow_matches_pillow(tmp_path, color, channels):
    from PIL import Image

    rng = np.random.default_rng(color)
    pixels = rng.integers(0, 256 if color != 3 else 16, (9, 7, channels), dtype=np.uint8).squeeze()
    palette = rng.integers(0, 256, 16 * 3, dtype=np.uint8).tobytes() if color == 3 else b""
    f = tmp_path / "t.png"
    f.write_bytes(_png(pixels, color, filters=[0, 1, 2, 3, 4], palette=palette))
    ours = read_png(f)
    with Image.open(f) as im:
        np.testing.assert_array_equal(ours, np.asarray(im.convert("RGB")))
    assert ours.shape == (9, 7, 3) and ours.dtype == np.uint8


# --------------------------------------------------------------------------- CLI

def test_cli_verify_info_predict(bundle_dir, test_images, tmp_path, python_exe):
    proc = cli(python_exe, "verify", bundle_dir, "--threads", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for fmt in runtime.FORMATS:
        assert any(line.startswith(fmt + " ") and "PASS" in line for line in proc.stdout.splitlines()), proc.stdout
    report = json.loads(cli(python_exe, "verify", bundle_dir, "--format", "onnx", "--json").stdout)
    assert report["ok"] and [f["format"] for f in report["formats"]] == ["onnx"]
    assert report["formats"][0]["max_abs_diff"] <= report["formats"][0]["tolerance"]

    info = cli(python_exe, "info", bundle_dir)
    assert info.returncode == 0 and "tflite-int8" in info.stdout and "backends here" in info.stdout

    from PIL import Image

    x = test_images[0]
    Image.fromarray(x[0]).save(tmp_path / "cat.png")
    np.save(tmp_path / "two.npy", x[1:3])
    proc = cli(python_exe, "predict", bundle_dir, tmp_path / "cat.png", tmp_path / "two.npy",
               "--format", "tflite", "--top", "2", "--json", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    model = load(bundle_dir, format="tflite", threads=1)
    probs = model.predict(x[:3])
    assert [p["file"] for p in out["predictions"]] == [str(tmp_path / "cat.png"), f"{tmp_path / 'two.npy'}[0]",
                                                        f"{tmp_path / 'two.npy'}[1]"]
    for row, p in zip(out["predictions"], probs):
        assert [t["label"] for t in row["top"]] == [model.classes[k] for k in np.argsort(-p)[:2]]
    text = cli(python_exe, "predict", bundle_dir, tmp_path / "cat.png", "--threads", "1")
    assert text.returncode == 0 and model.classify(x[0])[0] in text.stdout

    np.save(tmp_path / "float.npy", x[0].astype(np.float32))
    assert_one_line_error(cli(python_exe, "predict", bundle_dir, tmp_path / "float.npy"), contains="uint8")
    Image.fromarray(x[0]).resize((40, 30)).save(tmp_path / "small.png")
    assert_one_line_error(cli(python_exe, "predict", bundle_dir, tmp_path / "small.png"), contains="32x32")
    assert cli(python_exe, "predict", bundle_dir, tmp_path / "small.png", "--resize").returncode == 0
    (tmp_path / "junk.png").write_bytes(b"not an image")
    assert_one_line_error(cli(python_exe, "predict", bundle_dir, tmp_path / "junk.png"), contains="image")


def test_verify_fails_when_the_model_is_not_the_exported_one(bundle_copy, python_exe):
    """A consistent bundle whose stored torch logits are not this model's: verify exits 1."""
    import io

    with np.load(bundle_copy / "samples.npz", allow_pickle=False) as z:
        x, y, logits = z["x"], z["y"], z["logits"]
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y, logits=logits[::-1].copy())  # another model's answers
    (bundle_copy / "samples.npz").write_bytes(buf.getvalue())
    import hashlib

    edit_manifest(bundle_copy, lambda m: m["samples"].update(sha256=hashlib.sha256(buf.getvalue()).hexdigest()))
    proc = cli(python_exe, "verify", bundle_copy, "--threads", "1")
    assert proc.returncode == 1 and "FAIL" in proc.stdout
    assert "logits differ from torch" in proc.stdout and "top-1 agrees with torch" in proc.stdout


# --------------------------------------------------------------------------- environments

def test_runtime_never_imports_torch_or_the_other_packages(bundle_dir, python_exe):
    code = (
        "import sys, numpy as np, runtime\n"
        f"b = {str(bundle_dir)!r}\n"
        "for f in runtime.FORMATS:\n"
        "    m = runtime.load(b, format=f, threads=1)\n"
        "    m.predict(np.zeros((2, 32, 32, 3), np.uint8))\n"
        "bad = [m for m in ('torch', 'torchvision', 'compress', 'export', 'device_bench', 'tensorflow',\n"
        "                   'litert_torch', 'onnx') if m in sys.modules]\n"
        "print('IMPORTED', bad)\n"
    )
    proc = subprocess.run([python_exe, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "IMPORTED []" in proc.stdout, proc.stdout


def _bare_env(tmp_path: Path, packages: list) -> Path:
    """A site dir holding only numpy, the runtime and the named packages (symlinks into this venv):
    what a board with `pip install` of just those would import."""
    import numpy

    site = Path(numpy.__file__).resolve().parents[1]
    env = tmp_path / "site"
    env.mkdir()
    for name in ["numpy", "numpy.libs", *packages]:
        if (site / name).exists():
            (env / name).symlink_to(site / name)
    (env / "runtime").symlink_to(REPO / "runtime")
    return env


def test_board_with_only_numpy_and_litert(bundle_dir, tmp_path, python_exe):
    """No torch, no Pillow, no onnxruntime: predict a PNG with LiteRT, and the onnx format's
    error says which pip command fixes it."""
    from PIL import Image

    env = _bare_env(tmp_path, ["ai_edge_litert"])
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(tmp_path / "grey.png")
    run_env = {"PYTHONPATH": str(env), "PATH": "/usr/bin:/bin"}
    # -S: no site-packages at all, only PYTHONPATH; cwd outside the repo
    base = [python_exe, "-S", "-m", "runtime"]
    proc = subprocess.run([*base, "predict", str(bundle_dir), str(tmp_path / "grey.png"), "--threads", "1"],
                          cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "grey.png" in proc.stdout, proc.stderr
    proc = subprocess.run([*base, "predict", str(bundle_dir), str(tmp_path / "grey.png"), "--format", "onnx"],
                          cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc, contains='pip install "./runtime[onnx]"')
    proc = subprocess.run([*base, "verify", str(bundle_dir), "--threads", "1"],
                          cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "skipped" in proc.stdout, proc.stdout + proc.stderr


def test_no_interpreter_installed_says_what_to_install(bundle_dir, tmp_path, python_exe):
    env = _bare_env(tmp_path, [])
    proc = subprocess.run([python_exe, "-S", "-m", "runtime", "predict", str(bundle_dir), "x.png"],
                          cwd=tmp_path, env={"PYTHONPATH": str(env), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc, contains='pip install "./runtime[litert]"')


@pytest.mark.skipif("tflite-runtime" not in installed_backends(), reason="tflite_runtime is not importable here")
@pytest.mark.parametrize("fmt", ["tflite", "tflite-int8"])
def test_tflite_runtime_backend(bundle_dir, test_images, fmt):
    """The older tflite-runtime wheel (numpy<2 boards). No torch here, so this runs in a device
    venv too: the reference is the torch logits stored in samples.npz and LiteRT if installed."""
    from runtime.bundle import read_bundle, read_samples

    samples = read_samples(read_bundle(bundle_dir))
    model = load(bundle_dir, format=fmt, backend="tflite-runtime", threads=1)
    assert model.backend == "tflite-runtime" and model.backend_version
    logits = model.logits(samples.x)
    agree = (logits.argmax(1) == samples.logits.argmax(1)).mean()
    if fmt == "tflite":
        assert agree >= 0.99
        np.testing.assert_allclose(logits, samples.logits, atol=1e-4 * max(1.0, np.abs(samples.logits).max()))
    else:
        assert agree >= 0.9
    if "ai-edge-litert" in installed_backends():
        other = load(bundle_dir, format=fmt, backend="ai-edge-litert", threads=1)
        x = test_images[0]
        np.testing.assert_allclose(model.predict(x), other.predict(x), atol=1e-5)


# --------------------------------------------------------------------------- dynamic-batch TFLite

@pytest.fixture(scope="module")
def dynamic_tflite_bundle(tmp_path_factory, test_images):
    """A one-format bundle whose TFLite model has a dynamic batch (-1), converted here with
    litert-torch (export writes batch-1 models, but a user's own converter may not)."""
    import hashlib

    import litert_torch
    import torch

    from tests.run_fixture import MEAN, SCALE, STD, normalise

    class MeanPoolNet(torch.nn.Module):  # global mean, not AdaptiveAvgPool: converts with a dynamic batch
        def __init__(self):
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))

    torch.manual_seed(0)
    net = MeanPoolNet().eval()
    out = tmp_path_factory.mktemp("dyn") / "dyn"
    out.mkdir()
    batch = torch.export.Dim("batch", min=1, max=256)
    litert_torch.convert(litert_torch.to_channel_last_io(net, args=[0]), (torch.zeros(2, 32, 32, 3),),
                         dynamic_shapes=(({0: batch},),)).export(str(out / "model.tflite"))
    x = test_images[0][:64]
    with torch.no_grad():
        logits = net(normalise(x)).numpy()
    np.savez(out / "samples.npz", x=x, y=test_images[1][:64], logits=logits)
    data = (out / "model.tflite").read_bytes()
    manifest = {
        "schema_version": 1, "name": "dyn", "classes": [f"c{i}" for i in range(10)],
        "preprocess": {"scale": SCALE, "mean": list(MEAN), "std": list(STD), "color": "RGB", "height": 32, "width": 32},
        "artifacts": {"tflite": {
            "file": "model.tflite", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
            "input": {"name": "x", "shape": [-1, 32, 32, 3], "layout": "NHWC", "dtype": "float32"},
            "output": {"name": "y", "shape": [-1, 10], "dtype": "float32", "kind": "logits"}}},
        "samples": {"file": "samples.npz", "sha256": hashlib.sha256((out / "samples.npz").read_bytes()).hexdigest(),
                    "count": 64},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out, logits


def test_dynamic_batch_tflite_resizes_instead_of_looping(dynamic_tflite_bundle, test_images):
    bundle, torch_logits = dynamic_tflite_bundle
    model = load(bundle, threads=1)
    assert model.format == "tflite" and model.fixed_batch is None and model.input_shape[0] == -1
    x = test_images[0][:64]
    assert model.run(model.preprocess(x[:5])).shape == (5, 10)  # one invoke, 5 images
    np.testing.assert_allclose(model.logits(x, batch_size=13), torch_logits, atol=1e-4)
    # alternating batch sizes from several threads: every caller gets its own images' answers
    expect = model.predict(x, batch_size=64)
    errors = []

    def worker(size):
        try:
            for _ in range(20):
                for i in range(0, 64, size):
                    np.testing.assert_allclose(model.predict(x[i:i + size]), expect[i:i + size], atol=1e-6)
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(s,)) for s in (1, 3, 8, 64)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:2]
    assert cli(sys.executable, "verify", bundle, "--threads", "1").returncode == 0
