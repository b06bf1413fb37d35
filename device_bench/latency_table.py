"""A latency table: what every prunable layer of one model costs on one board, as a function of
its widths, and the network latency it predicts. numpy + stdlib only, cheap to import (no SSH, no
interpreter, no torch): `compress` imports it to prune to a budget in milliseconds.

    table = load_table("tables/vgg16-pi4.json")
    entry = table.entry("tflite-int8", threads=1)          # one (format, threads) of the board
    entry.predict_keep({"features.0": 40, ...})            # ms; groups not named keep every channel
    entry.predict(widths)                                  # ms from {layer: (in, out)}, e.g. arch.json's
    entry.layer_ms("features.3", cin, cout)                # per-layer ms, numpy-vectorised
    lat = entry.bind(group_names)                          # for a pruner: kept-count vector -> ms
    lat.total(k); lat.removal_savings(k); lat.change(k, step)   # like compress.prune.ResourceModel
    lat.step_counts()                                      # per group: the kept counts worth keeping
    entry.step_widths("features.3", "out")                 # widths where removing one more channel helps
    table.check_compatible(report["device"], backend_versions)   # TableMismatch for another board

How a layer is costed (docs/latency-table.md has the measurements behind it). A layer's latency
is a staircase in each width: runtimes pad channels to their SIMD tiles, so on a plateau every
width costs what its top costs. The profile sweeps one 3x3 conv's input and output width on the
board and records the plateaus it finds ("flat gaps" [lo, hi]: every width in it costs what `hi`
costs); `Axis` turns a width into its plateau top ("effective width"). A top can be a fast path
of its own: XNNPACK fp32 on an AMD EPYC ran a conv with 32 output channels in 0.76x the time of
18..30 (its "dips", read from the sweep, factor < 1); a grid point at such a top is that top's
cost, so widths inside the plateau are costed at the top's value divided by its dip, and only the
top itself keeps the fast path. Each distinct layer shape
(kernel, stride, input size, op) was then timed on the board at a few (in, out) grid points that
are plateau tops; between them the latency is bilinear in the effective widths, which is what a
padded GEMM's work is. A whole network costs more than the sum of its layers timed alone, and
the more so the bigger it is (its weights and activations no longer stay in the caches between
layers), so the sum is mapped to network latency by a calibration curve measured on the board:
whole networks at several widths ("anchors"), their measured ms against their sum of layers,
made non-decreasing, linear between anchors and proportional beyond the first and last one.
The curve is derived from the anchors when a table is loaded (their widths and measured ms are
the facts; the stored curve is what the profile computed then, for reading), so a change to how
layers are costed recalibrates old tables too. (Tables from before the curve carry a line
instead: scale * sum(layers) + overhead_ms.)

Everything a pruner queries is a lookup in per-shape tables precomputed for every integer width
up to the dense one, so `total` and `removal_savings` cost microseconds.
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

SCHEMA = 1
KIND = "edgeslim-latency-table"
# What identifies a board: two boards equal in these run a model at the same speed. The hostname
# is not in it (a table measured on one Pi 4 is meant for the whole fleet of Pi 4s).
FINGERPRINT_FIELDS = ("machine", "cpu", "board", "cpu_cores")
GEMM_OPS = ("conv2d", "linear")  # two widths, padded to the runtime's tiles; the others have one


class TableError(ValueError):
    """A table file that cannot be used: missing, not a table, wrong schema, no such entry."""


class TableMismatch(TableError):
    """A table measured on another board (or for another model) than the one it is applied to."""


def fingerprint(device: Mapping[str, Any]) -> Dict[str, Any]:
    """The identity of a board from a report's `device` object (device_bench.device.describe):
    the FINGERPRINT_FIELDS and their sha256 `id`."""
    fields = {k: device.get(k) for k in FINGERPRINT_FIELDS}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return {"id": digest, **fields}


def _board_text(board: Mapping[str, Any]) -> str:
    parts = [board.get("board"), board.get("cpu"), board.get("machine")]
    cores = board.get("cpu_cores")
    return ", ".join(str(p) for p in parts if p) + (f", {cores} cores" if cores else "")


# --------------------------------------------------------------------------- the width axes


class Axis:
    """Width -> effective width (the top of the plateau it is on), from the flat gaps a sweep found.

    flat: [(lo, hi), ...]: every width in [lo, hi] costs what `hi` costs.
    period: beyond `sweep_max`, plateaus continue every `period` channels above `last_top`
            (0: widths beyond the sweep are their own effective width).
    """

    def __init__(self, flat: Sequence[Sequence[int]] = (), sweep_max: int = 0, period: int = 0, last_top: int = 0,
                 dips: Optional[Mapping[int, float]] = None):
        self.flat = [(int(lo), int(hi)) for lo, hi in flat]
        self.sweep_max, self.period, self.last_top = int(sweep_max), int(period), int(last_top)
        self.dips = {int(w): float(f) for w, f in (dips or {}).items()}   # plateau top -> its ms / the plateau's

    @classmethod
    def identity(cls) -> Axis:
        return cls()

    def to_json(self) -> Dict[str, Any]:
        return {"flat": [list(g) for g in self.flat], "sweep_max": self.sweep_max, "period": self.period,
                "last_top": self.last_top}

    @classmethod
    def from_json(cls, d: Optional[Mapping[str, Any]], tolerance: float = 0.0) -> Axis:
        """From a table's axis JSON. With the raw sweep and the entry's `tolerance`, the plateaus are
        fitted again by this code (the sweep is the fact, the stored plateaus what the profile
        computed then, as with the calibration); the dips come from the sweep (find_dips)."""
        if not d:
            return cls.identity()
        sweep = d.get("sweep")
        if sweep and tolerance > 0:
            d = {**d, **find_flat_gaps(sweep["widths"], sweep["ms"], tolerance)}
        flat = d.get("flat", ())
        return cls(flat, d.get("sweep_max", 0), d.get("period", 0), d.get("last_top", 0),
                   find_dips(sweep, flat, tolerance))

    def effective(self, widths) -> np.ndarray:
        """Effective width of every width in `widths` (any integer array)."""
        c = np.asarray(widths, dtype=np.int64)
        e = c.copy()
        for lo, hi in self.flat:
            e = np.where((c >= lo) & (c <= hi), hi, e)
        if self.period > 0:
            beyond = c > max(self.sweep_max, self.last_top)
            up = self.last_top + np.ceil((c - self.last_top) / self.period).astype(np.int64) * self.period
            e = np.where(beyond, up, e)
        return e

    def factor(self, widths) -> np.ndarray:
        """Per width: its top's dip if the width is that top (the fast path), else 1."""
        c = np.asarray(widths, dtype=np.int64)
        f = np.ones(c.shape)
        for top, dip in self.dips.items():
            f = np.where(c == top, dip, f)
        return f

    def tops(self, up_to: int) -> List[int]:
        """Every width in [1, up_to] that is the top of its plateau (its own effective width)."""
        w = np.arange(1, up_to + 1)
        return [int(x) for x in w[self.effective(w) == w]]


