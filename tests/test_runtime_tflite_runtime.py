"""The runtime on a board that has the older tflite-runtime wheel (numpy<2) and nothing else.

The host venv cannot hold tflite-runtime (it needs numpy 1.x; the host has numpy 2), so this
builds a second, real venv beside the repo with the board's install command,
`pip install "./runtime[tflite-runtime]"` (the edgeslim-runtime distribution: numpy<2,
tflite-runtime 2.14; no torch, no Pillow), once, and reuses it on later runs. It is installed
editable, so what is tested is the working tree, and nothing but `runtime` is importable there.
The host side compares its logits with the torch logits in the bundle and with ai-edge-litert.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv-device-tflite"
# Holds: the interpreter and numpy 1.x, and `runtime` from this checkout (an older venv is rebuilt).
PROBE = f"""
import numpy, runtime, tflite_runtime.interpreter
assert numpy.__version__ < "2" and runtime.__file__ == {str(REPO / "runtime" / "__init__.py")!r}
"""


def _venv_python() -> Path:
    return VENV / "bin" / "python"


@pytest.fixture(scope="module")
def tflite_runtime_python() -> str:
    python = _venv_python()
    probe = [str(python), "-c", PROBE]
    if python.exists() and subprocess.run(probe, capture_output=True, cwd="/").returncode == 0:
        return str(python)
    # The base interpreter, not this venv's, so nothing of the host venv leaks in.
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(VENV)], check=True, capture_output=True, timeout=300)
    proc = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           "-e", f"{REPO / 'runtime'}[tflite-runtime]"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"could not build the tflite-runtime venv:\n{proc.stderr[-2000:]}"
    assert subprocess.run(probe, capture_output=True, cwd="/").returncode == 0
    return str(python)


def _board(python: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # No PYTHONPATH: the board venv's python sees only what was installed into it.
    return subprocess.run([python, *args], cwd=cwd, env={"PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)


BOARD_SCRIPT = r"""
import json, sys
import numpy as np
import runtime
from runtime import load
from runtime.backends import installed_backends
from runtime.bundle import read_bundle, read_samples

bundle = sys.argv[1]
samples = read_samples(read_bundle(bundle))
out = {"installed": installed_backends(), "numpy": np.__version__}
for fmt in ("tflite", "tflite-int8"):
    model = load(bundle, format=fmt, threads=1)          # backend chosen from what is installed
    out[fmt] = {"backend": model.backend, "version": model.backend_version}
    np.save(f"{fmt}.npy", model.logits(samples.x))
out["auto"] = load(bundle).format
out["heavy_modules"] = sorted(m for m in ("torch", "onnx", "onnxruntime", "ai_edge_litert", "PIL",
                                          "compress", "export", "device_bench") if m in sys.modules)
import importlib.util
out["other_packages"] = [m for m in ("compress", "export", "device_bench", "torch") if importlib.util.find_spec(m)]
print(json.dumps(out))
"""


def test_board_with_only_tflite_runtime(tflite_runtime_python, bundle_dir, tmp_path):
    from runtime import load
    from runtime.bundle import read_bundle, read_samples

    proc = _board(tflite_runtime_python, ["-c", BOARD_SCRIPT, str(bundle_dir)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["installed"] == ["tflite-runtime"] and report["numpy"].startswith("1.")
    assert report["tflite"]["backend"] == "tflite-runtime" and report["tflite"]["version"] == "2.14.0"
    assert report["auto"] == "tflite-int8"
    assert report["heavy_modules"] == [] and report["other_packages"] == []  # only runtime is on the board

    samples = read_samples(read_bundle(bundle_dir))
    fp32 = np.load(tmp_path / "tflite.npy")
    np.testing.assert_allclose(fp32, samples.logits, atol=1e-4 * max(1.0, float(np.abs(samples.logits).max())))
    assert (fp32.argmax(1) == samples.logits.argmax(1)).mean() >= 0.99
    # Same int8 kernels family: the two interpreters agree to within one output quantisation step.
    int8 = np.load(tmp_path / "tflite-int8.npy")
    litert = load(bundle_dir, format="tflite-int8", backend="ai-edge-litert", threads=1).logits(samples.x)
    step = float(np.abs(np.diff(np.unique(litert))).min()) if np.unique(litert).size > 1 else 1e-6
    assert np.abs(int8 - litert).max() <= step + 1e-6
    assert (int8.argmax(1) == litert.argmax(1)).mean() >= 0.99


def test_board_cli_with_only_tflite_runtime(tflite_runtime_python, bundle_dir, tmp_path):
    proc = _board(tflite_runtime_python, ["-m", "runtime", "verify", str(bundle_dir), "--threads", "1"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipped" in proc.stdout  # the ONNX formats: no onnxruntime on this board
    x = np.zeros((32, 32, 3), np.uint8)
    np.save(tmp_path / "black.npy", x)
    proc = _board(tflite_runtime_python, ["-m", "runtime", "predict", str(bundle_dir), str(tmp_path / "black.npy"),
                                          "--format", "tflite", "--top", "2"], cwd=tmp_path)
    assert proc.returncode == 0 and "black.npy" in proc.stdout, proc.stderr
    proc = _board(tflite_runtime_python, ["-m", "runtime", "predict", str(bundle_dir), str(tmp_path / "black.npy"),
                                          "--format", "onnx"], cwd=tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "./runtime[onnx]"' in lines[0], proc.stderr
