"""device_bench run: real measurements of the real test bundle in worker processes,
the report's fields, and every bad input ending in one line and exit 2."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.device_bench_helpers import bench

REPO = Path(__file__).resolve().parents[1]
FAST = ["--runs", "5", "--warmup", "1"]


@pytest.fixture(scope="module")
def local_report(bundle, tmp_path_factory):
    """One `run` over every format of the bundle, 1 thread: shared by the checks below."""
    out = tmp_path_factory.mktemp("bench") / "local.json"
    proc = bench("run", bundle, "--formats", "all", "--threads", "1", *FAST, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text()), proc


def test_run_measures_every_format(local_report, bundle):
    report, proc = local_report
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert report["schema"] == 1 and report["kind"] == "edgeslim-device-bench"
    assert sorted(r["format"] for r in report["results"]) == sorted(manifest["artifacts"])
    for r in report["results"]:
        assert r["status"] == "ok", r
        lat = r["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert lat["min"] <= lat["mean"] <= lat["max"] and lat["std"] >= 0
        assert r["runs"] == 5 and r["threads"] == 1 and r["batch"] == 1
        assert r["throughput_ips"] == pytest.approx(1000 / lat["mean"], rel=0.01)
        assert r["init_ms"] > 0 and r["first_inference_ms"] > 0
        # the worker's own memory: more than Python+numpy once a model is loaded
        assert r["peak_rss_mb"] > r["rss_baseline_mb"] > 5
        entry = manifest["artifacts"][r["format"]]
        assert r["model_bytes"] == (bundle / entry["file"]).stat().st_size
        assert r["top1"] == entry.get("top1")
        assert r["backend"] in ("ai-edge-litert", "tflite-runtime", "onnxruntime") and r["backend_version"]
    # one line of progress per measurement on stderr
    assert proc.stderr.count("p50") == len(report["results"])


def test_report_names_device_and_bundle(local_report, bundle):
    report, _ = local_report
    d = report["device"]
    for key in ("hostname", "cpu", "cpu_cores", "os", "kernel", "python", "cpufreq", "temperature_c", "backends"):
        assert key in d
    assert d["cpu_cores"] >= 1 and d["python"] == ".".join(map(str, sys.version_info[:3]))
    assert d["emulated"] is False and d["emulation"] is None  # this host runs natively
    assert "emulated" not in proc_stderr(local_report)
    raw = (bundle / "manifest.json").read_bytes()
    manifest = json.loads(raw)
    b = report["bundle"]
    assert b["manifest_sha256"] == hashlib.sha256(raw).hexdigest()
    assert b["name"] == manifest["name"]
    assert b["source"]["method"] == manifest["source"]["method"]
    assert b["source"]["slim"]["flops"] == manifest["source"]["slim"]["flops"]
    assert {f: v["top1"] for f, v in b["formats"].items()} == {f: a.get("top1") for f, a in manifest["artifacts"].items()}


def proc_stderr(local_report) -> str:
    return local_report[1].stderr


# /proc/cpuinfo of an x86 host as an emulated aarch64 program reads it (qemu-user passes it through),
# and of a Raspberry Pi 4.
X86_CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: fpu vme sse2\n"
PI4_CPUINFO = ("processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
               "CPU implementer\t: 0x41\nCPU part\t: 0xd08\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n")


@pytest.mark.parametrize("machine, kernel_arch, cpuinfo, emulated", [
    ("aarch64", "x86_64", X86_CPUINFO, True),  # qemu-user on this host
    ("aarch64", None, X86_CPUINFO, True),  # the same on a kernel without /proc/sys/kernel/arch
    ("armv7l", "x86_64", X86_CPUINFO, True),
    ("aarch64", "aarch64", PI4_CPUINFO, False),  # a real Pi 4, 64-bit OS
    ("armv7l", "aarch64", PI4_CPUINFO, False),  # 32-bit Pi OS on a 64-bit kernel: native
    ("i686", "x86_64", X86_CPUINFO, False),  # 32-bit x86 userspace: native
    ("x86_64", "x86_64", X86_CPUINFO, False),
    ("x86_64", "aarch64", PI4_CPUINFO, True),  # x86 programs emulated on an ARM board
])
def test_emulation_is_detected_from_the_kernel_and_cpuinfo(machine, kernel_arch, cpuinfo, emulated):
    from device_bench.device import emulation

    found = emulation(machine, kernel_arch, cpuinfo)
    assert (found is not None) == emulated, found
    if emulated:
        assert found.startswith("qemu-user: ") and machine in found


def test_threads_seconds_and_batch(bundle, tmp_path):
    out = tmp_path / "r.json"
    proc = bench("run", bundle, "--formats", "tflite,onnx", "--threads", "1,2", "--seconds", "0.05",
                 "--warmup", "1", "--batch", "2", "--out", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert [(r["format"], r["threads"]) for r in report["results"]] == \
        [("tflite", 1), ("tflite", 2), ("onnx", 1), ("onnx", 2)]
    assert report["settings"]["seconds"] == 0.05 and report["settings"]["runs"] is None
    for r in report["results"]:
        if r["format"] == "onnx":  # ONNX takes any batch
            assert r["status"] == "ok" and r["batch"] == 2 and r["runs"] >= 1
            assert r["throughput_ips"] == pytest.approx(2000 / r["latency_ms"]["mean"], rel=0.01)
        else:  # the exported TFLite model is fixed at batch 1: skipped, said why, not a failure
            assert r["status"] == "skipped" and "fixed batch" in r["reason"]


def test_a_failing_format_is_reported_and_others_still_run(bundle, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    model = broken / manifest["artifacts"]["onnx"]["file"]
    model.write_bytes(model.read_bytes()[:-10] + b"0123456789")  # corrupted after export
    out = tmp_path / "r.json"
    proc = bench("run", broken, "--formats", "onnx,tflite", "--threads", "1", *FAST, "--out", out)
    assert proc.returncode == 1
    report = json.loads(out.read_text())
    status = {r["format"]: r for r in report["results"]}
    assert status["tflite"]["status"] == "ok"
    assert status["onnx"]["status"] == "error" and "sha256" in status["onnx"]["error"]
    assert "1 of 2 measurements failed" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["run", "{missing}"], "bundle not found"),
    (["run", "{bundle}", "--formats", "tflite,keras"], "unknown format 'keras'"),
    (["run", "{bundle}", "--formats", ","], "names no format"),
    (["run", "{bundle}", "--threads", "0"], "bad --threads"),
    (["run", "{bundle}", "--threads", "two"], "bad --threads"),
    (["run", "{bundle}", "--threads", "1,,x"], "bad --threads"),
    (["run", "{bundle}", "--runs", "0"], "--runs must be at least 1"),
    (["run", "{bundle}", "--runs", "5", "--seconds", "1"], "not allowed with argument"),
    (["run", "{bundle}", "--batch", "0"], "--batch must be at least 1"),
    (["run", "{bundle}", "--out", "{tmp}"], "is a folder"),
    (["run", "{notbundle}"], "no manifest.json"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(bundle, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "keep.json"
    out.write_text("{\"precious\": true}")
    subs = {"{missing}": str(tmp_path / "nope"), "{bundle}": str(bundle), "{tmp}": str(tmp_path),
            "{notbundle}": str(tmp_path / "empty")}
    argv = [subs.get(a, a) for a in args]
    if argv[0] == "run" and "--out" not in argv:
        argv += ["--out", str(out)]
    proc = bench(*argv)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("device_bench: error:"), proc.stderr
    assert message in lines[0]
    assert out.read_text() == "{\"precious\": true}"  # nothing the user had was touched


def test_harness_overhead_benchmark_runs(bundle):
    """benchmarks/harness_overhead.py runs end to end (its verdict depends on the machine, so only
    the report line is checked here; the 5 % check itself is the benchmark's exit status)."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "harness_overhead.py"), str(bundle),
                           "--format", "tflite", "--runs", "20", "--warmup", "2", "--rounds", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr
    assert "harness overhead" in proc.stdout and "bare invoke" in proc.stdout
