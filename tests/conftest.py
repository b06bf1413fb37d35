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
