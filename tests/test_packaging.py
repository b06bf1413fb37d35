"""What goes on the board: the edgeslim-runtime distribution (runtime/pyproject.toml) holds the
runtime package and nothing else, its extras are the interpreters the runtime names, and the
install commands in the docs are the ones that exist."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
DEVICE = tomllib.loads((REPO / "runtime" / "pyproject.toml").read_text())["project"]


def test_device_wheel_holds_only_the_runtime(tmp_path):
    src = tmp_path / "runtime"  # a copy: an in-tree build would leave build/ in the checkout
    shutil.copytree(REPO / "runtime", src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", str(src), "-w", str(tmp_path / "wheel")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("edgeslim_runtime-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    code = sorted(n for n in names if ".dist-info/" not in n)
    assert code == sorted(f"runtime/{p.name}" for p in (REPO / "runtime").glob("*.py"))
    requires = [ln.split(":", 1)[1].strip() for ln in metadata.splitlines() if ln.startswith("Requires-Dist:")]
    assert "numpy>=1.23" in requires
    assert not [r for r in requires if re.match(r"(torch|onnx\b|litert-torch|tqdm|matplotlib)", r)]


def test_extras_are_the_runtimes_backends():
    from runtime.backends import _PIP, BACKENDS

    extras = DEVICE["optional-dependencies"]
    assert set(extras) == {"litert", "tflite-runtime", "onnx"}
    pinned = {re.split(r"[=<>; ]", r)[0] for reqs in extras.values() for r in reqs} - {"numpy"}
    assert pinned == set(BACKENDS)
    for backend, hint in _PIP.items():  # every "no interpreter" message names a real extra
        (extra,) = re.findall(r'"\./runtime\[([a-z-]+)\]"', hint)
        assert extra in extras and any(r.startswith(backend) for r in extras[extra])
    root = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not [e for e in root if e.startswith("device")]  # the board never installs the host distribution


def test_docs_name_only_install_commands_that_exist():
    docs = [REPO / "README.md", REPO / "runtime" / "README.md", REPO / "docs" / "device.md"]
    text = "\n".join(p.read_text() for p in docs)
    from board.root import device_install
    *pip, target = device_install("litert")   # README shows the exact command the board test runs
    assert " ".join(pip) + f' "{target}"' in (REPO / "README.md").read_text()
    assert "edgeslim[device" not in text
    for extra in re.findall(r'\./runtime\[([a-z,-]+)\]', text):
        assert set(extra.split(",")) <= set(DEVICE["optional-dependencies"]), extra


def test_deploy_ships_package_files_only(tmp_path, monkeypatch):
    """A build/ or *.egg-info left in runtime/ by `pip install ./runtime` never goes to the board."""
    from device_bench import deploy

    pkg = tmp_path / "runtime"
    shutil.copytree(REPO / "runtime", pkg, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    (pkg / "build" / "lib" / "runtime").mkdir(parents=True)
    (pkg / "build" / "lib" / "runtime" / "model.py").write_text("stale = True\n")
    (pkg / "edgeslim_runtime.egg-info").mkdir()
    (pkg / "edgeslim_runtime.egg-info" / "PKG-INFO.md").write_text("x")
    monkeypatch.setattr(deploy, "CODE_PACKAGES", ("runtime",))
    monkeypatch.setattr(deploy, "package_dir", lambda name: pkg)
    shipped = sorted(rel for rel, _ in deploy.code_files())
    assert shipped == sorted(f"code/runtime/{p.name}" for p in pkg.iterdir() if p.suffix in (".py", ".md"))