CREEP = 0.10   # a plateau may rise this much from its first width to its top (at least 2x the tolerance)


def creep(tolerance: float) -> float:
    return max(CREEP, 2 * tolerance)


def find_flat_gaps(widths: Sequence[int], ms: Sequence[float], tolerance: float) -> Dict[str, Any]:
    """Plateaus in a latency sweep over `widths`: the Axis parameters (see Axis).

    The sweep is first made non-decreasing (isotonic fit: a wider layer never costs less, so a
    dip is noise). Neighbouring widths are on one plateau when the latency rises by at most
    `tolerance` (relative) from one to the next, and by at most `creep(tolerance)` from the
    plateau's first width to its last, so costing a width as its plateau's top is off by at most
    that much. (A plateau can creep: XNNPACK int8 on the Intel Xeon rose 8 % from 1 to 64 input
    channels, then doubled at 72. Cut into pieces every `tolerance`, its widths were priced by
    interpolating between the pieces' tops across the real step, 20-38 % under on the layers of
    a pruned VGG-16.) A plateau reaches down to just above the sweep width before it: runtimes pad
    to the next tile, so the cost steps up right after a tile boundary, and the cheaper width
    before the plateau is the boundary. Beyond the sweep, plateaus of the last one's length L
    repeat when it reaches the sweep's end and starts on a multiple of L (runtimes pad to multiples
    of a tile; a plateau that does not sit on that grid is not taken as one)."""
    w = np.asarray(widths, dtype=np.int64)
    order = np.argsort(w)
    w, t = w[order], isotonic(np.asarray(ms, dtype=np.float64)[order])
    limit = creep(tolerance)
    runs: List[List[int]] = []  # index ranges [first, last] of the sweep on one plateau, disjoint
    for i in range(len(w) - 1):
        flat_step = t[i + 1] <= t[i] * (1 + tolerance) + 1e-12
        if runs and runs[-1][1] == i:
            if flat_step and t[i + 1] <= t[runs[-1][0]] * (1 + limit) + 1e-12:
                runs[-1][1] = i + 1
            continue  # the plateau ended at i: the next one starts at i + 1 at the earliest
        if flat_step:
            runs.append([i, i + 1])
    flat = [(int(w[a - 1]) + 1 if a > 0 else int(w[a]), int(w[b])) for a, b in runs]
    period = last_top = 0
    if flat and flat[-1][1] == int(w[-1]):
        length = flat[-1][1] - flat[-1][0] + 1
        if length > 1 and (flat[-1][0] - 1) % length == 0:
            period, last_top = length, flat[-1][1]
    return {"flat": [list(g) for g in flat], "sweep_max": int(w[-1]) if len(w) else 0,
            "period": period, "last_top": last_top}


