"""Latency statistics from per-run durations."""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

PERCENTILES = (50, 90, 99)


def summarize_ns(durations_ns: Sequence[int], batch: int = 1) -> Dict[str, float]:
    """p50/p90/p99/mean/std/min/max in milliseconds, and throughput in images per second
    (batch / mean latency: back-to-back invokes on one interpreter)."""
    ms = np.asarray(durations_ns, dtype=np.float64) / 1e6
    if ms.size == 0:
        raise ValueError("no timed runs")
    p50, p90, p99 = np.percentile(ms, PERCENTILES)
    mean = float(ms.mean())
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": mean,
            "std": float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
            "min": float(ms.min()), "max": float(ms.max()),
            "throughput_ips": batch * 1000.0 / mean if mean > 0 else float("inf")}
