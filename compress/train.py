"""The training loop every method shares.

A run is a list of phases (e.g. dense -> fine-tune), each with its own learning-rate cycle,
over one total epoch budget. Pruning methods plug in as callbacks: they see every step
after backward (gradients present) and every epoch end, where they may replace the model
(channel surgery). After every epoch the whole state is written to `checkpoint.pt`
(temp file + rename, `torch.load(weights_only=True)`-safe), so a run killed at any moment
resumes from the last finished epoch and ends exactly where the uninterrupted run would.

Under `torchrun` the trainer wraps the model in DistributedDataParallel (gloo on CPU,
nccl on GPU), shards the data by rank, and offers `all_reduce_sum` so callbacks that
accumulate statistics from activations select the same channels on every rank.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from compress.data import batches

LOG_COLUMNS = ["epoch", "phase", "lr", "train_loss", "train_top1", "test_loss", "test_top1",
               "flops", "params", "seconds"]
CHECKPOINT_FORMAT = 1


@dataclass
class TrainConfig:
    epochs: int = 30                 # the whole budget; phases split it
    batch_size: int = 256            # global: divided among DDP ranks
    lr: float = 0.1                  # peak learning rate of every phase unless the phase says otherwise
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"       # onecycle | cosine | step
    warmup_epochs: float = 0.0       # linear warm-up for cosine/step (onecycle warms up by itself)
    onecycle_pct_start: float = 0.25
    step_milestones: tuple = (0.5, 0.75)   # fractions of a phase where `step` divides the lr by 10
    label_smoothing: float = 0.0
    bf16: bool = False               # CPU/GPU autocast to bfloat16 for training and per-epoch eval
    channels_last: bool = True
    seed: int = 0
    device: str = "cpu"
    eval_every: int = 1              # evaluate on the test set every k epochs (and always at the end)
    progress: bool = True            # tqdm bars


@dataclass
class Phase:
    """A stretch of epochs with a fresh optimizer and, by default, its own learning-rate cycle.

    `cycle_start`/`cycle_epochs` let a phase continue a longer cycle instead: a phase of 3 epochs
    with cycle_start=9, cycle_epochs=12 runs the last quarter of a 12-epoch cycle."""
    name: str
    epochs: int
    lr: Optional[float] = None       # None: TrainConfig.lr
    cycle_start: int = 0
    cycle_epochs: Optional[int] = None   # None: the phase's own length

    def progress(self, phase_epoch: float) -> float:
        return (self.cycle_start + phase_epoch) / (self.cycle_epochs or self.epochs)


class Callback:
    """Where a pruning method plugs in. Order on start (fresh or resumed): `load_state_dict`
    (only when resuming), then `on_train_start` — so setup can honour the restored state."""

    def on_train_start(self, trainer: Trainer) -> None: ...

    def after_backward(self, trainer: Trainer, step: int) -> None:
        """Gradients are present (all-reduced under DDP); the optimizer has not stepped yet."""

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        """May assign `trainer.model` (surgery); the trainer then rebuilds its optimizer."""

    def resources(self, trainer: Trainer) -> Optional[tuple[int, int]]:
        """(flops, params) of the network as masked now, or None to count the module as it is."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


# ---------------------------------------------------------------------------------------------
# learning rate: a pure function of (config, phase, progress) so resuming needs no scheduler state


def lr_at(config: TrainConfig, peak: float, progress: float, phase_epochs: int) -> float:
    """Learning rate at `progress` in [0, 1) through a phase of `phase_epochs` epochs."""
    t = min(max(progress, 0.0), 1.0)
    if config.schedule == "onecycle":
        pct = config.onecycle_pct_start
        low, end = peak / 25.0, peak / 1e4
        if t < pct:
            return low + (peak - low) * (1 - math.cos(math.pi * t / pct)) / 2
        return end + (peak - end) * (1 + math.cos(math.pi * (t - pct) / (1 - pct))) / 2
    warm = min(config.warmup_epochs / max(phase_epochs, 1), 0.5)
    if t < warm:
        return peak * (t + 1e-3) / warm
    if config.schedule == "cosine":
        return peak * (1 + math.cos(math.pi * (t - warm) / (1 - warm))) / 2
    if config.schedule == "step":
        return peak * 0.1 ** sum(t >= m for m in config.step_milestones)
    raise ValueError(f"unknown schedule {config.schedule!r}")


