"""What a user asks for: a FLOPs or parameter reduction, a latency budget in milliseconds, or
several at once (torch-free, so the CLI checks it at once).

    parse_target("flops=0.76")              -> "flops=0.76" (normalised), or UserError (one line)
    parse_target("latency=1.2")             -> "latency=1.2ms" (a budget is always in ms)
    target_dict("flops=0.76,params=0.92")   -> {"metric": "flops", "reduction": 0.76, "also": {"params": 0.92}}
    target_dict("latency=1.2ms,flops=0.5")  -> {"metric": "latency", "ms": 1.2, "also": {"flops": 0.5}}
    check_target("params", 0.5)             -> 0.5

A joint target is met on every metric; the first one named is the primary (what a one-metric view
of the run, e.g. a plot, shows), except that a latency budget is always the primary. A latency
target's "reduction" (1 - budget / the dense network's predicted ms) is only known once a latency
table is read: compress.latency.resolve adds it, and the table's identity, to the dict.
"""
from __future__ import annotations

from typing import Optional

from compress.errors import UserError

METRICS = ("flops", "params", "latency")   # latency: milliseconds predicted by a latency table
FORMS = "flops=R, params=R, latency=Xms or several comma-separated (R the reduction, 0 < R < 1; X the budget in ms)"


def check_target(metric: str, reduction) -> float:
    if metric not in METRICS:
        raise UserError(f"unknown target metric {metric!r}; choose one of {', '.join(METRICS)}")
    if isinstance(reduction, bool) or not isinstance(reduction, (int, float)) or not 0 < reduction < 1:
        raise UserError(f"target reduction must be a fraction strictly between 0 and 1 (e.g. 0.76 for "
                        f"-76 % {metric}), got {reduction!r}")
    return float(reduction)


def _budget_ms(text: str, value: str) -> float:
    number = value.strip().lower()
    number = number[:-2].strip() if number.endswith("ms") else number
    try:
        ms = float(number)
    except ValueError:
        raise UserError(f"--target {text!r}: latency budget {value.strip()!r} is not a number of milliseconds "
                        f"(e.g. latency=1.2ms)") from None
    if not 0 < ms < float("inf"):
        raise UserError(f"--target {text!r}: the latency budget must be a positive number of milliseconds")
    return ms


def parse_target(text: str) -> Optional[str]:
    """`--target` as given: "flops=R", "params=R" (R the reduction), "latency=X[ms]" or several
    comma-separated, or "none". A latency budget comes first in the normalised text."""
    if text.strip().lower() == "none":
        return None
    parts = []
    for part in text.split(","):
        metric, sep, value = part.partition("=")
        metric = metric.strip().lower()
        if not sep or metric not in METRICS:
            raise UserError(f"--target {text!r}: expected {FORMS}")
        if any(p.startswith(metric + "=") for p in parts):
            raise UserError(f"--target {text!r}: {metric} is named twice")
        if metric == "latency":
            parts.insert(0, f"latency={_budget_ms(text, value):g}ms")
            continue
        try:
            r = float(value)
        except ValueError:
            raise UserError(f"--target {text!r}: {value.strip()!r} is not a number") from None
        if not 0.0 < r < 1.0:
            raise UserError(f"--target {text!r}: the reduction must be strictly between 0 and 1 "
                            f"(0.76 removes 76 % of the {metric})")
        parts.append(f"{metric}={r:g}")
    return ",".join(parts)


def target_dict(target) -> dict:
    """A target as text ("flops=0.5", "latency=1.2ms,flops=0.5") or dict -> the dict report.json holds."""
    if isinstance(target, str):
        text = parse_target(target)
        if text is None:
            raise UserError("a pruner needs a target such as flops=0.5, params=0.5 or latency=1.2ms")
        pairs = [p.split("=") for p in text.split(",")]
        metric, value = pairs[0]
        out = {"metric": metric, "ms": float(value[:-2])} if metric == "latency" else \
            {"metric": metric, "reduction": float(value)}
        if len(pairs) > 1:
            out["also"] = {m: float(v) for m, v in pairs[1:]}
        return out
    if isinstance(target, dict) and target.get("metric") == "latency" and "ms" in target:
        out = dict(target)   # a resolved latency target (compress.latency.resolve) passes through, checked
        out["ms"] = _budget_ms(str(target), str(target["ms"]))
        if "reduction" in out:
            out["reduction"] = check_target("latency", out["reduction"])
        if target.get("also"):
            out["also"] = {str(m): check_target(str(m), r) for m, r in dict(target["also"]).items()}
        return out
    if isinstance(target, dict) and {"metric", "reduction"} <= set(target):
        out = {"metric": str(target["metric"]), "reduction": check_target(str(target["metric"]), target["reduction"])}
        if target.get("also"):
            out["also"] = {str(m): check_target(str(m), r) for m, r in dict(target["also"]).items()}
        return out
    raise UserError(f"target must be a string like 'flops=0.5' or 'latency=1.2ms', or a dict with metric and "
                    f"reduction (or metric latency and ms), got {target!r}")


def budget_text(target: dict) -> str:
    """"latency=1.2ms,flops=0.5": a target dict as the user wrote it."""
    first = f"latency={target['ms']:g}ms" if target["metric"] == "latency" else \
        f"{target['metric']}={target['reduction']:g}"
    return ",".join([first] + [f"{m}={r:g}" for m, r in target.get("also", {}).items()])
