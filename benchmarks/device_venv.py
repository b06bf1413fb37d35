"""What a board pays for the runtime: install `edgeslim[device]` in a fresh venv, then measure
its size on disk and the cold start of each format (process start -> import -> load -> first
prediction), in new processes, the way a service on the board would start.

    python benchmarks/device_venv.py dist/vgg16-f76 --out reports/device-venv
    python benchmarks/device_venv.py dist/vgg16-f76 --extra device-tflite --python python3.9
    python benchmarks/device_venv.py dist/vgg16-f76 --extra device-onnx --repeats 5

The package is installed from a copy of this checkout (pyproject.toml + the four packages), so
the source tree is left untouched and exactly the board's extras are installed — never the host
ones. The venv also runs `python -m runtime verify` on the bundle and checks that torch is
absent. Writes NAME.json, NAME.md and NAME.png into --out. Takes ~1 min of pip per run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("compress", "export", "runtime", "device_bench")
STAGES = ("startup", "import", "load", "first_predict")

# Runs inside the venv: one cold start of one format; prints one JSON line.
COLD_START = r"""
import time
t0_wall, t0 = time.time(), time.perf_counter()
import json, resource, sys
import numpy as np
import runtime
t1 = time.perf_counter()
fmt, bundle, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    model = runtime.load(bundle, format=fmt, threads=threads)
except runtime.RuntimeUserError as e:
    print(json.dumps({"format": fmt, "error": str(e)}))
    sys.exit(0)
t2 = time.perf_counter()
pre = model.bundle.preprocess
probs = model.predict(np.full((pre.height, pre.width, 3), 128, np.uint8))
t3 = time.perf_counter()
heavy = sorted(m for m in ("torch", "tensorflow", "compress", "export", "device_bench") if m in sys.modules)
print(json.dumps({"format": fmt, "backend": model.backend, "backend_version": model.backend_version,
                  "t0_wall": t0_wall, "import": t1 - t0, "load": t2 - t1, "first_predict": t3 - t2,
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "finite": bool(np.isfinite(probs).all()), "heavy_modules": heavy}))
"""

# Runs inside the venv: what got installed, and how big each distribution is.
INVENTORY = r"""
import json, importlib.util, sys
from importlib import metadata
rows = []
for d in metadata.distributions():
    size = 0
    for f in d.files or []:
        try:
            size += d.locate_file(f).stat().st_size
        except OSError:
            pass
    rows.append({"name": d.metadata["Name"], "version": d.version, "bytes": size})
print(json.dumps({"python": sys.version.split()[0], "packages": sorted(rows, key=lambda r: -r["bytes"]),
                  "torch_importable": importlib.util.find_spec("torch") is not None}))
