"""Prune your own model in your own training loop: the Python API (`python -m compress` uses it too).

    import compress

    pruner = compress.Pruner(model, example_input, target="flops=0.5", method="seed",
                             epochs=30, steps_per_epoch=len(loader))
    for epoch in range(30):
        for x, y in loader:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            pruner.step()                 # after backward, before optimizer.step()
            optimizer.step()
        if pruner.ready and model is not slim_already:   # optional: train the cut network from here on
            ...
    slim = pruner.extract()               # an ordinary, smaller nn.Module: the masked network, cut
    compress.save_run("runs/mine", slim, ...)   # the run folder `python -m export` reads

Methods (the same names as the CLI's `--method`):

* "seed" — prune while training (compress/prune/seed.py). Construct it before training with the
  budget (`epochs`, `steps_per_epoch`); `step()` after every backward feeds the channel utilities
  and moves the masks; `ready` turns True once the masks are final and have been trained on for the
  settle period, after which `extract()` can cut the network (the rest of training then runs on
  the compact network, which is the same function and cheaper). Schedule knobs: `warmup`, `ramp`,
  `end` (shares of the budget), `settle_epochs`, and SeedConfig's fields (`smoothing`,
  `update_every`, `hysteresis`, `redistribute`, `redistribute_by`, `redistribute_every`, `budget_init`, `soft`).
* "l1", "random" — one-shot: `Pruner(...).extract()` right away scores (filter L1 norm; a seeded
  random draw) and cuts.
* Targets: "flops=R", "params=R", or both ("flops=0.76,params=0.92": both met, each within 1 pp).
  "latency=1.2ms" with `latency_table="tables/net-pi4.json"` (and `format=`, `threads=` to pick
  the table's entry; default its only one, else tflite-int8 x1): the predicted latency at or under
  the budget, widths on the table's step widths (docs/latency-table.md); joint with flops/params
  too ("latency=1.2ms,flops=0.5"). `predicted_ms()` is the table's prediction for the masks.
* Any one-shot method takes `widths={group: channels}` instead of a target: keep exactly that many
  top-scoring channels per named group (e.g. the widths another run found).
* "slimming" — construct it at the start of dense training; `step()` adds Network Slimming's L1
  subgradient on the BN scales (`slimming_lambda`); `extract()` at the end of dense training.
* "taylor" — construct it when dense training is over; run forward + backward on a few dozen
  batches, calling `step()` after each (no optimizer step needed); `extract()` ranks by the mean
  first-order Taylor significance seen.

Every method selects with the same budgeted rule (compress.prune.budget.select) to the target,
exact to compress.flops.count on the extracted network. `extract` checks the result against the
masked network on a batch (`check_input`, default the example input) and records the difference.
Construct the pruner after moving the model to its device (it hooks the model's layers, as an
optimizer holds its parameters). Under DDP pass `reduce=` to `step` (a function averaging a 1-D
tensor over ranks) so every rank picks the same channels.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from compress.errors import UserError
from compress.latency import open_table, resolve
from compress.prune import importance
from compress.prune.budget import max_reduction, select
from compress.prune.cost import ResourceModel
from compress.prune.depth import DepthChooser
from compress.prune.graph import ChannelGroup, find_groups
from compress.prune.masks import ChannelMasker
from compress.prune.seed import SeedConfig, SeedPruner
from compress.prune.surgery import extract as cut
from compress.prune.surgery import mark_removable
from compress.prune.targets import target_dict

METHODS = ("seed", "l1", "slimming", "taylor", "random")
Reduce = Optional[Callable[[torch.Tensor], torch.Tensor]]


def check_reachable(cost: ResourceModel, metric: str, reduction: float, min_keep: float, round_to: int = 1,
                    removable: frozenset = frozenset()) -> None:
    """UserError when no selection can reach the target (`removable`: branches that may go whole)."""
    best = max_reduction(cost, metric, min_keep, round_to, removable)
    if metric == "latency" and reduction > best:
        dense = cost.dense("latency")
        raise UserError(f"latency budget {dense * (1 - reduction):.4g} ms is unreachable for this model: keeping "
                        f"only --min-keep {min_keep:g} of every prunable group (rounded up to the latency table's "
                        f"steps) it is predicted at {dense * (1 - best):.4g} ms at the fastest (dense "
                        f"{dense:.4g} ms); raise the budget or lower --min-keep")
    if metric != "latency" and reduction > best - 0.005:
        rounded = f" rounded up to multiples of --round-to {round_to}" if round_to > 1 else ""
        raise UserError(f"target {metric}={reduction:g} is unreachable for this model: keeping only "
                        f"--min-keep {min_keep:g} of every prunable group{rounded} removes {best:.1%} of the "
                        f"{metric} (layers that cannot be pruned keep the rest)")


class Pruner:
    def __init__(self, model: nn.Module, example_input: torch.Tensor, target: Union[str, Mapping, None],
                 method: str = "seed", *, widths: Optional[Mapping[str, int]] = None, epochs: Optional[int] = None, steps_per_epoch: Optional[int] = None,
                 min_keep: float = 0.1, round_to: int = 1, cost_power: float = 0.0, ignore: Sequence[str] = (),
                 seed: int = 0, slimming_lambda: float = 1e-4, groups: Optional[list[ChannelGroup]] = None,
                 latency_table=None, format: Optional[str] = None, threads: Optional[int] = None,
                 remove_branches: bool = False, calibration: Optional[torch.Tensor] = None, **seed_options):
        if method not in METHODS:
            raise UserError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
        if method != "seed" and seed_options:
            raise UserError(f"{', '.join(sorted(seed_options))}: options of the seed method, not of {method}")
        if (target is None) == (widths is None) or (widths is not None and method == "seed"):
            raise UserError("give a pruner either a target (flops=R / params=R / latency=Xms) or, for a one-shot "
                            "method, widths=")
        self.model, self.method = model, method
        self.target = None if target is None else target_dict(target)
        latency = self.target is not None and self.target["metric"] == "latency"
        if latency != (latency_table is not None):
            raise UserError("a latency target (latency=Xms) is priced with a latency table: give both, "
                            "--target latency=... and --latency-table FILE (target=, latency_table=)")
        self.widths = None if widths is None else {str(k): int(v) for k, v in widths.items()}
        self.min_keep, self.round_to, self.cost_power, self.seed = min_keep, round_to, cost_power, seed
        self.slimming_lambda = slimming_lambda
        self.example_input = example_input.detach()
        was_training = model.training
        self.groups = groups if groups is not None else find_groups(model, self.example_input, ignore)
        if remove_branches:   # residual branches may be cut to width 0 (surgery.BranchBias)
            if widths is not None:
                raise UserError("remove_branches chooses branches for a target; widths= fixes every group's width")
            mark_removable(model, self.groups, self.example_input)
        self.cost = ResourceModel(model, self.groups, self.example_input)
        model.train(was_training)
        if latency:
            self.target = self._price_latency(latency_table, format, threads)
        self.depth: Optional[DepthChooser] = None
        self.removed: Optional[frozenset] = None   # one-shot methods: chosen at the first `masks`
        self.depth_record: Optional[dict] = None
        if remove_branches:
            self.depth = DepthChooser(model, self.groups, self.cost, calibration, self.target["metric"])
        removable = frozenset(self.depth.removable) if self.depth else frozenset()
        if self.target is not None:
            for metric, reduction in _all(self.target).items():
                check_reachable(self.cost, metric, reduction, min_keep, round_to, removable)
            if self.target.get("also") or latency:   # can the widths hit it? Find out now, not after training
                trial = {g.name: -torch.arange(g.size, dtype=torch.float32) for g in self.groups}
                select(trial, self.cost, self.target["metric"], self.target["reduction"], min_keep,
                       cost_power=cost_power, round_to=round_to, also=self.target.get("also"), removed=removable)
        else:
            _check_widths(self.groups, self.widths)
        self.seed_pruner: Optional[SeedPruner] = None
        self.masker: Optional[ChannelMasker] = None
        self.extraction: Optional[dict] = None
        self._slim: Optional[nn.Module] = None
        if method == "seed":
            if not epochs or not steps_per_epoch or epochs < 1 or steps_per_epoch < 1:
                raise UserError("the seed method prunes over a training budget: give epochs= and steps_per_epoch=")
            split = {k: seed_options.pop(k) for k in ("warmup", "ramp", "end", "settle_epochs") if k in seed_options}
            unknown = set(seed_options) - set(SeedConfig.__dataclass_fields__)
            if unknown:
                raise UserError(f"unknown seed-method option(s): {', '.join(sorted(unknown))}")
            config = SeedConfig.for_run(self.target["metric"], self.target["reduction"], epochs, steps_per_epoch,
                                        also=self.target.get("also"), min_keep=min_keep, cost_power=cost_power, round_to=round_to,
                                        **split, **seed_options)
            self.seed_pruner = SeedPruner(self.groups, self.cost, config)
            if self.depth is not None:
                reduction = self.target["reduction"]
                self.seed_pruner.choose_removed = lambda select_for: self.depth.choose(select_for, reduction)
            self.steps_per_epoch = steps_per_epoch
        if method in ("seed", "taylor"):
            self._attach()
        if method == "slimming":
            self._gammas = _bn_scales(model, self.groups)

    def _price_latency(self, path, format: Optional[str], threads: Optional[int]) -> dict:
        """Attach the table's entry to the cost model; the target with its reduction resolved."""
        table, entry = open_table(path, format, threads)
        want = list(table.model.get("input") or [])[1:]
        have = list(self.example_input.shape[1:])
        if want and want != have:
            raise UserError(f"latency table {table.path.name} was profiled for input {want}, this network takes "
                            f"{have}: profile it at this size (python -m device_bench profile --input-size)")
        self.cost.attach_latency(entry)
        return resolve(self.target, table, entry)

    def predicted_ms(self, masks: Optional[Mapping[str, torch.Tensor]] = None) -> Optional[float]:
        """With a latency target: the table's prediction (ms) for `masks` (default: the masks the
        network would be cut with now)."""
        if self.cost.latency is None:
            return None
        return float(self.cost.resource("latency", self.masks if masks is None else masks))

    # ------------------------------------------------------------------ the loop

    def _attach(self) -> None:
        """(Re)create the masker on the model's current device (a model moved after construction
        gets its masker back on the next step)."""
        if self.masker is not None:
            self.masker.remove()
        recording = self.seed_pruner is None or not self.seed_pruner.frozen
        self.masker = ChannelMasker(self.model, self.groups, record=recording)
        self._masker_device = _device_of(self.model)
        if self.seed_pruner is not None:
            self.masker.set(self.seed_pruner.masks, off=self.seed_pruner.off_scale)

    def step(self, reduce: Reduce = None) -> None:
        """Call once per training step, after `loss.backward()` and before `optimizer.step()`."""
        if self._slim is not None:
            return   # cut already: the compact network trains on its own
        if self.method == "slimming":
            for gamma in self._gammas:
                if gamma.grad is not None:
                    gamma.grad.add_(torch.sign(gamma.detach()), alpha=self.slimming_lambda)
            return
        if self.masker is None:
            return
        if _device_of(self.model) != self._masker_device:
            self._attach()
        if self.method == "taylor":
            self.masker.pop_taylor(reduce=reduce)
            return
        pruner = self.seed_pruner
        theta = self.masker.pop_taylor(reduce=reduce) if self.masker.record else None
        new = pruner.step(theta)
        if new is not None:
            self.masker.set(new, off=pruner.off_scale)
        self.masker.record = not pruner.frozen   # the structure is final: stop paying for Taylor

    @property
    def ready(self) -> bool:
        """True when `extract()` gives the final network: one-shot methods always; the seed method
        once its masks are final and have been trained on for the settle period."""
        p = self.seed_pruner
        if p is None:
            return True
        return p.steps >= p.config.freeze_at + p.config.settle_steps

    @property
    def extract_epoch(self) -> Optional[int]:
        """Seed method: the number of epochs after which the network is ready to cut."""
        p = self.seed_pruner
        return None if p is None else p.config.extract_epoch(self.steps_per_epoch)

    # ------------------------------------------------------------------ selection and the cut

    def scores(self) -> dict[str, torch.Tensor]:
        """Per group, the channels' scores the selection ranks by (higher = keep)."""
        if self.method == "seed":
            return importance.seed_utility(self.seed_pruner)
        if self.method == "l1":
            return importance.l1_filter(self.model, self.groups)
        if self.method == "slimming":
            return importance.bn_scale(self.model, self.groups)
        if self.method == "taylor":
            if int(self.masker.counts.min()) == 0:
                raise UserError("taylor: no backward pass was recorded; run forward + backward and call step() "
                                "on some batches before extract()")
            return importance.taylor(self.masker)
        return importance.random_scores(self.groups, self.seed)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The keep-masks the network would be cut with now."""
        if self.seed_pruner is not None and self.seed_pruner.masks is not None:
            return {n: m.clone() for n, m in self.seed_pruner.masks.items()}
        if self.widths is not None:
            return keep_top(self.scores(), self.widths)
        t = self.target
        scores = self.scores()

        def select_for(removed: frozenset) -> dict[str, torch.Tensor]:
            return select(scores, self.cost, t["metric"], t["reduction"], self.min_keep, cost_power=self.cost_power,
                          round_to=self.round_to, also=t.get("also"), removed=removed)

        if self.depth is not None and self.removed is None:   # once: the branches to remove
            self.removed, self.depth_record = self.depth.choose(select_for, t["reduction"])
        return select_for(self.removed or frozenset())

    def extract(self, check_input: Optional[torch.Tensor] = None) -> nn.Module:
        """The compact network: a new nn.Module with the switched-off channels physically removed.
        Called again, it returns the same module (trained on in between, if you did). The model you
        gave keeps its weights and loses its masking hooks."""
        if self._slim is not None:
            return self._slim
        masks = self.masks
        if self.masker is not None:
            self.masker.remove()
            self.masker = None
        device = _device_of(self.model)
        batch = (check_input if check_input is not None else self.example_input).to(device)
        self._slim = cut(self.model, self.groups, masks, batch)
        # the masked-vs-cut comparison surgery.extract made on `batch` (surgery.check_extraction)
        self.extraction = {"epoch_step": None if self.seed_pruner is None else self.seed_pruner.steps,
                           "check": getattr(self._slim, "extraction_check", None)}
        return self._slim

    def resources(self) -> Optional[tuple[int, int]]:
        """(FLOPs, params) of the network as masked now, or None before any mask exists."""
        p = self.seed_pruner
        if self._slim is not None or p is None or p.masks is None:
            return None
        return self.cost.flops(p.masks), self.cost.params(p.masks)

    def summary(self) -> dict:
        """What report.json records of the pruning (docs/formats.md)."""
        out = {"method": self.method, "target": self.target, "widths": self.widths, "min_keep": self.min_keep,
               "round_to": self.round_to,
               "cost_power": self.cost_power, "extraction": self.extraction}
        if self.seed_pruner is not None:
            out["seed"] = self.seed_pruner.summary()
        if self.depth_record is not None:
            out["depth"] = self.depth_record
        if self.method == "slimming":
            out["slimming_lambda"] = self.slimming_lambda
        return out

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        return {"cut": self._slim is not None,
                "seed": None if self.seed_pruner is None else self.seed_pruner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.seed_pruner is not None and state.get("seed") is not None:
            self.seed_pruner.load_state_dict(state["seed"])
            self._attach()


def _all(target: dict) -> dict[str, float]:
    """{metric: reduction} of every metric a target names."""
    return {target["metric"]: target["reduction"], **target.get("also", {})}


def keep_top(scores: Mapping[str, torch.Tensor], widths: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Keep exactly widths[g] top-scoring channels of each group named (the others stay whole)."""
    masks = {}
    for name, s in scores.items():
        keep = widths.get(name, len(s))
        mask = torch.zeros(len(s), dtype=torch.bool)
        mask[torch.topk(torch.as_tensor(s).float().cpu(), keep).indices] = True
        masks[name] = mask
    return masks


