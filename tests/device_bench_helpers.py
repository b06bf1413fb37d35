"""What the device_bench tests share: the CLI as a subprocess."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bench(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "device_bench", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
