"""What the host needs to run an arm64 root: root, Debian's qemu-user-static and debootstrap, and
the kernel's binfmt_misc handing aarch64 programs to qemu. Every change made here is undone by
the context manager that made it; installed packages stay (they are the documented set-up).
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List

from .errors import BoardError, Unavailable

APT_PACKAGES = ("qemu-user-static", "debootstrap", "binfmt-support")
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
QEMU_FORMAT = "qemu-aarch64"


def run(argv: List[str], what: str, **kw) -> subprocess.CompletedProcess:
    """Run a host tool; a failure is a BoardError naming `what` and the tool's last words."""
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        tail = [ln for ln in (proc.stderr + proc.stdout).strip().splitlines() if ln.strip()]
        raise BoardError(f"{what} failed (exit {proc.returncode}): {tail[-1].strip() if tail else 'no output'}")
    return proc


def check_machine() -> None:
    """Raise Unavailable (the run is skipped, saying why) where an emulated board cannot be built."""
    if platform.system() != "Linux":
        raise Unavailable(f"needs Linux (chroot, binfmt_misc); this is {platform.system()}")
    if platform.machine() not in ("x86_64", "amd64"):
        raise Unavailable(f"expects an x86-64 host to emulate aarch64 on; this is {platform.machine()}")
    if os.geteuid() != 0:
        raise Unavailable("needs root (debootstrap, chroot and mount do); run it as root")


def install_tools() -> None:
    """apt-get the Debian packages that are missing. Unavailable when apt cannot."""
    missing = [p for p in APT_PACKAGES if not _installed(p)]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise Unavailable(f"{', '.join(missing)} not installed and there is no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"installing {' '.join(missing)} (apt-get)", flush=True)
    argv = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
    if subprocess.run(argv, capture_output=True, env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env)
        proc = subprocess.run(argv, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            raise Unavailable(f"apt-get could not install {' '.join(missing)}: "
                              f"{tail[-1] if tail else 'exit ' + str(proc.returncode)}")


def _installed(package: str) -> bool:
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${Status}", package], capture_output=True, text=True)
    return proc.returncode == 0 and proc.stdout.endswith(" installed")


def debian_mirror() -> str:
    """The Debian mirror the host's apt already uses (deb822 .sources or one-line sources.list), so
    the board is built from the same place as the host's own packages."""
    override = os.environ.get("EDGESLIM_DEBIAN_MIRROR")
    if override:
        return override
    candidates: List[str] = []
    sources = Path("/etc/apt/sources.list.d")
    for path in sorted(sources.glob("*.sources")) if sources.is_dir() else []:
        for stanza in path.read_text(errors="replace").split("\n\n"):
            fields = dict(line.split(":", 1) for line in stanza.splitlines()
                          if ":" in line and not line.startswith(("#", " ")))
            fields = {k.strip(): v.strip() for k, v in fields.items()}
            suites = fields.get("Suites", "").split()
            if "deb" in fields.get("Types", "").split() and "bookworm" in suites and \
                    "main" in fields.get("Components", "").split() and fields.get("Enabled", "yes") != "no":
                candidates += fields.get("URIs", "").split()
    lists = [Path("/etc/apt/sources.list")] + (sorted(sources.glob("*.list")) if sources.is_dir() else [])
    for path in lists:
        for line in (path.read_text(errors="replace").splitlines() if path.is_file() else []):
            words = [w for w in line.split() if not w.startswith("[")]
            if len(words) >= 4 and words[0] == "deb" and words[2] == "bookworm" and "main" in words[3:]:
                candidates.append(words[1])
    for uri in candidates:
        if uri.startswith(("http://", "https://")) and "security" not in uri:
            return uri
    raise Unavailable("the host's apt sources name no Debian bookworm mirror; set EDGESLIM_DEBIAN_MIRROR")


@contextmanager
def aarch64_binfmt() -> Iterator[None]:
    """Make the kernel run aarch64 ELF files with qemu-aarch64-static, for as long as the block
    runs; then put binfmt_misc back the way it was (unregistered, unmounted) if we changed it.
    Debian registers qemu with the F (fix-binary) flag: the kernel opens the interpreter once, at
    registration, so it need not exist inside the chroot."""
    mounted = enabled = False
    try:
        if not (BINFMT_DIR / "register").exists():
            proc = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise Unavailable(f"cannot mount binfmt_misc ({proc.stderr.strip() or 'mount failed'}); "
                                  "a container may need --privileged")
            mounted = True
        entry = BINFMT_DIR / QEMU_FORMAT
        if not entry.exists() or not entry.read_text().startswith("enabled"):
            proc = subprocess.run(["update-binfmts", "--enable", QEMU_FORMAT], capture_output=True, text=True)
            if proc.returncode != 0:  # qemu-user-static was configured before binfmt-support: import it
                subprocess.run(["update-binfmts", "--import", QEMU_FORMAT], capture_output=True)
                proc = subprocess.run(["update-binfmts", "--enable", QEMU_FORMAT], capture_output=True, text=True)
            if proc.returncode != 0 or not entry.exists():
                raise Unavailable(f"cannot register {QEMU_FORMAT} with binfmt_misc: "
                                  f"{proc.stderr.strip() or 'update-binfmts failed'}")
            enabled = True
        flags = next((ln.split(":", 1)[1].strip() for ln in entry.read_text().splitlines()
                      if ln.startswith("flags:")), "")
        if "F" not in flags:
            raise Unavailable(f"{entry} is registered without the F (fix-binary) flag, so chrooted aarch64 "
                              "programs cannot find qemu; re-register it with Debian's qemu-user-static")
        yield
    finally:
        if enabled:
            subprocess.run(["update-binfmts", "--disable", QEMU_FORMAT], capture_output=True)
        if mounted:
            subprocess.run(["umount", str(BINFMT_DIR)], capture_output=True)


def mounts_under(path: Path) -> List[Path]:
    """Mount points at or below `path`, deepest first (from /proc/self/mountinfo)."""
    root = str(path.resolve())
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # mountinfo writes a space in a path as \040
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
        if point == root or point.startswith(root + "/"):
            found.append(Path(point))
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def unmount_all(path: Path) -> None:
    """Unmount everything below `path` (what a killed debootstrap or run may have left)."""
    for point in mounts_under(path):
        proc = subprocess.run(["umount", str(point)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise BoardError(f"cannot unmount {point}: {proc.stderr.strip()} (a process may still use it)")


def remove_tree(path: Path) -> None:
    """rm -rf for a root filesystem: never while anything (the host's /proc or /dev) is mounted in it."""
    if not path.exists():
        return
    unmount_all(path)
    if mounts_under(path):
        raise BoardError(f"refusing to delete {path}: something is still mounted inside it")
    shutil.rmtree(path)
