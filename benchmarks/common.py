"""What every benchmark script records and how it writes: the machine, the versions, the command
line, atomic JSON/Markdown/PNG writes, and running the project's CLIs as subprocesses.

Benchmarks drive `python -m compress|export|device_bench` with argument lists (never a shell
string) so that what is measured is exactly what a user runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from compress.provenance import code_version  # noqa: E402  (the repo's own code, not an installed copy)

RESULTS = REPO / "benchmarks" / "results"
PYTHON = sys.executable
DEFAULT_DATA_DIR = Path("/work/shared/data")

PACKAGES = ("torch", "torch-pruning", "numpy", "onnx", "onnxruntime", "litert-torch", "ai-edge-litert",
            "matplotlib")


class BenchError(Exception):
    """A user error: printed as one line, exit status 2."""


def cli(main) -> None:
    """A benchmark script's entry point: main()'s status, a BenchError as one line and exit 2."""
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


class Parser(argparse.ArgumentParser):
    """argparse that raises BenchError (one line, exit 2) instead of printing the usage."""

    def error(self, message):
        raise BenchError(message)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "cores_usable": usable,
            "machine": platform.machine(), "os": f"{platform.system()} {platform.release()}",
            # Other work on the host slows every number here: record how busy it was.
            "load_average_at_start": [round(v, 2) for v in load] if load else None}


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def meta(argv: Optional[Sequence[str]] = None) -> dict:
    """The provenance block every result JSON starts with."""
    args = list(sys.argv[1:] if argv is None else argv)
    script = Path(sys.argv[0]).resolve() if sys.argv[0] else None
    if script is not None and script.is_relative_to(REPO):
        script = script.relative_to(REPO)
    return {"command": shlex.join(["python", *([str(script)] if script else []), *args]),
            "created": now_iso(), "machine": machine(), "versions": versions(), "code": code_version()}


def meta_markdown(m: dict) -> list[str]:
    mach, ver = m["machine"], m["versions"]
    load = mach.get("load_average_at_start")
    pkgs = ", ".join(f"{k} {v}" for k, v in ver.items() if v)
    return [f"- command: `{m['command']}`",
            f"- date: {m['created']}" + (f", finished {m['finished']}" if m.get("finished") else ""),
            f"- machine: {mach['cpu']}, {mach['cores_usable']}/{mach['cores']} cores, {mach['os']}"
            + (f", load average at start {load[0]:.2f}" if load else ""),
            f"- versions: {pkgs}",
            f"- code: {code_text(m.get('code'))}"]


def code_text(code: Optional[dict]) -> str:
    if not code or not code.get("commit"):
        return "not a git checkout" if code else "not recorded"
    return code["commit"][:12] + (" (with uncommitted changes)" if code.get("dirty") else "")


# ---------------------------------------------------------------------------------------------
# writing: temp file + rename, so an interrupted benchmark never leaves half a result


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1) + "\n")


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"{path}: cannot read JSON ({type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------------------------------------
# the project's CLIs


def child_env() -> dict:
    """The repo on PYTHONPATH so `python -m compress` works from any working directory."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def lock_folder(folder: Path) -> int:
    """Hold an exclusive lock on `folder` for this process (and the children given the fd), so two
    sessions never work on the same runs; returns the fd to pass on."""
    import fcntl
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BenchError(f"{folder} is in use by another session (or a run it started is still going); "
                         f"wait for it or stop it first") from None
    return fd


class Logged:
    """A command started with its stdout+stderr appended to a log (the command line and the time
    first); `wait()` gives (exit status, wall seconds). Several can run at once."""

    def __init__(self, cmd: Sequence[str], log: Path, pass_fds: Sequence[int] = ()):
        log.parent.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.file = open(log, "a")
        self.file.write(f"\n$ {shlex.join(cmd)}   # {now_iso()}\n")
        self.file.flush()
        try:
            self.proc = subprocess.Popen(list(cmd), stdout=self.file, stderr=subprocess.STDOUT, env=child_env(),
                                         pass_fds=tuple(pass_fds))
        except BaseException:
            self.file.close()
            raise

    def poll(self) -> Optional[int]:
        return self.proc.poll()

    def wait(self, timeout: Optional[float] = None) -> tuple[int, float]:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.file.write(f"timed out after {timeout} s\n")
            rc = 124
        finally:
            self.file.close()
        return rc, time.perf_counter() - self.started


def run_logged(cmd: Sequence[str], log: Path, timeout: Optional[float] = None,
               pass_fds: Sequence[int] = ()) -> tuple[int, float]:
    """Run `cmd` with its stdout+stderr appended to `log`; returns (exit status, wall seconds)."""
    return Logged(cmd, log, pass_fds).wait(timeout)


def tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