"""


@dataclass
class Config:
    bundle: Path
    out: Path
    extra: str = "device"
    python: str = sys.executable
    repeats: int = 3
    threads: int = 1
    keep: Optional[Path] = None  # keep the venv here instead of deleting it


@dataclass
class Result:
    bundle: str
    extra: str
    python: str
    machine: str
    pip_seconds: float = 0.0
    venv_bytes: int = 0
    site_packages_bytes: int = 0
    packages: List[dict] = field(default_factory=list)
    torch_importable: bool = False
    verify_ok: Optional[bool] = None
    verify: Optional[dict] = None
    cold_start: Dict[str, dict] = field(default_factory=dict)  # format -> medians + runs


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def copy_source(dst: Path) -> Path:
    """pyproject + the packages, without caches: pip builds from this copy, not the checkout."""
    dst.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dst / name)
    for pkg in PACKAGES:
        if (REPO / pkg).is_dir():
            shutil.copytree(REPO / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = Path(root) / f
            if not p.is_symlink():
                total += p.stat().st_size
    return total


def run_json(cmd: List[str], timeout: float = 600, **kw) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def cold_start(vpy: Path, fmt: str, cfg: Config, cwd: Path) -> dict:
    """One fresh process; 'startup' is launch -> first line of the script (interpreter start)."""
    launched = time.time()
    r = run_json([str(vpy), "-c", COLD_START, fmt, str(cfg.bundle.resolve()), str(cfg.threads)], cwd=cwd)
    if "error" not in r:
        r["startup"] = r.pop("t0_wall") - launched
        r["total"] = sum(r[s] for s in STAGES)
    return r


def measure(cfg: Config) -> Result:
    from tqdm import tqdm

    manifest = json.loads((cfg.bundle / "manifest.json").read_text())
    formats = [f for f in ("tflite-int8", "tflite", "onnx-int8", "onnx") if f in manifest.get("artifacts", {})]
    work = Path(tempfile.mkdtemp(prefix="edgeslim-device-venv-"))
    venv = cfg.keep or work / "venv"
    try:
        source = copy_source(work / "src")
        log(f"creating a venv with {cfg.python}")
        subprocess.run([cfg.python, "-m", "venv", str(venv)], check=True, timeout=300)
        vpy = venv / "bin" / "python"
        log(f'pip install "edgeslim[{cfg.extra}]" from a copy of {REPO} (~1 min)')
        start = time.time()
        subprocess.run([str(vpy), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        f"{source}[{cfg.extra}]"], check=True, timeout=1800)
        result = Result(bundle=manifest.get("name", cfg.bundle.name), extra=cfg.extra, python="",
                        machine=f"{platform.machine()} {platform.system()} ({os.cpu_count()} cpus)",
                        pip_seconds=time.time() - start)
        # Exclude what pip/setuptools themselves take: a board needs them only to install.
        inv = run_json([str(vpy), "-c", INVENTORY], cwd=work)
        result.python, result.torch_importable = inv["python"], inv["torch_importable"]
        tooling = {"pip", "setuptools", "wheel"}
        result.packages = [p for p in inv["packages"] if p["name"].lower() not in tooling]
        result.site_packages_bytes = sum(p["bytes"] for p in result.packages)
        result.venv_bytes = dir_bytes(venv)

        log("python -m runtime verify in the venv")
        proc = subprocess.run([str(vpy), "-m", "runtime", "verify", str(cfg.bundle.resolve()), "--json",
                               "--threads", str(cfg.threads)], capture_output=True, text=True, cwd=work, timeout=600)
        try:
            result.verify = json.loads(proc.stdout)
            result.verify_ok = proc.returncode == 0
        except json.JSONDecodeError:
            result.verify, result.verify_ok = {"error": proc.stderr.strip()[-500:]}, False

        runs: Dict[str, List[dict]] = {f: [] for f in formats}
        for _ in tqdm(range(cfg.repeats), desc="cold starts", unit="round"):
            for fmt in formats:
                runs[fmt].append(cold_start(vpy, fmt, cfg, work))
        for fmt, rs in runs.items():
            if any("error" in r for r in rs):
                result.cold_start[fmt] = {"error": next(r["error"] for r in rs if "error" in r)}
                continue
            med = {k: statistics.median(r[k] for r in rs) for k in (*STAGES, "total", "max_rss_mb")}
            result.cold_start[fmt] = {"backend": rs[0]["backend"], "backend_version": rs[0]["backend_version"],
                                      "median": med, "runs": rs,
                                      "heavy_modules": sorted({m for r in rs for m in r["heavy_modules"]})}
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def markdown(r: Result) -> str:
    mb = 1e6
    lines = [f"# Device venv: `edgeslim[{r.extra}]`, Python {r.python}, {r.machine}", "",
             f"- bundle `{r.bundle}`; pip install took {r.pip_seconds:.0f} s",
             f"- installed packages (without pip/setuptools): **{r.site_packages_bytes / mb:.1f} MB**; "
             f"whole venv {r.venv_bytes / mb:.1f} MB",
             f"- torch importable in the venv: {'YES (wrong!)' if r.torch_importable else 'no'}",
             f"- `python -m runtime verify`: {'OK' if r.verify_ok else 'FAILED'}", "",
             "| package | version | MB |", "|---|---|---:|"]
    lines += [f"| {p['name']} | {p['version']} | {p['bytes'] / mb:.1f} |" for p in r.packages]
    lines += ["", "Cold start, median of the runs (seconds): process launch -> interpreter up -> "
              "`import runtime` -> `load()` (incl. sha256) -> first `predict()`.", "",
              "| format | backend | startup | import | load | first predict | **total** | max RSS MB |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for fmt, c in r.cold_start.items():
        if "error" in c:
            lines.append(f"| {fmt} | not runnable: {c['error']} | | | | | | |")
            continue
        m = c["median"]
        lines.append(f"| {fmt} | {c['backend']} {c['backend_version']} | {m['startup']:.3f} | {m['import']:.3f} | "
                     f"{m['load']:.3f} | {m['first_predict']:.3f} | **{m['total']:.3f}** | {m['max_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(r: Result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f, c["median"]) for f, c in r.cold_start.items() if "error" not in c]
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 2.0))
    left = [0.0] * len(rows)
    for stage in STAGES:
        widths = [m[stage] for _, m in rows]
        ax.barh([f for f, _ in rows], widths, left=left, label=stage.replace("_", " "))
        left = [a + b for a, b in zip(left, widths)]
    ax.set_xlabel("seconds from process launch")
    ax.set_title(f"cold start, edgeslim[{r.extra}], Python {r.python}")
    ax.invert_yaxis()
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=len(STAGES), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(r: Result, out: Path) -> Path:
    """NAME.json/.md/.png, each written to a temp file and renamed into place."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{r.bundle}-{r.extra}-py{''.join(r.python.split('.')[:2])}"
    for suffix, text in ((".json", json.dumps(asdict(r), indent=2)), (".md", markdown(r))):
        tmp = out / (stem + suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / (stem + suffix))
    tmp = out / (stem + ".tmp.png")
    plot(r, tmp)
    tmp.replace(out / (stem + ".png"))
    return out / stem


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--out", type=Path, default=Path("reports/device-venv"))
    p.add_argument("--extra", default="device", choices=["device", "device-tflite", "device-onnx"])
    p.add_argument("--python", default=sys.executable, help="interpreter the venv is made from (e.g. python3.9)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--keep", type=Path, default=None, help="create the venv here and keep it")
    a = p.parse_args(argv)
    if not (a.bundle / "manifest.json").is_file():
        print(f"error: {a.bundle} is not a bundle (no manifest.json)", file=sys.stderr)
        return 2
    if a.keep is not None and a.keep.exists():
        print(f"error: {a.keep} exists; --keep needs a new folder", file=sys.stderr)
        return 2
    cfg = Config(bundle=a.bundle, out=a.out, extra=a.extra, python=a.python, repeats=max(1, a.repeats),
                 threads=a.threads, keep=a.keep)
    result = measure(cfg)
    stem = write(result, cfg.out)
    print(markdown(result))
    log(f"wrote {stem}.json, .md, .png")
    return 0 if result.verify_ok and not result.torch_importable else 1


if __name__ == "__main__":
    sys.exit(main())
