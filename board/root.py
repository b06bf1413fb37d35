"""The cached arm64 Debian bookworm root (the base of Raspberry Pi OS Bookworm) and the venvs in it.

    ~/.cache/edgeslim/board/                  ($EDGESLIM_BOARD_CACHE)
        bookworm-arm64/                       the root: debootstrap --arch=arm64, Debian's python3 (3.11),
                                              openssh-server, a user `pi` (uid 1000) as on a Pi
        bookworm-arm64/.edgeslim-root         stamp: the recipe it was built from; another recipe rebuilds it
        bookworm-arm64/home/pi/edgeslim-venv*/  one venv per device install; stamp .edgeslim-venv = the
                                              install command + a hash of the sources it was installed from
        x86-device-venv/                      the same device install on this host (Debian's python3), the
                                              x86 side of the comparisons

Everything that runs inside the root goes through `in_root`: private mount and pid namespaces, so its
/proc mount is invisible to the host and vanishes with it, and when its first process ends (or is
killed) the kernel ends every process it started. Nothing is left mounted or running on the host.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

from .errors import BoardError
from .host import remove_tree

CACHE = Path(os.environ.get("EDGESLIM_BOARD_CACHE") or Path.home() / ".cache" / "edgeslim" / "board")
SUITE, ARCH = "bookworm", "arm64"
# minbase + what a Pi OS Lite image has that we use: Python 3.11 with venv, an SSH server, CA certificates for pip.
PACKAGES = ("python3", "python3-venv", "openssh-server", "ca-certificates")
USER, UID = "pi", 1000
HOME = f"/home/{USER}"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Host variables that reach pip inside the root: a proxy, an index. (Host paths such as PIP_FIND_LINKS
# mean nothing in there.)
PASS_ENV = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "PIP_INDEX_URL",
            "PIP_DEFAULT_TIMEOUT")
REPO = Path(__file__).resolve().parents[1]
# What the device install reads from the checkout: the edgeslim-runtime distribution (runtime/ is
# the package and holds its own pyproject.toml; nothing of the host packages goes to the board).
SOURCES = ("runtime",)


def device_install(extra: str = "litert") -> List[str]:
    """THE device install, as README gives it for a Pi: run with the venv's pip from a copy of this
    checkout. One place: when the device packaging changes, change it here.

    --no-compile: pip would byte-compile every module of every wheel (numpy's tests and f2py
    included: ~18 MB on aarch64); without it Python writes the .pyc of just the modules a run
    imports, on the first start, so the footprint measured after the checks ran is what a board
    keeps."""
    return ["pip", "install", "--no-compile", f"./runtime[{extra}]"]


# name of the venv in pi's home -> the runtime's extra. `edgeslim-venv` is README's venv (its size is
# the footprint); the other two cover the other interpreters the board can have (onnxruntime;
# tflite-runtime, which needs numpy<2).
BOARD_VENVS = {"edgeslim-venv": "litert", "edgeslim-venv-onnx": "onnx", "edgeslim-venv-tflite": "tflite-runtime"}

Log = Callable[[str], None]


def root_dir() -> Path:
    return CACHE / f"{SUITE}-{ARCH}"


def recipe() -> str:
    return f"debootstrap --arch={ARCH} --variant=minbase --include={','.join(PACKAGES)} {SUITE}; user {USER}:{UID}\n"


def host_ca_bundle() -> Optional[Path]:
    """The CA bundle the host's pip is told to trust, if any: where the network reaches the package
    index through a TLS proxy, the board has to trust the same certificates to install anything."""
    for name in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        if os.environ.get(name) and Path(os.environ[name]).is_file():
            return Path(os.environ[name])
    return None


BOARD_CA = "/etc/ssl/certs/edgeslim-host-ca.crt"  # the host's bundle, copied in for pip


def env_for(home: str) -> Dict[str, str]:
    env = {"PATH": PATH, "HOME": home, "LANG": "C.UTF-8", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "PIP_NO_INPUT": "1", "PIP_PROGRESS_BAR": "off", "PYTHONUNBUFFERED": "1",
           "PIP_RETRIES": "10"}
    return {**env, **{k: os.environ[k] for k in PASS_ENV if k in os.environ}}


def in_root(root: Path, argv: List[str], *, as_user: bool = False, cwd: str = "/") -> List[str]:
    """`argv` run inside `root` (see the module docstring); as root, or as the board's user."""
    words = ["unshare", "--mount", "--pid", "--fork", "--kill-child", f"--root={root}", f"--wd={cwd}",
             "--mount-proc=/proc"]
    if as_user:
        words += ["--setgid", str(UID), "--setuid", str(UID)]
    return words + ["--", *argv]


