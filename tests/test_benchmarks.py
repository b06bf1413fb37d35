"""The benchmark scripts at their tiniest scale: real runs of the real CLIs, checked for content.

A 1/8-width VGG-16 on 256 CIFAR-10 images for 2 epochs, one torch thread (the host is shared);
the latency script measures the ONNX formats only (TFLite conversion would double its time).
No timing is asserted.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import methods
from benchmarks.torch_pruning_peer import classifier_names, prune_to_target

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
SMOKE_METHODS = "seed,random,torch-pruning,torch-pruning-taylor"


def run_script(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def methods_args(results: Path, data_dir: Path) -> list[str]:
    # two runs at once (random waits for the seed run's widths), run folders outside the results
    return ["--preset", "smoke", "--methods", SMOKE_METHODS, "--targets", "0.5", "--results", str(results),
            "--data-dir", str(data_dir), "--compress-arg=--workers=1", "--jobs", "2", "--runs", str(runs_of(results))]


def runs_of(results: Path) -> Path:
    return results.parent / "runs-elsewhere"


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory, small_cifar_dir) -> Path:
    results = tmp_path_factory.mktemp("bench") / "methods-smoke"
    proc = run_script("methods.py", *methods_args(results, small_cifar_dir))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return results


@pytest.mark.slow
def test_methods_smoke_runs_every_configuration(smoke_results):
    result = json.loads((smoke_results / "methods.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["vgg16-none", "vgg16-seed-f50", "vgg16-torch-pruning-f50", "vgg16-torch-pruning-taylor-f50",
                          "vgg16-random-f50"]
    assert all(r["status"] == "done" for r in rows.values())
    assert rows["vgg16-none"]["flops_reduction"] == pytest.approx(0.0, abs=1e-9)
    for name in ("vgg16-seed-f50", "vgg16-torch-pruning-f50", "vgg16-torch-pruning-taylor-f50"):
        assert abs(rows[name]["flops_reduction"] - 0.5) <= 0.01, name
        assert 0.0 <= rows[name]["top1"] <= 1.0
    # random pruning takes the seed run's per-layer widths
    assert not (smoke_results / "runs").exists()
    arch = {n: json.loads((runs_of(smoke_results) / n / "arch.json").read_text())["modules"]
            for n in ("vgg16-seed-f50", "vgg16-random-f50")}
    assert arch["vgg16-seed-f50"] == arch["vgg16-random-f50"]
    # the same epoch budget for every method
    assert {r["epochs"] for r in rows.values()} == {2}
    md = (smoke_results / "methods.md").read_text()
    assert "machine:" in md and "command:" in md and "| 0.50 | torch-pruning |" in md
    assert result["meta"]["machine"]["cores"] >= 1 and result["meta"]["versions"]["torch"]
    assert (smoke_results / "methods.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_methods_rerun_skips_finished_runs(smoke_results, small_cifar_dir):
    walls = (smoke_results / "wall_times.json").read_text()
    logs = {p.name: p.read_text() for p in (smoke_results / "logs").iterdir()}
    proc = run_script("methods.py", *methods_args(smoke_results, small_cifar_dir))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "5/5 configurations done" in proc.stdout
    assert (smoke_results / "wall_times.json").read_text() == walls       # nothing ran again
    assert {p.name: p.read_text() for p in (smoke_results / "logs").iterdir()} == logs
    sessions = json.loads((smoke_results / "methods.json").read_text())["sessions"]
    assert len(sessions) == 2


@pytest.mark.slow
def test_torch_pruning_run_folder_matches_compress_schema(smoke_results):
    from safetensors.torch import load_file

    from compress.prune.surgery import rebuild
    runs = runs_of(smoke_results)
    seed = json.loads((runs / "vgg16-seed-f50" / "report.json").read_text())
    tp = json.loads((runs / "vgg16-torch-pruning-f50" / "report.json").read_text())
    assert set(seed) <= set(tp)
    assert tp["method"] == "torch-pruning" and tp["target"] == {"metric": "flops", "reduction": 0.5}
    assert tp["dense"]["flops"] == seed["dense"]["flops"]
    assert 0 < tp["torch_pruning"]["pruning_ratio"] < 0.9 and tp["torch_pruning"]["importance"] == "magnitude"
    tp_taylor = json.loads((runs / "vgg16-torch-pruning-taylor-f50" / "report.json").read_text())
    assert tp_taylor["torch_pruning"]["importance"] == "taylor"
    # weights + arch rebuild the network that model.pt2 holds
    folder = runs / "vgg16-torch-pruning-f50"
    model = rebuild(json.loads((folder / "arch.json").read_text()))
    model.load_state_dict(load_file(str(folder / "weights.safetensors")))
    program = torch.export.load(str(folder / "model.pt2")).module()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), program(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_training_curves_reads_real_runs(smoke_results, tmp_path):
    runs = runs_of(smoke_results)
    proc = run_script("training_curves.py", str(runs / "vgg16-none"), str(runs / "vgg16-seed-f50"),
                      "--out", str(tmp_path / "curves"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "curves" / "curves.json").read_text())
    dense, seed = result["runs"]
    assert (dense["method"], seed["method"]) == ("none", "seed") and len(seed["epochs"]) == 2
    report = json.loads((runs / "vgg16-seed-f50" / "report.json").read_text())
    assert seed["params"] == report["slim"]["params"] == seed["epochs"][-1]["params"] < dense["params"]
    last_logged = (runs / "vgg16-seed-f50" / "train_log.csv").read_text().splitlines()[-1].split(",")
    assert seed["epochs"][-1]["train_top1"] == float(last_logged[4]) and 0 < seed["epochs"][-1]["train_loss"]
    assert "| vgg16-seed-f50 | seed | 2 |" in (tmp_path / "curves" / "curves.md").read_text()
    assert (tmp_path / "curves" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_training_curves_bad_input_is_one_line_exit_2(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.json").write_text('{"name": "x", "slim": {}}')
    (tmp_path / "run" / "train_log.csv").write_text("epoch,phase\n1,train\n")
    for args, message in ((["--out", str(tmp_path / "o"), str(tmp_path / "missing")], "cannot read JSON"),
                          (["--out", str(tmp_path / "o"), str(tmp_path / "run")], "not a compress train log")):
        proc = run_script("training_curves.py", *args)
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


def test_prune_to_target_meets_flops_within_half_a_point():
    from compress.models import create_model
    model = create_model("vgg16", width=0.125).eval()
    for target in (0.76,):
        result = prune_to_target(model, metric="flops", reduction=target, importance="magnitude", min_keep=0.1,
                                 ignore=classifier_names(model), input_shape=(1, 3, 32, 32))
        assert abs(result.reduction - target) <= 0.005
        assert result.model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert model.features[0].out_channels == 8      # the dense model is left alone


def test_methods_resumes_a_half_done_run(tmp_path):
    layout = methods.Layout(tmp_path)
    config = methods.Config("vgg16", "taylor", 0.76)
    assert config.name == "vgg16-taylor-f76"
    partial = layout.run(config).with_name("vgg16-taylor-f76.partial")
    partial.mkdir(parents=True)
    assert "--force" in methods.command(config, "cpu", layout, None, ())
    (partial / "checkpoint.pt").write_bytes(b"")
    cmd = methods.command(config, "cpu", layout, None, ())
    assert "--resume" in cmd and "--force" not in cmd
    assert cmd[cmd.index("--target") + 1] == "flops=0.76" and cmd[cmd.index("--epochs") + 1] == "4"


def test_methods_gives_each_of_several_runs_its_share_of_the_cores(monkeypatch):
    monkeypatch.setattr(methods.os, "cpu_count", lambda: 4)
    assert methods.with_threads(("--epochs", "4"), 1) == ("--epochs", "4", "--workers=4")   # also alone: resumes
    assert methods.with_threads(("--epochs", "4"), 2) == ("--epochs", "4", "--workers=2")
    assert methods.with_threads(("--workers=3",), 2) == ("--workers=3",)      # the user's choice wins
    assert methods.with_threads((), 8) == ("--workers=1",)


def test_methods_bad_jobs_or_runs_is_one_line_exit_2(tmp_path):
    (tmp_path / "file").write_text("")
    for args, message in ((["--jobs", "0"], "--jobs 0: must be at least 1"),
                          (["--runs", str(tmp_path / "file")], "exists and is not a folder")):
        proc = run_script("methods.py", "--results", str(tmp_path / "r"), *args)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "r").exists()


def test_methods_a_finished_row_without_its_kept_copy_is_not_run_again(tmp_path, capsys):
    """Results committed before the kept copies were (a .gitignore pattern kept reports/ out of git):
    the rows of methods.json are all that is left of those runs, and they count as done."""
    row = {"name": "vgg16-uniform-f90", "model": "vgg16", "method": "uniform", "target": 0.9, "seed": 0,
           "status": "done", "top1": 0.7829, "flops_reduction": 0.9, "params_reduction": 0.9, "train_seconds": 212.0,
           "wall_seconds": None, "epochs": 4}
    (tmp_path / "methods.json").write_text(json.dumps({"rows": [row], "sessions": []}))
    args = ["--preset", "cpu", "--models", "vgg16", "--targets", "0.9", "--methods", "seed,uniform", "--no-dense",
            "--results", str(tmp_path)]
    assert methods.main(args + ["--dry-run"]) == 0
    planned = capsys.readouterr().out.splitlines()
    assert len(planned) == 1 and "--method seed" in planned[0]        # only the run that never finished
    assert methods.main(args + ["--report-only"]) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "methods.json").read_text())["rows"]}
    assert rows["vgg16-uniform-f90"]["top1"] == 0.7829 and rows["vgg16-uniform-f90"]["status"] == "done"
    assert rows["vgg16-seed-f90"]["status"] == "pending"


def test_methods_wall_time_adds_up_only_across_a_resumed_run():
    assert methods.wall_after(100.0, ["compress", "--resume"], 50.0) == 150.0
    assert methods.wall_after(100.0, ["compress", "--force"], 50.0) == 50.0
    assert methods.wall_after(None, ["compress"], 12.345) == 12.35


def test_methods_wall_time_is_blank_when_a_session_lost_part_of_it():
    assert methods.known_wall(500.0, 480.0) == 500.0
    assert methods.known_wall(128.0, 1500.0) is None    # killed after epoch 3, resumed for epoch 4
    assert methods.known_wall(None, 10.0) is None


def test_methods_plot_draws_a_line_per_method_over_targets_and_bars_for_a_single_target(monkeypatch, tmp_path):
    def row(model, method, target, top1, seed=0):
        return {"model": model, "method": method, "target": target, "top1": top1, "seed": seed,
                "flops_reduction": target or 0.0, "params_reduction": target or 0.0, "train_seconds": 60.0}
    rows = [row("vgg16", "none", None, 0.84), row("resnet56", "none", None, 0.77)]
    rows += [row("vgg16", m, t, 0.8 - t / 10) for m in ("seed", "l1") for t in (0.5, 0.76, 0.9)]
    rows += [row("vgg16", "seed", t, 0.82 - t / 10, seed=1) for t in (0.5, 0.76, 0.9)]
    rows += [row("resnet56", m, 0.5, acc) for m, acc in (("seed", 0.70), ("slimming", 0.73), ("l1", 0.71))]
    figures = []
    monkeypatch.setattr(methods, "save_figure", lambda fig, path: figures.append(fig))
    methods.plot({"rows": rows, "preset": "cpu"}, tmp_path / "methods.png")
    vgg, resnet = figures[0].axes
    assert [t.get_text() for t in vgg.get_legend().get_texts()] == ["dense (same budget)", "seed", "l1"]
    by_label = {c.get_label(): c.lines[0] for c in vgg.containers}   # errorbar: (data line, caps, bars)
    # the seed line is the mean over its two seeds
    assert list(by_label["seed"].get_xdata()) == [0.5, 0.76, 0.9]
    assert list(by_label["seed"].get_ydata()) == pytest.approx([0.81 - t / 10 for t in (0.5, 0.76, 0.9)])
    # one target: a bar per method, best on top, and the dense line
    assert [t.get_text() for t in resnet.get_yticklabels()] == ["seed", "l1", "slimming"]
    assert [round(p.get_width(), 2) for p in resnet.patches] == [0.70, 0.71, 0.73]
    dense = next(line for line in resnet.get_lines() if line.get_label() == "dense (same budget)")
    assert dense.get_xdata()[0] == 0.77


def test_methods_summary_is_mean_and_spread_over_seeds():
    rows = [{"model": "vgg16", "method": "seed", "target": 0.9, "seed": s, "top1": v, "flops_reduction": 0.9,
             "params_reduction": 0.9, "train_seconds": 60.0} for s, v in ((0, 0.70), (1, 0.74))]
    rows.append({"model": "vgg16", "method": "l1", "target": 0.9, "seed": 0, "status": "pending"})
    seed, l1 = methods.summarize(rows)
    assert seed["n"] == 2 and seed["mean"] == pytest.approx(0.72) and (seed["min"], seed["max"]) == (0.70, 0.74)
    assert seed["seeds"] == {"0": 0.70, "1": 0.74}
    assert l1["n"] == 0 and l1["planned"] == 1 and "mean" not in l1


def test_methods_plan_orders_seeds_and_names_them():
    names = [c.name for c in methods.plan(["vgg16"], ["uniform", "seed"], {"vgg16": (0.9,)}, seeds=(0, 1),
                                          dense=False)]
    assert names == ["vgg16-seed-f90", "vgg16-uniform-f90", "vgg16-seed-f90-s1", "vgg16-uniform-f90-s1"]


def test_methods_a_kept_report_counts_as_done_and_feeds_the_widths(tmp_path):
    layout = methods.Layout(tmp_path)
    seed = methods.Config("vgg16", "seed", 0.9, 1)
    kept = layout.kept(seed)
    kept.mkdir(parents=True)
    (kept / "report.json").write_text("{}")
    assert layout.finished(seed) == kept
    cmd = methods.command(methods.Config("vgg16", "scratch", 0.9, 1), "cpu", layout, None, ())
    assert cmd[cmd.index("--widths-from") + 1] == str(kept) and cmd[cmd.index("--seed") + 1] == "1"


def test_methods_runs_the_peer_with_each_criterion(tmp_path):
    layout = methods.Layout(tmp_path)
    for method, importance in (("torch-pruning", "magnitude"), ("torch-pruning-taylor", "taylor")):
        cmd = methods.command(methods.Config("resnet56", method, 0.5), "cpu", layout, None, ())
        assert cmd[1] == str(methods.PEER) and cmd[cmd.index("--importance") + 1] == importance
        assert cmd[cmd.index("--target") + 1] == "flops=0.5"


def test_methods_starts_a_one_shot_run_from_a_siblings_kept_dense_phase(tmp_path):
    layout = methods.Layout(tmp_path, tmp_path / "runs")
    grid = methods.plan(["vgg16"], ["l1", "torch-pruning", "slimming"], {"vgg16": (0.76, 0.9)}, dense=False)
    tp76, tp90 = methods.Config("vgg16", "torch-pruning", 0.76), methods.Config("vgg16", "torch-pruning", 0.9)
    assert layout.dense_start(tp76, grid) is None
    kept = layout.run(tp90).with_name("vgg16-torch-pruning-f90.partial") / "dense.pt"   # still running
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"")
    # the same kind of dense phase (l1's is plain training too), never slimming's or another seed's
    assert layout.dense_start(tp76, grid) == kept and layout.dense_start(methods.Config("vgg16", "l1", 0.9), grid) == kept
    assert layout.dense_start(methods.Config("vgg16", "slimming", 0.76), grid) is None
    assert layout.dense_start(methods.Config("vgg16", "l1", 0.76, seed=1), grid + [methods.Config("vgg16", "l1", 0.76, 1)]) is None
    cmd = methods.command(tp76, "cpu", layout, None, (), layout.dense_start(tp76, grid))
    assert cmd[cmd.index("--dense-from") + 1] == str(kept) and "--keep-dense" in cmd
    own = layout.run(tp76).with_name("vgg16-torch-pruning-f76.partial")   # its own checkpoint wins
    own.mkdir()
    (own / "checkpoint.pt").write_bytes(b"")
    cmd = methods.command(tp76, "cpu", layout, None, (), kept)
    assert "--resume" in cmd and "--dense-from" not in cmd
    assert "--keep-dense" not in methods.command(methods.Config("vgg16", "seed", 0.9), "cpu", layout, None, ())


def test_methods_first_puts_named_runs_at_the_front():
    grid = methods.plan(["vgg16"], ["seed", "uniform"], {"vgg16": (0.76, 0.9)}, seeds=(0, 1), dense=False)
    order = [c.name for c in methods.put_first(grid, ["vgg16-uniform-f90-s1", "vgg16-seed-f76"])]
    assert order[:3] == ["vgg16-uniform-f90-s1", "vgg16-seed-f76", "vgg16-uniform-f76"] and len(order) == len(grid)
    with pytest.raises(methods.BenchError, match="not in this grid"):
        methods.put_first(grid, ["vgg16-l1-f90"])


def test_methods_only_runs_the_named_configurations(tmp_path):
    proc = run_script("methods.py", "--preset", "cpu", "--methods", "seed,uniform,l1", "--targets", "0.5,0.9",
                      "--no-dense", "--results", str(tmp_path / "r"), "--dry-run",
                      "--only", "vgg16-l1-f90,vgg16-seed-f50")
    assert proc.returncode == 0, proc.stderr
    outs = [line.split("--out ")[1].split()[0] for line in proc.stdout.splitlines()]
    assert [Path(o).name for o in outs] == ["vgg16-l1-f90", "vgg16-seed-f50"]
    proc = run_script("methods.py", "--preset", "cpu", "--methods", "seed", "--results", str(tmp_path / "r"),
                      "--dry-run", "--only", "vgg16-seed-f50", "--first", "vgg16-seed-f50")
    assert proc.returncode == 2 and "give one of them" in proc.stderr


def test_torch_pruning_peer_starts_from_an_l1_runs_kept_dense_phase(tmp_path, small_cifar_dir):
    tiny = ["--model", "vgg16", "--width", "0.125", "--preset", "smoke", "--epochs", "4", "--train-subset", "256",
            "--test-subset", "128", "--calib", "32", "--data-dir", str(small_cifar_dir), "--no-progress",
            "--workers", "1"]
    l1 = tmp_path / "l1"
    proc = subprocess.run([sys.executable, "-m", "compress", "--method", "l1", "--target", "flops=0.5", "--keep-dense",
                           "--out", str(l1), *tiny], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tp = tmp_path / "tp"
    proc = run_script("torch_pruning_peer.py", "--target", "flops=0.76", "--dense-from", str(l1 / "dense.pt"),
                      "--out", str(tp), *tiny)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dense phase: epochs 1-1 from" in proc.stderr
    rows = [line.split(",") for line in (tp / "train_log.csv").read_text().splitlines()[1:]]
    assert rows[0] == (l1 / "train_log.csv").read_text().splitlines()[1].split(",")
    report = json.loads((tp / "report.json").read_text())
    assert report["method"] == "torch-pruning" and report["config"]["dense_from"] == str(l1 / "dense.pt")
    assert abs(report["achieved"]["flops_reduction"] - 0.76) <= 0.005 + 1e-9


def test_methods_joint_target_names_the_runs_and_feeds_random_the_joint_seed_run(tmp_path):
    configs = methods.plan(["vgg16"], ["seed", "l1", "random"], {"vgg16": (0.76,)}, seeds=(0, 1), params=0.92)
    assert [c.name for c in configs] == ["vgg16-none", "vgg16-seed-f76-p92", "vgg16-l1-f76-p92", "vgg16-random-f76-p92",
                                         "vgg16-none-s1", "vgg16-seed-f76-p92-s1", "vgg16-l1-f76-p92-s1",
                                         "vgg16-random-f76-p92-s1"]
    layout = methods.Layout(tmp_path)
    seed, l1, random = configs[1:4]
    for c in (seed, l1):
        cmd = methods.command(c, "cpu", layout, None, ())
        assert cmd[cmd.index("--target") + 1] == "flops=0.76,params=0.92"
    cmd = methods.command(random, "cpu", layout, None, ())
    assert cmd[cmd.index("--widths-from") + 1] == str(layout.run(seed)) and "--target" not in cmd
    rows = [{"model": "vgg16", "method": "seed", "target": 0.76, "params_target": p, "seed": 0, "top1": t,
             "flops_reduction": 0.76, "params_reduction": 0.9, "train_seconds": 60.0}
            for p, t in ((0.92, 0.79), (None, 0.81))]
    assert [(c["params_target"], c["mean"]) for c in methods.summarize(rows)] == [(0.92, 0.79), (None, 0.81)]


def test_methods_plan_runs_seed_before_the_methods_that_take_its_widths():
    order = [c.name for c in methods.plan(["vgg16"], ["scratch", "l1"], {"vgg16": (0.9,)})]
    assert order == ["vgg16-none", "vgg16-seed-f90", "vgg16-l1-f90", "vgg16-scratch-f90"]


@pytest.mark.parametrize("args, message", [
    (["--methods", "seed,magic"], "unknown magic"),
    (["--targets", "0.5,1.5"], "strictly between 0 and 1"),
    (["--preset", "huge"], "unknown preset"),
    (["--models", "mobilenetv2"], "give --targets"),
    (["--params", "1.2"], "strictly between 0 and 1"),
    (["--methods", "seed,uniform", "--params", "0.9"], "uniform hit(s) one FLOPs target"),
])
def test_methods_bad_input_is_one_line_exit_2(args, message, tmp_path):
    proc = run_script("methods.py", *args, "--results", str(tmp_path / "r"))
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag, message", [
    ("--round-to=8", "--round-to is not supported for Torch-Pruning"),
    ("--cost-power=1", "--cost-power is compress's selection rule"),
])
def test_torch_pruning_peer_refuses_compress_options_it_cannot_honour(flag, message, tmp_path, small_cifar_dir):
    out = tmp_path / "tp"
    proc = run_script("torch_pruning_peer.py", "--out", str(out), "--model", "vgg16", "--width", "0.125",
                      "--target", "flops=0.5", "--preset", "smoke", "--data-dir", str(small_cifar_dir), flag)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists() and not out.with_name("tp.partial").exists()


@pytest.mark.slow
def test_latency_vs_flops_smoke(smoke_results, tmp_path):
    runs = runs_of(smoke_results)
    out = tmp_path / "lat"
    proc = run_script("latency_vs_flops.py", "--dense", str(runs / "vgg16-none"), "--slim",
                      str(runs / "vgg16-seed-f50"), "--formats", "onnx,onnx-int8", "--threads", "1",
                      "--runs", "5", "--warmup", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((out / "latency_vs_flops.json").read_text())
    rows = result["speedups"]
    assert [(r["format"], r["threads"]) for r in rows] == [("onnx", 1), ("onnx-int8", 1)]
    for r in rows:
        assert r["flops_ratio"] == pytest.approx(1 / (1 - 0.5), rel=0.05)
        assert r["speedup"] == pytest.approx(r["dense_p50_ms"] / r["slim_p50_ms"])
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["flops_ratio"])
    assert {(r["bundle"], r["runtime"]) for r in result["int8_vs_fp32"]} == {
        ("vgg16-none", "onnx"), ("vgg16-seed-f50", "onnx")}
    assert (out / "latency_vs_flops.png").is_file() and "efficiency" in (out / "latency_vs_flops.md").read_text()


def test_latency_vs_flops_rejects_a_folder_without_a_run(tmp_path):
    proc = run_script("latency_vs_flops.py", "--dense", str(tmp_path), "--slim", str(tmp_path))
    assert proc.returncode == 2 and "no report.json" in proc.stderr


def test_seed_overhead_smoke(tmp_path, small_cifar_dir):
    out = tmp_path / "ov"
    proc = run_script("seed_overhead.py", "--width", "0.125", "--steps", "3", "--batch-size", "8", "--bf16", "off",
                      "--threads", "1", "--data-dir", str(small_cifar_dir), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "seed_overhead.json").read_text())
    (row,) = result["rows"]
    assert row["bf16"] is False and row["plain_ms"] > 0 and row["seed_ms"] > 0
    assert row["overhead"] == pytest.approx(row["seed_ms"] / row["plain_ms"] - 1)
    assert (out / "seed_overhead.png").is_file() and "machine:" in (out / "seed_overhead.md").read_text()


def test_methods_refuses_a_results_folder_another_session_holds(tmp_path, small_cifar_dir):
    import os

    from benchmarks.common import lock_folder
    results = tmp_path / "held"
    fd = lock_folder(results)
    try:
        proc = run_script("methods.py", *methods_args(results, small_cifar_dir))
    finally:
        os.close(fd)
    assert proc.returncode == 2 and "in use by another session" in proc.stderr
    assert not (results / "runs").exists()


def test_export_times_measures_every_format_of_a_real_run(trained_run, tmp_path):
    out = tmp_path / "export-times"
    # The ONNX pair only: every format's build is export's own function, tested in test_export.py;
    # the TFLite converters would add minutes here.
    proc = run_script("export_times.py", str(trained_run), "--formats", "onnx,onnx-int8", "--repeat", "2",
                      "--calib", "32", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "export_times.json").read_text())
    (run,) = result["runs"].values()
    assert set(run["formats"]) == {"onnx", "onnx-int8"}
    for fmt in run["formats"].values():
        assert len(fmt["builds_s"]) == 2 and fmt["build_s"] > 0 and fmt["eval_s"] > 0 and fmt["bytes"] > 0
        assert fmt["top1"] > 0.2        # the fixture's tiny CNN is ~40 %; a broken export is ~10 %
    assert "| onnx-int8 |" in (out / "export_times.md").read_text()
    assert (out / "export_times.png").stat().st_size > 0
    assert result["meta"]["machine"]["cpu"]


@pytest.mark.parametrize("args, message", [
    (["--formats", "onnx,coreml"], "unknown coreml"),
    (["--repeat", "0"], "at least 1"),
    (["{missing}"], "missing"),
])
def test_export_times_bad_input_is_one_line_exit_2(args, message, trained_run, tmp_path):
    argv = [str(tmp_path / "missing") if a == "{missing}" else a for a in args]
    if argv[0].startswith("--"):
        argv = [str(trained_run), *argv]
    proc = run_script("export_times.py", *argv, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_device_venv_installs_only_the_runtime_and_times_every_stage(bundle_dir, tmp_path):
    """`pip install "./runtime[litert]"` into a fresh venv, for real: what it holds, and one cold
    start per format, each stage timed. No timing is asserted."""
    proc = run_script("device_venv.py", str(bundle_dir), "--out", str(tmp_path), "--repeats", "1", timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (report,) = tmp_path.glob("*-litert-py*.json")
    r = json.loads(report.read_text())
    assert r["install"] == "pip install './runtime[litert]'" and r["verify_ok"]
    assert r["importable"] == {"torch": False, "compress": False, "export": False, "device_bench": False}
    names = {p["name"]: p for p in r["packages"]}
    assert {"edgeslim-runtime", "numpy", "ai-edge-litert"} <= set(names) and "edgeslim" not in names
    assert "edgeslim-runtime" in names["numpy"]["required_by"]
    assert r["site_packages_bytes"] == sum(p["bytes"] for p in r["packages"]) > 0
    for fmt in ("tflite", "tflite-int8"):
        c = r["cold_start"][fmt]
        assert c["backend"] == "ai-edge-litert" and c["finite"]
        assert "/venv/lib/" in c["runtime_file"]  # the installed package, not a source folder on the path
        m = c["median"]
        assert all(m[s] > 0 for s in ("import", "verify", "interpreter", "first_inference"))
        assert m["total"] == pytest.approx(m["import"] + m["verify"] + m["interpreter"] + m["first_inference"])
    assert "./runtime[onnx]" in r["cold_start"]["onnx"]["error"]  # no onnxruntime in a [litert] venv
    assert (tmp_path / report.name.replace(".json", ".png")).stat().st_size > 0


@pytest.mark.slow
def test_latency_target_smoke(tmp_path, small_cifar_dir):
    """FLOPs-targeted run -> its measured p50 as the budget -> latency-targeted run -> one final pass
    with the dense network: real compress, export, profile and device_bench at their smallest.
    The target is mild (-50 %): this tiny network is overhead-bound, and at -76 % its measured p50
    came within noise of the table's fastest reachable network (0.0701 vs 0.0723 ms on a busy host),
    which makes the latency run's budget unreachable."""
    out = tmp_path / "lt"
    args = ["--models", "vgg11", "--targets", "0.5", "--width", "0.25", "--format", "tflite", "--epochs", "3", "--rounds", "1",
            "--runs", "20", "--quiet-wait", "0", "--tables", str(tmp_path / "tables"), "--data-dir", str(small_cifar_dir),
            "--profile-flags", "--grid coarse --rounds 3 --burst-ms 3",
            "--extra", "--train-subset 256 --test-subset 128 --calib 32 --batch-size 32 --workers 1", "--out", str(out)]
    proc = run_script("latency_target.py", *args, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads((out / "latency_target.json").read_text())
    flops, lat = sorted(doc["pairs"], key=lambda p: p["kind"])
    assert (flops["kind"], lat["kind"]) == ("flops", "latency")
    assert flops["budget_ms"] == lat["budget_ms"] > 0
    run = json.loads((out / "runs" / "vgg11-latency-50" / "report.json").read_text())
    assert run["target"]["metric"] == "latency" and run["target"]["ms"] == pytest.approx(lat["budget_ms"], abs=1e-3)
    for p in (flops, lat):
        assert p["p50_ms"] > 0 and p["dense_p50_ms"] > 0 and 0 < p["flops_reduction"] < 1
        assert p["speedup"] == pytest.approx(p["dense_p50_ms"] / p["p50_ms"], rel=1e-2)
    assert len(doc["verdicts"]) == 1 and (out / "latency_target.png").is_file()
    # the budgets were measured with the table's anchors timed again, and the host's drift since is reported
    table = json.loads((out / "tables" / "vgg11-recalibrated.json").read_text())
    assert len(table["entries"][0]["recalibrations"]) == 1
    assert lat["host_drift"] == pytest.approx(lat["dense_p50_ms"] / lat["dense_p50_at_budget_ms"], rel=1e-2)
    assert lat["p50_over_budget_drift_corrected"] == pytest.approx(
        lat["p50_ms"] / (lat["budget_ms"] * lat["host_drift"]), rel=1e-2)
    assert "corrected" in doc["verdicts"][0]
    # a rerun redoes nothing: every step's output is there
    again = run_script("latency_target.py", *args, timeout=300)
    assert again.returncode == 0 and json.loads((out / "latency_target.json").read_text())["pairs"] == doc["pairs"]


@pytest.mark.parametrize("args, message", [
    (["--targets", "0.5,x"], "expected comma-separated reductions"),
    (["--targets", "1.2"], "strictly between 0 and 1"),
    (["--rounds", "0"], "must be at least 1"),
    (["--width", "0"], "expected a multiplier"),
    (["--data-dir", "/nonexistent"], "has no cifar10.npz"),
    (["--kinds", "flops,speed"], "choose from flops, latency, depth"),
    (["--kinds", "depth,depth"], "each once"),
])
def test_latency_target_bad_input_is_one_line_exit_2(args, message, small_cifar_dir):
    base = [] if "--data-dir" in args else ["--data-dir", str(small_cifar_dir)]
    proc = run_script("latency_target.py", *base, *args)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_board_footprint_measures_the_aarch64_install(tmp_path):
    """The board install resolved and installed for manylinux aarch64 (real wheels from the index)."""
    proc = run_script("board_footprint.py", "--out", str(tmp_path), timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "board_footprint.json").read_text())
    assert doc["install"] == 'pip install --no-compile "./runtime[litert]"'
    names = set(doc["sizes"])
    assert {"numpy", "ai_edge_litert", "runtime"} <= names and not names & {"pip", "setuptools", "torch"}
    assert doc["numpy_extension"] and all("aarch64" in n for n in doc["numpy_extension"])
    assert doc["total_bytes"] == doc["packages_bytes"] + doc["first_run_pyc_bytes"] and doc["first_run_pyc_bytes"] > 0
    assert "goal <= 120 MB" in (tmp_path / "board_footprint.md").read_text()


