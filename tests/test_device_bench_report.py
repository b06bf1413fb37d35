"""device_bench report: real reports in, README.md table + PNG plots out; malformed input -> one line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.image
import pytest

from tests.device_bench_helpers import bench

REPO = Path(__file__).resolve().parents[1]
FAST = ["--threads", "1", "--runs", "5", "--warmup", "1"]


@pytest.fixture(scope="module")
def reports(bundle, tmp_path_factory):
    """Two real runs: the slim test bundle, and the same model files under a manifest that says it
    is the dense baseline of the same source model (what `report` pairs as dense vs slim)."""
    tmp = tmp_path_factory.mktemp("reports")
    dense = tmp / "dist" / "tiny-dense"
    shutil.copytree(bundle, dense)
    manifest = json.loads((dense / "manifest.json").read_text())
    manifest["name"] = "tiny-dense"
    manifest["source"].update(method="dense", achieved={"flops_reduction": 0.0, "params_reduction": 0.0})
    (dense / "manifest.json").write_text(json.dumps(manifest))
    out = []
    for b, formats in ((bundle, "all"), (dense, "tflite,onnx")):
        path = tmp / f"{b.name}.json"
        proc = bench("run", b, "--formats", formats, *FAST, "--out", path)
        assert proc.returncode == 0, proc.stderr
        out.append(path)
    return out


def test_report_writes_table_and_plots(reports, tmp_path):
    out = tmp_path / "summary"
    proc = bench("report", *reports, "--out", out)
    assert proc.returncode == 0, proc.stderr
    readme = (out / "README.md").read_text()
    measured = [json.loads(p.read_text()) for p in reports]
    rows = [ln for ln in readme.splitlines() if ln.startswith("| ") and " ms" not in ln]
    for rep in measured:
        for r in rep["results"]:
            assert any(f"| {rep['bundle']['name']} | {r['format']} | 1 |" in ln for ln in rows), r["format"]
            assert f"{r['latency_ms']['p50']:.3f}" in readme
    assert "## Dense vs slim" in readme and "## Boards" in readme and "## Bundles" in readme
    for name in ("latency.png", "tradeoff.png", "memory.png", "dense_vs_slim.png"):
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 100 and image.shape[1] > 100, name
        assert f"]({name})" in readme


def test_report_accepts_a_folder_and_skips_pairs_it_cannot_make(reports, tmp_path):
    folder = tmp_path / "fleet"
    folder.mkdir()
    shutil.copy(reports[0], folder / "a.json")
    (folder / "summary.json").write_text(json.dumps({"hosts": []}))  # a fleet summary is not a report
    proc = bench("report", folder, "--out", tmp_path / "summary")
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "summary" / "dense_vs_slim.png").exists()
    assert "Dense vs slim" not in (tmp_path / "summary" / "README.md").read_text()


def _malformed(tmp: Path, good: Path):
    report = json.loads(good.read_text())
    cases = {
        "not_json.json": "{not json",
        "not_report.json": json.dumps({"hello": 1}),
        "no_results.json": json.dumps({k: v for k, v in report.items() if k != "results"}),
        "bad_result.json": json.dumps({**report, "results": [{"format": "tflite", "status": "ok", "threads": 1}]}),
        "future.json": json.dumps({**report, "schema": 99}),
        "nothing_ok.json": json.dumps({**report, "results": [{"format": "onnx", "status": "error", "error": "x"}]}),
    }
    for name, text in cases.items():
        (tmp / name).write_text(text)
    return cases


@pytest.mark.parametrize("name, message", [
    ("not_json.json", "not valid JSON"),
    ("not_report.json", "not a device_bench report"),
    ("no_results.json", "'results' is missing"),
    ("bad_result.json", "lacks latency_ms"),
    ("future.json", "schema 99 is not supported"),
    ("nothing_ok.json", "no successful measurement"),
    ("missing.json", "report not found"),
    ("reports/*.json", "the shell found no match"),
    ("empty_dir", "holds no report"),
])
def test_bad_reports_are_one_line_and_exit_2(reports, tmp_path, name, message):
    _malformed(tmp_path, reports[0])
    (tmp_path / "empty_dir").mkdir()
    out = tmp_path / "summary"
    # the bad one comes after a good one: nothing is written unless every input is good
    # (a report whose measurements all failed is fine next to a good one, not alone)
    good = [] if name == "nothing_ok.json" else [reports[0]]
    proc = bench("report", *good, tmp_path / name, "--out", out)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("device_bench: error:") and message in lines[0], proc.stderr
    assert not out.exists()


def test_report_needs_inputs_and_a_folder(reports, tmp_path):
    proc = bench("report", "--out", tmp_path / "s")
    assert proc.returncode == 2 and "required" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    (tmp_path / "file").write_text("x")
    proc = bench("report", reports[0], "--out", tmp_path / "file")
    assert proc.returncode == 2 and "is a file" in proc.stderr
    assert (tmp_path / "file").read_text() == "x"


def test_an_emulated_board_is_labelled_everywhere(reports, tmp_path):
    """A report whose device was emulated (what `make test-board` produces under qemu-user): the
    summary names the board "(emulated)" in every row and says its latencies are not board figures."""
    report = json.loads(reports[0].read_text())
    report["device"].update(emulated=True, emulation="qemu-user: aarch64 programs on an x86_64 kernel")
    report["remote"] = {"host": "pi@127.0.0.1:2222", "release": "r", "python": "python3", "board_report": "x"}
    emulated = tmp_path / "emulated.json"
    emulated.write_text(json.dumps(report))
    out = tmp_path / "summary"
    proc = bench("report", reports[1], emulated, "--out", out)
    assert proc.returncode == 0, proc.stderr
    readme = (out / "README.md").read_text()
    assert "**Emulated:** pi@127.0.0.1:2222 (emulated) ran under qemu-user: aarch64 programs on an x86_64 kernel" \
        in readme and "never quote them as board figures" in readme
    rows = [ln for ln in readme.splitlines() if ln.startswith("| pi@127.0.0.1:2222")]
    assert rows and all(ln.startswith("| pi@127.0.0.1:2222 (emulated) |") for ln in rows)
    native = json.loads(reports[1].read_text())["device"]["hostname"]
    assert f"| {native} |" in readme and f"{native} (emulated)" not in readme
