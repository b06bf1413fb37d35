"""deploy / remote: ship a bundle and the pure-Python code to a board over SSH, verify it there,
switch `current` atomically, run the benchmark on the board and fetch the report.

Board layout and the board-side steps are in _board.py (sent as source with `python -c`).
One deploy = two ssh calls: `probe` (Python? numpy? an interpreter? release already there?),
then `install` (a tar streamed to the board's stdin, checked file by file against sha256s that
came over the command line) or `activate` when the identical release is already on the board.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import re
import shlex
import sys
import tarfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import _board, ssh
from .bundle import BundleInfo, verify_files
from .errors import FAILED, BenchError
from .files import sha256_file, write_json_atomic
from .ssh import SshOptions, Target

CODE_PACKAGES = ("runtime", "device_bench")
Log = Callable[[str], None]


@dataclass(frozen=True)
class BoardConfig:
    python: str = "python3"  # the board's interpreter: a command name, or a path (~/ and relative = from $HOME)
    remote_dir: str = "edgeslim"  # from $HOME unless absolute
    keep: int = 3  # releases kept on the board, the current one included

    def checked(self) -> BoardConfig:
        for what, value in (("--python", self.python), ("--remote-dir", self.remote_dir)):
            if not value or value.startswith("-") or any(c in value for c in "\n\r\0") \
                    or (value.startswith("~") and not value.startswith("~/")):
                raise BenchError(f"bad {what} {value!r}")
        if "/" not in self.python and not re.match(r"^[A-Za-z0-9._+-]+$", self.python):
            raise BenchError(f"bad --python {self.python!r}: a command name or a path")
        if self.keep < 1:
            raise BenchError(f"--keep must be at least 1, got {self.keep}")
        return self


def remote_path(path: str) -> str:
    """A board path as one shell word. Relative paths (and ~/...) start at the login's $HOME,
    spelled "$HOME"/... so they still hold after a `cd`."""
    if path.startswith("~/"):
        path = path[2:]
    return shlex.quote(path) if path.startswith("/") else '"$HOME"/' + shlex.quote(path)


def python_word(cfg: BoardConfig) -> str:
    return remote_path(cfg.python) if "/" in cfg.python else shlex.quote(cfg.python)


# --------------------------------------------------------------------------- the release


@dataclass
class Release:
    name: str  # <bundle>-<manifest sha256[:12]>-<code sha256[:8]>: identical content, identical name
    files: List[Tuple[str, Path]]  # (path inside the release, local file)
    checksums: bytes  # CHECKSUMS.json
    checksums_sha: str
    size: int

    def stream_to(self, pipe, progress: Optional[Callable[[int], None]] = None) -> None:
        """Write the release as a tar stream (no temp file, no local tar needed)."""
        sink = _Counting(pipe, progress)
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_tarinfo(_board.CHECKSUMS, len(self.checksums)), io.BytesIO(self.checksums))
            for rel, path in self.files:
                with open(path, "rb") as f:
                    tar.addfile(_tarinfo(rel, path.stat().st_size), f)


class _Counting:
    def __init__(self, pipe, progress):
        self.pipe, self.progress = pipe, progress

    def write(self, data: bytes) -> int:
        self.pipe.write(data)
        if self.progress:
            self.progress(len(data))
        return len(data)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, int(time.time())
    return info


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise BenchError(f"cannot find the {name!r} package to ship to the board (run from the edgeslim checkout "
                         "or install edgeslim)")
    return Path(list(spec.submodule_search_locations)[0])


def code_files() -> List[Tuple[str, Path]]:
    """The packages' own .py/.md files: only folders that are packages (have an __init__.py), so
    a build/ or *.egg-info left by `pip install ./runtime` never reaches the board."""
    files = []
    for pkg in CODE_PACKAGES:
        root = package_dir(pkg)
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            folders = [root.joinpath(*rel.parts[:i]) for i in range(1, len(rel.parts))]
            if path.is_file() and path.suffix in (".py", ".md") and "__pycache__" not in rel.parts \
                    and not any(p.startswith(".") for p in rel.parts) \
                    and all((f / "__init__.py").is_file() for f in folders):
                files.append((f"code/{pkg}/{rel.as_posix()}", path))
    return files


def build_release(bundle: BundleInfo) -> Release:
    """Check the bundle against its manifest, then list everything the board gets with sha256s."""
    digests = {f"bundle/{rel}": (bundle.root / rel, sha) for rel, sha in verify_files(bundle).items()}
    return _release(bundle.name, bundle.manifest_sha256, digests)


def folder_release(name: str, root: Path, files: Sequence[str]) -> Release:
    """A release whose payload (the board's `bundle/` folder) is `files` of `root`, e.g. the probe
    set of `device_bench profile`; named by the sha256 of their listing like a bundle's."""
    digests = {f"bundle/{rel}": (root / rel, sha256_file(root / rel)) for rel in files}
    listing = hashlib.sha256("".join(f"{r} {s}\n" for r, (_, s) in sorted(digests.items())).encode()).hexdigest()
    return _release(name, listing, digests)


def _release(bundle_name: str, content_sha: str, digests: Dict[str, Tuple[Path, str]]) -> Release:
    code = {rel: (path, sha256_file(path)) for rel, path in code_files()}
    code_sha = hashlib.sha256("".join(f"{r} {s}\n" for r, (_, s) in sorted(code.items())).encode()).hexdigest()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", bundle_name).strip("._-")[:60] or "bundle"
    name = f"{slug}-{content_sha[:12]}-{code_sha[:8]}"
    everything = {**digests, **code}
    checksums = json.dumps({"release": name, "bundle": bundle_name, "manifest_sha256": content_sha,
                            "files": {rel: sha for rel, (_, sha) in sorted(everything.items())}},
                           indent=1, sort_keys=True).encode()
    files = [(rel, path) for rel, (path, _) in sorted(everything.items())]
    return Release(name=name, files=files, checksums=checksums,
                   checksums_sha=hashlib.sha256(checksums).hexdigest(),
                   size=sum(p.stat().st_size for _, p in files))


# --------------------------------------------------------------------------- board calls


def board_call(target: Target, opts: SshOptions, cfg: BoardConfig, op: str, args: Sequence[str],
               stdin_writer=None) -> Dict[str, Any]:
    """Run one _board.py op with the board's Python; its JSON answer, or a BenchError."""
    source = Path(_board.__file__).read_text()
    words = [python_word(cfg), "-c", shlex.quote(source), shlex.quote(op), remote_path(cfg.remote_dir)]
    words += [shlex.quote(a) for a in args]
    res = ssh.run(target, opts, " ".join(words), stdin_writer=stdin_writer)
    answers = [ln[len(_board.MARKER):] for ln in res.stdout.decode("utf-8", "replace").splitlines()
               if ln.startswith(_board.MARKER)]
    if not answers:
        if res.returncode == 127:
            raise BenchError(f"{target.label}: no Python at {cfg.python!r} on the board; install python3 "
                             "(3.9+) or pass --python PATH", exit_code=FAILED)
        last = [ln for ln in res.stderr.splitlines() if ln.strip()]
        if any("SyntaxError" in ln for ln in last):
            raise BenchError(f"{target.label}: {cfg.python} on the board is too old; Python 3.9 or newer is "
                             "needed (install it or pass --python PATH)", exit_code=FAILED)
        raise BenchError(f"{target.label}: {cfg.python} on the board failed (exit {res.returncode}): "
                         f"{last[-1].strip() if last else 'no output'}", exit_code=FAILED)
    answer = json.loads(answers[-1])
    if not answer.get("ok"):
        raise BenchError(f"{target.label}: {answer.get('error')}", exit_code=FAILED)
    return answer


def install_advice(target: Target, cfg: BoardConfig, probe: Dict[str, Any]) -> Optional[str]:
    """None when the board's Python can run a bundle; otherwise exactly what to install, one line."""
    where = f"{target.label} ({cfg.python} = Python {probe['python']}, {probe['machine']})"
    if not probe["python_ok"]:
        return f"{where}: Python 3.9 or newer is needed; install it or pass --python PATH"
    have_backend = any(probe["backends"].values())
    if probe["numpy"] and have_backend:
        return None
    missing = " and ".join(w for w, ok in (("numpy", probe["numpy"]), ("a TFLite/ONNX interpreter", have_backend))
                           if not ok)
    # 32-bit Pi OS has no ai-edge-litert wheels; tflite-runtime's armv7 wheels need numpy<2.
    armv7 = probe["machine"].lower().startswith(("armv7", "armv6"))
    tflite = ['"numpy<2"', "tflite-runtime"] if armv7 else ["ai-edge-litert"]
    packages = " ".join(([] if probe["numpy"] or armv7 else ["numpy"]) + ([] if have_backend else tflite))
    alternative = "" if have_backend else " (or onnxruntime instead of the TFLite package, for the ONNX formats)"
    if probe["externally_managed"] and not probe["in_venv"]:
        return (f"{where} has no {missing}. This Python is managed by the OS; make a venv on the board: "
                f"`python3 -m venv ~/edgeslim-venv && ~/edgeslim-venv/bin/pip install {packages}`{alternative}, "
                "then pass --python ~/edgeslim-venv/bin/python")
    pip = f"`{cfg.python} -m pip install {packages}`"
    if not probe.get("pip"):
        pip = f"`{cfg.python} -m ensurepip && {cfg.python} -m pip install {packages}` (this Python has no pip)"
    return f"{where} has no {missing}. Install on the board: {pip}{alternative}"


def upload_progress(target: Target, release: Release, log: Log) -> Callable[[int], None]:
    """A log line at every quarter of the upload (bundles for real models are tens of MB)."""
    sent, quarter = 0, 1

    def progress(n: int) -> None:
        nonlocal sent, quarter
        sent += n
        if release.size > 1_000_000 and quarter < 4 and sent >= quarter * release.size / 4:
            log(f"{target.label}: uploaded {min(sent, release.size) / 1e6:.1f}/{release.size / 1e6:.1f} MB")
            while quarter < 4 and sent >= quarter * release.size / 4:
                quarter += 1

    return progress


def deploy(bundle: Optional[BundleInfo], target: Target, opts: SshOptions, cfg: BoardConfig, log: Log,
           release: Optional[Release] = None) -> Dict[str, Any]:
    """Put the release (by default: the bundle's) on the board and make it `current`. Returns
    what the board reported."""
    release = release or build_release(bundle)
    probe = board_call(target, opts, cfg, "probe", [release.name, release.checksums_sha])
    advice = install_advice(target, cfg, probe)
    if advice:
        raise BenchError(advice, exit_code=FAILED)
    backends = ", ".join(f"{d} {v}" for d, v in probe["backends"].items() if v)
    log(f"{target.label}: Python {probe['python']} ({probe['machine']}), numpy {probe['numpy']}, {backends}")
    args = [release.name, release.checksums_sha, str(cfg.keep)]
    if probe.get("release_intact"):
        answer = board_call(target, opts, cfg, "activate", args)
        log(f"{target.label}: {release.name} already on the board, verified {answer['files']} files")
    else:
        log(f"{target.label}: uploading {release.name} ({release.size / 1e6:.1f} MB, {len(release.files)} files)")
        answer = board_call(target, opts, cfg, "install", args,
                            stdin_writer=lambda pipe: release.stream_to(pipe, upload_progress(target, release, log)))
        log(f"{target.label}: verified {answer['files']} files (sha256) on the board")
    log(f"{target.label}: current -> releases/{release.name}")
    answer["probe"] = probe
    return answer


# --------------------------------------------------------------------------- remote run


def remote_job(target: Target, opts: SshOptions, cfg: BoardConfig, release: Release, words: List[str],
               log: Log, what: str, echo: Optional[Log] = None) -> Tuple[Dict[str, Any], int, str, Dict[str, Any]]:
    """Deploy `release`, run `python -m WORDS... --out ../reports/<new>.json` in its code folder on
    the board, fetch that JSON. Returns (the JSON, the command's exit status, its path on the
    board, what deploy reported). The board's stderr goes line by line to `echo` (default: log)."""
    deployed = deploy(None, target, opts, cfg, log, release)
    base = f"{cfg.remote_dir.rstrip('/')}/releases/{release.name}"
    report_name = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{uuid.uuid4().hex[:6]}.json"
    command = (f"cd {remote_path(base + '/code')} && {python_word(cfg)} -m "
               + ssh.quote_command(words + ["--out", f"../reports/{report_name}"]))
    log(f"{target.label}: running {what}")
    res = ssh.run(target, opts, command, echo=echo or (lambda line: log(f"{target.label}: {line}")))
    fetched = ssh.run(target, opts, "cat " + remote_path(f"{base}/reports/{report_name}"))
    if fetched.returncode != 0:
        tail = [ln for ln in res.stderr.splitlines() if ln.strip()]
        raise BenchError(f"{target.label}: {what} on the board failed (exit {res.returncode}): "
                         f"{tail[-1].strip() if tail else 'no output'}", exit_code=FAILED)
    try:
        report = json.loads(fetched.stdout)
    except ValueError:
        raise BenchError(f"{target.label}: the board's report is not JSON", exit_code=FAILED) from None
    return report, res.returncode, f"{base}/reports/{report_name}", deployed


def remote_run(bundle: BundleInfo, target: Target, opts: SshOptions, cfg: BoardConfig, run_args: List[str],
               out: Path, log: Log, release: Optional[Release] = None,
               finish: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """deploy + `python -m device_bench run` on the board + fetch the report to `out`.
    `finish(report)` may add to the report before it is written (predictions, budget)."""
    release = release or build_release(bundle)
    report, returncode, board_report, deployed = remote_job(
        target, opts, cfg, release, ["device_bench", "run", "../bundle", *run_args], log, "the benchmark")
    report["remote"] = {"host": target.label, "release": release.name, "python": cfg.python,
                        "board_report": board_report}
    if finish is not None:
        finish(report)
    write_json_atomic(out, report)
    log(f"{target.label}: report -> {out}")
    if returncode != 0:
        raise BenchError(f"{target.label}: some measurements failed on the board (see {out})", exit_code=FAILED)
    return {"deployed": deployed, "report": str(out)}


# --------------------------------------------------------------------------- fleets


def run_fleet(targets: List[Target], job: Callable[[Target, Log], Dict[str, Any]],
              out_dir: Optional[Path]) -> int:
    """`job` on every board in parallel. One board failing never stops the others; each board's
    log goes to OUT/<board>.log, the outcome of all to OUT/summary.json and stderr."""
    lock = threading.Lock()

    def one(target: Target) -> Dict[str, Any]:
        log_file = open(out_dir / f"{target.slug}.log", "w") if out_dir else None  # noqa: SIM115

        def log(line: str) -> None:
            with lock:
                if log_file:
                    log_file.write(line + "\n")
                    log_file.flush()
                else:
                    print(line, file=sys.stderr, flush=True)

        start = time.time()
        try:
            result = {"host": target.label, "status": "ok", **job(target, log)}
        except BenchError as e:
            log(f"error: {e}")
            result = {"host": target.label, "status": "failed", "error": str(e)}
        except Exception as e:  # a bug on one board's thread must not hide the others' results
            log(f"error: {type(e).__name__}: {e}")
            result = {"host": target.label, "status": "failed", "error": f"{type(e).__name__}: {e}"}
        finally:
            if log_file:
                log_file.close()
        result["seconds"] = round(time.time() - start, 1)
        with lock:
            if result["status"] == "ok":
                print(f"ok      {target.label}" + (f" -> {result['report']}" if "report" in result else ""),
                      file=sys.stderr, flush=True)
            else:
                print(f"FAILED  {result['error']}", file=sys.stderr, flush=True)
        return result

    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=min(8, len(targets))) as pool:
        results = list(pool.map(one, targets))
    failed = [r for r in results if r["status"] != "ok"]
    summary = {"hosts": [{k: v for k, v in r.items() if k != "deployed"} for r in results],
               "ok": len(results) - len(failed), "failed": len(failed)}
    if out_dir:
        write_json_atomic(out_dir / "summary.json", summary)
    print(f"{summary['ok']}/{len(results)} boards ok" + (f", {len(failed)} failed" if failed else "")
          + (f"; summary: {out_dir / 'summary.json'}" if out_dir else ""), file=sys.stderr, flush=True)
    return FAILED if failed else 0
