"""What a board pays for the runtime: install the device distribution (`runtime/`, named
edgeslim-runtime) in a fresh venv, then measure its size on disk, what pulled each package in,
and the cold start of each format in new processes, the way a service on the board starts.

    python benchmarks/device_venv.py dist/vgg16-f76 --out reports/device-venv              # [litert]
    python benchmarks/device_venv.py dist/vgg16-f76 --extra onnx --repeats 9
    python benchmarks/device_venv.py dist/vgg16-f76 --extra tflite-runtime --python python3.9
    python benchmarks/device_venv.py dist/vgg16-f76 --no-compile     # pip writes no .pyc at install

The distribution is installed from a copy of runtime/ (so the checkout gets no build/ folder),
with exactly one of its extras, the way README tells a board to install it. The venv must then
hold no torch and no compress/export/device_bench; it runs `python -m runtime verify` on the
bundle. Cold start, per format and repeat, in a new process: `import numpy, runtime`; verify
(manifest + sha256 of the model file, `load_seconds["bundle"]`); interpreter (importing its
module + creating it and allocating tensors); first inference (`predict` of one image). Files
are in the page cache after the first repeat, as on a board that has run the model before.
Every command in the venv runs without this shell's PYTHON* variables, as a service would;
`--nice -20` gives the cold starts the CPU on a host busy with other work.
Writes NAME.json, NAME.md and NAME.png into --out. Takes ~1 min of pip per run.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import tomllib

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    REPO,
    BenchError,
    meta,
    meta_markdown,
    pyplot,
    save_figure,
    write_json,
    write_text,
)

DEVICE_DIST = REPO / "runtime"
EXTRAS = tuple(tomllib.loads((DEVICE_DIST / "pyproject.toml").read_text())["project"]["optional-dependencies"])
FORMATS = ("tflite-int8", "tflite", "onnx-int8", "onnx")
# The stages of one cold start, in order (load = verify + interpreter); `total` is import + load +
# first inference (process start-up is reported apart).
STAGES = ("import", "verify", "interpreter", "first_inference")

# Runs inside the venv: one cold start of one format; prints one JSON line.
# Wall time per stage, and this process's CPU time per stage (`cpu_*`): on a host shared with
# other work the CPU time is close to what the stage takes on an idle one.
COLD_START = r"""
import json, resource, sys, time
t0_wall, t0, c0 = time.time(), time.perf_counter(), time.process_time()
import numpy as np
import runtime
t1, c1 = time.perf_counter(), time.process_time()
fmt, bundle, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    model = runtime.load(bundle, format=fmt, threads=threads)
except runtime.RuntimeUserError as e:
    print(json.dumps({"format": fmt, "error": str(e)}))
    sys.exit(0)
