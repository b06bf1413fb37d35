"""A bench report checked against a latency budget and a latency table (`run`/`remote`
--budget-ms X --latency-table FILE): what the table predicts for the bundle, what was measured,
and whether the measured p50 is within the budget. The result is the report's `latency_check`
(docs/formats.md §3); stdlib + numpy (latency_table) only, so it runs on the board too.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import latency_table as lt
from .errors import BenchError


def open_table(path: Optional[str]) -> Optional[lt.LatencyTable]:
    if not path:
        return None
    try:
        return lt.load_table(path)
    except lt.TableError as e:
        raise BenchError(str(e)) from None


def check_device(table: Optional[lt.LatencyTable], device: Dict[str, Any], backends: Dict[str, str]) -> List[str]:
    """Refuse (BenchError, exit 2) a table from another board; the warnings otherwise."""
    if table is None:
        return []
    try:
        return table.check_compatible(device, backends)
    except lt.TableMismatch as e:
        raise BenchError(str(e)) from None


def bundle_keep(table: lt.LatencyTable, manifest: Dict[str, Any]):
    """The bundle's kept counts per group, from its source.layers (each conv's output width)."""
    source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
    table.check_model(source.get("model"))
    layers = source.get("layers")
    if not isinstance(layers, list) or not layers:
        raise lt.TableMismatch("the bundle's manifest lists no layer widths (source.layers), so the table cannot "
                               "be applied to it")
    widths = {str(la["name"]): int(la["after"]) for la in layers if isinstance(la, dict) and "after" in la}
    return table.keep_from_widths(widths)


def check(report: Dict[str, Any], manifest: Dict[str, Any], table: Optional[lt.LatencyTable],
          budget_ms: Optional[float]) -> Dict[str, Any]:
    """The `latency_check` object for a finished report (also stored in it)."""
    block: Dict[str, Any] = {"budget_ms": budget_ms, "table": None, "warnings": [], "results": []}
    keep = None
    if table is not None:
        block["table"] = {"path": str(table.path), "sha256": hashlib.sha256(Path(table.path).read_bytes()).hexdigest(),
                          "model": table.model.get("spec"), "board": table.board_text}
        try:
            block["warnings"] = table.check_compatible(report["device"], report["device"].get("backends") or {})
        except lt.TableMismatch as e:  # the report is still written; the caller then fails with this
            block["refused"] = str(e)
        try:
            keep = None if "refused" in block else bundle_keep(table, manifest)
        except lt.TableMismatch as e:
            block["warnings"].append(f"no prediction: {e}")
    for r in report["results"]:
        if r.get("status") != "ok":
            continue
        measured = r["latency_ms"]["p50"]
        row: Dict[str, Any] = {"format": r["format"], "threads": r["threads"], "measured_p50_ms": measured,
                               "predicted_ms": None, "error": None}
        if keep is not None:
            entry = table.find(r["format"], r["threads"])
            if entry is None:
                row["note"] = f"the table has no {r['format']} x{r['threads']} entry"
            else:
                row["predicted_ms"] = round(entry.predict_keep(keep), 4)
                row["error"] = round(lt.relative_error(row["predicted_ms"], measured), 4)
        if budget_ms is not None:
            row["within_budget"] = measured <= budget_ms
            row["margin"] = round((budget_ms - measured) / budget_ms, 4)
            if row["predicted_ms"] is not None:
                row["predicted_within_budget"] = row["predicted_ms"] <= budget_ms
        block["results"].append(row)
    block["budget_missed"] = budget_ms is not None and any(not row["within_budget"] for row in block["results"])
    report["latency_check"] = block
    return block


def describe(block: Dict[str, Any]) -> List[str]:
    """One line per measurement, for the terminal."""
    lines = [f"warning: {w}" for w in block["warnings"]]
    budget = block.get("budget_ms")
    for row in block["results"]:
        text = f"{row['format']:<12} x{row['threads']:<2} measured p50 {row['measured_p50_ms']:.3f} ms"
        if row["predicted_ms"] is not None:
            text += f"  predicted {row['predicted_ms']:.3f} ms ({row['error'] * 100:+.1f} %)"
        elif row.get("note"):
            text += f"  ({row['note']})"
        if budget is not None:
            text += (f"  budget {budget:g} ms: met ({row['margin'] * 100:.0f} % to spare)" if row["within_budget"]
                     else f"  budget {budget:g} ms: MISSED by {-row['margin'] * 100:.1f} %")
        lines.append(text)
    return lines