def test_latency_prediction_repredicts_the_committed_measurements(tmp_path):
    """Today's table code on the EPYC measurements of 2026-12-04 (tables and device_bench reports are
    committed): the held-out networks are drawn again from their seeds, int8 (no fast-path tops in
    those tables) predicts exactly what it did then, and the fp32 dips make VGG-16 fp32 x1 better."""
    import shutil

    out = tmp_path / "lp"
    shutil.copytree(BENCH / "results" / "latency-prediction", out)
    proc = run_script("latency_prediction.py", "--repredict", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((out / "latency_prediction.json").read_text())
    assert doc["meta"]["machine"]["cpu"] == "AMD EPYC" and doc["meta"]["repredicted"]["command"]
    rows = [(r["model"], row) for r in doc["results"] for row in r["rows"]]
    assert len(rows) == 48
    for _, row in rows:
        assert row["error"] == pytest.approx(row["predicted_ms"] / row["measured_p50_ms"] - 1, abs=1e-4)
        if row["format"] == "tflite-int8" and row["threads"] == 1:
            assert row["predicted_ms"] == pytest.approx(row["predicted_ms_at_measurement"], abs=1e-4)  # stored to 4 places
    vgg_fp32 = [row for model, row in rows if model == "vgg16" and row["format"] == "tflite" and row["threads"] == 1]
    within_now = sum(abs(r["error"]) <= 0.1 for r in vgg_fp32)
    within_then = sum(abs(r["error_at_measurement"]) <= 0.1 for r in vgg_fp32)
    assert (within_then, within_now) == (1, 4)
    assert "predicted then" in (out / "latency_prediction.md").read_text()


def test_calibration_alternatives_reproduces_the_tables_own_predictions(tmp_path):
    """On the committed Xeon re-profile (tables and measurements in git), the "interp" column is the
    table's own prediction: the held-out networks drawn again from their seeds give the errors the
    benchmark recorded (6/6 within ±10 %); the smooth fits are scored on the same networks."""
    import shutil

    src = tmp_path / "results"
    shutil.copytree(BENCH / "results" / "latency-prediction-xeon-r56x2", src / "latency-prediction-xeon-r56x2")
    out = tmp_path / "out"
    proc = run_script("calibration_alternatives.py", "--results", str(src), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((out / "calibration_alternatives.json").read_text())
    (row,) = doc["rows"]
    assert (row["model"], row["entry"]) == ("resnet56", "tflite x2")
    recorded = json.loads((src / "latency-prediction-xeon-r56x2" / "latency_prediction.json").read_text())
    errors = [x["error"] for r in recorded["results"] for x in r["rows"]]
    assert row["interp"]["networks"] == len(errors) == 6
    assert row["interp"]["mean_abs"] == pytest.approx(sum(map(abs, errors)) / 6, abs=2e-4)
    assert row["interp"]["within"] == 6
    assert all(row[k]["networks"] == 6 for k in ("power", "ratio", "weights"))
    empty = run_script("calibration_alternatives.py", "--results", str(tmp_path / "none"), "--out", str(out))
    assert empty.returncode != 0 and "no latency-prediction" in empty.stderr


def test_plateaus_by_size_prices_a_staircase_as_a_table_does():
    # A synthetic sweep shaped like XNNPACK fp32 on the Xeon: plateaus 1-16, 17-32 with 32 a fast
    # path, 33-64. Priced with its own plateaus every width costs its plateau's cost exactly;
    # priced with plateaus 16 wide everywhere (another size's), the 33..48 widths come out cheap.
    from benchmarks.plateaus_by_size import axis_of, priced
    from device_bench import latency_table as lt

    widths = [1, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64]
    ms = [1.0] * 5 + [2.0] * 3 + [1.4] + [3.0] * 4
    own = axis_of(widths, ms, 0.02)
    assert own.tops(64) == [16, 32, 64] and own.dips == {32: 0.7}
    assert priced(own, widths, ms).tolist() == pytest.approx(ms)
    sixteen = lt.Axis([[1, 16], [17, 32], [33, 48], [49, 64]], 64, 0, 0, {32: 0.7})
    got = priced(sixteen, widths, ms[:10] + [2.5] + ms[11:])
    assert got[9] == pytest.approx(2.5) and got[12] == pytest.approx(3.0)


@pytest.mark.parametrize("keep_range, message", [("0.5", "expected LO,HI"), ("0.4,0.2", "needs 0 < LO <= HI <= 1"),
                                                 ("0,0.3", "needs 0 < LO <= HI <= 1")])
def test_latency_prediction_keep_range_bad_input_is_one_line_exit_2(keep_range, message, tmp_path):
    proc = run_script("latency_prediction.py", "--keep-range", keep_range, "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
