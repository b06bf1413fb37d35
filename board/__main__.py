"""python -m board {test,try}: an emulated Raspberry Pi OS base — Debian bookworm arm64 under
qemu-user, its own sshd on 127.0.0.1 — to prove the device install on aarch64, and to try a bundle on
when there is no board yet. Needs root (debootstrap, chroot); see board/__init__.py.

    python -m board test [--skip-if-unable] [--bundle dist/NAME] [--out reports/board-test]
    python -m board try dist/NAME [--out reports/NAME-emulated]

Exit status: 0 passed (or skipped with --skip-if-unable, saying why), 1 a check failed, 2 bad input
or a machine that cannot (without --skip-if-unable).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

from . import check, host, root
from .emulated import EmulatedBoard, check_stopped
from .errors import BoardError, Unavailable

RUN_ARGS = ["--threads", "1", "--runs", "20", "--warmup", "2"]  # emulated latency means nothing: keep it short
FOOTPRINT_GOAL_MB = 120  # issue 17: the device install on a 64-bit Pi, installed packages (not pip/setuptools)


def log(line: str) -> None:
    print(line, flush=True)


class Timer:
    """Wall time of each phase, for the summary (CI has a 90-minute budget)."""

    def __init__(self) -> None:
        self.start, self.phases = time.time(), {}  # type: float, Dict[str, float]

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.time()
        try:
            yield
        finally:
            self.phases[name] = round(time.time() - t, 1)

    def total(self) -> float:
        return round(time.time() - self.start, 1)


@contextmanager
def cache_lock() -> Iterator[None]:
    """One board run at a time per cache: two would share the root's sshd folder and venvs."""
    root.CACHE.mkdir(parents=True, exist_ok=True)
    with open(root.CACHE / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another board run to finish (lock {root.CACHE / '.lock'})")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def git_commit() -> str:
    proc = subprocess.run(["git", "-C", str(root.REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                          text=True)
    dirty = subprocess.run(["git", "-C", str(root.REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (proc.stdout.strip() or "unknown") + ("-dirty" if dirty else "")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def make_test_bundle(work: Path, data_dir: Optional[str]) -> Path:
    """A small CNN trained for seconds on 2,000 real CIFAR-10 images (tests/run_fixture.py, so its
    logits are not a near-tie that rounding could flip), exported with `python -m export`."""
    candidates = [data_dir, os.environ.get("EDGESLIM_DATA"), str(root.REPO.parent / "shared" / "data")]
    npz = next((Path(d) / "cifar10.npz" for d in candidates if d and (Path(d) / "cifar10.npz").is_file()), None)
    if npz is None:
        raise BoardError("CIFAR-10 (cifar10.npz) not found in --data-dir, $EDGESLIM_DATA or ../shared/data; "
                         "or pass --bundle dist/NAME")
    train = ("import sys, numpy as np\nfrom pathlib import Path\nfrom tests.run_fixture import write_trained_run\n"
             "src, small, out = map(Path, sys.argv[1:4])\n"
             "with np.load(src, allow_pickle=False) as z:\n"
             "    np.savez(small, x_train=z['x_train'][:2000], y_train=z['y_train'][:2000], x_test=z['x_test'][:500],"
             " y_test=z['y_test'][:500], classes=z['classes'])\n"
             "write_trained_run(out, small, name='board-test')\n")
    run = work / "runs" / "board-test"
    dist = work / "dist" / "board-test"
    for argv, what in (([sys.executable, "-c", train, str(npz), str(work / "small-cifar10.npz"), str(run)],
                        "training the test model"),
                       ([sys.executable, "-m", "export", str(run), "--out", str(dist)], "python -m export")):
        proc = subprocess.run(argv, cwd=root.REPO, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise BoardError(f"{what} failed: {(check.error_lines(proc.stderr) or ['no output'])[-1]}")
    return dist


def sizes_mb(sizes: Dict[str, int]) -> Dict[str, float]:
    return {k: round(v / 1e6, 1) for k, v in sizes.items()}


def print_sizes(name: str, sizes: Dict[str, int]) -> None:
    biggest = sorted(((v, k) for k, v in sizes.items() if k.startswith("site-packages/")), reverse=True)[:4]
    parts = ", ".join(f"{k.split('/', 1)[1]} {v / 1e6:.1f}" for v, k in biggest)
    log(f"  {name}: {sizes['venv'] / 1e6:.1f} MB (du), packages {sizes['packages'] / 1e6:.1f} MB, our code "
        f"{sizes['own_code'] / 1e6:.2f} MB; biggest: {parts}")


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the two commands


def prepare_host(timer: Timer) -> str:
    """Root, Debian's qemu-user-static + debootstrap, a Debian mirror; Unavailable where not."""
    with timer.phase("host tools"):
        host.check_machine()
        host.install_tools()
        return host.debian_mirror()


def prepare(timer: Timer, mirror: str, venvs: List[str]) -> Dict[str, Any]:
    """The root and the board venvs (built or reused)."""
    with timer.phase("root"):
        board_root = root.build_root(mirror, log)
        python = root.python_version_in_root(board_root)
        if not python.startswith("3.11."):
            raise BoardError(f"the root's python3 is {python}, not 3.11 as on Raspberry Pi OS Bookworm")
    with timer.phase("board venvs"):
        paths = root.build_board_venvs(board_root, log, venvs)
    return {"root": board_root, "python": python, "venvs": paths}


class Checks:
    """Every check's outcome; a failure is recorded and the run goes on, so one run says all."""

    def __init__(self) -> None:
        self.passed, self.failures = 0, []  # type: int, List[str]

    def record(self, ok: bool, line: str, failure: Optional[str] = None) -> bool:
        log(f"  {'ok' if ok else 'FAIL'} {line}")
        if ok:
            self.passed += 1
        else:
            self.failures.append(failure or line)
        return ok

    def counts(self) -> str:
        return f"{self.passed} passed, {len(self.failures)} failed"


def run_remote_and_compare(board: EmulatedBoard, bundle: Path, venvs: Dict[str, str], remote_dir: str,
                           out: Path, checks: Checks) -> Dict[str, Any]:
    """Checks 1 and 2 with every board venv that has an interpreter for one of the bundle's formats."""
    artifacts = json.loads((bundle / "manifest.json").read_text())["artifacts"]
    formats = list(artifacts)
    reports, outputs = {}, []
    for name, venv in venvs.items():
        backends = check.board_backends(board, venv)
        if not check.runnable_formats(formats, backends):
            log(f"remote: {venv} skipped: its interpreters ({', '.join(backends) or 'none'}) run none of "
                f"{', '.join(formats)}")
            continue
        log(f"remote: {bundle.name} with {venv}/bin/python ({', '.join(backends)})")
        try:
            report = check.remote(board, bundle, venv, out / f"{name}.json", remote_dir, RUN_ARGS)
        except check.CheckFailed as e:
            checks.record(False, str(e))
            continue
        d = report["device"]
        measured = [r["format"] for r in report["results"]]
        reports[name] = {"report": str(out / f"{name}.json"), "formats": measured, "backends": d["backends"],
                         "machine": d["machine"], "os": d["os"], "python": d["python"], "emulation": d["emulation"]}
        checks.record(True, f"{', '.join(measured)} measured on {d['machine']}, {d['os']}, Python {d['python']}, "
                      f"marked emulated ({d['emulation']})")
        for fmt in measured:
            try:
                scale = ((artifacts[fmt].get("output") or {}).get("quantization") or {}).get("scale")
                r = check.compare_outputs(check.board_logits(board, venv, remote_dir, fmt),
                                          check.host_logits(bundle, fmt), fmt, scale)
            except check.CheckFailed as e:
                checks.record(False, str(e))
                continue
            outputs.append({"venv": name, **r})
            steps = f" = {r['max_abs_diff_quant_steps']:g} quantisation steps" if "max_abs_diff_quant_steps" in r else ""
            checks.record(r["ok"], f"{fmt} outputs, {r['board_backend']} on aarch64 vs {r['host_backend']} on "
                          f"x86_64, {r['images']} images: max |diff| {r['max_abs_diff']:.2g}{steps}, same argmax "
                          f"{100 * r['argmax_agreement']:.1f} % ({r['check']})",
                          f"{name} {fmt}: outputs differ from the host's ({r['check']} not met)")
    covered = sorted({f for r in reports.values() for f in r["formats"]})
    missing = sorted(set(formats) - set(covered))
    checks.record(not missing, f"every format of the bundle measured on the board: {', '.join(covered) or 'none'}",
                  f"formats no board venv measured: {', '.join(missing)}")
    return {"reports": reports, "outputs": outputs, "formats_covered": covered}


def summary_report(out: Path, reports: Dict[str, Any]) -> Optional[str]:
    """`device_bench report` of the board's reports: the emulated board labelled as such."""
    files = [r["report"] for r in reports.values()]
    if not files:
        return None
    proc = check.bench("report", *files, "--out", out / "summary")
    if proc.returncode != 0:
        raise check.CheckFailed(f"device_bench report failed: {(check.error_lines(proc.stderr) or ['?'])[-1]}")
    readme = (out / "summary" / "README.md").read_text()
    if "(emulated)" not in readme or "never quote them as board figures" not in readme:
        raise check.CheckFailed("the summary does not mark the board as emulated")
    return str(out / "summary" / "README.md")


def cmd_test(args: argparse.Namespace, timer: Timer) -> int:
    checks = Checks()
    summary: Dict[str, Any] = {"command": "python -m board test", "commit": git_commit(),
                               "date": time.strftime("%Y-%m-%d"), "host_cpu": cpu_model()}
    out = Path(args.out)
    mirror = prepare_host(timer)
    with tempfile.TemporaryDirectory(prefix="edgeslim-board.") as tmp, cache_lock(), host.aarch64_binfmt():
        work = Path(tmp)
        env = prepare(timer, mirror, list(root.BOARD_VENVS))
        board_root = env["root"]
        with timer.phase("x86 venv"):
            x86_venv = root.build_x86_venv(log)
        with timer.phase("bundle"):
            bundle = Path(args.bundle) if args.bundle else make_test_bundle(work, args.data_dir)
            log(f"bundle: {bundle}")
        for folder in (check.TEST_DIR, f"{check.TEST_DIR}-bare"):  # what an earlier run deployed
            host.remove_tree(board_root / root.HOME.lstrip("/") / folder)
        with timer.phase("board checks"), EmulatedBoard(board_root, work) as board:
            log(f"board: sshd on {board.host} (aarch64 under qemu-user), Python {env['python']}")
            summary.update(run_remote_and_compare(board, bundle, env["venvs"], check.TEST_DIR, out, checks))
            try:
                summary["summary"] = summary_report(out, summary["reports"])
                checks.record(True, f"device_bench report labels the board (emulated): {summary['summary']}")
            except check.CheckFailed as e:
                checks.record(False, str(e))
            log("bad input on the board vs x86_64 (the same device install there):")
            bad = check.bad_input_errors(board, check.bad_bundles(bundle, work / "bad"), x86_venv / "bin" / "python",
                                         env["venvs"]["edgeslim-venv"] + "/bin/python", check.TEST_DIR)
            bad.append(check.missing_numpy_advice(board, bundle, check.TEST_DIR))
            for r in bad:
                shown = r.get("error") or (r["board"]["stderr"][-1] if r["board"]["stderr"] else "(no stderr)")
                checks.record(r["ok"], f"{r['case']}: {shown}", f"bad input '{r['case']}': "
                              + json.dumps({k: r.get(k) for k in ("board", "x86_64", "exit", "error")}))
            summary["bad_input"] = bad
        try:
            check_stopped(board_root)
            checks.record(True, "nothing left running or mounted in the root")
        except BoardError as e:
            checks.record(False, str(e))
        log("sizes (du):")
        sizes = {name: root.venv_sizes(board_root / path.lstrip("/")) for name, path in env["venvs"].items()}
        sizes["x86-device-venv"] = root.venv_sizes(x86_venv)
        for name, s in sizes.items():
            print_sizes(name + (" (x86_64)" if name.startswith("x86") else " (aarch64)"), s)
        summary["sizes_mb"] = {k: sizes_mb(v) for k, v in sizes.items()}
        # The footprint goal (issue 17): README's install on the board, measured after the checks
        # ran in it, so it holds the .pyc a first start writes.
        packages = sizes["edgeslim-venv"]["packages"] / 1e6
        summary["footprint"] = {"venv": "edgeslim-venv", "packages_mb": round(packages, 1),
                                "goal_mb": FOOTPRINT_GOAL_MB, "met": packages <= FOOTPRINT_GOAL_MB}
        log(f"footprint: {' '.join(root.device_install('litert'))} on aarch64: {packages:.1f} MB of packages "
            f"after the checks ran (goal <= {FOOTPRINT_GOAL_MB} MB: {'met' if packages <= FOOTPRINT_GOAL_MB else 'MISSED'})")
        summary["device_install"] = {name: " ".join(root.device_install(extra))
                                     for name, extra in root.BOARD_VENVS.items()}
    summary["seconds"] = {**timer.phases, "total": timer.total()}
    summary["checks"] = {"passed": checks.passed, "failed": checks.failures}
    write_json(out / "board-test.json", summary)
    log(f"times: {', '.join(f'{k} {v:.0f} s' for k, v in summary['seconds'].items())}")
    log(f"summary: {out / 'board-test.json'}")
    for f in checks.failures:
        log(f"FAILED: {f}")
    log(f"test-board: {checks.counts()}")
    return 1 if checks.failures else 0


def cmd_try(args: argparse.Namespace, timer: Timer) -> int:
    bundle = Path(args.bundle)
    if not (bundle / "manifest.json").is_file():
        raise BoardError(f"{bundle} is not a bundle folder (dist/NAME with manifest.json)")
    out = Path(args.out or f"reports/{bundle.name}-emulated")
    checks = Checks()
    mirror = prepare_host(timer)
    with tempfile.TemporaryDirectory(prefix="edgeslim-board.") as tmp, cache_lock(), host.aarch64_binfmt():
        env = prepare(timer, mirror, list(root.BOARD_VENVS))
        with EmulatedBoard(env["root"], Path(tmp)) as board:
            log(f"board: sshd on {board.host} (aarch64 under qemu-user), Python {env['python']}")
            result = run_remote_and_compare(board, bundle, env["venvs"], "edgeslim", out, checks)
            readme = summary_report(out, result["reports"])
        check_stopped(env["root"])
    write_json(out / "board-try.json", {"bundle": str(bundle), "commit": git_commit(),
                                        "failed": checks.failures, **result})
    if readme:
        log(f"summary: {readme} (latencies are the emulator's, not a board's)")
    for f in checks.failures:
        log(f"FAILED: {f}")
    log(f"board-try: {bundle.name} on emulated aarch64 Debian 12: {checks.counts()}")
    return 1 if checks.failures else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m board", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("test", help="prove the device install on the emulated board (make test-board)")
    t.add_argument("--skip-if-unable", action="store_true",
                   help="where this machine cannot run the board (not root, no apt, no binfmt_misc), say why "
                   "and exit 0 (CI)")
    t.add_argument("--bundle", help="test this bundle instead of training a small one (needs a tflite model)")
    t.add_argument("--data-dir", help="folder with cifar10.npz for the small test model (default "
                   "$EDGESLIM_DATA or ../shared/data)")
    t.add_argument("--out", default="reports/board-test", help="reports and board-test.json (default "
                   "reports/board-test)")
    y = sub.add_parser("try", help="deploy + run + compare your bundle on the emulated board (make board-try)")
    y.add_argument("bundle", help="bundle folder, e.g. dist/vgg16-f76")
    y.add_argument("--out", help="folder for the reports and summary (default reports/NAME-emulated)")
    return p


def _terminate(signum, frame):  # SIGTERM/SIGHUP: unwind, so every context manager undoes its change
    raise SystemExit(128 + signum)


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    timer = Timer()
    commands: Dict[str, Callable[[argparse.Namespace, Timer], int]] = {"test": cmd_test, "try": cmd_try}
    try:
        return commands[args.command](args, timer)
    except Unavailable as e:
        if getattr(args, "skip_if_unable", False):
            log(f"test-board: SKIPPED: this machine cannot run the emulated board: {e}")
            return 0
        print(f"board: error: {e}", file=sys.stderr)
        return 2
    except BoardError as e:
        print(f"board: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("board: interrupted; what it started is stopped and unmounted", file=sys.stderr)
        return 130
    except SystemExit:
        print("board: terminated; what it started is stopped and unmounted", file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())
