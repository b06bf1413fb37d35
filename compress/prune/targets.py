"""What a user asks for: a FLOPs or parameter reduction (torch-free, so the CLI checks it at once).

    parse_target("flops=0.76")   -> "flops=0.76" (normalised), or UserError with a one-line message
    check_target("params", 0.5)  -> 0.5
"""
from __future__ import annotations

from typing import Optional

from compress.errors import UserError

METRICS = ("flops", "params")


def check_target(metric: str, reduction) -> float:
    if metric not in METRICS:
        raise UserError(f"unknown target metric {metric!r}; choose one of {', '.join(METRICS)}")
    if isinstance(reduction, bool) or not isinstance(reduction, (int, float)) or not 0 < reduction < 1:
        raise UserError(f"target reduction must be a fraction strictly between 0 and 1 (e.g. 0.76 for "
                        f"-76 % {metric}), got {reduction!r}")
    return float(reduction)


def parse_target(text: str) -> Optional[str]:
    """`--target` as given: "flops=R" or "params=R" (R the reduction), or "none"."""
    if text.strip().lower() == "none":
        return None
    metric, sep, value = text.partition("=")
    metric = metric.strip().lower()
    if not sep or metric not in METRICS:
        raise UserError(f"--target {text!r}: expected flops=R or params=R (R the reduction, 0 < R < 1)")
    try:
        r = float(value)
    except ValueError:
        raise UserError(f"--target {text!r}: {value!r} is not a number") from None
    if not 0.0 < r < 1.0:
        raise UserError(f"--target {text!r}: the reduction must be strictly between 0 and 1 "
                        f"(0.76 removes 76 % of the {metric})")
    return f"{metric}={r:g}"
