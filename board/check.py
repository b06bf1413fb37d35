"""What `make test-board` checks on the emulated board, and `make board-try` reuses for a user's bundle:

1. `device_bench remote` (= deploy + run + fetch) of the bundle with each board venv: every format an
   installed interpreter runs is measured, and the report says aarch64, Debian 12, emulated.
2. The board's logits equal the host's on the bundle's sample images: fp32 within FP32_ATOL, int8 the
   same argmax on every image.
3. Bad input on the board (wrong hash, corrupt model, no interpreter) ends in the same one-line
   error as on x86-64 with the same device install; a board Python without numpy gets the install advice.

Each check raises CheckFailed with what differed; the caller collects the results.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from device_bench import _board

from .emulated import EmulatedBoard
from .errors import BoardError
from .root import HOME, REPO

EMULATED_WARNING = "warning: this machine is emulated"  # device_bench run, under qemu
FP32_ATOL = 1e-4  # max |logit(board) - logit(host)| for float models
TEST_DIR = "edgeslim-test"  # deploy folder in pi's home for the checks (emptied at the start)


class CheckFailed(BoardError):
    pass


def bench(*args: Any, timeout: float = 3600) -> subprocess.CompletedProcess:
    """`python -m device_bench ...` on the host, as a user types it."""
    return subprocess.run([sys.executable, "-m", "device_bench", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> List[str]:
    return [ln for ln in stderr.strip().splitlines() if ln.strip()]


# --------------------------------------------------------------------------- 1. remote


def remote(board: EmulatedBoard, bundle: Path, venv: str, out: Path, remote_dir: str,
           run_args: List[str]) -> Dict[str, Any]:
    """deploy + run on the board with `venv`'s Python + fetch the report; the report, checked."""
    proc = bench("remote", bundle, "--host", board.host, *board.ssh_args(), "--python", f"{venv}/bin/python",
                 "--remote-dir", remote_dir, "--connect-timeout", "60", "--formats", "all", *run_args,
                 "--out", out)
    if proc.returncode != 0:
        raise CheckFailed(f"device_bench remote with {venv} failed ({proc.returncode}): "
                          f"{(error_lines(proc.stderr) or ['no output'])[-1]}")
    report = json.loads(out.read_text())
    d = report["device"]
    problems = []
    if d.get("machine") != "aarch64":
        problems.append(f"machine is {d.get('machine')!r}, not aarch64")
    if not str(d.get("os", "")).startswith("Debian GNU/Linux 12"):
        problems.append(f"os is {d.get('os')!r}, not Debian GNU/Linux 12")
    if d.get("emulated") is not True:
        problems.append(f"not marked emulated (emulated={d.get('emulated')!r})")
    if "not a board" not in proc.stderr:
        problems.append("the run printed no emulation warning")
    bad = [f"{r['format']}: {r.get('error')}" for r in report["results"] if r["status"] != "ok"]
    if bad:
        problems.append("measurements failed: " + "; ".join(bad))
    if not report["results"]:
        problems.append("nothing was measured")
    if problems:
        raise CheckFailed(f"{venv}: " + "; ".join(problems))
    return report


def board_backends(board: EmulatedBoard, venv: str) -> List[str]:
    """The interpreters importable in a board venv (found without importing them)."""
    probe = ("import importlib.util, json, sys; print(json.dumps([d for d, m in json.loads(sys.argv[1]).items() "
             "if importlib.util.find_spec(m)]))")
    res = board.run([f"{venv}/bin/python", "-c", probe, json.dumps(_board.BACKEND_MODULES)])
    if res.returncode != 0:
        raise CheckFailed(f"{venv}/bin/python does not run on the board: {(error_lines(res.stderr) or ['?'])[-1]}")
    return json.loads(res.stdout)


def runnable_formats(formats: List[str], backends: List[str]) -> List[str]:
    families = {_board.BACKEND_FAMILY[b] for b in backends}
    return [f for f in formats if ("tflite" if f.startswith("tflite") else "onnx") in families]


# --------------------------------------------------------------------------- 2. outputs


