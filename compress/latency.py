"""A latency budget in milliseconds: the latency table a target is priced with (torch-free).

    table, entry = open_table("tables/vgg16-pi4.json", "tflite-int8", 1)   # UserError (one line) if unusable
    target = resolve(target_dict("latency=1.2ms"), table, entry)          # + reduction, + the table's identity
    latency_report(target, arch)                                          # report.json's "latency"

The prediction itself is device_bench.latency_table's (one implementation); this module only
picks the table's entry, checks it belongs to the network, and turns a budget in ms into the
reduction of the dense network's predicted ms that compress.prune.budget.select works with.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

from compress.errors import UserError
from device_bench.latency_table import LatencyEntry, LatencyTable, TableError, load_table

DEFAULT_ENTRY = ("tflite-int8", 1)   # the deployment most boards run, when a table has several


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def open_table(path, format: Optional[str] = None, threads: Optional[int] = None) -> tuple[LatencyTable, LatencyEntry]:
    """The table and its (format, threads) entry. Unnamed fields: the table's only entry that
    fits, else tflite-int8 x1 when the table has it."""
    try:
        table = path if isinstance(path, LatencyTable) else load_table(path)
        if format is not None and threads is not None:
            return table, table.entry(format, int(threads))
    except TableError as e:
        raise UserError(str(e)) from None
    fits = [e for e in table.entries if (format is None or e.format == format)
            and (threads is None or e.threads == int(threads))]
    have = ", ".join(e.label for e in table.entries) or "none"
    if len(fits) == 1:
        return table, fits[0]
    default = [e for e in fits if (e.format, e.threads) == DEFAULT_ENTRY]
    if default:
        return table, default[0]
    if not fits:
        asked = f"--format {format}" if threads is None else (f"--threads {threads}" if format is None else "")
        raise UserError(f"{table.path} has no entry for {asked} (it has: {have}); profile it with "
                        f"python -m device_bench profile")
    raise UserError(f"{table.path} has several entries ({have}): name one with --format and --threads")


def resolve(target: dict, table: LatencyTable, entry: LatencyEntry) -> dict:
    """A latency target with its reduction (of the dense network's predicted ms) and the table's
    identity filled in, so report.json says what the budget was priced with."""
    dense = entry.predict_keep(None)
    budget = float(target["ms"])
    if budget >= dense:
        raise UserError(f"latency budget {budget:g} ms is not below the dense network's predicted "
                        f"{dense:.3f} ms ({entry.label}, {table.path.name}): nothing to prune")
    return {**target, "reduction": 1.0 - budget / dense,
            "table": {"path": str(Path(table.path).resolve()), "sha256": sha256(table.path),
                      "format": entry.format, "threads": entry.threads, "board": table.board_text,
                      "backend": entry.backend, "backend_version": entry.backend_version,
                      "dense_ms": dense}}


def latency_report(target: Optional[dict], arch: dict) -> Optional[dict]:
    """What report.json records of a latency target: the budget, the table it was priced with,
    the dense and the slim network's predicted ms (None when the target has no latency)."""
    if not target or target.get("metric") != "latency" or "table" not in target:
        return None
    info = dict(target["table"])
    dense = info.pop("dense_ms")
    out = {"budget_ms": target["ms"], **info, "dense_predicted_ms": dense, "predicted_ms": None}
    try:
        if sha256(info["path"]) != info["sha256"]:
            raise TableError(f"{info['path']} changed since the run priced its budget with it")
        _, entry = open_table(info["path"], info["format"], info["threads"])
        out["predicted_ms"] = entry.predict(arch["modules"])
    except (OSError, TableError, UserError) as e:
        out["note"] = f"slim network not predicted: {' '.join(str(e).split())}"
    if out["predicted_ms"] is not None:
        out["within_budget"] = out["predicted_ms"] <= out["budget_ms"] * (1 + 1e-9)
    return out
