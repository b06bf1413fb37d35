"""`python -m compress` end to end at smoke scale: the run folder, the exported program in a fresh
process, the target, the folder protocol, and every bad input -> one line, exit 2."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RUN_FILES = ["model.pt2", "weights.safetensors", "arch.json", "report.json", "train_log.csv", "channels.png",
             "checkpoint.pt", "calib.npz", "test.npz"]
LOG_COLUMNS = "epoch,phase,lr,train_loss,train_top1,test_loss,test_top1,flops,params,seconds"


def tiny_args(data_dir: Path, *extra: str) -> list[str]:
    """A VGG-16 at width 0.25 on 192 images for 2 epochs: seconds, but every code path."""
    return ["--model", "vgg16", "--width", "0.25", "--preset", "smoke", "--epochs", "2", "--train-subset", "192",
            "--test-subset", "128", "--calib", "32", "--batch-size", "32", "--data-dir", str(data_dir),
            "--no-progress", *extra]


def compress_here(*args: str) -> None:
    """The same CLI in this process (no interpreter start-up): for runs whose exit path is not the point."""
    from compress.cli import main
    assert main(list(args)) == 0


def compress(*args: str, cwd: Path = REPO, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "compress", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"compress failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory, small_cifar_dir) -> Path:
    out = tmp_path_factory.mktemp("runs") / "seed-f50"
    compress(*tiny_args(small_cifar_dir, "--method", "seed", "--target", "flops=0.5", "--out", str(out)))
    return out


def test_seed_run_writes_the_whole_run_folder(seed_run: Path):
    for name in RUN_FILES:
        assert (seed_run / name).is_file(), name
    assert not seed_run.with_name(seed_run.name + ".partial").exists()

    report = json.loads((seed_run / "report.json").read_text())
    for key in ("schema", "name", "method", "model", "dataset", "num_classes", "classes", "target", "dense",
                "slim", "achieved", "layers", "epochs", "seconds", "input", "config", "toolchain", "created"):
        assert key in report, key
    assert report["method"] == "seed" and report["name"] == "seed-f50" and report["num_classes"] == 10
    assert report["target"] == {"metric": "flops", "reduction": 0.5}
    assert abs(report["achieved"]["flops_reduction"] - 0.5) <= 0.01
    assert report["slim"]["flops"] < report["dense"]["flops"]
    assert 0.0 <= report["slim"]["top1"] <= 1.0
    assert any(layer["after"] < layer["before"] for layer in report["layers"])
    assert report["input"]["layout"] == "NCHW" and report["input"]["shape"] == [1, 3, 32, 32]

    lines = (seed_run / "train_log.csv").read_text().splitlines()
    assert lines[0] == LOG_COLUMNS and len(lines) == 3

    ckpt = torch.load(seed_run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["arch"]  # extracted at the end: the compact shape is stored

    with np.load(seed_run / "calib.npz", allow_pickle=False) as z:
        assert z["x"].shape == (32, 32, 32, 3) and z["x"].dtype == np.uint8 and z["y"].dtype == np.int64
    with np.load(seed_run / "test.npz", allow_pickle=False) as z:
        assert z["x"].shape == (128, 32, 32, 3) and len(z["y"]) == 128
    assert (seed_run / "channels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_arch_and_weights_rebuild_the_exported_network(seed_run: Path):
    from safetensors.torch import load_file

    from compress.flops import count
    from compress.prune.surgery import rebuild

    model = rebuild(json.loads((seed_run / "arch.json").read_text()))
    model.load_state_dict(load_file(seed_run / "weights.safetensors"))
    model.eval()
    report = json.loads((seed_run / "report.json").read_text())
    assert count(model).flops == report["slim"]["flops"]
    program = torch.export.load(seed_run / "model.pt2").module()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(x), rtol=1e-4, atol=1e-4)


def test_model_pt2_runs_in_a_fresh_process_without_this_project(seed_run: Path, tmp_path: Path):
    script = textwrap.dedent("""
        import json, sys
        sys.modules["compress"] = None      # importing this project now fails
        import numpy as np, torch
        run = sys.argv[1]
        report = json.load(open(run + "/report.json"))
        program = torch.export.load(run + "/model.pt2").module()
        z = np.load(run + "/test.npz", allow_pickle=False)
        inp = report["input"]
        x = torch.from_numpy(z["x"]).permute(0, 3, 1, 2).float() * inp["scale"]
        x = (x - torch.tensor(inp["mean"]).view(1, 3, 1, 1)) / torch.tensor(inp["std"]).view(1, 3, 1, 1)
        with torch.no_grad():
            logits = torch.cat([program(x[i:i + 50]) for i in range(0, len(x), 50)])   # several batch sizes
        print(json.dumps({"top1": float((logits.argmax(1).numpy() == z["y"]).mean()), "k": logits.shape[1]}))
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(seed_run)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    report = json.loads((seed_run / "report.json").read_text())
    assert got["k"] == 10
    assert abs(got["top1"] - report["slim"]["top1"]) <= 1 / 128 + 1e-9  # at most one argmax tie apart