# Runs on the board (and on the host) with the shipped `runtime`: the logits of samples.npz.
LOGITS = """
import json, sys
from runtime import load
from runtime.bundle import read_samples
model = load(sys.argv[1], format=sys.argv[2], threads=1)
logits = model.logits(read_samples(model.bundle).x)
print(json.dumps({"backend": model.backend, "version": model.backend_version, "logits": logits.tolist()}))
"""


def board_logits(board: EmulatedBoard, venv: str, remote_dir: str, fmt: str) -> Dict[str, Any]:
    code = f"{HOME}/{remote_dir}/current/code"
    res = board.run(["env", "-C", code, f"{venv}/bin/python", "-c", LOGITS, "../bundle", fmt])
    if res.returncode != 0:
        raise CheckFailed(f"{venv}: logits of {fmt} on the board failed: {(error_lines(res.stderr) or ['?'])[-1]}")
    return json.loads(res.stdout.decode().strip().splitlines()[-1])


def host_logits(bundle: Path, fmt: str) -> Dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", LOGITS, str(bundle), fmt], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        raise CheckFailed(f"logits of {fmt} on the host failed: {(error_lines(proc.stderr) or ['?'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare_outputs(board_out: Dict[str, Any], host_out: Dict[str, Any], fmt: str,
                    output_scale: Optional[float] = None) -> Dict[str, Any]:
    """fp32: max |difference| <= FP32_ATOL. int8: identical argmax on every image (the dequantised
    logits may differ by a quantisation step, `output_scale`, where the kernels round differently)."""
    b, h = np.asarray(board_out["logits"], np.float32), np.asarray(host_out["logits"], np.float32)
    if b.shape != h.shape:
        raise CheckFailed(f"{fmt}: board logits {b.shape} vs host {h.shape}")
    diff = float(np.abs(b - h).max())
    same_argmax = float((b.argmax(1) == h.argmax(1)).mean())
    result = {"format": fmt, "images": len(b), "board_backend": f"{board_out['backend']} {board_out['version']}",
              "host_backend": f"{host_out['backend']} {host_out['version']}", "max_abs_diff": diff,
              "argmax_agreement": same_argmax}
    if output_scale:
        result["max_abs_diff_quant_steps"] = round(diff / output_scale, 3)
    if fmt.endswith("int8"):
        result["check"] = "identical argmax"
        result["ok"] = same_argmax == 1.0
    else:
        result["check"] = f"max |diff| <= {FP32_ATOL:g}"
        result["ok"] = diff <= FP32_ATOL
    return result


# --------------------------------------------------------------------------- 3. bad input


def bad_bundles(bundle: Path, dest: Path) -> Path:
    """dest/{good, wrong-hash, corrupt, broken-manifest}/ and dest/image.npy: the same files go to the board."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    model = manifest["artifacts"]["tflite"]["file"]
    for name in ("good", "wrong-hash", "corrupt", "broken-manifest"):
        shutil.copytree(bundle, dest / name)
    # broken manifest: cut off mid-file, as an interrupted copy leaves it
    text = (bundle / "manifest.json").read_text()
    (dest / "broken-manifest" / "manifest.json").write_text(text[: len(text) // 2])
    # wrong hash: one byte of the model changed, the manifest left as it was
    data = bytearray((bundle / model).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (dest / "wrong-hash" / model).write_bytes(bytes(data))
    # corrupt: the model cut in half, and the manifest's sha256 updated to match, so the checksum
    # passes and the interpreter is handed a truncated flatbuffer
    half = (bundle / model).read_bytes()[: len(data) // 2]
    (dest / "corrupt" / model).write_bytes(half)
    entry = manifest["artifacts"]["tflite"]
    entry["sha256"] = hashlib.sha256(half).hexdigest()
    if "bytes" in entry:
        entry["bytes"] = len(half)
    (dest / "corrupt" / "manifest.json").write_text(json.dumps(manifest, indent=2))
    with np.load(bundle / manifest["samples"]["file"], allow_pickle=False) as z:
        np.save(dest / "image.npy", z["x"][:1])
    return dest


# (what, runtime/device_bench arguments): run in the folder bad_bundles made, on both machines.
BAD_INPUTS = [
    ("wrong hash", ["runtime", "predict", "wrong-hash", "image.npy", "--format", "tflite"]),
    ("corrupt model", ["runtime", "predict", "corrupt", "image.npy", "--format", "tflite"]),
    ("broken manifest", ["runtime", "predict", "broken-manifest", "image.npy", "--format", "tflite"]),
    ("no interpreter", ["runtime", "predict", "good", "image.npy", "--format", "onnx"]),
    ("wrong hash (bench)", ["device_bench", "run", "wrong-hash", "--formats", "tflite", "--threads", "1",
                            "--runs", "1", "--warmup", "0", "--out", "r.json"]),
    ("no interpreter (bench)", ["device_bench", "run", "good", "--formats", "onnx", "--threads", "1",
                                "--runs", "1", "--warmup", "0", "--out", "r.json"]),
]


def upload_folder(board: EmulatedBoard, local: Path, remote: str) -> None:
    """`local` to the board's `remote` folder as a tar over ssh (the board's own tar unpacks it)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(local, arcname=".")
    res = board.run(["mkdir", "-p", remote])
    if res.returncode != 0:
        raise CheckFailed(f"mkdir {remote} on the board failed: {res.stderr.strip()}")
    res = board.run(["tar", "-x", "-f", "-", "-C", remote], stdin_writer=lambda pipe: pipe.write(buf.getvalue()))
    if res.returncode != 0:
        raise CheckFailed(f"upload to {remote} failed: {res.stderr.strip()}")


def bad_input_errors(board: EmulatedBoard, local: Path, x86_python: Path, board_python: str,
                     remote_dir: str) -> List[Dict[str, Any]]:
    """Each BAD_INPUTS command on x86-64 (this host, the same device install) and on the board; the
    exit status and stderr must be one error line, and the same on both."""
    remote = f"{HOME}/{remote_dir}/bad"
    upload_folder(board, local, remote)
    code = f"{HOME}/{remote_dir}/current/code"
    results = []
    for what, args in BAD_INPUTS:
        x86 = subprocess.run([str(x86_python), "-m", *args], cwd=local, capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "LANG": "C.UTF-8"}, timeout=600)
        res = board.run(["env", "-C", remote, f"PYTHONPATH={code}", board_python, "-m", *args])
        # device_bench run says, on the board only, that it is emulated; everything else must be equal
        board_lines = error_lines(res.stderr)
        warned = [ln for ln in board_lines if ln.startswith(EMULATED_WARNING)]
        on_board = (res.returncode, [ln for ln in board_lines if ln not in warned])
        on_x86 = (x86.returncode, error_lines(x86.stderr))
        one_line = [ln for ln in on_board[1] if "error" in ln.lower()]
        ok = on_board == on_x86 and on_board[0] != 0 and len(one_line) == 1 \
            and bool(warned) == (args[0] == "device_bench")
        results.append({"case": what, "command": "python -m " + " ".join(args), "ok": ok,
                        "board": {"exit": on_board[0], "stderr": on_board[1]},
                        "x86_64": {"exit": on_x86[0], "stderr": on_x86[1]}})
    return results


def missing_numpy_advice(board: EmulatedBoard, bundle: Path, remote_dir: str) -> Dict[str, Any]:
    """deploy to the board's bare Debian python3 (externally managed, no numpy): one line that says
    which venv to make and what to pip install, and nothing deployed."""
    proc = bench("deploy", bundle, "--host", board.host, *board.ssh_args(), "--python", "python3",
                 "--remote-dir", f"{remote_dir}-bare", "--connect-timeout", "60")
    lines = [ln for ln in error_lines(proc.stderr) if ln.startswith("device_bench: error:")]
    line = lines[0] if len(lines) == 1 else ""
    wanted = ("has no numpy and a TFLite/ONNX interpreter", "python3 -m venv ~/edgeslim-venv", "aarch64",
              "pip install numpy ai-edge-litert")
    listed = board.run(["test", "-e", f"{HOME}/{remote_dir}-bare"])
    ok = proc.returncode == 1 and bool(line) and all(w in line for w in wanted) and listed.returncode != 0
    return {"case": "board python3 without numpy", "ok": ok, "exit": proc.returncode, "error": line or proc.stderr}