def isotonic(y: np.ndarray) -> np.ndarray:
    """Least-squares non-decreasing fit (pool adjacent violators)."""
    values: List[float] = []
    counts: List[int] = []
    for v in y:
        values.append(float(v))
        counts.append(1)
        while len(values) > 1 and values[-2] > values[-1]:
            n = counts[-2] + counts[-1]
            values[-2] = (values[-2] * counts[-2] + values[-1] * counts[-1]) / n
            counts[-2] = n
            values.pop()
            counts.pop()
    return np.repeat(values, counts)


DIP_MIN = 0.10   # a top counts as a fast path when it is at least this much cheaper than its plateau...
DIP_NOISE = 3    # ...and by more than this many times the entry's timing tolerance


def find_dips(sweep: Optional[Mapping[str, Any]], flat: Sequence[Sequence[int]], tolerance: float = 0.0) -> Dict[int, float]:
    """Plateau tops that ran faster than the rest of their plateau in the sweep: {top: its ms / the
    median ms of the sweep widths below it on the plateau (at least two)}, for ratios at most
    1 - max(DIP_MIN, DIP_NOISE * tolerance). (The flat gaps come from the isotonic fit, which
    averages such a dip into its plateau; the raw sweep keeps it.)"""
    if not sweep or not flat:
        return {}
    limit = 1 - max(DIP_MIN, DIP_NOISE * tolerance)
    w = np.asarray(sweep.get("widths", ()), dtype=np.int64)
    ms = np.asarray(sweep.get("ms", ()), dtype=np.float64)
    if w.shape != ms.shape:
        return {}
    dips = {}
    for lo, hi in flat:
        below, top = ms[(w >= lo) & (w < hi)], ms[w == hi]
        if len(below) >= 2 and len(top) and np.median(below) > 0:
            ratio = float(top[0] / np.median(below))
            if ratio <= limit:
                dips[int(hi)] = round(ratio, 4)
    return dips


def calibration_curve(sums: Sequence[float], measured: Sequence[float]) -> Dict[str, List[float]]:
    """The anchors' (sum of layers, measured ms), sorted by sum, anchors with the same sum merged,
    the ms made non-decreasing (isotonic: a noisy anchor cannot make a bigger network cheaper)."""
    pts: Dict[float, List[float]] = {}
    for s_, m in zip(sums, measured):
        pts.setdefault(round(float(s_), 9), []).append(float(m))
    xs = sorted(x for x in pts if x > 0)
    ys = isotonic(np.array([float(np.mean(pts[x])) for x in xs]))
    return {"sum_ms": [round(x, 6) for x in xs], "ms": [round(float(y), 6) for y in ys]}


# --------------------------------------------------------------------------- interpolation


