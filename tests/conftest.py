"""Shared fixtures. Tests use the real CIFAR-10 file in ../shared/data when it is there
(it is, here and in CI); tests that need it are skipped elsewhere, never faked."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = Path(os.environ.get("EDGESLIM_TEST_CIFAR", REPO.parent / "shared" / "data" / "cifar10.npz"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def cifar_npz() -> Path:
    """The full CIFAR-10 npz (50k/10k)."""
    if not SHARED_CIFAR.is_file():
        pytest.skip(f"CIFAR-10 not found at {SHARED_CIFAR}")
    return SHARED_CIFAR


@pytest.fixture(scope="session")
def small_cifar_dir(tmp_path_factory, cifar_npz) -> Path:
    """A data dir holding a small cifar10.npz (2,000 train / 500 test real images), for fast runs."""
    d = tmp_path_factory.mktemp("small_cifar")
    with np.load(cifar_npz, allow_pickle=False) as z:
        np.savez(d / "cifar10.npz", x_train=z["x_train"][:2000], y_train=z["y_train"][:2000],
                 x_test=z["x_test"][:500], y_test=z["y_test"][:500], classes=z["classes"])
    return d


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, small_cifar_dir) -> Path:
    """A run folder (docs/formats.md §1: model.pt2, report.json, calib.npz, test.npz) holding a small
    CNN with pruned-looking widths (13/21/29 channels) trained for a few seconds on real CIFAR-10."""
    from tests.run_fixture import write_trained_run

    return write_trained_run(tmp_path_factory.mktemp("runs") / "tiny-slim", small_cifar_dir / "cifar10.npz")


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory, trained_run, python_exe) -> Path:
    """`python -m export trained_run --out <tmp>/dist/tiny-slim` (all four formats), run as the user would.
    The bundle (docs/formats.md §2) is the folder returned; <tmp>/dist/tiny-slim.tar.gz is next to it."""
    import subprocess

    out = tmp_path_factory.mktemp("dist") / "tiny-slim"
    proc = subprocess.run([python_exe, "-m", "export", str(trained_run), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"python -m export failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return out


@pytest.fixture(scope="session")
def bundle(request) -> Path:
    """The bundle the device_bench tests measure: `bundle_dir` (a small trained CNN exported to all
    four formats). While developing, $DEVICE_BENCH_TEST_BUNDLE can name an existing bundle instead."""
    override = os.environ.get("DEVICE_BENCH_TEST_BUNDLE")
    return Path(override) if override else request.getfixturevalue("bundle_dir")


@pytest.fixture(scope="session")
def probe_cache(tmp_path_factory) -> Path:
    """One probe cache for the session: the SSH profile reuses the local one's conversions."""
    return tmp_path_factory.mktemp("probe-cache")


@pytest.fixture(scope="session")
def table_path(tmp_path_factory, probe_cache) -> Path:
    """A real latency table of tests.latency_fixture's tiny residual CNN (16x16 input), profiled on
    this machine with the coarse grid, tflite x1: `python -m device_bench profile` as a user runs it.
    While developing, $EDGESLIM_TEST_LATENCY_TABLE can name a table made with the same command."""
    override = os.environ.get("EDGESLIM_TEST_LATENCY_TABLE")
    if override:
        return Path(override)
    from tests.device_bench_helpers import bench
    from tests.latency_fixture import MODEL, PROFILE

    out = tmp_path_factory.mktemp("tables") / "tiny.json"
    proc = bench("profile", MODEL, *PROFILE, "--cache", probe_cache, "--out", out, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "latency table:" in proc.stdout
    return out