def _check_widths(groups: list[ChannelGroup], widths: Mapping[str, int]) -> None:
    sizes = {g.name: g.size for g in groups}
    for name, n in widths.items():
        if name not in sizes:
            raise UserError(f"widths: the model has no prunable group {name!r} (its groups: "
                            f"{', '.join(list(sizes)[:5])}{', ...' if len(sizes) > 5 else ''})")
        if not 1 <= n <= sizes[name]:
            raise UserError(f"widths: group {name!r} has {sizes[name]} channels; cannot keep {n}")


def _device_of(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _bn_scales(model: nn.Module, groups: list[ChannelGroup]) -> list[nn.Parameter]:
    modules = dict(model.named_modules())
    names = sorted({o for g in groups for o in g.outputs
                    if isinstance(modules[o], nn.modules.batchnorm._BatchNorm)})
    return [modules[n].weight for n in names if modules[n].weight is not None]


def save_run(folder, model: nn.Module, *, pruner: Optional[Pruner] = None, dense: Optional[nn.Module] = None,
             calib: tuple, test: tuple, classes: Sequence[str], mean: Sequence[float], std: Sequence[float],
             name: Optional[str] = None, spec: Optional[str] = None, top1: Optional[float] = None,
             dense_top1: Optional[float] = None, epochs: int = 0, seconds: float = 0.0, config: Optional[dict] = None,
             overwrite: bool = False) -> dict:
    """Write the run folder `python -m export` reads (docs/formats.md §1) for a network you trained.

    `calib` and `test` are (images, labels): uint8 (N, H, W, C) images as a camera or file gives them,
    int labels; the network's input is (uint8 / 255 - mean) / std per channel, NCHW. `pruner` (or the
    `dense` model) gives the dense network the report compares with. `spec` ("pkg.module:factory")
    lets `compress.prune.rebuild` rebuild the network from weights.safetensors + arch.json; without it
    model.pt2 (what export reads) is still complete. `top1` defaults to the model's accuracy on `test`.
    The folder is built as FOLDER.partial and renamed when complete; an existing run is replaced only
    with `overwrite=True`. Returns report.json's content."""
    import os
    import shutil
    import time
    from pathlib import Path

    import numpy as np

    from compress import report
    from compress.data import Dataset
    from compress.flops import count
    from compress.prune.surgery import arch_of

    out = Path(folder)
    (x_cal, y_cal), (x_test, y_test) = calib, test
    x_cal, x_test = np.asarray(x_cal), np.asarray(x_test)
    for what, x in (("calib", x_cal), ("test", x_test)):
        if x.dtype != np.uint8 or x.ndim != 4:
            raise UserError(f"save_run: {what} images must be uint8 (N, H, W, C), got {x.dtype} {x.shape}")
    if len(mean) != x_test.shape[3] or len(std) != x_test.shape[3]:
        raise UserError(f"save_run: mean/std need one value per channel ({x_test.shape[3]})")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"save_run: {out} already holds files; pass overwrite=True to replace it")
    dense_model = dense if dense is not None else (pruner.model if pruner is not None else None)
    if dense_model is None:
        raise UserError("save_run: give pruner= or dense= (the network before pruning)")
    data = Dataset(name="custom", x_train=x_cal, y_train=np.asarray(y_cal, dtype=np.int64), x_test=x_test,
                   y_test=np.asarray(y_test, dtype=np.int64), classes=[str(c) for c in classes],
                   mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))
    input_shape = (1, x_test.shape[3], *x_test.shape[1:3])
    dense_counts = count(dense_model, input_shape)
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    if top1 is None:
        top1 = accuracy(model, x_test, y_test, mean, std)
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    target = pruner.target if pruner is not None else None
    summary = report.write_run_folder(
        work, model, name=name or out.name, method=pruner.method if pruner is not None else "custom", data=data,
        num_classes=len(classes), target=target, dense_counts=dense_counts, dense_top1=dense_top1, slim_top1=top1,
        arch=arch_of(model, spec, len(classes), 1.0), epochs=epochs, seconds=seconds, wall_seconds=seconds,
        config={"model": spec, "dataset": "custom", **(config or {})}, calib=len(y_cal), seed=0,
        pruning=pruner.summary() if pruner is not None else None)
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}-{int(time.time())}")
        os.replace(out, old)
        os.replace(work, out)
        shutil.rmtree(old)
    else:
        os.replace(work, out)
    return summary


@torch.no_grad()
def accuracy(model: nn.Module, images, labels, mean: Sequence[float], std: Sequence[float], batch: int = 256) -> float:
    """Top-1 of `model` (eval mode, CPU) on uint8 (N, H, W, C) images, preprocessed as the bundle does."""
    import numpy as np

    model.eval()
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    correct = 0
    for i in range(0, len(labels), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch])).permute(0, 3, 1, 2).float() / 255.0
        correct += int((model((x - m) / s).argmax(1) == torch.as_tensor(labels[i:i + batch])).sum())
    return correct / max(len(labels), 1)
