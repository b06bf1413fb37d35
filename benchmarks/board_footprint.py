"""What the board install weighs on a 64-bit Raspberry Pi, measured from the aarch64 wheels.

    python benchmarks/board_footprint.py [--extra litert] [--python-version 3.11] [--bundle dist/NAME] [--out DIR]

The emulated board (`make test-board`) measures the real install, but takes 20-45 min. This
takes ~1 min and needs no root: pip resolves and installs the device distribution the way
README tells a board to (`pip install --no-compile "./runtime[EXTRA]"`), for the board's
platform (manylinux aarch64, CPython --python-version), into a folder (`pip install --target
--platform`: the same files pip writes into the board venv's site-packages, without pip and
setuptools). Python then writes the .pyc of what a run imports on its first start; those are
measured on this host: a fresh venv with the same install, one `runtime.load` + `predict` per
TFLite format of --bundle (or a one-op probe model when none is given), bytecode writing on.
CPython's .pyc are the same on every architecture for one minor version. Writes
board_footprint.json and .md into --out.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, RESULTS, BenchError, cli, meta, meta_markdown, write_json, write_text  # noqa: E402
from benchmarks.device_venv import EXTRAS, board_env  # noqa: E402
from board.root import TOOLING, device_install  # noqa: E402

PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_27_aarch64", "manylinux_2_28_aarch64",
             "manylinux_2_31_aarch64", "manylinux_2_34_aarch64")   # bookworm: glibc 2.36
GOAL_MB = 120.0
FIRST_RUN = r"""
import sys, numpy as np, runtime
bundle = sys.argv[1]
for fmt in ("tflite-int8", "tflite"):
    try:
        m = runtime.load(bundle, format=fmt)
    except Exception as e:      # a format the bundle lacks
        print(f"{fmt}: {e}", file=sys.stderr)
        continue
    m.predict(np.zeros((1, *m.input_shape[1:3], 3), np.uint8))   # TFLite: NHWC
"""


def du(path: Path) -> int:
    out = subprocess.run(["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def pip(*args: str, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, cwd=cwd,
                          env=board_env(), timeout=1800)
    if proc.returncode != 0:
        raise BenchError(f"pip {' '.join(args[:3])} ... failed: {proc.stderr.strip().splitlines()[-1:]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/board_footprint.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--extra", default="litert", choices=EXTRAS)
    p.add_argument("--python-version", default="3.11", help="the board's CPython (Bookworm: 3.11)")
    p.add_argument("--bundle", type=Path, help="a bundle for the first-run .pyc (default: none, imports only)")
    p.add_argument("--out", type=Path, default=RESULTS / "board-footprint")
    args = p.parse_args(argv)
    if args.bundle and not (args.bundle / "manifest.json").is_file():
        raise BenchError(f"--bundle {args.bundle} is not a bundle folder (no manifest.json)")
    install = device_install(args.extra)
    work = Path(tempfile.mkdtemp(prefix="edgeslim-footprint-"))
    try:
        src = work / "src" / "runtime"
        shutil.copytree(REPO / "runtime", src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
        wheels = work / "wheels"
        pip("wheel", "--quiet", "--no-deps", str(src), "-w", str(wheels), cwd=work)
        ours = next(wheels.glob("*.whl"))
        site = work / "site-packages"
        plat = [a for pl in PLATFORMS for a in ("--platform", pl)]
        pip("install", "--quiet", "--no-compile", "--only-binary=:all:", "--python-version", args.python_version,
            *plat, "--target", str(site), f"{ours}[{args.extra}]", cwd=work)
        sizes = {e.name: du(e) for e in site.iterdir() if e.name.split("-")[0] not in TOOLING}
        packages = sum(sizes.values())
        # proof of the platform: numpy's core extension is built for aarch64
        native = sorted(x.name for x in site.rglob("_multiarray_umath*.so"))
        # the .pyc a first start writes, measured in a venv of this host
        venv = work / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=board_env(), timeout=300)
        vpip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*vpip, *install[2:-1], f"{ours}[{args.extra}]"], check=True, env=board_env(), cwd=work,
                       capture_output=True, timeout=1800)
        vsite = next(venv.glob("lib/python3*/site-packages"))

        def pyc_bytes() -> int:
            return sum(du(d) for d in vsite.rglob("__pycache__") if d.relative_to(vsite).parts[0].split("-")[0]
                       not in TOOLING)
        before = pyc_bytes()
        code = FIRST_RUN if args.bundle else "import numpy, runtime"
        run = subprocess.run([str(venv / "bin" / "python"), "-c", code, *([str(args.bundle.resolve())] if args.bundle
                              else [])], env=board_env(), cwd=work, capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            raise BenchError(f"the first run failed: {run.stderr.strip().splitlines()[-1:]}")
        first_run = pyc_bytes() - before
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mb = 1e6
    total = packages + first_run
    doc = {"meta": meta(argv), "install": " ".join(install[:-1]) + f' "{install[-1]}"', "extra": args.extra,
           "platform": f"manylinux aarch64, CPython {args.python_version}", "bundle": str(args.bundle), "numpy_extension": native,
           "packages_bytes": packages, "first_run_pyc_bytes": first_run, "total_bytes": total,
           "goal_mb": GOAL_MB, "met": total / mb <= GOAL_MB,
           "sizes": dict(sorted(sizes.items(), key=lambda kv: -kv[1]))}
    write_json(args.out / "board_footprint.json", doc)
    lines = [f"# Board footprint: `{doc['install']}` on {doc['platform']}", "", *meta_markdown(doc["meta"]), "",
             f"- installed packages (no pip/setuptools, no .pyc): **{packages / mb:.1f} MB**",
             f"- .pyc a first start writes ({'runtime.load + predict, TFLite formats of ' + str(args.bundle) if args.bundle else 'import numpy, runtime'}): "
             f"{first_run / mb:.1f} MB",
             f"- after the first start: **{total / mb:.1f} MB** (goal <= {GOAL_MB:.0f} MB: "
             f"{'met' if doc['met'] else 'missed'})", "", "| entry | MB |", "|---|---:|"]
    lines += [f"| {k} | {v / mb:.1f} |" for k, v in doc["sizes"].items() if v >= 0.05 * mb]
    write_text(args.out / "board_footprint.md", "\n".join(lines) + "\n")
    print(f"{doc['install']} on aarch64: {packages / mb:.1f} MB + {first_run / mb:.1f} MB of first-run .pyc = "
          f"{total / mb:.1f} MB; wrote {args.out / 'board_footprint.md'}")
    return 0


if __name__ == "__main__":
    cli(main)