def _weights(points: np.ndarray, x: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation on `points` (sorted) at x, extrapolating the end segments:
    (left index, right index, weight of the right point)."""
    if len(points) == 1:
        zero = np.zeros(x.shape, dtype=np.int64)
        return zero, zero, np.zeros(x.shape)
    i = np.clip(np.searchsorted(points, x, side="right") - 1, 0, len(points) - 2)
    lo, hi = points[i], points[i + 1]
    return i, i + 1, (x - lo) / (hi - lo)


@dataclass
class Grid:
    """One layer shape's measured latency (ms, net of the empty-model overhead) at the grid points."""
    cin: np.ndarray  # effective widths, sorted
    cout: np.ndarray
    ms: np.ndarray  # (len(cin), len(cout))

    def at(self, e_in: np.ndarray, e_out: np.ndarray) -> np.ndarray:
        """Bilinear in the effective widths, ends extrapolated linearly, never below 0."""
        i0, i1, u = _weights(self.cin.astype(np.float64), e_in.astype(np.float64))
        j0, j1, v = _weights(self.cout.astype(np.float64), e_out.astype(np.float64))
        m = self.ms
        value = ((1 - u) * (1 - v) * m[i0, j0] + u * (1 - v) * m[i1, j0]
                 + (1 - u) * v * m[i0, j1] + u * v * m[i1, j1])
        return np.maximum(value, 0.0)


# --------------------------------------------------------------------------- the model's layers


@dataclass(frozen=True)
class Width:
    """A layer's width as a function of the groups' kept counts: const + sum(coef[g] * kept[g])."""
    const: int
    groups: Tuple[Tuple[str, int], ...]

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Width:
        return cls(int(d.get("const", 0)), tuple((str(g), int(a)) for g, a in sorted(d.get("groups", {}).items())))

    def to_json(self) -> Dict[str, Any]:
        return {"const": self.const, "groups": dict(self.groups)}


@dataclass(frozen=True)
class Layer:
    name: str
    op: str  # conv2d, depthwise, linear, add, maxpool, avgpool, mean
    shape: str  # key into the table's `shapes`
    cin: Width
    cout: Width  # for single-width ops (add, pools) cin == cout


class LatencyEntry:
    """The table for one (format, threads) on the table's board. See the module docstring."""

    def __init__(self, table: LatencyTable, raw: Mapping[str, Any]):
        self.table, self.raw = table, raw
        self.format, self.threads = str(raw["format"]), int(raw["threads"])
        self.backend, self.backend_version = raw.get("backend"), raw.get("backend_version")
        axes = raw.get("axes", {})
        tolerance = float(raw.get("tolerance", 0.0))
        self.axis_in, self.axis_out = Axis.from_json(axes.get("in"), tolerance), Axis.from_json(axes.get("out"), tolerance)
        self.grids: Dict[str, Grid] = {}
        for key, g in raw.get("grids", {}).items():
            cin, cout = np.asarray(g["in"], dtype=np.int64), np.asarray(g["out"], dtype=np.int64)
            ms = np.asarray(g["ms"], dtype=np.float64).reshape(len(cin), len(cout))
            if table.shapes.get(key, {}).get("op") in GEMM_OPS:   # the plateau's cost where a point is a dipped top
                ms = ms / np.outer(self.axis_in.factor(cin), self.axis_out.factor(cout))
                ms = np.maximum.accumulate(np.maximum.accumulate(ms, axis=0), axis=1)
            self.grids[key] = Grid(cin, cout, ms)
        missing = sorted({la.shape for la in table.layers} - set(self.grids))
        if missing:
            raise TableError(f"{table.path}: entry {self.label} has no grid for layer shape(s) {', '.join(missing)}")
        self._luts: Dict[str, np.ndarray] = {}
        self.cal_sum = self.cal_ms = self.scale = self.overhead_ms = None
        anchors = [a for a in raw.get("anchors") or () if isinstance(a, Mapping) and "keep" in a and "measured_ms" in a]
        cal = raw.get("calibration")
        if anchors:   # the curve from the anchors under this code's layer costs (module docstring)
            sums = [float(self.bind().layers(table.keep_vector(a["keep"])).sum()) for a in anchors]
            cal = calibration_curve(sums, [float(a["measured_ms"]) for a in anchors])
        if cal:
            self.cal_sum = np.asarray(cal["sum_ms"], dtype=np.float64)
            self.cal_ms = np.asarray(cal["ms"], dtype=np.float64)
            if len(self.cal_sum) < 1 or self.cal_sum.shape != self.cal_ms.shape or np.any(np.diff(self.cal_sum) <= 0) \
                    or np.any(np.diff(self.cal_ms) < 0) or self.cal_sum[0] <= 0:
                raise TableError(f"{table.path}: entry {raw['format']} x{raw['threads']} has an invalid calibration")
        else:  # the line of older tables
            self.overhead_ms = float(raw.get("overhead_ms", 0.0))
            self.scale = float(raw.get("scale", 1.0))

    @property
    def label(self) -> str:
        return f"{self.format} x{self.threads}"

    def network_ms(self, layer_sum):
        """Network latency (ms) from the sum of its layers (ms; scalar or array): the calibration."""
        s = np.asarray(layer_sum, dtype=np.float64)
        if self.cal_sum is None:
            return self.scale * s + self.overhead_ms
        lo, hi = self.cal_sum, self.cal_ms
        inside = np.interp(s, lo, hi)
        return np.where(s < lo[0], s * (hi[0] / lo[0]), np.where(s > lo[-1], s * (hi[-1] / lo[-1]), inside))

    def _evaluate(self, layer: Layer, cin, cout) -> np.ndarray:
        """ms at widths (cin, cout) from the grid. GEMM-like layers (conv2d, linear) step with the
        board's measured plateaus; elementwise ops and depthwise convs have one width and no
        GEMM tiles, so their width is its own effective width and `cin` is ignored."""
        grid = self.grids[layer.shape]
        cout = np.asarray(cout, dtype=np.int64)
        if layer.op in GEMM_OPS:
            cin = np.asarray(cin, dtype=np.int64)
            value = grid.at(self.axis_in.effective(cin), self.axis_out.effective(cout)) \
                * self.axis_in.factor(cin) * self.axis_out.factor(cout)
            return np.where((cin > 0) & (cout > 0), value, 0.0)
        value = grid.at(np.broadcast_to(grid.cin[0], cout.shape), cout)
        return np.where(cout > 0, value, 0.0)

    def _lut(self, layer: Layer) -> np.ndarray:
        """ms for every (in, out) up to the dense widths ((1, out) for one-width ops), shared by
        the layers of one shape."""
        key = f"{layer.shape}|{layer.op}"
        lut = self._luts.get(key)
        if lut is None:
            n_in, n_out = self.table.max_widths[key]
            n_in = n_in if layer.op in GEMM_OPS else 0
            ci, co = np.meshgrid(np.arange(n_in + 1), np.arange(n_out + 1), indexing="ij")
            lut = self._luts[key] = self._evaluate(layer, ci, co)
        return lut

    def layer_ms(self, name: str, cin, cout) -> np.ndarray:
        """Latency (ms) of layer `name` at input/output widths (scalars or arrays; for one-width
        ops, add and pools, `cin` is ignored). Widths beyond the dense ones are extrapolated."""
        layer = self.table.layer(name)
        cin, cout = np.broadcast_arrays(np.asarray(cin, dtype=np.int64), np.asarray(cout, dtype=np.int64))
        lut = self._lut(layer)
        if layer.op not in GEMM_OPS:
            cin = np.zeros_like(cout)
        inside = cin.size and cin.min() >= 0 and cout.min() >= 0 and cin.max() < lut.shape[0] \
            and cout.max() < lut.shape[1]
        return lut[cin, cout] if inside else self._evaluate(layer, cin, cout)

    def step_widths(self, name: str, axis: str = "out", other: Optional[int] = None) -> List[int]:
        """The widths w in 1..dense of layer `name` on `axis` ("in" or "out") where latency(w) <
        latency(w + 1): the tops of the plateaus, which a pruner should round a width to (the
        dense width is always one). The other width is held at `other` (default: its dense one)."""
        if axis not in ("in", "out"):
            raise ValueError(f"axis is 'in' or 'out', not {axis!r}")
        layer = self.table.layer(name)
        dense_in, dense_out = self.table.dense_widths(layer)
        if layer.op not in GEMM_OPS:
            axis = "out"
        n = dense_in if axis == "in" else dense_out
        w = np.arange(1, n + 1)
        held = np.full(w.shape, other if other is not None else (dense_out if axis == "in" else dense_in))
        ms = self.layer_ms(name, w, held) if axis == "in" else self.layer_ms(name, held, w)
        steps = [int(x) for x, a, b in zip(w[:-1], ms[:-1], ms[1:]) if b > a * (1 + 1e-9)]
        return steps + [int(n)]

    # ---- whole networks

    def breakdown(self, keep=None) -> Dict[str, float]:
        """ms of every layer at kept counts `keep` (see predict_keep), before the calibration."""
        k = self.table.keep_vector(keep)
        return {la.name: float(self.layer_ms(la.name, w_in, w_out))
                for la, w_in, w_out in zip(self.table.layers, self.table.width_in(k), self.table.width_out(k))}

    def predict_keep(self, keep=None) -> float:
        """Predicted latency (ms) of the network that keeps `keep[g]` channels of each group g
        ({group name: count}, a vector in table.groups order, or None for the dense network)."""
        return self.bind().total(self.table.keep_vector(keep))

    def predict(self, widths: Mapping[str, Any]) -> float:
        """Predicted latency (ms) from per-layer widths: {conv/linear name: (in, out)} or arch.json's
        `modules` ({name: {"in", "out", ...}}); layers not named are dense."""
        return self.predict_keep(self.table.keep_from_widths(widths))

    def bind(self, group_names: Optional[Sequence[str]] = None) -> GroupLatency:
        """A fast evaluator over kept-count vectors ordered as `group_names` (default: table.groups;
        the pruner passes its own groups' names, which must be the table's)."""
        return GroupLatency(self, group_names)


class GroupLatency:
    """Network latency as a function of the kept-count vector k (one entry per group), for a
    greedy pruner: total(k) and removal_savings(k) (ms saved by removing one more channel of
    each group), shaped like compress.prune.ResourceModel's."""

    def __init__(self, entry: LatencyEntry, group_names: Optional[Sequence[str]] = None):
        t = entry.table
        names = list(group_names) if group_names is not None else [g for g, _ in t.groups]
        unknown = [g for g in names if g not in t.group_index]
        if unknown or len(names) != len(t.groups):
            raise TableMismatch(f"the network's groups do not match the latency table's ({t.model_text}): "
                                + (f"unknown {unknown[:3]}" if unknown else f"{len(names)} groups, the table has "
                                   f"{len(t.groups)}"))
        perm = np.array([t.group_index[g] for g in names])
        self.entry, self.table = entry, t
        # Columns reordered so that the caller's vector can be used directly.
        self.c_in, self.c_out = t.c_in, t.c_out
        self.a_in, self.a_out = t.a_in[:, perm], t.a_out[:, perm]
        self.sizes = t.sizes[perm]
        self.luts = [entry._lut(la) for la in t.layers]
        self.single = np.array([la.op not in GEMM_OPS for la in t.layers])
        self._steps: Optional[List[np.ndarray]] = None

    def _lookup(self, w_in: np.ndarray, w_out: np.ndarray) -> np.ndarray:
        """Per-layer ms; w_in/w_out are (layers,) or (layers, n) integer arrays."""
        out = np.empty(w_in.shape)
        for li, lut in enumerate(self.luts):
            wi = np.zeros_like(w_in[li]) if self.single[li] else np.clip(w_in[li], 0, lut.shape[0] - 1)
            out[li] = lut[wi, np.clip(w_out[li], 0, lut.shape[1] - 1)]
        return out

    def widths(self, k: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        k = np.asarray(k, dtype=np.float64)
        return (np.rint(self.c_in + self.a_in @ k).astype(np.int64),
                np.rint(self.c_out + self.a_out @ k).astype(np.int64))

    def layers(self, k: np.ndarray) -> np.ndarray:
        """ms of every layer (table.layers order), before the calibration."""
        return self._lookup(*self.widths(k))

    def total(self, k: np.ndarray) -> float:
        return float(self.totals(np.asarray(k, dtype=np.float64)[None, :])[0])

    def totals(self, ks: np.ndarray) -> np.ndarray:
        """Network ms for many kept-count vectors at once (rows of `ks`, shape (n, groups))."""
        ks = np.asarray(ks, dtype=np.float64).T
        w_in = np.rint(self.c_in[:, None] + self.a_in @ ks).astype(np.int64)
        w_out = np.rint(self.c_out[:, None] + self.a_out @ ks).astype(np.int64)
        return np.asarray(self.entry.network_ms(self._lookup(w_in, w_out).sum(axis=0)), dtype=np.float64)

    def change(self, k: np.ndarray, step: np.ndarray) -> np.ndarray:
        """ms the network changes by when group g alone goes from k[g] to k[g] + step[g], for every
        g at once (ResourceModel.change's contract)."""
        k = np.asarray(k, dtype=np.float64)
        w_in, w_out = self.widths(k)
        base = self._lookup(w_in, w_out)  # (layers,)
        step = np.asarray(step, dtype=np.float64)[None, :]
        after = self._lookup(w_in[:, None] + np.rint(self.a_in * step).astype(np.int64),  # (layers, groups)
                             w_out[:, None] + np.rint(self.a_out * step).astype(np.int64))
        s = base.sum()
        return self.entry.network_ms(s + (after - base[:, None]).sum(axis=0)) - self.entry.network_ms(s)

    def removal_savings(self, k: np.ndarray) -> np.ndarray:
        """ms saved by removing one more channel of each group, at kept counts k (0 where a group
        is at 1 channel)."""
        k = np.asarray(k, dtype=np.float64)
        return np.where(k > 1, -self.change(k, -np.ones(len(k))), 0.0)

    def step_counts(self) -> List[np.ndarray]:
        """Per group, the kept counts k (ascending, the whole group last) where its conv/linear
        layers get faster going from k + 1 to k channels, the other groups dense: the tops of the
        plateaus, the only widths worth keeping ("learned rounding"). Single-width ops (add,
        pools) are left out: their cost falls with every channel, by little, and would make
        every width a step."""
        if self._steps is not None:
            return self._steps
        gemm = ~self.single
        out = []
        for g, size in enumerate(self.sizes.astype(np.int64)):
            counts = np.arange(1, size + 1)
            k = np.repeat(self.sizes[:, None], size, axis=1)
            k[g] = counts
            w_in = np.rint(self.c_in[:, None] + self.a_in @ k).astype(np.int64)
            w_out = np.rint(self.c_out[:, None] + self.a_out @ k).astype(np.int64)
            ms = self._lookup(w_in, w_out)[gemm].sum(axis=0)  # (size,)
            tops = counts[:-1][ms[1:] > ms[:-1] * (1 + 1e-9) + 1e-12]
            out.append(np.append(tops, size).astype(np.float64))
        self._steps = out
        return out


# --------------------------------------------------------------------------- the table


class LatencyTable:
    """A latency table file (docs/formats.md §4). Use load_table()."""

    def __init__(self, raw: Mapping[str, Any], path: Union[str, Path] = "<table>"):
        self.raw, self.path = raw, Path(path)
        try:
            self.model: Dict[str, Any] = dict(raw["model"])
            self.board: Dict[str, Any] = dict(raw["board"])
            self.groups: List[Tuple[str, int]] = [(str(g["name"]), int(g["size"])) for g in raw["groups"]]
            self.shapes: Dict[str, Any] = dict(raw["shapes"])
            self.layers: List[Layer] = [Layer(str(la["name"]), str(la["op"]), str(la["shape"]),
                                              Width.from_json(la["in"]), Width.from_json(la["out"]))
                                        for la in raw["layers"]]
            entries = list(raw["entries"])
        except (KeyError, TypeError, ValueError) as e:
            raise TableError(f"{self.path}: not a valid latency table ({type(e).__name__}: {e})") from None
        self.group_index = {g: i for i, (g, _) in enumerate(self.groups)}
        self.sizes = np.array([s for _, s in self.groups], dtype=np.float64)
        self._by_name = {la.name: i for i, la in enumerate(self.layers)}
        n, m = len(self.layers), len(self.groups)
        self.c_in, self.c_out = np.zeros(n), np.zeros(n)
        self.a_in, self.a_out = np.zeros((n, m)), np.zeros((n, m))
        for li, la in enumerate(self.layers):
            for width, c, a in ((la.cin, self.c_in, self.a_in), (la.cout, self.c_out, self.a_out)):
                c[li] = width.const
                for g, coef in width.groups:
                    if g not in self.group_index:
                        raise TableError(f"{self.path}: layer {la.name} uses unknown group {g!r}")
                    a[li, self.group_index[g]] = coef
        dense_in = np.rint(self.c_in + self.a_in @ self.sizes).astype(int)
        dense_out = np.rint(self.c_out + self.a_out @ self.sizes).astype(int)
        self.max_widths: Dict[str, Tuple[int, int]] = {}
        for la, di, do in zip(self.layers, dense_in, dense_out):
            key = f"{la.shape}|{la.op}"
            old = self.max_widths.get(key, (0, 0))
            self.max_widths[key] = (max(old[0], int(di)), max(old[1], int(do)))
        self.entries = [LatencyEntry(self, e) for e in entries]

    # ---- identity
    @property
    def model_text(self) -> str:
        m = self.model
        return f"{m.get('spec')} (num_classes {m.get('num_classes')}, width {m.get('width')}, input {m.get('input')})"

    @property
    def board_text(self) -> str:
        return _board_text(self.board)

    def entry(self, format: str, threads: int) -> LatencyEntry:
        for e in self.entries:
            if e.format == format and e.threads == int(threads):
                return e
        have = ", ".join(e.label for e in self.entries) or "none"
        raise TableError(f"{self.path} has no entry for {format} x{threads} (it has: {have}); "
                         f"profile it with --formats {format} --threads {threads}")

    def find(self, format: str, threads: int) -> Optional[LatencyEntry]:
        try:
            return self.entry(format, threads)
        except TableError:
            return None

    def check_compatible(self, device: Mapping[str, Any], backends: Optional[Mapping[str, str]] = None,
                         format: Optional[str] = None, threads: Optional[int] = None) -> List[str]:
        """Raise TableMismatch when `device` (a report's device object) is another board than the
        one the table was measured on; return warnings (one line each) for what may shift the
        numbers without making them wrong in kind: another interpreter version, another clock."""
        mine, theirs = fingerprint(device), self.board
        if mine["id"] != theirs.get("id"):
            diff = [k for k in FINGERPRINT_FIELDS if mine.get(k) != theirs.get(k)]
            raise TableMismatch(f"latency table {self.path.name} was measured on {self.board_text}, not on this "
                                f"board ({_board_text(mine)}; differs in {', '.join(diff) or 'id'}); profile this "
                                "board: python -m device_bench profile MODEL --host ...")
        notes = []
        entries = [self.entry(format, threads)] if format is not None and threads is not None else self.entries
        for e in entries:
            have = (backends or {}).get(e.backend) if e.backend else None
            if backends is not None and e.backend and have is None:
                notes.append(f"latency table {self.path.name} ({e.label}) was measured with {e.backend} "
                             f"{e.backend_version}, which this board does not use: predictions may be off")
            elif have is not None and have != e.backend_version:
                notes.append(f"latency table {self.path.name} ({e.label}) was measured with {e.backend} "
                             f"{e.backend_version}, this board runs {have}: predictions may be off; re-profile")
        clock = (device.get("cpufreq") or {}).get("max_mhz")
        was = (self.board.get("cpufreq") or {}).get("max_mhz")
        if clock and was and abs(clock - was) > 0.02 * was:
            notes.append(f"latency table {self.path.name} was measured at {was:.0f} MHz max, this board runs at "
                         f"{clock:.0f} MHz max: predictions may be off")
        return list(dict.fromkeys(notes))

    def check_model(self, spec: Optional[str], num_classes: Optional[int] = None) -> None:
        """TableMismatch when a network is not the table's model."""
        if spec is not None and str(spec) != str(self.model.get("spec")):
            raise TableMismatch(f"latency table {self.path.name} is for model {self.model.get('spec')!r}, "
                                f"not {spec!r}")
        if num_classes is not None and self.model.get("num_classes") not in (None, int(num_classes)):
            raise TableMismatch(f"latency table {self.path.name} is for {self.model.get('num_classes')} classes, "
                                f"not {num_classes}")

    # ---- widths
    def layer(self, name: str) -> Layer:
        if name not in self._by_name:
            raise KeyError(f"latency table has no layer {name!r}")
        return self.layers[self._by_name[name]]

    def dense_widths(self, layer: Layer) -> Tuple[int, int]:
        li = self._by_name[layer.name]
        return int(round(self.c_in[li] + self.a_in[li] @ self.sizes)), \
            int(round(self.c_out[li] + self.a_out[li] @ self.sizes))

    def keep_vector(self, keep=None) -> np.ndarray:
        """{group: kept} / vector / None -> the kept-count vector in table.groups order."""
        if keep is None:
            return self.sizes.copy()
        if isinstance(keep, np.ndarray) or (isinstance(keep, (list, tuple)) and not isinstance(keep, Mapping)):
            k = np.asarray(keep, dtype=np.float64)
            if k.shape != self.sizes.shape:
                raise TableMismatch(f"kept-count vector has {k.size} entries, the table has {len(self.groups)} groups")
            return k
        k = self.sizes.copy()
        for g, v in keep.items():
            if g not in self.group_index:
                raise TableMismatch(f"latency table ({self.model_text}) has no group {g!r}")
            v = int(v)
            if not 0 <= v <= self.sizes[self.group_index[g]]:   # 0: a residual branch removed whole
                raise ValueError(f"group {g!r} keeps {v} channels; it has {int(self.sizes[self.group_index[g]])}")
            k[self.group_index[g]] = v
        return k

    def width_in(self, k: np.ndarray) -> np.ndarray:
        return np.rint(self.c_in + self.a_in @ k).astype(np.int64)

    def width_out(self, k: np.ndarray) -> np.ndarray:
        return np.rint(self.c_out + self.a_out @ k).astype(np.int64)

    def keep_from_widths(self, widths: Mapping[str, Any]) -> np.ndarray:
        """Kept counts from per-layer widths, checked: every layer named must have the widths the
        derived counts give it. `widths`: {name: (in, out)}, arch.json's {name: {"in", "out"}},
        or {name: out} (a bundle's source.layers: every conv's output channels). A group at 0 is a
        residual branch removed whole (compress --remove-branches)."""
        def pair(v) -> Tuple[Optional[int], int]:
            if isinstance(v, Mapping):
                return int(v["in"]), int(v["out"])
            if isinstance(v, (int, np.integer)):
                return None, int(v)
            a, b = v
            return int(a), int(b)

        given = {name: pair(v) for name, v in widths.items()}
        k = self.sizes.copy()
        for la in self.layers:  # a layer whose output is exactly one group defines it
            if la.name in given and la.cout.const == 0 and len(la.cout.groups) == 1:
                g, coef = la.cout.groups[0]
                k[self.group_index[g]] = given[la.name][1] / coef
        w_in, w_out = self.width_in(k), self.width_out(k)
        for li, la in enumerate(self.layers):
            if la.name not in given or la.op not in GEMM_OPS:
                continue
            want_in, want_out = given[la.name]
            if want_out == 0 and w_out[li] == 0:
                continue   # a removed branch's first conv (arch.json records it 0 -> 0): gone, 0 ms
            if w_out[li] != want_out or (want_in is not None and w_in[li] != want_in):
                raise TableMismatch(f"layer {la.name} is {want_in if want_in is not None else '?'}->{want_out} "
                                    f"channels, but the table's model ({self.model_text}) couples it to "
                                    f"{w_in[li]}->{w_out[li]}: not a pruned {self.model.get('spec')}")
        if np.any(k < 0) or np.any(k > self.sizes):   # 0: a residual branch removed whole
            raise TableMismatch(f"the widths do not fit the table's model ({self.model_text})")
        return k


def load_table(path: Union[str, Path]) -> LatencyTable:
    """Read and check a latency table file; TableError (one line) when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise TableError(f"latency table not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TableError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("kind") != KIND:
        raise TableError(f"{path} is not a latency table (no \"kind\": \"{KIND}\"); make one with "
                         "python -m device_bench profile")
    if raw.get("schema") != SCHEMA:
        raise TableError(f"{path}: latency table schema {raw.get('schema')!r} is not supported (expected {SCHEMA})")
    return LatencyTable(raw, path)


def warn_all(notes: Iterable[str]) -> None:
    for note in notes:
        warnings.warn(note, stacklevel=2)


def relative_error(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured if measured else math.inf