t2, c2 = time.perf_counter(), time.process_time()
pre = model.bundle.preprocess
probs = model.predict(np.full((pre.height, pre.width, 3), 128, np.uint8))
t3, c3 = time.perf_counter(), time.process_time()
s = getattr(model, "load_seconds", None)  # None: a runtime older than load_seconds (--runtime-code)
print(json.dumps({"format": fmt, "backend": model.backend, "backend_version": model.backend_version,
                  "runtime_file": runtime.__file__, "t0_wall": t0_wall, "import": t1 - t0, "load": t2 - t1,
                  "verify": s and s["bundle"], "backend_import": s and s["backend_import"],
                  "interpreter": s and t2 - t1 - s["bundle"],
                  "first_inference": t3 - t2, "cpu_import": c1 - c0, "cpu_load": c2 - c1, "cpu_first_inference": c3 - c2,
                  "finite": bool(np.isfinite(probs).all()),
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

# Runs inside the venv: every distribution, its size, what it requires; which edgeslim/heavy
# packages can be imported at all.
INVENTORY = r"""
import json, importlib.util, re, sys
from importlib import metadata
rows = []
for d in metadata.distributions():
    size = 0
    for f in d.files or []:
        try:
            size += d.locate_file(f).stat().st_size
        except OSError:
            pass
    requires = [re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0] for r in (d.requires or []) if "extra ==" not in r]
    rows.append({"name": d.metadata["Name"], "version": d.version, "bytes": size, "requires": requires})
importable = {m: importlib.util.find_spec(m) is not None for m in ("torch", "compress", "export", "device_bench")}
print(json.dumps({"python": sys.version.split()[0], "packages": sorted(rows, key=lambda r: -r["bytes"]),
                  "importable": importable}))
"""
TOOLING = {"pip", "setuptools", "wheel"}  # what a board needs only to install; not counted


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def board_env(runtime_code: Optional[Path] = None) -> dict:
    """The environment a service on the board would have: none of this shell's PYTHON* settings
    (PYTHONPATH would leak the checkout in, PYTHONDONTWRITEBYTECODE would stop .pyc caching).
    runtime_code: a folder whose runtime/ package is imported instead of the installed one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    if runtime_code is not None:
        env["PYTHONPATH"] = str(runtime_code.resolve())
    return env


def run_json(cmd: List[str], timeout: float = 600, runtime_code: Optional[Path] = None, **kw) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=board_env(runtime_code), **kw)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise BenchError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def why(packages: List[dict]) -> None:
    """Add `required_by` to every package: the installed packages that list it as a requirement."""
    norm = {p["name"].lower().replace("_", "-"): p for p in packages}
    for p in packages:
        p["required_by"] = []
    for p in packages:
        for r in p["requires"]:
            dep = norm.get(r.lower().replace("_", "-"))
            if dep is not None and p["name"] not in dep["required_by"]:
                dep["required_by"].append(p["name"])


def cold_start(vpy: Path, fmt: str, bundle: Path, threads: int, cwd: Path, nice: int = 0,
               runtime_code: Optional[Path] = None) -> dict:
    """One fresh process; 'startup' is launch -> first line of the script (interpreter start)."""
    prefix = ["nice", "-n", str(nice)] if nice else []
    launched = time.time()
    r = run_json([*prefix, str(vpy), "-c", COLD_START, fmt, str(bundle.resolve()), str(threads)], cwd=cwd,
                 runtime_code=runtime_code)
    if "error" not in r:
        r["startup"] = r.pop("t0_wall") - launched
        r["total"] = r["import"] + r["load"] + r["first_inference"]
        r["cpu_total"] = r["cpu_import"] + r["cpu_load"] + r["cpu_first_inference"]
    return r


def measure(bundle: Path, extra: str, python: str, repeats: int, threads: int, keep: Optional[Path],
            compile_pyc: bool = True, nice: int = 0, runtime_code: Optional[Path] = None) -> dict:
    from tqdm import tqdm

    manifest = json.loads((bundle / "manifest.json").read_text())
    formats = [f for f in FORMATS if f in manifest.get("artifacts", {})]
    flags = [] if compile_pyc else ["--no-compile"]
    result = {"meta": meta(), "bundle": manifest.get("name", bundle.name), "extra": extra,
              "install": shlex.join(["pip", "install", *flags, f"./runtime[{extra}]"]), "nice": nice,
              "runtime_code": str(runtime_code) if runtime_code else None}
    work = Path(tempfile.mkdtemp(prefix="edgeslim-device-venv-"))
    venv = keep or work / "venv"
    try:
        # The source copy lives apart from `here`, the empty folder every venv command runs in:
        # `python -c` / `-m` put the working directory first on sys.path, and a runtime/ folder
        # there would be imported instead of the installed package.
        source, here = work / "src" / "runtime", work / "run"
        here.mkdir()
        shutil.copytree(DEVICE_DIST, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
        log(f"creating a venv with {python}")
        subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=300, env=board_env())
        vpy = venv / "bin" / "python"
        log(f'{result["install"]} (a copy of {DEVICE_DIST}; ~1 min)')
        started = time.time()
        subprocess.run([str(vpy), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *flags,
                        f"{source}[{extra}]"], check=True, timeout=1800, cwd=here, env=board_env())
        result["pip_seconds"] = round(time.time() - started, 1)
        # -B: the inventory itself must not write .pyc files into what it measures.
        inv = run_json([str(vpy), "-B", "-c", INVENTORY], cwd=here)
        packages = [p for p in inv["packages"] if p["name"].lower() not in TOOLING]
        why(packages)
        result.update(python=inv["python"], packages=packages, importable=inv["importable"],
                      site_packages_bytes=sum(p["bytes"] for p in packages), venv_bytes=dir_bytes(venv))

        log("python -m runtime verify in the venv")
        proc = subprocess.run([str(vpy), "-m", "runtime", "verify", str(bundle.resolve()), "--json",
                               "--threads", str(threads)], capture_output=True, text=True, cwd=here, timeout=600,
                              env=board_env())
        try:
            result["verify"] = json.loads(proc.stdout)
            result["verify_ok"] = proc.returncode == 0
        except json.JSONDecodeError:
            result["verify"], result["verify_ok"] = {"error": proc.stderr.strip()[-500:]}, False

        runs: Dict[str, List[dict]] = {f: [] for f in formats}
        for _ in tqdm(range(repeats), desc="cold starts", unit="round"):
            for fmt in formats:
                runs[fmt].append(cold_start(vpy, fmt, bundle, threads, here, nice, runtime_code))
        expected = (runtime_code or venv).resolve()  # which runtime/ the cold starts must have imported
        for r in (r for rs in runs.values() for r in rs if "error" not in r):
            if not Path(r["runtime_file"]).resolve().is_relative_to(expected):
                raise BenchError(f"a cold start imported {r['runtime_file']}, not the runtime in {expected}")
        result["cold_start"] = {}
        for fmt, rs in runs.items():
            if any("error" in r for r in rs):
                result["cold_start"][fmt] = {"error": next(r["error"] for r in rs if "error" in r)}
                continue
            keys = ("startup", *STAGES, "load", "backend_import", "total", "cpu_import", "cpu_load",
                    "cpu_first_inference", "cpu_total", "max_rss_mb")
            result["cold_start"][fmt] = {"backend": rs[0]["backend"], "backend_version": rs[0]["backend_version"],
                                         "runtime_file": rs[0]["runtime_file"],
                                         "median": {k: median(r[k] for r in rs) for k in keys},
                                         "first_total": rs[0]["total"], "finite": all(r["finite"] for r in rs),
                                         "runs": rs}
        result["venv_bytes_after_runs"] = dir_bytes(venv)  # + any .pyc Python wrote on first imports
        result["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def verify_problems(r: dict) -> str:
    v = r.get("verify") or {}
    if "error" in v:
        return f" ({v['error']})"
    bad = [f"{f['file']}: {f['detail']}" for f in v.get("files", []) if not f["ok"]]
    bad += [f"{f['format']}: {f['detail']}" for f in v.get("formats", []) if f["status"] == "fail"]
    return f" ({'; '.join(bad)})" if bad else ""


def median(values) -> Optional[float]:
    values = list(values)
    return None if None in values else statistics.median(values)


def ms(v: Optional[float], digits: int = 0) -> str:
    return "-" if v is None else f"{1000 * v:.{digits}f}"


def markdown(r: dict) -> str:
    mb = 1e6
    imp = r["importable"]
    lines = [f"# Device venv: `{r['install']}`, Python {r['python']}", "", *meta_markdown(r["meta"]),
             f"- bundle `{r['bundle']}`; pip install took {r['pip_seconds']:.0f} s; cold starts at niceness "
             f"{r['nice']}",
             f"- installed packages (without pip/setuptools): **{r['site_packages_bytes'] / mb:.1f} MB**; "
             f"whole venv {r['venv_bytes'] / mb:.1f} MB after install, {r['venv_bytes_after_runs'] / mb:.1f} MB "
             "after the cold starts",
             "- importable in the venv: " + ", ".join(f"{m} {'YES (wrong!)' if v else 'no'}" for m, v in imp.items()),
             f"- `python -m runtime verify`: {'OK' if r['verify_ok'] else 'FAILED'}" + verify_problems(r),
             *([f"- cold starts time the runtime in `{r['runtime_code']}`, not the installed one"]
               if r.get("runtime_code") else []), "",
             "| package | version | MB | required by |", "|---|---|---:|---|"]
    lines += [f"| {p['name']} | {p['version']} | {p['bytes'] / mb:.1f} | {', '.join(p['required_by']) or '-'} |"
              for p in r["packages"]]
    lines += ["", "Cold start, median of the runs (ms): `import numpy, runtime` -> verify (manifest + sha256) -> "
              "interpreter (import its module, create, allocate) -> first inference (`predict`, one image). "
              "Process start-up is apart.", "",
              "| format | backend | start-up | import | verify | interpreter (of it: module import) | "
              "first inference | **total** | first run's total | CPU time | max RSS MB |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for fmt, c in r["cold_start"].items():
        if "error" in c:
            lines.append(f"| {fmt} | not runnable: {c['error']} | | | | | | | | | |")
            continue
        m = c["median"]
        lines.append(f"| {fmt} | {c['backend']} {c['backend_version']} | {ms(m['startup'])} | {ms(m['import'])} | "
                     f"{ms(m['verify'])} | {ms(m['interpreter'])} ({ms(m['backend_import'])}) | "
                     f"{ms(m['first_inference'], 1)} | **{ms(m['total'])}** | {ms(c['first_total'])} | "
                     f"{ms(m['cpu_total'])} | {m['max_rss_mb']:.0f} |")
    lines += ["", "CPU time: this process's user + system time over the same stages (import + load + first "
              "inference); on a busy host it is close to what the stages take on an idle one."]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    plt = pyplot()
    rows = [(f, c["median"]) for f, c in r["cold_start"].items() if "error" not in c]
    # a runtime without load_seconds (--runtime-code) has no verify/interpreter split: one load bar
    stages = STAGES if all(m["verify"] is not None for _, m in rows) else ("import", "load", "first_inference")
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 2.0))
    left = [0.0] * len(rows)
    for stage in stages:
        widths = [1000 * m[stage] for _, m in rows]
        ax.barh([f for f, _ in rows], widths, left=left, label=stage.replace("_", " "))
        left = [a + b for a, b in zip(left, widths)]
    ax.axvline(300, color="grey", linestyle="--", linewidth=1, label="300 ms")
    ax.set_xlabel("milliseconds (median of the runs)")
    ax.set_title(f"cold start, {r['install']}, Python {r['python']}")
    ax.invert_yaxis()
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=len(stages) + 1, fontsize=8, frameon=False)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--out", type=Path, default=Path("reports/device-venv"))
    p.add_argument("--extra", default="litert", help=f"the interpreter extra of runtime/pyproject.toml: "
                   f"{', '.join(EXTRAS)} (several: litert,onnx)")
    p.add_argument("--python", default=sys.executable, help="interpreter the venv is made from (e.g. python3.9)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--keep", type=Path, default=None, help="create the venv here and keep it")
    p.add_argument("--nice", type=int, default=0,
                   help="run each cold start at this niceness (negative needs root): on a host busy with other "
                        "work, -20 gives the measured process the CPU as on an idle board; pip is not affected")
    p.add_argument("--runtime-code", type=Path, default=None,
                   help="time the runtime/ package in this folder instead of the installed one (e.g. an older "
                        "commit: git worktree add /tmp/old main), with the same installed packages")
    p.add_argument("--no-compile", action="store_true",
                   help="pip install --no-compile: no .pyc at install (Python writes those it imports on first use)")
    a = p.parse_args(argv)
    try:
        unknown = [e for e in a.extra.split(",") if e not in EXTRAS]
        if unknown:
            raise BenchError(f"unknown --extra {','.join(unknown)}; runtime/pyproject.toml has {', '.join(EXTRAS)}")
        if not (a.bundle / "manifest.json").is_file():
            raise BenchError(f"{a.bundle} is not a bundle (no manifest.json)")
        if a.keep is not None and a.keep.exists():
            raise BenchError(f"{a.keep} exists; --keep needs a new folder")
        if a.runtime_code is not None and not (a.runtime_code / "runtime" / "__init__.py").is_file():
            raise BenchError(f"--runtime-code {a.runtime_code} has no runtime/ package")
        result = measure(a.bundle, a.extra, a.python, max(1, a.repeats), a.threads, a.keep, not a.no_compile,
                         a.nice, a.runtime_code)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stem = f"{result['bundle']}-{a.extra.replace(',', '+')}-py{''.join(result['python'].split('.')[:2])}" \
        + ("-no-compile" if a.no_compile else "") + ("-other-code" if a.runtime_code else "")
    write_json(a.out / f"{stem}.json", result)
    write_text(a.out / f"{stem}.md", markdown(result))
    plot(result, a.out / f"{stem}.png")
    print(markdown(result))
    log(f"wrote {a.out / stem}.json, .md, .png")
    clean = result["verify_ok"] and not any(result["importable"].values())
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
