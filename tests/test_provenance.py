"""compress.provenance: a changed tracked code file makes the checkout dirty; a changed result does not."""
from __future__ import annotations

import subprocess
from pathlib import Path

from compress.provenance import DATA, is_dirty


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def test_dirty_counts_code_not_results_or_untracked_files(tmp_path: Path):
    git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / DATA).mkdir(parents=True)
    (tmp_path / DATA / "run.log").write_text("epoch 1\n")
    git(tmp_path, "add", ".")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    assert is_dirty(tmp_path) is False
    (tmp_path / DATA / "run.log").write_text("epoch 1\nepoch 2\n")   # a run's log growing
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "new.txt").write_text("untracked")
    assert is_dirty(tmp_path) is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert is_dirty(tmp_path) is True
