"""board/: the parts of the emulated-board machinery that can be checked without building the root
(that is `make test-board`): deleting a root never reaches through a mount into the host, the
output comparison's two rules, where the Debian mirror comes from, finding processes by their root."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from board import check, host
from board.emulated import processes_in

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_remove_tree_never_deletes_through_a_bind_mount(tmp_path):
    """A root with the host's /dev or /proc still mounted in it must not be rm -rf'ed through the
    mount. Run in a private mount namespace, so a failure cannot leave a mount behind."""
    precious = tmp_path / "host-dev"
    precious.mkdir()
    (precious / "null").write_text("host file")
    tree = tmp_path / "root"
    (tree / "dev").mkdir(parents=True)
    (tree / "etc").mkdir()
    (tree / "etc" / "hostname").write_text("board")
    script = ("import subprocess, sys\nfrom pathlib import Path\nfrom board import host\n"
              "tree, precious = Path(sys.argv[1]), Path(sys.argv[2])\n"
              "subprocess.run(['mount', '--bind', str(precious), str(tree / 'dev')], check=True)\n"
              "assert host.mounts_under(tree) == [tree / 'dev']\n"
              "host.remove_tree(tree)\n")
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-c", script,
                           str(tree), str(precious)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert not tree.exists()
    assert (precious / "null").read_text() == "host file"


def test_outputs_compare_fp32_by_tolerance_and_int8_by_argmax():
    host_out = {"backend": "ai-edge-litert", "version": "2.3.0", "logits": [[0.1, 2.0, -1.0], [3.0, 0.2, 0.1]]}

    def board(logits):
        return {"backend": "ai-edge-litert", "version": "2.3.0", "logits": logits}

    close = check.compare_outputs(board([[0.1, 2.00005, -1.0], [3.0, 0.2, 0.1]]), host_out, "tflite")
    assert close["ok"] and close["max_abs_diff"] == pytest.approx(5e-5, abs=1e-6)
    far = check.compare_outputs(board([[0.1, 2.001, -1.0], [3.0, 0.2, 0.1]]), host_out, "tflite")
    assert not far["ok"]
    # int8: a quantisation step apart is fine while every argmax agrees, not once one flips
    step = check.compare_outputs(board([[0.1, 1.9, -1.0], [3.1, 0.2, 0.1]]), host_out, "tflite-int8", 0.1)
    assert step["ok"] and step["max_abs_diff_quant_steps"] == pytest.approx(1.0, abs=1e-3)
    flipped = check.compare_outputs(board([[2.5, 2.0, -1.0], [3.0, 0.2, 0.1]]), host_out, "tflite-int8", 0.1)
    assert not flipped["ok"] and flipped["argmax_agreement"] == 0.5


@pytest.mark.skipif(not Path("/etc/apt").is_dir(), reason="not a Debian-family host")
def test_the_debian_mirror_comes_from_the_hosts_apt_sources(monkeypatch):
    monkeypatch.delenv("EDGESLIM_DEBIAN_MIRROR", raising=False)
    mirror = host.debian_mirror()
    assert mirror.startswith(("http://", "https://")) and "security" not in mirror
    monkeypatch.setenv("EDGESLIM_DEBIAN_MIRROR", "http://mirror.example/debian")
    assert host.debian_mirror() == "http://mirror.example/debian"


def test_processes_are_found_by_their_root_directory():
    assert os.getpid() in processes_in(Path("/"))
    assert processes_in(REPO / "no-such-root") == []