def kill_namespace(proc: subprocess.Popen) -> None:
    """Stop an `in_root` command: SIGKILL its namespace's first process (the kernel then ends every
    process in the namespace), then unshare. --kill-child alone is not enough: the kernel drops that
    request when the child changes user (--setuid)."""
    for pid in children(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.kill()
    proc.wait()


def children(pid: int) -> List[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def run_logged(argv: List[str], what: str, log_file: Path, echo: Optional[Callable[[str], bool]] = None,
               env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None) -> None:
    """Run, writing all output to log_file and printing the lines `echo` picks (progress)."""
    with open(log_file, "a") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=cwd, errors="replace")
        last = []
        try:
            for line in proc.stdout:
                log.write(line)
                last = (last + [line.rstrip()])[-5:]
                if echo and echo(line):
                    print(f"    {line.rstrip()}", flush=True)
            proc.wait()
        except BaseException:  # interrupted: stop it and everything it started
            kill_namespace(proc)
            raise
    if proc.returncode != 0:
        tail = [ln for ln in last if ln.strip()]
        raise BoardError(f"{what} failed (exit {proc.returncode}): {tail[-1] if tail else 'no output'} "
                         f"(full log: {log_file})")


def _stage_line(line: str) -> bool:
    """debootstrap's stage lines (not the hundreds of per-package ones)."""
    return bool(re.match(r"I: (Retrieving Release|Checking|Installing (core|base)|Unpacking (required|the base)|"
                         r"Configuring (required|the base)|Base system)", line))


def build_root(mirror: str, log: Log) -> Path:
    """The root, built if it is missing or was built from another recipe. Built as <root>.partial
    and renamed when complete: an interrupted build is never mistaken for a root."""
    root = root_dir()
    stamp = root / ".edgeslim-root"
    if stamp.is_file() and stamp.read_text() == recipe():
        log(f"root: {root} (cached)")
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = root.with_name(root.name + ".partial")
    remove_tree(partial)
    log(f"root: building {root} with debootstrap (arm64 under qemu: ~10-20 min)")
    start = time.time()
    debootstrap = ["debootstrap", f"--arch={ARCH}", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                   SUITE, str(partial), mirror]
    # In its own mount namespace: the /proc and /sys debootstrap mounts in the target are gone when it
    # ends, even if it is killed.
    run_logged(["unshare", "--mount", "--", *debootstrap], "debootstrap", CACHE / "debootstrap.log",
               echo=_stage_line)
    configure_root(partial)
    remove_tree(root)
    partial.rename(root)
    log(f"root: built in {time.time() - start:.0f} s")
    return root


def configure_root(new_root: Path) -> None:
    """What a Pi image has beyond debootstrap that we use: the user `pi`. Stamped last."""
    # useradd leaves the password field "!", which sshd (without PAM) takes as a locked account and
    # refuses even key logins; "*" means no password, not locked.
    for argv in (["useradd", "--create-home", "--shell", "/bin/bash", "--uid", str(UID), USER],
                 ["usermod", "--password", "*", USER]):
        run_logged(in_root(new_root, argv), argv[0], CACHE / "debootstrap.log")
    write_atomic(new_root / ".edgeslim-root", recipe())


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def source_files() -> List[Path]:
    files = []
    for name in SOURCES:
        path = REPO / name
        if path.is_file():
            files.append(path)
        else:
            files += sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                            and p.suffix != ".pyc")
    return files


def sources_sha256() -> str:
    """What the installed package is made of: runtime's code and pyproject.toml (its README.md is
    copied for the package metadata, but its text changes nothing a board runs)."""
    h = hashlib.sha256()
    for path in source_files():
        if path.name != "README.md" or path.parent != REPO / "runtime":
            h.update(f"{path.relative_to(REPO).as_posix()}\0".encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def copy_sources(dest: Path, owner: Optional[int] = None) -> None:
    """What `pip install .` needs from this checkout, copied (pip and setuptools write build/ and
    *.egg-info next to the sources: not in the user's checkout)."""
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for path in source_files():
        target = partial / path.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    if owner is not None:
        for path in [partial, *partial.rglob("*")]:
            os.chown(path, owner, owner)
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)


def _pip_line(line: str) -> bool:
    return line.startswith(("Collecting", "Successfully installed", "ERROR"))


def venv_key(extra: str) -> str:
    """Line 1 decides what the venv holds (the install command, the declared dependencies): when it
    changes the venv is made anew. Line 2 is our code: when only it changes, the same install
    command is run again in the venv, as a user upgrades a board (pip reinstalls a local project)."""
    pyproject = hashlib.sha256((REPO / "runtime" / "pyproject.toml").read_bytes()).hexdigest()
    return f"{' '.join(device_install(extra))} pyproject {pyproject}\nsources {sources_sha256()}\n"


def venv_state(stamp: Path, extra: str) -> str:
    """'current', 'code changed' or 'new' (missing, or another install/dependency set)."""
    have = stamp.read_text().splitlines() if stamp.is_file() else []
    want = venv_key(extra).splitlines()
    if have == want:
        return "current"
    return "code changed" if have[:1] == want[:1] else "new"


