"""Which code made a result: the git commit of this checkout and whether it had local changes.

A headline number must name the code that produced it (report.json, every benchmark JSON). Outside a
git checkout (an installed wheel) the package version is all there is, and the commit is None.
"""
from __future__ import annotations

import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


DATA = "benchmarks/results"   # tracked data, not code: a changed result or log does not make the code dirty


def _git(*args: str, root: Path = ROOT) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@lru_cache(maxsize=1)
def code_version() -> dict:
    """{"version", "commit", "dirty"}: dirty = tracked files differ from the commit (untracked files,
    such as run folders, do not count; nor do benchmarks/results/, which holds data, among it the logs
    of the runs being measured)."""
    try:
        version = metadata.version("edgeslim")
    except metadata.PackageNotFoundError:
        version = None
    commit = _git("rev-parse", "HEAD") if (ROOT / ".git").exists() else None
    return {"version": version, "commit": commit, "dirty": None if commit is None else is_dirty(ROOT)}


def is_dirty(root: Path) -> bool | None:
    """Whether tracked files outside DATA differ from the checkout's commit (None: git failed)."""
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", f":(exclude){DATA}", root=root)
    return None if status is None else bool(status)