# ---------------------------------------------------------------------------------------------
# distributed helpers


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size())


# ---------------------------------------------------------------------------------------------


def steps_per_epoch(n_train: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps in one epoch: every rank gets n // world images in batches of batch // world,
    the last partial batch dropped (compress.data.batches with train=True)."""
    per_rank = max(batch_size // world_size, 1)
    return max((n_train // world_size) // per_rank, 1)


@dataclass
class EpochResult:
    loss: float
    top1: float


@dataclass
class Trainer:
    model: nn.Module
    data: Any                                   # compress.data.Dataset (x/y train/test, mean, std)
    config: TrainConfig
    phases: list[Phase]
    callbacks: Sequence[Callback] = ()
    workdir: Optional[Path] = None              # checkpoint.pt and train_log.csv go here (main rank)
    input_shape: tuple = (1, 3, 32, 32)
    arch_of: Optional[Callable[[nn.Module], dict]] = None    # describe the model after surgery
    rebuild: Optional[Callable[[dict], nn.Module]] = None    # and build it back on resume
    dist: DistInfo = field(default_factory=DistInfo)
    extra_state: dict = field(default_factory=dict)          # saved in the checkpoint as is (primitives)
    # (epoch, name): keep the checkpoint from which `epoch` (0-based) starts under this name too (a
    # one-shot method's last dense epoch, so that a run at another target can start there).
    keep: Optional[tuple[int, str]] = None

    def __post_init__(self):
        if sum(p.epochs for p in self.phases) != self.config.epochs:
            raise ValueError(f"phases {[(p.name, p.epochs) for p in self.phases]} do not add up to "
                             f"{self.config.epochs} epochs")
        self.device = torch.device(self.config.device)
        self.start_epoch = 0
        self.step = 0                    # global optimizer steps so far
        self.epoch = 0
        self.log: list[dict] = []
        self.seconds = 0.0               # training time summed over resumed sessions
        self.model_replaced = False      # set once a callback swaps in a new module
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self._optimizer_state: Optional[dict] = None
        self.phase = self.phases[0] if self.phases else None
        self.lr = 0.0
        self._attach(self.model)

    # -- model / optimizer ------------------------------------------------------------------

    def _attach(self, model: nn.Module) -> None:
        model.to(self.device)
        if self.config.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self._attached = model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        else:
            self.net = model

    def _new_optimizer(self) -> torch.optim.Optimizer:
        # Weight decay on conv/linear weights only, as is usual: not on BN affine or biases.
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim > 1]
        other = [p for p in self.model.parameters() if p.requires_grad and p.ndim <= 1]
        c = self.config
        return torch.optim.SGD([{"params": decay, "weight_decay": c.weight_decay},
                                {"params": other, "weight_decay": 0.0}],
                               lr=c.lr, momentum=c.momentum, nesterov=c.nesterov and c.momentum > 0)

    def _phase_of(self, epoch: int) -> tuple[Phase, int]:
        start = 0
        for phase in self.phases:
            if epoch < start + phase.epochs:
                return phase, epoch - start
            start += phase.epochs
        return self.phases[-1], self.phases[-1].epochs

    def autocast(self):
        if not self.config.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # -- distributed helpers callbacks use ---------------------------------------------------

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks in place (identity on one process); returns it."""
        if self.dist.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.dist.enabled:
            dist.broadcast(tensor, src=0)
        return tensor

    # -- checkpoint ----------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Optional[Path]:
        return None if self.workdir is None else Path(self.workdir) / "checkpoint.pt"

    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch + 1,            # the next epoch to run
            "step": self.step,
            "seconds": self.seconds,
            "arch": json.dumps(self.arch_of(self.model)) if (self.model_replaced and self.arch_of) else "",
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
            "rng": rng,
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "log": self.log,
            "extra": self.extra_state,
        }

    def save_checkpoint(self) -> None:
        if self.checkpoint_path is None or not self.dist.is_main:
            return
        tmp = self.checkpoint_path.with_suffix(".pt.tmp")
        torch.save(self.state_dict(), tmp)
        if self.keep is not None and self.epoch + 1 == self.keep[0]:
            kept = self.checkpoint_path.with_name(self.keep[1])
            kept.unlink(missing_ok=True)
            os.link(tmp, kept)      # the same bytes; the next os.replace leaves this name alone
        os.replace(tmp, self.checkpoint_path)

    def load_checkpoint(self, path: Path) -> None:
        self.load_state(torch.load(path, map_location="cpu", weights_only=True), where=str(path))

    def load_state(self, state: dict, where: str = "checkpoint", callbacks: bool = True) -> None:
        """Continue from a checkpoint's contents (what `state_dict` saved). callbacks=False: another
        run's checkpoint from before any callback acted (--dense-from); this run's callbacks and
        extra_state stay as they are."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{where}: unknown checkpoint format {state.get('format')!r}")
        if state["arch"]:
            if self.rebuild is None:
                raise ValueError(f"{where}: the model was changed by surgery but no rebuild function was given")
            self.model_replaced = True
            self._attach(self.rebuild(json.loads(state["arch"])))
        self.model.load_state_dict(state["model"])
        self.start_epoch = state["epoch"]
        self.epoch = self.start_epoch - 1
        self.step = state["step"]
        self.seconds = state["seconds"]
        self.log = list(state["log"])
        if callbacks:
            self.extra_state = dict(state["extra"])
        self._optimizer_state = state["optimizer"] or None
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        for cb, cb_state in zip(self.callbacks, state["callbacks"] if callbacks else ()):
            cb.load_state_dict(cb_state)

    # -- the loop ------------------------------------------------------------------------------

    def fit(self) -> list[dict]:
        """Run from `start_epoch` to the end of the budget; returns the per-epoch log."""
        c = self.config
        for cb in self.callbacks:
            cb.on_train_start(self)
        self.optimizer = self._new_optimizer()
        if self._optimizer_state is not None:
            self.optimizer.load_state_dict(self._optimizer_state)
            self._optimizer_state = None
        for epoch in range(self.start_epoch, c.epochs):
            self.epoch = epoch
            self.phase, phase_epoch = self._phase_of(epoch)
            t0 = time.perf_counter()
            train = self._train_epoch(epoch, phase_epoch)
            for cb in self.callbacks:
                cb.on_epoch_end(self, epoch)
            if self.model is not self._attached:       # a callback did surgery
                self.model_replaced = True
                self._attach(self.model)
                self.optimizer = self._new_optimizer()
            next_phase, next_phase_epoch = self._phase_of(epoch + 1)
            if epoch + 1 < c.epochs and next_phase_epoch == 0:
                self.optimizer = self._new_optimizer()   # a new phase starts with fresh momentum
            last = epoch + 1 == c.epochs
            test = self.evaluate() if (last or (epoch + 1) % max(c.eval_every, 1) == 0) else None
            self.seconds += time.perf_counter() - t0
            flops, params = self.resources()
            self.log.append({
                "epoch": epoch + 1, "phase": self.phase.name, "lr": self.lr,
                "train_loss": train.loss, "train_top1": train.top1,
                "test_loss": test.loss if test else "", "test_top1": test.top1 if test else "",
                "flops": flops, "params": params, "seconds": round(self.seconds, 2),
            })
            if self.dist.is_main:
                self._write_log()
                msg = f"epoch {epoch + 1}/{c.epochs} [{self.phase.name}] loss {train.loss:.3f} " \
                      f"train {train.top1:.3f}" + (f" test {test.top1:.4f}" if test else "") + \
                      f" flops {flops / 1e6:.1f}M params {params / 1e6:.3f}M"
                tqdm.write(msg)
            self.save_checkpoint()
        return self.log

    def _train_epoch(self, epoch: int, phase_epoch: int) -> EpochResult:
        c, d = self.config, self.data
        per_rank = max(c.batch_size // self.dist.world_size, 1)
        steps = steps_per_epoch(len(d.y_train), c.batch_size, self.dist.world_size)
        peak = self.phase.lr if self.phase.lr is not None else c.lr
        criterion = nn.CrossEntropyLoss(label_smoothing=c.label_smoothing)
        self.net.train()
        loss_sum = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.int64)
        seen = 0
        it = batches(d.x_train, d.y_train, per_rank, train=True, seed=c.seed, epoch=epoch,
                     mean=d.mean, std=d.std, device=self.device, channels_last=c.channels_last,
                     rank=self.dist.rank, world_size=self.dist.world_size)
        bar = tqdm(it, total=steps, desc=f"epoch {epoch + 1}/{c.epochs} {self.phase.name}", leave=False,
                   disable=not (c.progress and self.dist.is_main), dynamic_ncols=True)
        for i, (x, y) in enumerate(bar):
            self.lr = lr_at(c, peak, self.phase.progress(phase_epoch + i / steps),
                            self.phase.cycle_epochs or self.phase.epochs)
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr
            with self.autocast():
                logits = self.net(x)
            loss = criterion(logits.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for cb in self.callbacks:
                cb.after_backward(self, self.step)
            self.optimizer.step()
            self.step += 1
            loss_sum += loss.detach().double().cpu() * len(y)
            correct += (logits.argmax(1) == y).sum().cpu()
            seen += len(y)
            if i % 10 == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                                lr=f"{self.lr:.4f}")
        bar.close()
        self._average_buffers()
        totals = self.all_reduce_sum(torch.stack([loss_sum, correct.double(), torch.tensor(float(seen),
                                                                                         dtype=torch.float64)]))
        return EpochResult(loss=(totals[0] / totals[2]).item(), top1=(totals[1] / totals[2]).item())

    @torch.no_grad()
    def _average_buffers(self) -> None:
        """BN running statistics are per rank (DDP only copies rank 0's at the next forward):
        average them so every rank evaluates, prunes and saves the same network."""
        if not self.dist.enabled:
            return
        for buf in self.model.buffers():
            if buf.is_floating_point():
                self.all_reduce_sum(buf).div_(self.dist.world_size)

    @torch.no_grad()
    def evaluate(self, model: Optional[nn.Module] = None, bf16: Optional[bool] = None) -> EpochResult:
        """Test loss and top-1 over the whole test set (sharded over ranks, summed)."""
        c, d = self.config, self.data
        model = model if model is not None else self.model
        model.eval()
        use_bf16 = c.bf16 if bf16 is None else bf16
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in batches(d.x_test, d.y_test, 500, train=False, seed=c.seed, epoch=0, mean=d.mean,
                            std=d.std, device=self.device, channels_last=c.channels_last,
                            rank=self.dist.rank, world_size=self.dist.world_size):
            with ctx:
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        totals = self.all_reduce_sum(torch.tensor([loss_sum, correct, seen], dtype=torch.float64))
        return EpochResult(loss=(totals[0] / totals[2]).item(), top1=(totals[1] / totals[2]).item())

    def resources(self) -> tuple[int, int]:
        for cb in self.callbacks:
            counted = cb.resources(self)
            if counted is not None:
                return counted
        from compress.flops import count
        counts = count(self.model, self.input_shape)
        return counts.flops, counts.params

    def _write_log(self) -> None:
        if self.workdir is None:
            return
        path = Path(self.workdir) / "train_log.csv"
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
            writer.writeheader()
            for row in self.log:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        os.replace(tmp, path)


def config_dict(config: TrainConfig) -> dict:
    d = asdict(config)
    d["step_milestones"] = list(d["step_milestones"])
    return d
