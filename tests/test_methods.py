"""Every method at smoke scale: it runs, it lands on the target, the baselines that borrow a seed
run's widths really use them; and two DDP ranks (gloo on 127.0.0.1) select the same channels."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.test_cli import compress_here, tiny_args


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory, small_cifar_dir) -> Path:
    out = tmp_path_factory.mktemp("runs") / "seed"
    compress_here(*tiny_args(small_cifar_dir, "--method", "seed", "--target", "flops=0.6", "--out", str(out)))
    return out


def report_of(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def phases_of(run: Path) -> list[str]:
    return [line.split(",")[1] for line in (run / "train_log.csv").read_text().splitlines()[1:]]


@pytest.mark.parametrize("method", ["l1", "slimming", "taylor"])
def test_one_shot_baselines_train_prune_finetune_to_the_target(method: str, tmp_path: Path, small_cifar_dir: Path):
    out = tmp_path / method
    compress_here(*tiny_args(small_cifar_dir, "--method", method, "--target", "flops=0.6", "--out", str(out)))
    report = report_of(out)
    assert report["method"] == method
    assert abs(report["achieved"]["flops_reduction"] - 0.6) <= 0.01
    assert report["dense"]["top1"] is not None          # measured before the cut
    assert phases_of(out) == ["dense", "finetune"]       # 2 epochs split 50/50
    assert any(layer["after"] < layer["before"] for layer in report["layers"])


def test_random_uses_the_seed_runs_widths(seed_run: Path, tmp_path: Path, small_cifar_dir: Path):
    out = tmp_path / "random"
    # --model/--width come from the seed run's arch.json when not given.
    compress_here("--method", "random", "--widths-from", str(seed_run), "--preset", "smoke", "--epochs", "2",
             "--train-subset", "192", "--test-subset", "128", "--calib", "32", "--batch-size", "32",
             "--data-dir", str(small_cifar_dir), "--no-progress", "--out", str(out))
    report, seed = report_of(out), report_of(seed_run)
    assert report["layers"] == seed["layers"]
    assert report["slim"]["flops"] == seed["slim"]["flops"] and report["target"] == seed["target"]
    assert phases_of(out) == ["dense", "finetune"]


def test_scratch_trains_the_seed_runs_shape_from_fresh_weights(seed_run: Path, tmp_path: Path,
                                                               small_cifar_dir: Path):
    out = tmp_path / "scratch"
    compress_here(*tiny_args(small_cifar_dir, "--method", "scratch", "--widths-from", str(seed_run), "--out", str(out)))
    arch = json.loads((out / "arch.json").read_text())
    assert arch["modules"] == json.loads((seed_run / "arch.json").read_text())["modules"]
    report = report_of(out)
    assert report["slim"]["flops"] == report_of(seed_run)["slim"]["flops"]
    assert report["dense"]["flops"] == report_of(seed_run)["dense"]["flops"]
    assert phases_of(out) == ["train", "train"]


# ----------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, argv: list[str], dump: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from compress import cli, methods

    extract_once = methods.PruneCallback.on_epoch_end

    def record_then_extract(self, trainer, epoch):
        # What this rank selected, just before the channels are cut.
        if epoch == self.at_epoch and not self.extracted:
            torch.save({"masks": self.pruner.masks, "utility": self.pruner.seed_pruner.utility,
                        "model": {k: v.cpu() for k, v in trainer.model.state_dict().items()}},
                       Path(dump) / f"rank{rank}.pt")
        extract_once(self, trainer, epoch)

    methods.PruneCallback.on_epoch_end = record_then_extract
    assert cli.main(argv) == 0


@pytest.mark.slow
def test_two_ddp_ranks_select_identical_masks(tmp_path: Path, small_cifar_dir: Path):
    out = tmp_path / "ddp"
    argv = tiny_args(small_cifar_dir, "--method", "seed", "--target", "flops=0.5", "--out", str(out))
    mp.spawn(_rank_main, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["masks"].keys() == r1["masks"].keys()
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
        assert torch.equal(r0["utility"][name], r1["utility"][name]), name
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k    # DDP kept the replicas identical
    report = report_of(out)
    assert abs(report["achieved"]["flops_reduction"] - 0.5) <= 0.01
    assert (out / "model.pt2").is_file() and not out.with_name("ddp.partial").exists()


def test_init_loads_safetensors_weights_and_refuses_a_mismatch(tmp_path: Path):
    from safetensors.torch import save_file

    from compress.errors import UserError
    from compress.methods import _load_init
    from compress.models import create_model

    source = create_model("vgg11", 10, 0.25)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "w.safetensors")
    target = create_model("vgg11", 10, 0.25)
    _load_init(target, str(tmp_path / "w.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    with pytest.raises(UserError, match="shape"):
        _load_init(create_model("vgg11", 10, 0.5), str(tmp_path / "w.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable"):
        _load_init(target, str(tmp_path / "junk.safetensors"))


def test_one_shot_selection_ranks_by_score_alone_unless_told(tmp_path: Path, small_cifar_dir: Path):
    """The one-shot baselines select with the same global rule as seed (`--cost-power`, default 0:
    score alone, as l1/slimming/taylor's papers rank); 1 ranks per unit of FLOPs saved and, on the
    same dense network, keeps other widths."""
    widths = {}
    for power in ("default", "1"):
        out = tmp_path / f"l1-{power}"
        extra = () if power == "default" else ("--cost-power", power)
        compress_here(*tiny_args(small_cifar_dir, "--method", "l1", "--target", "flops=0.6", "--out", str(out), *extra))
        report = report_of(out)
        assert abs(report["achieved"]["flops_reduction"] - 0.6) <= 0.01
        widths[power] = [layer["after"] for layer in report["layers"]]
        assert report["config"]["cost_power"] == (0.0 if power == "default" else 1.0)
    assert widths["default"] != widths["1"]


@pytest.mark.parametrize("method", ["seed", "l1"])
def test_round_to_keeps_every_width_a_multiple(method: str, tmp_path: Path, small_cifar_dir: Path):
    """--round-to 8: every pruned conv of the cut network keeps a multiple of 8 channels (or all
    of them), and the run still lands on the target; a bad value is refused before training."""
    out = tmp_path / method
    compress_here(*tiny_args(small_cifar_dir, "--method", method, "--target", "flops=0.5", "--round-to", "8",
                             "--out", str(out)))
    report = report_of(out)
    assert 0.5 <= report["achieved"]["flops_reduction"] <= 0.56
    assert report["config"]["round_to"] == 8
    assert all(layer["after"] % 8 == 0 or layer["after"] == layer["before"] for layer in report["layers"])
    assert any(layer["after"] < layer["before"] for layer in report["layers"])
    from compress.cli import main
    assert main(tiny_args(small_cifar_dir, "--method", method, "--target", "flops=0.5", "--round-to", "0",
                          "--out", str(tmp_path / "bad"))) == 2
    assert not (tmp_path / "bad").exists()


def test_seed_knobs_are_settable_and_recorded(tmp_path: Path, small_cifar_dir: Path):
    """Every knob of the method from the CLI, and report.json records what the run used, in steps,
    plus the code version that made it."""
    out = tmp_path / "knobs"
    compress_here(*tiny_args(small_cifar_dir, "--method", "seed", "--target", "flops=0.5", "--out", str(out),
                             "--epochs", "4", "--prune-warmup", "0.1", "--prune-ramp", "0.2", "--prune-end", "0.5",
                             "--prune-settle", "1", "--prune-every", "3", "--prune-smoothing", "0.8",
                             "--redistribute", "0.2", "--redistribute-by", "utility-ratio", "--soft-masks",
                             "--redistribute-every", "2"))
    report = report_of(out)
    steps = 192 // 32
    seed = report["pruning"]["seed"]
    assert seed["config"] == {**seed["config"], "warmup_steps": round(0.1 * 4 * steps), "ramp_steps": round(0.2 * 4 * steps),
                              "freeze_at": round(0.5 * 4 * steps), "settle_steps": steps, "update_every": 3,
                              "smoothing": 0.8, "redistribute": 0.2, "redistribute_by": "utility-ratio", "soft": True,
                              "redistribute_every": 2}
    assert seed["channel_flips"]["period_steps"] == 2
    assert report["config"]["prune_ramp"] == 0.2 and report["config"]["soft_masks"] is True
    # the cut waits a full epoch after the last mask change
    assert report["pruning"]["extraction"]["epoch_step"] - seed["last_change_step"] >= steps
    # and the cut was proven equal to the masked network on a training batch
    check = report["pruning"]["extraction"]["check"]
    assert check["relative_diff"] <= check["rtol"] and check["samples"] > 0
    assert phases_of(out) == ["seed", "seed", "seed", "compact"]   # cut at step 12 + 6 = the end of epoch 3
    code = report["code"]
    assert code["version"] and (code["commit"] is None or len(code["commit"]) == 40)


def test_seed_knobs_are_refused_for_other_methods_and_checked(tmp_path: Path, small_cifar_dir: Path):
    from compress.cli import main
    assert main(tiny_args(small_cifar_dir, "--method", "l1", "--target", "flops=0.5", "--prune-ramp", "0.2",
                          "--out", str(tmp_path / "a"))) == 2
    assert main(tiny_args(small_cifar_dir, "--method", "seed", "--target", "flops=0.5", "--prune-smoothing", "1.5",
                          "--out", str(tmp_path / "b"))) == 2
    assert main(tiny_args(small_cifar_dir, "--method", "seed", "--target", "flops=0.5", "--redistribute-by", "x",
                          "--out", str(tmp_path / "c"))) == 2
    assert not any((tmp_path / n).exists() for n in "abc")
