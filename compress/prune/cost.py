"""FLOPs and parameters of the network as a function of how many channels each group keeps.

    cost = ResourceModel(model, groups, torch.randn(1, 3, 32, 32))
    cost.flops({"features.0": 32})          # MACs with 32 of that group's channels kept
    cost.params(masks)                       # keep counts or boolean masks, per group name
    cost.attach_latency(entry)               # a latency table's entry: "latency" (ms) is a metric too

What is counted, as compress.flops.count counts it: MACs of Conv2d and Linear (nothing else costs
FLOPs by that convention); the parameters of Conv2d, Linear and BatchNorm as functions of the
widths, every other parameter as a constant. That is exact because find_groups admits only Conv2d,
BatchNorm and Linear layers on a pruned channel axis (anything else with parameters there, e.g. a
GroupNorm, is refused before training, naming the layer).

Exact by construction: one traced pass records every Conv2d/Linear's kernel and output size,
and each layer's input/output width is a constant plus (features per channel) x (channels kept)
for every group that touches it. A layer's MACs are then out * in * k*k * H*W (out * k*k * H*W
for a depthwise conv), and its parameters out * in * k*k (+ bias, + BN affine): bilinear in the
widths of adjacent groups. Counted as `compress.flops.count` counts (MACs of Conv2d and Linear,
every parameter), which the tests check on extracted networks.

Latency is the latency table's prediction (device_bench.latency_table.GroupLatency, bound to these
groups): resource/change/removal_savings/dense answer "latency" in ms as they answer FLOPs.

Everything is numpy over a (layers x groups) matrix, so one evaluation costs microseconds and
the budgeted selection can re-evaluate marginal costs after every removed channel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from compress.errors import UserError
from compress.flops import forward_with_hooks
from compress.prune.graph import ChannelGroup
from compress.prune.targets import METRICS


@dataclass
class _Layer:
    """One Conv2d/Linear/BN: its input and output widths as c + sum over groups of a[g] * kept[g],
    and its FLOPs and params as ab * out * in + b * out."""
    name: str
    c_in: float
    c_out: float
    a_in: dict = field(default_factory=dict)
    a_out: dict = field(default_factory=dict)
    flops_ab: float = 0.0
    flops_b: float = 0.0
    params_ab: float = 0.0
    params_b: float = 0.0


class ResourceModel:
    def __init__(self, model: nn.Module, groups: Sequence[ChannelGroup], example_input: torch.Tensor):
        self.groups = list(groups)
        self.names = [g.name for g in self.groups]
        self.index = {n: i for i, n in enumerate(self.names)}
        self.sizes = np.array([g.size for g in self.groups], dtype=np.int64)
        self.removable = np.array([g.removable for g in self.groups], dtype=bool)   # may go to width 0
        spatial = _output_positions(model, example_input)

        # Each layer's width as c + A @ keep, for its input side and its output side.
        coef: dict[tuple[str, str], dict[int, int]] = {}
        for gi, group in enumerate(self.groups):
            for member in group.members:
                per_channel, rest = divmod(len(member.idxs), group.size)
                if rest:
                    raise UserError(f"layer '{member.module}' reads group '{group.name}' unevenly "
                                    f"({len(member.idxs)} indices for {group.size} channels)")
                coef.setdefault((member.module, member.kind), {})[gi] = per_channel

        rows: list[_Layer] = []
        changing_params = 0
        for name, module in model.named_modules():
            a_in = coef.get((name, "in"), {})
            a_out = coef.get((name, "out"), {})
            if isinstance(module, nn.Conv2d):
                depthwise = module.groups == module.in_channels == module.out_channels and module.groups > 1
                if depthwise:  # its inputs are its outputs
                    a_in = a_out = {**a_in, **a_out}
                kernel = math.prod(module.kernel_size)
                bias = 1 if module.bias is not None else 0
                positions = spatial.get(name, 0)
                c_in, c_out = module.in_channels, module.out_channels
                if depthwise:
                    terms = dict(flops_b=kernel * positions, params_b=kernel + bias)
                elif a_in or a_out:
                    terms = dict(flops_ab=kernel * positions, params_ab=kernel, params_b=bias)
                else:  # untouched (possibly grouped) conv: fold it in as a constant output term
                    per_out = c_in // module.groups * kernel
                    terms = dict(flops_b=per_out * positions, params_b=per_out + bias)
                changing_params += sum(p.numel() for p in module.parameters(recurse=False))
            elif isinstance(module, nn.Linear):
                bias = 1 if module.bias is not None else 0
                c_in, c_out = module.in_features, module.out_features
                terms = dict(flops_ab=spatial.get(name, 0), params_ab=1, params_b=bias)
                changing_params += sum(p.numel() for p in module.parameters(recurse=False))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                c_in = c_out = module.num_features
                a_in = {}
                terms = dict(params_b=2 if module.affine else 0)
                changing_params += sum(p.numel() for p in module.parameters(recurse=False))
            else:
                continue
            for gi, k in a_in.items():
                c_in -= k * self.sizes[gi]
            for gi, k in a_out.items():
                c_out -= k * self.sizes[gi]
            rows.append(_Layer(name, c_in, c_out, a_in, a_out, **terms))

        n_layers, n_groups = len(rows), len(self.groups)
        self.layer_names = [r.name for r in rows]
        self.c_in = np.array([r.c_in for r in rows], dtype=np.float64)
        self.c_out = np.array([r.c_out for r in rows], dtype=np.float64)
        self.a_in = np.zeros((n_layers, n_groups))
        self.a_out = np.zeros((n_layers, n_groups))
        for li, r in enumerate(rows):
            for gi, k in r.a_in.items():
                self.a_in[li, gi] = k
            for gi, k in r.a_out.items():
                self.a_out[li, gi] = k
        # resource = const + sum_l ab_l * out_l * in_l + b_l * out_l
        self.ab = {"flops": np.array([r.flops_ab for r in rows], dtype=np.float64),
                   "params": np.array([r.params_ab for r in rows], dtype=np.float64)}
        self.b = {"flops": np.array([r.flops_b for r in rows], dtype=np.float64),
                  "params": np.array([r.params_b for r in rows], dtype=np.float64)}
        total_params = sum(p.numel() for p in model.parameters())
        self.const = {"flops": 0.0, "params": float(total_params - changing_params)}
        full = self.sizes.astype(np.float64)
        self.dense_flops = self.flops(full)
        self.latency = None   # GroupLatency, once attach_latency gave a table
        self._branch_params = self._removed_branch_params(model, example_input)
        self.dense_params = self.params(full)

    def _removed_branch_params(self, model: nn.Module, example_input: torch.Tensor) -> list[tuple[int, int, float]]:
        """A removable group at 0 (surgery.BranchBias): its reader conv and the BN after it become one
        value per output channel. Per such reader: (group, layer row, params per output channel the
        bilinear terms count there minus the 1 the cut network keeps)."""
        removable = np.flatnonzero(self.removable)
        if not len(removable):
            return []
        from compress.prune.surgery import _bn_after

        row = {name: i for i, name in enumerate(self.layer_names)}
        readers = {self.layer_names[li]: int(g) for g in removable for li in np.flatnonzero(self.a_in[:, g])}
        after = _bn_after(model, list(readers), example_input)
        out = []
        for name, g in readers.items():
            li = row[name]
            counted = self.b["params"][li] + (self.b["params"][row[after[name]]] if name in after else 0.0)
            out.append((g, li, counted - 1.0))
        return out

    def _branch_correction(self, ks: np.ndarray) -> np.ndarray:
        """Params the bilinear model counts for removed branches beyond what the cut network holds,
        for each row of `ks` (kept counts, shape (n, groups))."""
        out = np.zeros(len(ks))
        if self._branch_params:
            width_out = self.c_out + ks @ self.a_out.T
            for g, li, extra in self._branch_params:
                out += np.where(ks[:, g] == 0, extra * width_out[:, li], 0.0)
        return out

    def attach_latency(self, entry) -> None:
        """Price the "latency" metric with `entry` (a LatencyEntry of a table for this network);
        UserError when the table's groups are not these (another model, width or input)."""
        from device_bench.latency_table import TableMismatch

        table = entry.table
        try:
            latency = entry.bind(self.names)
        except TableMismatch as e:
            raise UserError(f"latency table {table.path.name} does not fit this network: {e}") from None
        sizes = dict(table.groups)
        for name, size in zip(self.names, self.sizes):
            if sizes[name] != size:
                raise UserError(f"latency table {table.path.name} is for another network ({table.model_text}): "
                                f"group {name} has {sizes[name]} channels there, {size} here")
        self.latency = latency
        self.dense_latency = latency.total(self.sizes.astype(np.float64))

    def _latency(self):
        if self.latency is None:
            raise UserError("a latency target needs a latency table (--latency-table FILE, latency_table=)")
        return self.latency

    # ------------------------------------------------------------------ evaluation

    def vector(self, keep: Mapping[str, int | torch.Tensor] | np.ndarray | None) -> np.ndarray:
        """Kept channels per group as a float vector (missing groups: all kept)."""
        if isinstance(keep, np.ndarray):
            return keep.astype(np.float64)
        k = self.sizes.astype(np.float64)
        for name, value in (keep or {}).items():
            if name not in self.index:
                raise KeyError(f"unknown group {name!r}")
            if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
                value = int(value.sum())
            k[self.index[name]] = float(value)
        return k

    def resource(self, metric: str, keep) -> int | float:
        """FLOPs or params (int), or latency (predicted ms, float) at kept counts `keep`."""
        total = self.resources(metric, self.vector(keep)[None, :])[0]
        return float(total) if metric == "latency" else int(round(total))

    def resources(self, metric: str, ks: np.ndarray) -> np.ndarray:
        """The resource at many kept-count vectors at once (rows of `ks`, shape (n, groups)), as floats."""
        if metric not in METRICS:
            raise UserError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        ks = np.asarray(ks, dtype=np.float64)
        if metric == "latency":
            return self._latency().totals(ks)
        width_in = self.c_in + ks @ self.a_in.T
        width_out = self.c_out + ks @ self.a_out.T
        total = self.const[metric] + (self.ab[metric] * width_out * width_in + self.b[metric] * width_out).sum(axis=1)
        if metric == "params":
            total -= self._branch_correction(ks)
        return total

    def flops(self, keep) -> int:
        return self.resource("flops", keep)

    def params(self, keep) -> int:
        return self.resource("params", keep)

    def dense(self, metric: str) -> int | float:
        if metric == "latency":
            self._latency()   # UserError without a table
            return self.dense_latency
        return self.dense_flops if metric == "flops" else self.dense_params

    def change(self, metric: str, k: np.ndarray, step: np.ndarray) -> np.ndarray:
        """Exact change of the resource when group g alone goes from k[g] to k[g] + step[g], for
        every g at once (the resource is bilinear in the widths of a layer's input and output)."""
        if metric == "latency":
            return self._latency().change(k, step)
        width_in = self.c_in + self.a_in @ k
        width_out = self.c_out + self.a_out @ k
        d_in, d_out = self.a_in * step[None, :], self.a_out * step[None, :]
        ab, b = self.ab[metric][:, None], self.b[metric][:, None]
        per_layer = ab * (d_in * width_out[:, None] + width_in[:, None] * d_out + d_in * d_out) + b * d_out
        change = per_layer.sum(axis=0)
        if metric == "params" and self._branch_params:   # removed branches: one value per channel
            moved = np.repeat(k[None, :], len(k), axis=0) + np.diag(step)   # row g: group g moved
            change -= self._branch_correction(moved) - self._branch_correction(k[None, :])[0]
        return change

    def removal_savings(self, metric: str, k: np.ndarray) -> np.ndarray:
        """Exact resource saved by removing one more channel of each group, at widths `k`."""
        return -self.change(metric, k, -np.ones(len(self.sizes)))


def _output_positions(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Per Conv2d/Linear: output positions per sample (H*W; tokens for a 3-D Linear input)."""
    names = {m: n for n, m in model.named_modules()}
    batch = example_input.shape[0]
    positions: dict[str, int] = {}

    def hook(module, inputs, output):
        channels = output.shape[1] if isinstance(module, nn.Conv2d) else output.shape[-1]
        positions[names[module]] = output.numel() // (batch * channels)

    forward_with_hooks(model, example_input, [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))],
                       hook)
    return positions
