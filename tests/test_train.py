"""The trainer: learning-rate schedules, callbacks that do surgery, the checkpoint, and a run
killed with SIGKILL mid-epoch that resumes to exactly the uninterrupted result."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.data import load_dataset, subset
from compress.flops import count
from compress.models import create_model
from compress.prune.graph import find_groups
from compress.prune.surgery import arch_of, extract, rebuild
from compress.train import LOG_COLUMNS, Callback, Phase, TrainConfig, Trainer, lr_at, steps_per_epoch
from tests.test_cli import REPO, compress, compress_here, tiny_args

# ----------------------------------------------------------------------------- schedules


def curve(config: TrainConfig, peak: float = 0.1, n: int = 1000) -> np.ndarray:
    return np.array([lr_at(config, peak, i / n, phase_epochs=10) for i in range(n)])


def test_onecycle_warms_up_to_the_peak_then_anneals_to_almost_zero():
    lrs = curve(TrainConfig(schedule="onecycle", onecycle_pct_start=0.25))
    assert lrs[0] == pytest.approx(0.1 / 25)
    assert lrs.max() == pytest.approx(0.1, rel=1e-3) and 240 <= lrs.argmax() <= 260
    assert lrs[-1] < 1e-4
    assert np.all(np.diff(lrs[260:]) <= 1e-12)


def test_cosine_with_warmup_and_step_decay():
    cos = curve(TrainConfig(schedule="cosine", warmup_epochs=1))
    assert cos[0] < 0.01 and cos.max() == pytest.approx(0.1, rel=1e-2) and cos[-1] < 1e-5
    step = curve(TrainConfig(schedule="step", step_milestones=(0.5, 0.75)))
    assert step[0] == step[499] == pytest.approx(0.1)
    assert step[500] == pytest.approx(0.01) and step[750] == pytest.approx(0.001)


def test_steps_per_epoch_matches_the_batches_of_every_rank(small_cifar_dir: Path):
    data = subset(load_dataset("cifar10", small_cifar_dir), train=203)
    from compress.data import batches
    for world in (1, 2):
        for rank in range(world):
            it = batches(data.x_train, data.y_train, 32 // world, train=True, seed=0, epoch=0, mean=data.mean,
                         std=data.std, rank=rank, world_size=world)
            assert len(it) == steps_per_epoch(203, 32, world)


# ----------------------------------------------------------------------------- surgery + checkpoint


class PruneHalfAfterFirstEpoch(Callback):
    """Cuts every group to its first half of channels at the end of epoch 0 (surgery in a callback)."""

    def __init__(self, groups):
        self.groups, self.done, self.calls = groups, False, []

    def on_train_start(self, trainer):
        self.calls.append("start")

    def after_backward(self, trainer, step):
        assert all(p.grad is not None for p in trainer.model.parameters() if p.requires_grad)

    def on_epoch_end(self, trainer, epoch):
        self.calls.append(f"end{epoch}")
        if epoch == 0:
            masks = {g.name: torch.arange(g.size) < max(1, g.size // 2) for g in self.groups}
            trainer.model = extract(trainer.model, self.groups, masks)
            self.done = True

    def state_dict(self):
        return {"done": self.done}

    def load_state_dict(self, state):
        self.done = state["done"]


def test_surgery_in_a_callback_checkpoints_the_new_shape(small_cifar_dir: Path, tmp_path: Path):
    data = subset(load_dataset("cifar10", small_cifar_dir), train=128, test=64)
    spec = dict(spec="vgg11", num_classes=10, width=0.125)
    torch.manual_seed(0)
    model = create_model("vgg11", 10, 0.125)
    groups = find_groups(model, torch.zeros(1, 3, 32, 32))
    callback = PruneHalfAfterFirstEpoch(groups)
    config = TrainConfig(epochs=3, batch_size=32, lr=0.05, progress=False)
    trainer = Trainer(model, data, config, [Phase("dense", 1), Phase("finetune", 2)], [callback], workdir=tmp_path,
                      arch_of=lambda m: arch_of(m, **spec), rebuild=rebuild)
    log = trainer.fit()
    assert callback.calls == ["start", "end0", "end1", "end2"]
    assert [row["phase"] for row in log] == ["dense", "finetune", "finetune"]
    dense_flops = count(create_model("vgg11", 10, 0.125)).flops
    # The row of epoch 1 describes the network that continues: half the channels, ~1/4 of the MACs.
    assert 0 < log[0]["flops"] == log[2]["flops"] < dense_flops * 0.5
    header = (tmp_path / "train_log.csv").read_text().splitlines()[0]
    assert header == ",".join(LOG_COLUMNS)

    state = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 3 and json.loads(state["arch"])["modules"]["features.0"]["out"] == 4
    assert state["callbacks"] == [{"done": True}]

    # A fresh trainer on a fresh dense model picks the compact shape and the weights up from the checkpoint.
    again = Trainer(create_model("vgg11", 10, 0.125), data, config, [Phase("dense", 1), Phase("finetune", 2)],
                    [PruneHalfAfterFirstEpoch(groups)], arch_of=lambda m: arch_of(m, **spec), rebuild=rebuild)
    again.load_checkpoint(tmp_path / "checkpoint.pt")
    for (k, a), b in zip(trainer.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a.cpu(), b.cpu()), k
    assert again.start_epoch == 3 and again.callbacks[0].done
    assert again.evaluate().top1 == trainer.evaluate().top1


def test_phases_must_add_up_to_the_budget(small_cifar_dir: Path):
    data = subset(load_dataset("cifar10", small_cifar_dir), train=64, test=32)
    with pytest.raises(ValueError, match="add up"):
        Trainer(create_model("vgg11", 10, 0.125), data, TrainConfig(epochs=3), [Phase("a", 1)])


# ----------------------------------------------------------------------------- SIGKILL + --resume


def checkpoint_epoch(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # not there yet
        return 0


def log_without_time(run: Path) -> list[list[str]]:
    rows = [line.split(",") for line in (run / "train_log.csv").read_text().splitlines()]
    return [row[:-1] for row in rows]  # last column: seconds


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [
    ("seed", ["--target", "flops=0.5"]),                                  # masks + utilities restored mid-pruning
    ("l1", ["--target", "flops=0.5", "--epochs", "3"]),                    # killed after surgery, in the fine-tune
])
def test_sigkill_mid_epoch_then_resume_ends_like_the_uninterrupted_run(method, extra, tmp_path: Path,
                                                                      small_cifar_dir: Path):
    args = tiny_args(small_cifar_dir, "--method", method, *extra)
    reference = tmp_path / "reference"
    compress_here(*args, "--out", str(reference))   # uninterrupted, in this process

    run = tmp_path / "killed"
    ckpt = run.with_name("killed.partial") / "checkpoint.pt"
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "compress", *args, "--out", str(run)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 600
        while checkpoint_epoch(ckpt) < 1 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)   # epoch 2 is running now
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint_epoch(ckpt) == 1 and not run.exists()

    compress("--out", str(run), "--resume", "--data-dir", str(small_cifar_dir), "--no-progress")
    ref_report = json.loads((reference / "report.json").read_text())
    report = json.loads((run / "report.json").read_text())
    assert report["slim"] == ref_report["slim"] and report["achieved"] == ref_report["achieved"]
    assert report["layers"] == ref_report["layers"]
    assert log_without_time(run) == log_without_time(reference)
    from safetensors.torch import load_file
    ours, theirs = load_file(run / "weights.safetensors"), load_file(reference / "weights.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_resume_refuses_changed_options(tmp_path: Path, small_cifar_dir: Path):
    out = tmp_path / "r"
    partial = tmp_path / "r.partial"
    partial.mkdir()
    torch.save({"extra": {"config": {"method": "seed", "epochs": 2, "out": str(out)}}}, partial / "checkpoint.pt")
    proc = compress("--out", str(out), "--resume", "--epochs", "5", check=False)
    assert proc.returncode == 2 and "--epochs 5 differs" in proc.stderr
