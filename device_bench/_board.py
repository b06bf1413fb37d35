"""The board side of deploy: stdlib only, Python 3.9+, no numpy (it runs before we know numpy is
there). Sent as source with `python3 -c SOURCE OP ARGS...` over ssh, so it is one self-contained
file; every line it prints for the host starts with MARKER and carries JSON.

Layout on the board, under ROOT (default ~/edgeslim):

    releases/NAME/            one verified release: CHECKSUMS.json, bundle/, code/{runtime,device_bench}/
    releases/.NAME.incoming-* an upload in progress (removed when it fails)
    current -> releases/NAME  switched with rename(2) of a new symlink: always old or new, never half

Ops:
    probe   [ROOT NAME SHA]   Python, machine, numpy, interpreters; whether release NAME exists intact
    install ROOT NAME SHA KEEP  read a tar of the release on stdin, verify every sha256, then activate
    activate ROOT NAME SHA KEEP re-verify an existing release and point `current` at it
"""
# No `from __future__ import annotations` and no annotations: this file must at least start on an
# old Python (3.6+) to say that the board needs 3.9.
import hashlib
import json
import os
import platform
import shutil
import sys
import sysconfig
import tarfile
import time
import uuid

MARKER = "EDGESLIM-BOARD "
CHECKSUMS = "CHECKSUMS.json"
MIN_PYTHON = (3, 9)
# distribution name -> import name of every interpreter runtime.load can use, by family.
BACKEND_MODULES = {"ai-edge-litert": "ai_edge_litert", "tflite-runtime": "tflite_runtime",
                   "onnxruntime": "onnxruntime"}
BACKEND_FAMILY = {"ai-edge-litert": "tflite", "tflite-runtime": "tflite", "onnxruntime": "onnx"}


class BoardError(Exception):
    pass


def emit(obj) -> None:
    sys.stdout.write(MARKER + json.dumps(obj) + "\n")
    sys.stdout.flush()


def installed_version(dist: str, module: str):
    """The version of an importable package, or None; found without importing it."""
    import importlib.util

    try:
        if importlib.util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):
        return None
    try:
        from importlib import metadata

        return metadata.version(dist)
    except Exception:
        return "unknown"


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(release_dir: str, checksums_sha: str) -> int:
    """Every file CHECKSUMS.json lists is present with its sha256; CHECKSUMS.json is the one the
    host computed (its own sha256 came over the command line, not through the upload)."""
    listing = os.path.join(release_dir, CHECKSUMS)
    if not os.path.isfile(listing):
        raise BoardError(f"{CHECKSUMS} is missing")
    if sha256_of(listing) != checksums_sha:
        raise BoardError(f"{CHECKSUMS} differs from the host's")
    with open(listing) as f:
        files = json.load(f)["files"]
    for rel, digest in files.items():
        path = os.path.join(release_dir, rel)
        if not os.path.isfile(path):
            raise BoardError(f"{rel} is missing")
        if sha256_of(path) != digest:
            raise BoardError(f"{rel} does not match its sha256")
    return len(files)


def intact(root: str, name: str, checksums_sha: str) -> bool:
    try:
        verify(os.path.join(root, "releases", name), checksums_sha)
        return True
    except (BoardError, OSError, ValueError, KeyError):
        return False


def probe(args) -> dict:
    info = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "python_ok": sys.version_info[:2] >= MIN_PYTHON,
        "machine": platform.machine(),
        "system": platform.system(),
        "numpy": installed_version("numpy", "numpy"),
        "pip": installed_version("pip", "pip"),
        "backends": {d: installed_version(d, m) for d, m in BACKEND_MODULES.items()},
        "in_venv": sys.prefix != getattr(sys, "base_prefix", sys.prefix),
        "externally_managed": os.path.exists(os.path.join(sysconfig.get_paths()["stdlib"], "EXTERNALLY-MANAGED")),
    }
    if len(args) >= 3:
        root, name, checksums_sha = args[:3]
        info["release_intact"] = intact(root, name, checksums_sha)
        current = os.path.join(root, "current")
        info["current"] = os.readlink(current) if os.path.islink(current) else None
    return info


