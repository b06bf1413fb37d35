"""device_bench profile and the latency table: a real profile of a tiny residual CNN on this
machine (real export converters, real interpreter; coarse grid), the same profile over the real
sshd on loopback (the deploy tests' server), the table's round trip and predictor, tables from
another board or runtime version, the budget check of `run`, and bad inputs (one line, exit 2)."""
from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from device_bench import latency_table as lt
from tests.device_bench_helpers import bench
from tests.latency_fixture import MODEL, PROFILE  # conftest.py's table_path profiles MODEL with PROFILE
from tests.test_device_bench_ssh import board_args, one_line_error, start_sshd, stop_sshd


@pytest.fixture(scope="session")
def slim_bundle(tmp_path_factory, small_cifar_dir) -> Path:
    """A pruned tiny_resnet (random channels kept) as a run folder, exported to tflite."""
    import subprocess

    import torch

    from compress.data import load_dataset, subset
    from compress.flops import count
    from compress.models import build_model
    from compress.prune import arch_of, extract, find_groups
    from compress.report import write_run_folder

    torch.manual_seed(0)
    model = build_model(MODEL, 10, 1.0).eval()
    example = torch.randn(1, 3, 16, 16)
    groups = find_groups(model, example)
    masks = {g.name: torch.rand(g.size) < 0.6 for g in groups}
    slim = extract(model, groups, masks, example).eval()
    data = subset(load_dataset(str(small_cifar_dir / "cifar10.npz")), train=64, test=32)
    data = dataclasses.replace(data, x_train=np.ascontiguousarray(data.x_train[:, :16, :16]),
                               x_test=np.ascontiguousarray(data.x_test[:, :16, :16]))  # the model takes 16x16
    run = tmp_path_factory.mktemp("runs") / "tiny-slim16"
    run.mkdir()
    write_run_folder(run, slim, name=run.name, method="random", data=data, num_classes=10, target=None,
                     dense_counts=count(model, (1, 3, 16, 16)), dense_top1=None, slim_top1=0.0,
                     arch=arch_of(slim, MODEL, 10, 1.0), epochs=0, seconds=0.0, wall_seconds=0.0,
                     config={"model": MODEL, "dataset": "cifar10"}, calib=32, seed=0)
    dist = tmp_path_factory.mktemp("dist") / "tiny-slim16"
    proc = subprocess.run([sys.executable, "-m", "export", str(run), "--out", str(dist), "--formats", "tflite",
                           "--calib", "32"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dist


# --------------------------------------------------------------------------- the profile


def test_profile_writes_a_table_that_predicts_its_anchors(table_path):
    raw = json.loads(table_path.read_text())
    table = lt.load_table(table_path)
    assert raw["kind"] == lt.KIND and raw["model"]["spec"] == MODEL and raw["model"]["input"] == [1, 3, 16, 16]
    assert {la["op"] for la in raw["layers"]} == {"conv2d", "add", "maxpool", "mean", "linear"}
    entry = table.entry("tflite", 1)
    assert entry.backend == "ai-edge-litert" and entry.backend_version
    assert set(entry.grids) == set(raw["shapes"])  # every layer shape was timed
    for grid in entry.grids.values():
        assert np.all(np.isfinite(grid.ms)) and np.all(grid.ms >= 0)
    # The whole network was measured at five uniform widths and two uneven ones: the calibration
    # curve goes through them (where the isotonic fit did not have to pool a noisy anchor).
    anchors = {a["name"]: a for a in raw["entries"][0]["anchors"]}
    assert set(anchors) == {"dense", "three-quarter", "half", "quarter", "eighth", "uneven-1", "uneven-2"}
    curve = raw["entries"][0]["calibration"]
    assert curve["sum_ms"] == sorted(curve["sum_ms"]) and curve["ms"] == sorted(curve["ms"])
    for a in anchors.values():
        assert a["measured_ms"] > 0 and a["sum_ms"] > 0
        assert entry.predict_keep(a["keep"]) == pytest.approx(a["predicted_ms"], rel=1e-4)
    exact = [a for a in anchors.values() if a["predicted_ms"] == pytest.approx(a["measured_ms"], rel=1e-3)]
    assert len(exact) >= 2
    assert entry.predict_keep(None) >= entry.predict_keep(anchors["half"]["keep"])
    assert entry.predict_keep({g: 1 for g, _ in table.groups}) > 0
    # plateau sweep recorded per axis, and the board fingerprint
    assert raw["entries"][0]["axes"]["out"]["sweep"]["widths"][0] == 1
    assert raw["board"]["id"] == lt.fingerprint(raw["board"])["id"]
    assert raw["profile"]["wall_seconds"] > 0 and raw["profile"]["grid"] == "coarse"


def test_profile_over_ssh_reuses_the_cache(table_path, probe_cache, tmp_path):
    (tmp_path / "sshd").mkdir()
    server = start_sshd(tmp_path / "sshd")
    try:
        out = tmp_path / "board.json"
        proc = bench("profile", MODEL, *PROFILE, "--cache", probe_cache, "--out", out,
                     *board_args(server, tmp_path / "board"), timeout=900)
    finally:
        stop_sshd(server)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "uploading" in proc.stderr  # the probe set went over ssh
    assert "apart between rounds (median)" in proc.stderr  # each entry's timing noise is said
    raw, local = json.loads(out.read_text()), json.loads(table_path.read_text())
    # Every probe the local profile made came from the cache. Timing noise can move a plateau
    # between the two profiles, and then the grid points it moved are new probes, and only those.
    def points(table):
        return {(k, i, o) for k, g in table["entries"][0]["grids"].items() for i in g["in"] for o in g["out"]}
    moved = points(raw) ^ points(local)
    assert raw["profile"]["probes_converted"] <= len(moved), (raw["profile"]["probes_converted"], moved)
    assert raw["board"]["id"] == local["board"]["id"]  # loopback: the same machine
    assert raw["board"]["profiled_as"] == server.host
    assert set(raw["entries"][0]["grids"]) == set(local["entries"][0]["grids"])
    assert (tmp_path / "board" / "current").is_symlink()


# --------------------------------------------------------------------------- the table


SWEEP = [1] + list(range(2, 33, 2)) + list(range(40, 129, 8))


def test_grid_never_falls_with_width_whatever_the_noise():
    from device_bench.profile import fit_grid

    noisy = np.array([[1.0, 0.9, 2.0], [0.8, 1.5, 1.4]])   # (in 8, 16) x (out 8, 16, 32)
    g = fit_grid(([8, 16], [8, 16, 32]), noisy, lt.Axis.identity(), lt.Axis.identity(), True)
    ms = np.array(g["ms"])
    assert np.all(np.diff(ms, axis=0) >= 0) and np.all(np.diff(ms, axis=1) >= 0)
    assert ms.tolist() == [[1.0, 1.0, 2.0], [1.0, 1.5, 2.0]]


def test_calibration_curve_is_sorted_monotone_and_proportional_outside():
    from device_bench.latency_table import calibration_curve

    curve = calibration_curve([2.0, 1.0, 4.0, 1.0, 3.0], [2.4, 1.0, 6.0, 1.2, 2.2])
    assert curve == {"sum_ms": [1.0, 2.0, 3.0, 4.0], "ms": [1.1, 2.3, 2.3, 6.0]}  # merged, then pooled
    table = lt.LatencyTable(_one_layer_table(curve), "t.json")
    entry = table.entries[0]
    assert entry.network_ms(1.5) == pytest.approx(1.7)             # linear between anchors
    assert entry.network_ms(0.5) == pytest.approx(0.55)            # proportional below the first
    assert entry.network_ms(8.0) == pytest.approx(12.0)            # and above the last
    bad = _one_layer_table({"sum_ms": [2.0, 1.0], "ms": [1.0, 2.0]})
    with pytest.raises(lt.TableError, match="invalid calibration"):
        lt.LatencyTable(bad, "t.json")


def _one_layer_table(calibration, size: int = 4, out=(1, 4), ms=((0.1, 0.4),)) -> dict:
    return {"model": {"spec": "m"}, "board": {}, "groups": [{"name": "c", "size": size}],
            "shapes": {"s": {"op": "conv2d"}},
            "layers": [{"name": "c", "op": "conv2d", "shape": "s", "in": {"const": 3, "groups": {}},
                        "out": {"const": 0, "groups": {"c": 1}}}],
            "entries": [{"format": "tflite", "threads": 1, "grids": {"s": {"in": [3], "out": list(out),
                                                                         "ms": [list(r) for r in ms]}},
                         "calibration": calibration}]}


def test_a_plateau_top_that_runs_faster_is_a_dip_and_only_the_top_keeps_it():
    # XNNPACK fp32, 1 thread (the AMD EPYC table of benchmarks/results/latency-prediction): 18..30
    # output channels ~14 us, exactly 32 10.6 us; 33..64 21 us with no fast path at 64.
    ms = [7.0] * 9 + [14.0, 13.9, 14.0, 13.9, 14.1, 14.2, 14.2] + [10.6] + [21.1] * 4 + [31.8] * 4 + [42.4] * 4
    flat = lt.find_flat_gaps(SWEEP, ms, tolerance=0.02)["flat"]
    assert flat[:3] == [[1, 16], [17, 32], [33, 64]]   # the isotonic fit pools the dip into its plateau...
    sweep = {"widths": SWEEP, "ms": ms}
    assert lt.find_dips(sweep, flat, tolerance=0.02) == {32: pytest.approx(10.6 / 14.0, abs=1e-3)}  # ...the sweep has it
    assert lt.find_dips(sweep, flat, tolerance=0.09) == {}          # within 3x the timing tolerance: noise
    assert lt.find_dips(sweep, [[31, 32]], tolerance=0.02) == {}    # one width below the top: not enough to tell
    assert lt.find_dips(None, flat) == {} and lt.find_dips(sweep, []) == {}
    axis = lt.Axis.from_json({"flat": flat, "sweep": sweep}, tolerance=0.02)
    assert axis.factor([20, 31, 32, 33, 64]).tolist() == [1.0, 1.0, pytest.approx(0.757, abs=1e-3), 1.0, 1.0]

    # A table whose grid was timed at the tops 16 and 32: 32's point is the fast path. Widths 17..31
    # cost the plateau (the point / the dip), 32 itself the point, and the prediction is non-decreasing
    # once the fast path is taken out.
    raw = _one_layer_table({"sum_ms": [0.1, 1.0], "ms": [0.1, 1.0]}, size=32, out=[16, 32], ms=[[0.7, 1.06]])
    raw["entries"][0]["axes"] = {"out": {"flat": flat, "sweep": sweep}}
    raw["entries"][0]["tolerance"] = 0.02
    entry = lt.LatencyTable(raw, "t.json").entries[0]
    dip = entry.axis_out.dips[32]
    at = entry.layer_ms("c", 3, np.arange(1, 33))
    assert at[31] == pytest.approx(1.06) and at[19] == pytest.approx(1.06 / dip) and at[30] == pytest.approx(1.06 / dip)
    assert at[15] == pytest.approx(0.7) and at[0] == pytest.approx(0.7)
    assert np.all(np.diff(at / entry.axis_out.factor(np.arange(1, 33))) >= 0)
    assert entry.bind().step_counts()[0].tolist() == [16, 32]       # learned rounding: 17..31 never pays
    # without the sweep (older tables, other runtimes) there is no dip: the point costs its whole plateau
    raw["entries"][0]["axes"]["out"].pop("sweep")
    plain = lt.LatencyTable(raw, "t.json").entries[0]
    assert plain.layer_ms("c", 3, 20) == pytest.approx(1.06)


def test_the_calibration_is_derived_from_the_anchors_when_a_table_is_loaded():
    raw = _one_layer_table({"sum_ms": [0.1, 0.4], "ms": [5.0, 6.0]})   # a stale stored curve
    raw["entries"][0]["anchors"] = [{"name": "dense", "keep": {"c": 4}, "measured_ms": 0.8},
                                    {"name": "quarter", "keep": {"c": 1}, "measured_ms": 0.15}]
    entry = lt.LatencyTable(raw, "t.json").entries[0]
    assert entry.cal_sum.tolist() == [0.1, 0.4] and entry.cal_ms.tolist() == [0.15, 0.8]
    assert entry.predict_keep({"c": 4}) == pytest.approx(0.8) and entry.predict_keep({"c": 1}) == pytest.approx(0.15)


def test_plateaus_of_a_tiled_runtime_and_of_a_smooth_one():
    rng = np.random.default_rng(0)
    tiled = [np.ceil(w / 16) * (1 + rng.normal(0, 0.003)) for w in SWEEP]  # pads to 16 channels, 0.3 % noise
    found = lt.find_flat_gaps(SWEEP, tiled, tolerance=0.02)
    assert found["flat"] == [[1, 16], [17, 32], [33, 48], [49, 64], [65, 80], [81, 96], [97, 112], [113, 128]]
    assert found["period"] == 16 and found["last_top"] == 128
    axis = lt.Axis.from_json(found)
    assert axis.effective([1, 16, 17, 100, 129, 150, 160, 161]).tolist() == [16, 16, 32, 112, 144, 160, 160, 176]
    assert axis.tops(70) == [16, 32, 48, 64]
    smooth = [1.0 + w for w in SWEEP]  # no tiles: every width is its own cost
    found = lt.find_flat_gaps(SWEEP, smooth, tolerance=0.005)
    assert found["flat"] == [] and lt.Axis.from_json(found).effective([5, 77]).tolist() == [5, 77]
    assert lt.isotonic(np.array([1.0, 3.0, 2.0, 4.0])).tolist() == [1.0, 2.5, 2.5, 4.0]



def test_table_round_trip_and_predictor(table_path, tmp_path):
    table = lt.load_table(table_path)
    copy_path = tmp_path / "copy.json"
    copy_path.write_text(json.dumps(json.loads(table_path.read_text()), indent=None))
    again = lt.load_table(copy_path)
    rng = np.random.default_rng(0)
    sizes = table.sizes.astype(int)
    for _ in range(20):
        keep = {g: int(rng.integers(1, s + 1)) for (g, _), s in zip(table.groups, sizes)}
        a, b = table.entry("tflite", 1).predict_keep(keep), again.entry("tflite", 1).predict_keep(keep)
        assert a == b and a > 0
    entry = table.entry("tflite", 1)
    lat = entry.bind()
    k = table.keep_vector({g: max(1, s // 2) for (g, s) in table.groups})
    assert lat.total(k) == pytest.approx(entry.predict_keep(k))
    saved = lat.removal_savings(k)  # one evaluation per group, against brute force
    for gi in range(len(k)):
        fewer = k.copy()
        fewer[gi] -= 1
        assert saved[gi] == pytest.approx(lat.total(k) - lat.total(fewer), abs=1e-9)
    # in the pruner's group order (a permutation of the table's)
    names = [g for g, _ in table.groups][::-1]
    assert entry.bind(names).total(k[::-1]) == pytest.approx(lat.total(k))
    with pytest.raises(lt.TableMismatch):
        entry.bind(names[1:])
    # per-layer widths (arch.json's modules) predict what kept counts do
    widths = {la.name: (int(i), int(o)) for la, i, o in zip(table.layers, table.width_in(k), table.width_out(k))
              if la.op in lt.GEMM_OPS}
    assert entry.predict(widths) == pytest.approx(entry.predict_keep(k))
    bad = dict(widths)
    name = next(iter(bad))
    bad[name] = (bad[name][0] + 1, bad[name][1])
    with pytest.raises(lt.TableMismatch, match="couples it"):
        entry.predict(bad)
    # step widths: sorted, within the layer, the dense width last; latency never rises going down them
    layer = next(la for la in table.layers if la.op == "conv2d" and la.cin.groups)
    steps = entry.step_widths(layer.name, "out")
    dense_out = table.dense_widths(layer)[1]
    assert steps == sorted(steps) and steps[-1] == dense_out and all(1 <= s <= dense_out for s in steps)
    ms = entry.layer_ms(layer.name, np.full(dense_out, table.dense_widths(layer)[0]), np.arange(1, dense_out + 1))
    assert np.all(np.diff(ms / entry.axis_out.factor(np.arange(1, dense_out + 1))) >= -1e-12)   # fast paths aside
    with pytest.raises(lt.TableError, match="no entry for tflite-int8 x1"):
        table.entry("tflite-int8", 1)


def test_another_board_is_refused_and_another_runtime_warned(table_path, tmp_path):
    table = lt.load_table(table_path)
    device = dict(json.loads(table_path.read_text())["board"])
    assert table.check_compatible(device, {"ai-edge-litert": table.entry("tflite", 1).backend_version}) == []
    other = dict(device, cpu="Cortex-A72", machine="aarch64")
    with pytest.raises(lt.TableMismatch, match="was measured on .* not on this board .*differs in machine, cpu"):
        table.check_compatible(other)
    notes = table.check_compatible(device, {"ai-edge-litert": "9.9.9"})
    assert len(notes) == 1 and "this board runs 9.9.9" in notes[0] and "\n" not in notes[0]


def _variant(table_path: Path, tmp_path: Path, name: str, edit) -> Path:
    raw = copy.deepcopy(json.loads(table_path.read_text()))
    edit(raw)
    path = tmp_path / name
    path.write_text(json.dumps(raw))
    return path


def test_run_with_the_table_and_a_budget(table_path, slim_bundle, tmp_path):
    out = tmp_path / "r.json"
    fast = ["--formats", "tflite", "--threads", "1", "--runs", "20", "--warmup", "2"]
    proc = bench("run", slim_bundle, *fast, "--latency-table", table_path, "--budget-ms", "1000", "--out", out)
    assert proc.returncode == 0, proc.stderr
    check = json.loads(out.read_text())["latency_check"]
    row = check["results"][0]
    assert row["predicted_ms"] > 0 and row["within_budget"] and not check["budget_missed"]
    assert "predicted" in proc.stdout and "budget 1000 ms: met" in proc.stdout
    # a budget the bundle cannot meet: said clearly, exit 1, and in the summary's Markdown
    proc = bench("run", slim_bundle, *fast, "--latency-table", table_path, "--budget-ms", "0.0001", "--out", out)
    assert proc.returncode == 1
    assert "MISSED" in proc.stdout and "latency budget 0.0001 ms MISSED" in proc.stderr
    assert json.loads(out.read_text())["latency_check"]["budget_missed"]
    proc = bench("report", out, "--out", tmp_path / "summary")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "summary" / "README.md").read_text()
    assert "## Latency budget" in text and "MISSED" in text
    # a table from another board: refused before measuring, one line, exit 2
    other = _variant(table_path, tmp_path, "other.json", lambda r: r["board"].update(cpu="Cortex-A72", id="0" * 16))
    proc = bench("run", slim_bundle, *fast, "--latency-table", other, "--out", tmp_path / "o.json")
    assert proc.returncode == 2 and "was measured on" in one_line_error(proc)
    assert not (tmp_path / "o.json").exists()
    # another interpreter version: measured, predicted, warned in one line
    older = _variant(table_path, tmp_path, "older.json", lambda r: r["entries"][0].update(backend_version="2.0.0"))
    proc = bench("run", slim_bundle, *fast, "--latency-table", older, "--out", tmp_path / "w.json")
    assert proc.returncode == 0, proc.stderr
    warned = [ln for ln in proc.stderr.splitlines() if "measured with ai-edge-litert 2.0.0" in ln]
    assert len(warned) == 1


def test_recalibrate_times_the_anchors_again_and_keeps_the_grid(table_path, probe_cache, tmp_path):
    """A table profiled while the board ran 3x slower (its anchors scaled by 3) predicts 3x too much;
    --recalibrate times the anchors again and brings the dense prediction back to the board as it
    runs now, the layer grid untouched, the old anchors kept."""
    def slower(raw):
        for a in raw["entries"][0]["anchors"]:
            a["measured_ms"] *= 3
    stale = _variant(table_path, tmp_path, "stale.json", slower)
    before = lt.load_table(stale).entry("tflite", 1)
    fresh = lt.load_table(table_path).entry("tflite", 1)
    assert before.predict_keep(None) == pytest.approx(3 * fresh.predict_keep(None), rel=0.01)
    proc = bench("profile", "--recalibrate", stale, "--cache", probe_cache, "--rounds", "3", "--burst-ms", "3",
                 timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "recalibrated" in proc.stdout and "now take" in proc.stderr
    raw = json.loads(stale.read_text())
    entry = raw["entries"][0]
    history = entry["recalibrations"]
    assert len(history) == 1 and 0.15 < history[0]["speed_ratio"] < 0.6  # ~1/3, give or take the host's noise
    assert history[0]["previous_anchors_ms"]["dense"] == pytest.approx(
        3 * next(a["measured_ms"] for a in fresh.raw["anchors"] if a["name"] == "dense"))
    assert entry["grids"] == fresh.raw["grids"] and entry["axes"] == fresh.raw["axes"]
    after = lt.load_table(stale).entry("tflite", 1)
    dense = next(a for a in entry["anchors"] if a["name"] == "dense")
    assert after.predict_keep(None) == pytest.approx(dense["measured_ms"], rel=0.05)
    assert after.predict_keep(None) < 0.6 * before.predict_keep(None)
    # another board, or another interpreter version: refused, the table left as it was
    for name, edit, message in [
            ("other.json", lambda r: r["board"].update(cpu="Cortex-A72", id="0" * 16), "was measured on"),
            ("older.json", lambda r: r["entries"][0].update(backend_version="2.0.0"), "profile the board again")]:
        path = _variant(table_path, tmp_path, name, edit)
        text = path.read_text()
        proc = bench("profile", "--recalibrate", path, "--cache", probe_cache, "--rounds", "1", "--burst-ms", "1",
                     timeout=600)
        assert proc.returncode == 2 and message in one_line_error(proc)
        assert path.read_text() == text
    proc = bench("profile", "resnet56", "--recalibrate", stale, "--cache", probe_cache)  # not the table's model
    assert proc.returncode == 2 and "is a table for tests.latency_fixture:tiny_resnet" in one_line_error(proc)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("args, message", [
    (["profile", "nosuchnet"], "unknown model 'nosuchnet'"),
    (["profile", "vgg16", "--formats", "pytorch"], "unknown format 'pytorch'"),
    (["profile", "vgg16", "--threads", "0"], "bad --threads"),
    (["profile", "vgg16", "--out", "{tmp}/table.txt"], "a latency table is a .json file"),
    (["profile", "{tmp}", "--out", "{tmp}/t.json"], "not a run folder"),
    (["profile", "vgg16", "--host", "pi@bad host"], "bad host"),
    (["profile", "vgg16", "--grid", "fine"], "invalid choice"),
    (["profile"], "name the model to profile"),
    (["profile", "--recalibrate", "{tmp}/missing.json"], "latency table not found"),
    (["profile", "--recalibrate", "{notatable}"], "is not a latency table"),
    (["run", "{bundle}", "--latency-table", "{tmp}/missing.json"], "latency table not found"),
    (["run", "{bundle}", "--latency-table", "{notatable}"], "is not a latency table"),
    (["run", "{bundle}", "--budget-ms", "-1"], "--budget-ms must be at least"),
    (["remote", "{bundle}", "--host", "pi@h", "--latency-table", "{notatable}"], "is not a latency table"),
])
def test_bad_input_is_one_line_and_exit_2(bundle, tmp_path, args, message):
    (tmp_path / "report.json").write_text(json.dumps({"kind": "edgeslim-device-bench"}))
    subs = {"{tmp}": str(tmp_path), "{bundle}": str(bundle), "{notatable}": str(tmp_path / "report.json")}
    argv = [subs.get(a, a) if a in subs else a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = bench(*argv)
    assert proc.returncode == 2, proc.stderr
    assert message in one_line_error(proc)
    assert not (tmp_path / "t.json").exists() and not (tmp_path / "table.txt").exists()


def _pool(cin: int) -> dict:
    return {"shape": {"op": "maxpool", "in_hw": [16, 16], "kernel": [2, 2], "stride": [2, 2], "padding": [0, 0],
                      "ceil_mode": False}, "cin": cin, "cout": cin}


def _conv(cin: int, cout: int) -> dict:
    return {"shape": {"op": "conv2d", "in_hw": [16, 16], "kernel": [3, 3], "stride": [1, 1], "padding": [1, 1],
                      "dilation": [1, 1]}, "cin": cin, "cout": cout}


@pytest.mark.parametrize("batch", [[_pool(8), _pool(16)], [_conv(8, 16), _pool(8), _conv(16, 8)]],
                         ids=["pools-only", "mixed"])
def test_int8_probe_batches_convert_in_one_go(batch, tmp_path, monkeypatch):
    """A tflite-int8 batch is one conversion (it used to fail export's single-output check and fall
    back to one conversion per probe), and a batch of pools alone is full-integer too (PT2E leaves
    a pool float unless its input is quantised: the anchor conv sees to that)."""
    from device_bench import probes
    from runtime.model import file_specs

    calls = []
    real = probes.export_module
    monkeypatch.setattr(probes, "export_module", lambda *a, **k: calls.append(1) or real(*a, **k))
    probes._build_batch(batch, "tflite-int8", tmp_path, probes.toolchain())
    files = sorted(tmp_path.rglob("*.tflite"))
    assert len(calls) == 1 and len(files) == len(batch)
    for f in files:
        inp, out = file_specs(f, "tflite-int8")
        assert (inp.dtype, out.dtype) == ("int8", "int8")


def test_a_creeping_plateau_stays_one_plateau_and_repeats_beyond_the_sweep():
    # XNNPACK int8, 1 thread, input widths on the Intel Xeon (benchmarks/results/latency-target-
    # xeon-vgg16-s0): ~2.4 us rising 8 % from 1 to 64 channels, then ~5.0 us to 128. Cut every 2 %
    # (the code before), it became overlapping pieces ([1, 24], [23, 32], ...), 72 was priced as 88
    # and interpolated across the step, and beyond 128 widths had no plateaus at all.
    ms = [2.40, 2.40, 2.41, 2.42, 2.42, 2.43, 2.44, 2.44, 2.45, 2.45, 2.46, 2.47, 2.47, 2.48, 2.49, 2.49, 2.50,
          2.52, 2.55, 2.57, 2.59, 4.90, 4.95, 4.97, 5.00, 5.02, 5.05, 5.07, 5.10]
    found = lt.find_flat_gaps(SWEEP, ms, tolerance=0.02)
    assert found["flat"] == [[1, 64], [65, 128]] and (found["period"], found["last_top"]) == (64, 128)
    axis = lt.Axis.from_json(found)
    assert axis.effective([40, 72, 129, 158, 199]).tolist() == [64, 128, 192, 192, 256]
    # a creep beyond max(CREEP, 2 x tolerance) is cut, and the pieces never share a width
    ramp = [1.0 + 0.004 * w for w in SWEEP]
    flat = lt.find_flat_gaps(SWEEP, ramp, tolerance=0.02)["flat"]
    assert len(flat) > 1 and all(a[1] < b[0] for a, b in zip(flat, flat[1:]))
    for lo, hi in flat:   # from the plateau's first swept width to its top
        first = min(i for i, w in enumerate(SWEEP) if w >= lo)
        assert ramp[SWEEP.index(hi)] <= ramp[first] * (1 + lt.creep(0.02)) + 1e-9
    # a last plateau off the tile grid (89..128 is 40 wide, 88 no multiple of 40) does not repeat
    odd = [1.0] * 21 + [1.5] * 3 + [2.0] * 5
    found = lt.find_flat_gaps(SWEEP, odd, tolerance=0.02)
    assert found["flat"][-1] == [89, 128] and found["period"] == 0


def test_a_table_refits_its_plateaus_from_the_stored_sweep():
    ms = [2.40] * 21 + [4.9] * 8
    chopped = {"flat": [[1, 24], [23, 32]], "sweep_max": 128, "period": 0, "last_top": 0,
               "sweep": {"widths": SWEEP, "ms": ms}}
    assert lt.Axis.from_json(chopped, tolerance=0.02).flat == [(1, 64), (65, 128)]
    assert lt.Axis.from_json({k: v for k, v in chopped.items() if k != "sweep"}, 0.02).flat == [(1, 24), (23, 32)]