def test_params_target_is_met_within_one_point(tmp_path: Path, small_cifar_dir: Path):
    out = tmp_path / "seed-p50"
    compress_here(*tiny_args(small_cifar_dir, "--method", "seed", "--target", "params=0.5", "--out", str(out)))
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == {"metric": "params", "reduction": 0.5}
    assert abs(report["achieved"]["params_reduction"] - 0.5) <= 0.01


def test_existing_run_is_kept_until_the_forced_run_is_complete(seed_run: Path, tmp_path: Path,
                                                              small_cifar_dir: Path):
    out = tmp_path / "run"
    shutil.copytree(seed_run, out)
    before = (out / "report.json").read_text()
    # A forced run that fails (unreachable target) leaves the old run as it was.
    bad = compress(*tiny_args(small_cifar_dir, "--method", "l1", "--target", "flops=0.999", "--out", str(out),
                              "--force"), check=False)
    assert bad.returncode == 2
    assert (out / "report.json").read_text() == before
    compress_here(*tiny_args(small_cifar_dir, "--method", "none", "--epochs", "1", "--out", str(out), "--force"))
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "none" and report["dense"]["top1"] == report["slim"]["top1"]
    assert report["achieved"]["flops_reduction"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no .partial / .old left behind


def test_info_subcommand(tmp_path: Path):
    proc = compress("info", "--model", "vgg16", "--width", "0.25")
    assert json.loads(proc.stdout)["flops"] > 0


BAD_INPUTS = {
    "unknown model": (["--model", "nosuchnet", "--target", "flops=0.5"], "unknown model"),
    "bad factory": (["--model", "no_such_pkg.nets:make", "--target", "flops=0.5"], "no_such_pkg"),
    "target zero": (["--target", "flops=0"], "between 0 and 1"),
    "target one": (["--target", "params=1"], "between 0 and 1"),
    "target malformed": (["--target", "flops"], "flops=R"),
    "target metric": (["--target", "macs=0.5"], "flops=R"),
    "target not a number": (["--target", "flops=half"], "not a number"),
    "target unreachable": (["--target", "flops=0.999", "--method", "l1"], "unreachable"),
    "unknown method": (["--target", "flops=0.5", "--method", "magic"], "unknown method"),
    "unknown preset": (["--target", "flops=0.5", "--preset", "turbo"], "unknown preset"),
    "no target": (["--method", "seed"], "needs --target"),
    "resume without checkpoint": (["--target", "flops=0.5", "--resume"], "nothing to resume"),
    "random with a target": (["--method", "random", "--widths-from", "/nonexistent", "--target", "flops=0.5"],
                             "drop --target"),
    "widths-from missing": (["--method", "scratch", "--widths-from", "/nonexistent/run"], "no arch.json"),
    "init not safetensors": (["--target", "flops=0.5", "--init", "weights.pt"], "safetensors"),
    "bad flag": (["--target", "flops=0.5", "--epochs", "many"], "invalid int"),
    "redistribute out of range": (["--target", "flops=0.5", "--redistribute", "1.5"], "(--redistribute)"),
    "joint target infeasible": (["--target", "flops=0.2,params=0.95", "--method", "l1"], "cannot hit"),
    "joint target twice": (["--target", "flops=0.2,flops=0.5"], "twice"),
    "settle too long": (["--target", "flops=0.5", "--prune-settle", "5"], "too short"),
    "time budget": (["--target", "flops=0.5", "--time-budget", "0"], "--time-budget"),
    "redistribute-every negative": (["--target", "flops=0.5", "--redistribute-every", "-1"], "(--redistribute-every)"),
    "redistribute-by unknown": (["--target", "flops=0.5", "--redistribute-by", "cost"], "invalid choice"),
    "dense-from for seed": (["--target", "flops=0.5", "--dense-from", "dense.pt"], "no dense phase to share"),
    "keep-dense for uniform": (["--method", "uniform", "--target", "flops=0.5", "--keep-dense"],
                               "no dense phase to share"),
    "dense-from missing": (["--method", "l1", "--target", "flops=0.5", "--dense-from", "/nonexistent/dense.pt"],
                           "file not found"),
    "remove-branches on a plain net": (["--model", "vgg11", "--target", "flops=0.5", "--remove-branches"],
                                       "no residual branch"),
    "remove-branches for uniform": (["--model", "resnet20", "--method", "uniform", "--target", "flops=0.5",
                                     "--remove-branches"], "--remove-branches"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(case: str, tmp_path: Path, small_cifar_dir: Path):
    args, expected = BAD_INPUTS[case]
    proc = compress("--data-dir", str(small_cifar_dir), "--out", str(tmp_path / "out"), "--preset", "smoke",
                    "--width", "0.25", *args, check=False, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert expected in lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("flags, expected", [
    (["--prune-end", "0.15"], "warm-up + ramp <= end"),        # the default warm-up + ramp is 0.2
    (["--prune-smoothing", "1.5"], "(--prune-smoothing)"),
    (["--prune-settle", "5"], "too short"),
])
def test_a_bad_seed_schedule_is_refused_before_the_data_is_read(flags, expected, tmp_path: Path):
    """A schedule that cannot work fails at once, not after the data set has been found and loaded:
    the data folder here does not exist, and the schedule is what the error names."""
    proc = compress("--data-dir", str(tmp_path / "no-data"), "--out", str(tmp_path / "out"), "--preset", "smoke",
                    "--target", "flops=0.5", *flags, check=False, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected in proc.stderr and "CIFAR" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_existing_run_without_force_is_refused(seed_run: Path, tmp_path: Path, small_cifar_dir: Path):
    before = (seed_run / "report.json").read_text()
    proc = compress(*tiny_args(small_cifar_dir, "--method", "seed", "--target", "flops=0.5",
                               "--out", str(seed_run)), check=False)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (seed_run / "report.json").read_text() == before


# --- --keep-dense / --dense-from: one-shot runs at other targets share one dense phase ---------------


@pytest.fixture(scope="module")
def l1_kept(tmp_path_factory, small_cifar_dir) -> Path:
    """An l1 run of 4 epochs (2 dense) that keeps the checkpoint before its last dense epoch."""
    out = tmp_path_factory.mktemp("runs") / "l1-f50"
    compress_here(*tiny_args(small_cifar_dir, "--method", "l1", "--target", "flops=0.5", "--epochs", "4",
                             "--keep-dense", "--out", str(out)))
    return out


def log_rows(run: Path) -> list[dict]:
    import csv
    with open(run / "train_log.csv") as f:
        return list(csv.DictReader(f))


def test_dense_from_continues_another_runs_dense_phase(l1_kept: Path, tmp_path: Path, small_cifar_dir: Path):
    kept = torch.load(l1_kept / "dense.pt", map_location="cpu", weights_only=True)
    assert kept["epoch"] == 1 and kept["arch"] == ""     # before the last dense epoch, before the cut
    out = tmp_path / "taylor-f76"
    proc = compress(*tiny_args(small_cifar_dir, "--method", "taylor", "--target", "flops=0.76", "--epochs", "4",
                               "--dense-from", str(l1_kept / "dense.pt"), "--out", str(out)))
    assert "dense phase: epochs 1-1 from" in proc.stderr
    source, fork = log_rows(l1_kept), log_rows(out)
    assert [r["phase"] for r in fork] == ["dense", "dense", "finetune", "finetune"]
    assert fork[0] == source[0]                          # the copied epoch, as that run logged it
    # The last dense epoch is trained again from the same state, weights and data order: the same
    # training loss (to bf16/threading noise), then this run's own cut to its own target.
    assert float(fork[1]["train_loss"]) == pytest.approx(float(source[1]["train_loss"]), abs=1e-3)
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "taylor" and report["config"]["dense_from"] == str(l1_kept / "dense.pt")
    assert abs(report["achieved"]["flops_reduction"] - 0.76) <= 0.01


@pytest.mark.parametrize("case", ["other seed", "other budget", "slimming", "after the cut"])
def test_dense_from_refuses_a_dense_phase_that_is_not_this_runs(case: str, l1_kept: Path, tmp_path: Path,
                                                                 small_cifar_dir: Path):
    dense, extra, expected = str(l1_kept / "dense.pt"), [], ""
    method = "taylor"
    if case == "other seed":
        extra, expected = ["--seed", "3"], "--seed 0, this one with 3"
    elif case == "other budget":
        extra, expected = ["--lr", "0.02"], "--lr 0.05, this one with 0.02"
    elif case == "slimming":
        method, expected = "slimming", "not --method slimming's"
    else:
        dense, expected = str(l1_kept / "checkpoint.pt"), "must not be over"
    out = tmp_path / "fork"
    proc = compress(*tiny_args(small_cifar_dir, "--method", method, "--target", "flops=0.76", "--epochs", "4",
                               "--dense-from", dense, "--out", str(out), *extra), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --dense-from") and expected in lines[-1], proc.stderr[-2000:]
    assert not out.exists() and not out.with_name("fork.partial").exists()