def safe_members(tar: tarfile.TarFile):
    """Regular files and folders with relative paths only: a tar can name ../../.bashrc."""
    for member in tar:
        parts = member.name.replace("\\", "/").split("/")
        if member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
            raise BoardError(f"refusing tar member {member.name!r}")
        yield member


def extract(stream, dest: str) -> None:
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in safe_members(tar):
            path = os.path.join(dest, *member.name.split("/"))
            if member.isdir():
                os.makedirs(path, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(path), exist_ok=True)
            src = tar.extractfile(member)
            with open(path, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())  # SD cards lose unsynced data on power cuts


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def activate(root: str, name: str) -> str:
    """Point ROOT/current at releases/NAME: a new symlink under a temporary name, renamed over
    the old one (rename(2) is atomic: what `ln -s tmp && mv -T tmp current` does)."""
    current = os.path.join(root, "current")
    if os.path.exists(current) and not os.path.islink(current):
        raise BoardError(f"{current} exists and is not a symlink; move it away")
    previous = os.readlink(current) if os.path.islink(current) else None
    tmp = os.path.join(root, f".current.{uuid.uuid4().hex[:8]}")
    os.symlink(os.path.join("releases", name), tmp)
    try:
        os.replace(tmp, current)
    except OSError:
        os.unlink(tmp)
        raise
    fsync_dir(root)
    return previous


def prune(root: str, keep: int, protect: set) -> list:
    """Delete the oldest releases beyond `keep` (never `protect`), and failed uploads older than a day."""
    releases = os.path.join(root, "releases")
    removed = []
    now = time.time()
    for entry in os.listdir(releases):
        path = os.path.join(releases, entry)
        if entry.startswith(".") and ".incoming-" in entry and now - os.path.getmtime(path) > 86400:
            shutil.rmtree(path, ignore_errors=True)
    done = sorted((e for e in os.listdir(releases) if not e.startswith(".") and e not in protect),
                  key=lambda e: os.path.getmtime(os.path.join(releases, e)), reverse=True)
    for entry in done[max(0, keep - len(protect)):]:
        shutil.rmtree(os.path.join(releases, entry), ignore_errors=True)
        removed.append(entry)
    return removed


def install(args) -> dict:
    root, name, checksums_sha, keep = args[0], args[1], args[2], int(args[3])
    releases = os.path.join(root, "releases")
    os.makedirs(releases, exist_ok=True)
    final = os.path.join(releases, name)
    incoming = os.path.join(releases, f".{name}.incoming-{uuid.uuid4().hex[:8]}")
    os.makedirs(incoming)
    try:
        try:
            extract(sys.stdin.buffer, incoming)
        except (tarfile.TarError, EOFError) as e:
            raise BoardError(f"the upload was cut off or damaged ({e}); nothing was changed") from None
        count = verify(incoming, checksums_sha)
        fsync_dir(incoming)
        if os.path.exists(final):  # a damaged copy of the same release: set it aside first
            os.replace(final, os.path.join(releases, f".{name}.damaged-{uuid.uuid4().hex[:8]}"))
        os.replace(incoming, final)
        fsync_dir(releases)
    except BaseException:
        shutil.rmtree(incoming, ignore_errors=True)
        raise
    previous = activate(root, name)
    removed = prune(root, keep, {name})
    for entry in os.listdir(releases):
        if entry.startswith(f".{name}.damaged-"):
            shutil.rmtree(os.path.join(releases, entry), ignore_errors=True)
    return {"release": name, "files": count, "previous": previous, "uploaded": True, "pruned": removed}


def reactivate(args) -> dict:
    root, name, checksums_sha, keep = args[0], args[1], args[2], int(args[3])
    count = verify(os.path.join(root, "releases", name), checksums_sha)
    previous = activate(root, name)
    return {"release": name, "files": count, "previous": previous, "uploaded": False,
            "pruned": prune(root, keep, {name})}


def main(argv) -> int:
    ops = {"probe": probe, "install": install, "activate": reactivate}
    if not argv or argv[0] not in ops:
        emit({"ok": False, "error": f"unknown op {argv[:1]}"})
        return 2
    try:
        emit({"ok": True, **ops[argv[0]](argv[1:])})
        return 0
    except (BoardError, OSError, ValueError, KeyError, IndexError) as e:
        emit({"ok": False, "error": f"{type(e).__name__}: {e}" if not isinstance(e, BoardError) else str(e)})
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