def build_board_venvs(root: Path, log: Log, names: Iterable[str] = tuple(BOARD_VENVS)) -> Dict[str, str]:
    """Each board venv, made or updated as venv_key says. {name: its path on the board}."""
    src = root / HOME.lstrip("/") / "edgeslim-src"
    paths = {}
    copied = False
    for name in names:
        extra, install = BOARD_VENVS[name], device_install(BOARD_VENVS[name])
        venv = root / HOME.lstrip("/") / name
        stamp = venv / ".edgeslim-venv"
        paths[name] = f"{HOME}/{name}"
        state = venv_state(stamp, extra)
        if state == "current":
            log(f"venv: {HOME}/{name} (cached: {' '.join(install)})")
            continue
        if not copied:
            copy_sources(src, owner=UID)
            copied = True
        start = time.time()
        env = env_for(HOME)
        ca = host_ca_bundle()
        if ca:
            shutil.copyfile(ca, root / BOARD_CA.lstrip("/"))
            env["PIP_CERT"] = BOARD_CA
        logf = CACHE / f"{name}.log"
        if state == "new":
            log(f"venv: {HOME}/{name}: python3 -m venv + {' '.join(install)} (aarch64, under qemu)")
            shutil.rmtree(venv, ignore_errors=True)  # a venv's scripts name its path: made in place, stamped last
            logf.unlink(missing_ok=True)
            run_logged(in_root(root, ["python3", "-m", "venv", f"{HOME}/{name}"], as_user=True), "python3 -m venv",
                       logf, env=env)
        else:
            log(f"venv: {HOME}/{name}: the code changed, {' '.join(install)} again (aarch64, under qemu)")
            stamp.unlink()
        argv = [f"{HOME}/{name}/bin/{install[0]}", *install[1:]]
        for attempt in (1, 2, 3):  # the package index's connection is sometimes reset mid-install
            try:
                run_logged(in_root(root, argv, as_user=True, cwd=f"{HOME}/edgeslim-src"), " ".join(install), logf,
                           echo=_pip_line, env=env)
                break
            except BoardError as e:
                if attempt == 3:
                    raise
                log(f"venv: {e}; trying again")
        write_atomic(stamp, venv_key(extra))
        log(f"venv: {HOME}/{name} ready in {time.time() - start:.0f} s")
    return paths


def build_x86_venv(log: Log, extra: str = "litert") -> Path:
    """The same device install on this host, with Debian's python3 as on the board."""
    venv = CACHE / "x86-device-venv"
    stamp = venv / ".edgeslim-venv"
    if venv_state(stamp, extra) == "current":
        log(f"venv: {venv} (cached: {' '.join(device_install(extra))}, x86_64)")
        return venv
    python = Path("/usr/bin/python3")
    if not python.exists():
        raise BoardError("/usr/bin/python3 is missing: apt-get install python3-venv")
    log(f"venv: {venv}: {python} -m venv + {' '.join(device_install(extra))} (x86_64)")
    src = CACHE / "x86-src"
    copy_sources(src)
    shutil.rmtree(venv, ignore_errors=True)
    logf = CACHE / "x86-device-venv.log"
    logf.unlink(missing_ok=True)
    run_logged([str(python), "-m", "venv", str(venv)], "python3 -m venv (x86_64)", logf)
    install = device_install(extra)
    run_logged([str(venv / "bin" / install[0]), *install[1:]], " ".join(install) + " (x86_64)", logf, cwd=src)
    write_atomic(stamp, venv_key(extra))
    shutil.rmtree(src, ignore_errors=True)
    return venv


def du_bytes(path: Path) -> int:
    """Disk usage as `du -s` counts it (allocated blocks, hard links once)."""
    proc = subprocess.run(["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True, check=True)
    return int(proc.stdout.split()[0])


OWN_CODE = ("compress", "export", "runtime", "device_bench")
# What a venv needs only to install: not part of the footprint's "packages" figure.
TOOLING = ("pip", "setuptools", "pkg_resources", "_distutils_hack", "distutils")


def venv_sizes(venv: Path) -> Dict[str, int]:
    """du of the venv, of the installed packages (site-packages without pip/setuptools), of our own
    code in it (the edgeslim packages and their dist-info), and of each installed distribution's
    top-level folder, in bytes."""
    site = next(venv.glob("lib/python3*/site-packages"), None)
    if site is None:
        raise BoardError(f"{venv} has no site-packages")
    own = [site / p for p in OWN_CODE if (site / p).exists()] + sorted(site.glob("edgeslim*.dist-info"))
    sizes = {"venv": du_bytes(venv), "own_code": sum(du_bytes(p) for p in own),
             "packages": sum(du_bytes(e) for e in site.iterdir() if e.name.split("-")[0] not in TOOLING)}
    for entry in sorted(site.iterdir()):
        if entry.is_dir() and not entry.name.endswith((".dist-info", "__pycache__")) and entry.name not in OWN_CODE:
            sizes[f"site-packages/{entry.name}"] = du_bytes(entry)
    return sizes


def python_version_in_root(root: Path) -> str:
    proc = subprocess.run(in_root(root, ["python3", "-c", "import platform; print(platform.python_version())"]),
                          capture_output=True, text=True, env=env_for("/root"))
    if proc.returncode != 0:
        raise BoardError(f"python3 does not run in {root}: {proc.stderr.strip()[-200:]}")
    return proc.stdout.strip()
