"""Put a finished bundle folder in place, with its .tar.gz, without ever exposing a half-written one."""
from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path


def tar_path(folder: Path) -> Path:
    return folder.parent / f"{folder.name}.tar.gz"


def staging_dir(target: Path) -> Path:
    """An empty folder next to `target` (same file system, so the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))


def write_tar(folder: Path, arcname: str, dest: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.partial-")
    os.close(fd)
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            for file in sorted(folder.iterdir()):
                tar.add(file, arcname=f"{arcname}/{file.name}", recursive=False)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish(staged: Path, target: Path) -> None:
    """Rename `staged` to `target` and write target.tar.gz; an old target is removed only after the new
    one is in place (it is moved aside first, and moved back if the rename fails)."""
    os.chmod(staged, 0o755)
    tar_tmp = staged.parent / f".{target.name}.tar.gz.next"
    write_tar(staged, target.name, tar_tmp)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-")) / target.name
        os.replace(target, old)
    try:
        os.replace(staged, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        tar_tmp.unlink(missing_ok=True)
        raise
    os.replace(tar_tmp, tar_path(target))
    if old is not None:
        shutil.rmtree(old.parent)
