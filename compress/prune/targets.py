"""What a user asks for: a FLOPs or parameter reduction, or both (torch-free, so the CLI checks it
at once).

    parse_target("flops=0.76")              -> "flops=0.76" (normalised), or UserError (one line)
    target_dict("flops=0.76,params=0.92")   -> {"metric": "flops", "reduction": 0.76, "also": {"params": 0.92}}
    check_target("params", 0.5)             -> 0.5

A joint target is met on every metric; the first one named is the primary (what a one-metric view
of the run, e.g. a plot, shows).
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
    """`--target` as given: "flops=R", "params=R" (R the reduction) or both comma-separated, or "none"."""
    if text.strip().lower() == "none":
        return None
    parts = []
    for part in text.split(","):
        metric, sep, value = part.partition("=")
        metric = metric.strip().lower()
        if not sep or metric not in METRICS:
            raise UserError(f"--target {text!r}: expected flops=R, params=R or flops=R,params=R "
                            f"(R the reduction, 0 < R < 1)")
        try:
            r = float(value)
        except ValueError:
            raise UserError(f"--target {text!r}: {value.strip()!r} is not a number") from None
        if not 0.0 < r < 1.0:
            raise UserError(f"--target {text!r}: the reduction must be strictly between 0 and 1 "
                            f"(0.76 removes 76 % of the {metric})")
        if any(p.startswith(metric + "=") for p in parts):
            raise UserError(f"--target {text!r}: {metric} is named twice")
        parts.append(f"{metric}={r:g}")
    return ",".join(parts)


def target_dict(target) -> dict:
    """A target as text ("flops=0.5", "flops=0.76,params=0.92") or dict -> the dict report.json holds."""
    if isinstance(target, str):
        text = parse_target(target)
        if text is None:
            raise UserError("a pruner needs a target such as flops=0.5 or params=0.5")
        pairs = [p.split("=") for p in text.split(",")]
        out = {"metric": pairs[0][0], "reduction": float(pairs[0][1])}
        if len(pairs) > 1:
            out["also"] = {m: float(v) for m, v in pairs[1:]}
        return out
    if isinstance(target, dict) and {"metric", "reduction"} <= set(target):
        out = {"metric": str(target["metric"]), "reduction": check_target(str(target["metric"]), target["reduction"])}
        if target.get("also"):
            out["also"] = {str(m): check_target(str(m), r) for m, r in dict(target["also"]).items()}
        return out
    raise UserError(f"target must be a string like 'flops=0.5' or a dict with metric and reduction, got {target!r}")
