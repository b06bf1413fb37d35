"""python -m device_bench {run, deploy, remote, profile, report}: argument parsing and dispatch.
Every bad input ends as one line on stderr and exit status 2; failed work exits 1."""
from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path
from typing import List, Optional

from .bundle import read_bundle, select_formats
from .errors import FAILED, BenchError
from .run import RunConfig, parse_threads


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise BenchError(f"{self.prog}: {message} (see --help)")


def _positive(kind, minimum, name):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"{name} must be at least {minimum}, got {text!r}")
        return value
    return parse


def _default_threads() -> str:
    from .device import usable_cores

    return ",".join(str(t) for t in dict.fromkeys([1, usable_cores()]))


def _add_run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("measurement")
    g.add_argument("--formats", default="all", help="'all' (every format this Python can run) or a comma "
                   "list: tflite-int8,tflite,onnx-int8,onnx (default: all)")
    g.add_argument("--threads", default=None, help="comma list of interpreter thread counts (default: 1 and "
                   "all cores, e.g. 1,4)")
    when = g.add_mutually_exclusive_group()
    when.add_argument("--runs", type=_positive(int, 1, "--runs"), default=200, help="timed invokes (default 200)")
    when.add_argument("--seconds", type=_positive(float, 0.001, "--seconds"), default=None,
                      help="time each measurement for this long instead of a number of runs")
    g.add_argument("--warmup", type=_positive(int, 0, "--warmup"), default=20,
                   help="untimed invokes after the first (default 20)")
    g.add_argument("--batch", type=_positive(int, 1, "--batch"), default=1,
                   help="images per invoke (default 1; the exported TFLite models take exactly 1)")
    g.add_argument("--cooldown", type=_positive(float, 0, "--cooldown"), default=0.0,
                   help="seconds to idle between measurements, for boards that throttle when hot")
    b = p.add_argument_group("latency budget")
    b.add_argument("--latency-table", metavar="FILE", help="a table from `device_bench profile` for this board: "
                   "report what it predicts for the bundle next to the measured p50")
    b.add_argument("--budget-ms", type=_positive(float, 1e-6, "--budget-ms"), default=None,
                   help="the latency budget: say whether each measured p50 meets it (exit status 1 if not)")


def _add_ssh_options(p: argparse.ArgumentParser, fleet_out: Optional[str]) -> None:
    """The board options; fleet_out None: one optional --host (profile: none = this machine)."""
    g = p.add_argument_group("board")
    if fleet_out is None:
        g.add_argument("--host", help="[user@]host[:port] of the board (default: profile this machine)")
    else:
        who = g.add_mutually_exclusive_group(required=True)
        who.add_argument("--host", help="[user@]host[:port] of the board, e.g. pi@raspberrypi.local")
        who.add_argument("--hosts", metavar="FILE", help=f"a file with one [user@]host[:port] per line: run "
                         f"every board in parallel{fleet_out}")
    g.add_argument("--port", type=_positive(int, 1, "--port"), default=22, help="ssh port (default 22)")
    g.add_argument("--identity", "-i", metavar="KEY", help="ssh private key file")
    g.add_argument("--known-hosts", metavar="FILE", help="known_hosts file to check the board's key against "
                   "(default: ssh's own)")
    g.add_argument("--accept-new-host-key", action="store_true",
                   help="trust a board seen for the first time (StrictHostKeyChecking=accept-new); a "
                   "CHANGED key is always refused")
    g.add_argument("--python", default="python3", help="the board's Python (default python3; e.g. "
                   "~/edgeslim-venv/bin/python)")
    g.add_argument("--remote-dir", default="edgeslim", help="folder on the board, from $HOME unless "
                   "absolute (default edgeslim)")
    g.add_argument("--keep", type=_positive(int, 1, "--keep"), default=3,
                   help="releases to keep on the board (default 3)")
    g.add_argument("--connect-timeout", type=_positive(int, 1, "--connect-timeout"), default=10,
                   help="seconds to wait for a board to answer (default 10)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m device_bench", description="Measure a bundle's latency and memory on a "
                "device, locally or over SSH, and summarise the reports.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="benchmark a bundle on this machine")
    r.add_argument("bundle", help="bundle folder (dist/NAME)")
    _add_run_options(r)
    r.add_argument("--out", help="report JSON (default reports/<bundle>-<hostname>.json)")

    d = sub.add_parser("deploy", help="copy a bundle and the code to a board, verify, switch `current`")
    d.add_argument("bundle")
    _add_ssh_options(d, "")

    m = sub.add_parser("remote", help="deploy, benchmark on the board, fetch the report")
    m.add_argument("bundle")
    _add_ssh_options(m, " (--out is then a folder)")
    _add_run_options(m)
    m.add_argument("--out", help="report JSON for --host (default reports/<bundle>-<host>.json); folder "
                   "for --hosts (default reports/fleet)")

    f = sub.add_parser("profile", help="measure a latency table for a model on a board (or this machine)")
    f.add_argument("model", metavar="MODEL_OR_RUN", nargs="?", help="zoo name (vgg16, resnet56, ...), "
                   "package.module:factory, path/to/file.py:factory, or a run folder (runs/NAME: its dense model is "
                   "profiled); with --recalibrate: the table's model")
    f.add_argument("--recalibrate", metavar="TABLE", help="time only TABLE's whole-network anchors again (a minute, "
                   "not a whole profile) and rewrite its calibration: for a board whose speed moved since it was "
                   "profiled. Writes TABLE in place (the previous anchors stay in it) or --out")
    f.add_argument("--num-classes", type=_positive(int, 1, "--num-classes"), default=10,
                   help="classes of a zoo/factory model (default 10; a run folder says its own)")
    f.add_argument("--width", type=_positive(float, 1e-6, "--width"), default=1.0,
                   help="width multiplier of a zoo model (default 1.0; a run folder says its own)")
    f.add_argument("--input-size", type=_positive(int, 1, "--input-size"), default=32,
                   help="input height = width in pixels (default 32; a run folder says its own)")
    f.add_argument("--ignore", default="", help="comma list of layers compress was told to --ignore")
    f.add_argument("--formats", default="all", help="'all' (every format the board has an interpreter for) or a "
                   "comma list: tflite-int8,tflite,onnx-int8,onnx")
    f.add_argument("--threads", default=None, help="comma list of interpreter thread counts (default: 1 and all "
                   "cores of this machine; name the board's with --host)")
    f.add_argument("--rounds", type=_positive(int, 1, "--rounds"), default=5,
                   help="interleaved timing rounds per probe (default 5)")
    f.add_argument("--burst-ms", type=_positive(float, 0.1, "--burst-ms"), default=10.0,
                   help="milliseconds of invokes per probe per round (default 10)")
    f.add_argument("--grid", choices=("full", "coarse"), default="full",
                   help="probe grid: full (default) or coarse (a quarter of the probes: a first look, CI)")
    f.add_argument("--cache", metavar="DIR", help="probe file cache (default ~/.cache/edgeslim/latency-probes, "
                   "or $EDGESLIM_CACHE/latency-probes)")
    f.add_argument("--out", help="the table (default tables/<model>-<board>.json)")
    _add_ssh_options(f, None)

    s = sub.add_parser("report", help="summarise reports: Markdown table + PNG plots")
    s.add_argument("reports", nargs="+", help="report JSON files, or folders of them")
    s.add_argument("--out", default="reports/summary", help="output folder (default reports/summary)")
    return p


def _run_config(args) -> RunConfig:
    return RunConfig(formats=args.formats, threads=parse_threads(args.threads or _default_threads()),
                     runs=args.runs, seconds=args.seconds, warmup=args.warmup, batch=args.batch,
                     cooldown=args.cooldown)


def _remote_run_args(cfg: RunConfig) -> List[str]:
    args = ["--formats", cfg.formats, "--threads", ",".join(map(str, cfg.threads)), "--warmup", str(cfg.warmup),
            "--batch", str(cfg.batch), "--cooldown", str(cfg.cooldown)]
    return args + (["--seconds", str(cfg.seconds)] if cfg.seconds is not None else ["--runs", str(cfg.runs)])


def _report_path(out: Optional[str], default: str) -> Path:
    path = Path(out or default)
    if path.is_dir():
        raise BenchError(f"--out {path} is a folder; give the report's file name, e.g. {path / 'report.json'}")
    if path.suffix != ".json":
        raise BenchError(f"--out {path}: a report is a .json file")
    return path


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _budget_finish(args, bundle):
    """(table, finish): the hook that adds `latency_check` to a report before it is written."""
    from . import budget

    table = budget.open_table(args.latency_table)
    if table is None and args.budget_ms is None:
        return None, None
    return table, lambda report: budget.check(report, bundle.manifest, table, args.budget_ms)


def _budget_verdict(report) -> int:
    """Print the latency check; 2 if the table was refused, 1 if the budget was missed."""
    from .budget import describe

    block = report.get("latency_check")
    if not block:
        return 0
    for line in describe(block):
        print(line)
    if block.get("refused"):
        raise BenchError(block["refused"])
    if block["budget_missed"]:
        print(f"latency budget {block['budget_ms']:g} ms MISSED", file=sys.stderr)
        return FAILED
    return 0


def cmd_run(args) -> int:
    from . import device
    from .budget import check_device
    from .run import installed_backends, run_bench

    bundle = read_bundle(args.bundle)
    cfg = _run_config(args)
    out = _report_path(args.out, f"reports/{bundle.name}-{socket.gethostname()}.json")
    table, finish = _budget_finish(args, bundle)
    for note in check_device(table, device.describe(), {d: v for d, v in installed_backends().items() if v}):
        print(f"warning: {note}", file=sys.stderr)  # a table from another board fails here, before measuring
    report = run_bench(bundle, cfg, out, finish=finish)
    failed = [r for r in report["results"] if r["status"] == "error"]
    print(f"report: {out}" + (f" ({len(failed)} of {len(report['results'])} measurements failed)" if failed else ""))
    verdict = _budget_verdict(report)
    return FAILED if failed else verdict


def _boards(args):
    from .deploy import BoardConfig
    from .ssh import SshOptions, parse_target, read_hosts_file

    targets = read_hosts_file(args.hosts, args.port) if args.hosts else [parse_target(args.host, args.port)]
    opts = SshOptions(identity=args.identity, known_hosts=args.known_hosts,
                      accept_new_host_key=args.accept_new_host_key, connect_timeout=args.connect_timeout).checked()
    cfg = BoardConfig(python=args.python, remote_dir=args.remote_dir, keep=args.keep).checked()
    return targets, opts, cfg


def cmd_deploy(args) -> int:
    from .deploy import build_release, deploy, run_fleet

    bundle = read_bundle(args.bundle)
    targets, opts, cfg = _boards(args)
    release = build_release(bundle)
    if args.host:
        deploy(bundle, targets[0], opts, cfg, _log, release)
        print(f"deployed {release.name} to {targets[0].label} ({cfg.remote_dir}/current)")
        return 0
    return run_fleet(targets, lambda t, log: {"release": deploy(bundle, t, opts, cfg, log, release)["release"]},
                     None)


def cmd_remote(args) -> int:
    from .deploy import build_release, remote_run, run_fleet

    bundle = read_bundle(args.bundle)
    cfg_run = _run_config(args)
    select_formats(bundle, cfg_run.formats)  # a bad format fails here, before any board is touched
    targets, opts, cfg = _boards(args)
    run_args = _remote_run_args(cfg_run)
    _, finish = _budget_finish(args, bundle)  # a bad table fails here, before any board is touched
    release = build_release(bundle)
    if args.host:
        out = _report_path(args.out, f"reports/{bundle.name}-{targets[0].slug}.json")
        remote_run(bundle, targets[0], opts, cfg, run_args, out, _log, release, finish=finish)
        print(f"report: {out}")
        return _budget_verdict(json.loads(out.read_text()))
    out_dir = Path(args.out or "reports/fleet")
    if out_dir.exists() and not out_dir.is_dir():
        raise BenchError(f"--out {out_dir} is a file; with --hosts it must be a folder")
    return run_fleet(targets, lambda t, log: remote_run(bundle, t, opts, cfg, run_args,
                                                        out_dir / f"{t.slug}.json", log, release, finish=finish),
                     out_dir)


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:60] or "model"


# A table entry whose probes varied more than this between rounds (median) predicts roughly: the
# Xeon's ResNet-56 fp32 x2 entry at 41 % got 2/6 held-out networks within ±10 %, profiled again at
# 2.7 % 6/6 (BENCHMARKS.md, "Latency tables").
NOISY = 0.2


def cmd_profile(args) -> int:
    from .bundle import KNOWN_FORMATS
    from .profile import Board, ProfileConfig, profile, resolve_model
    from .run import installed_backends, runnable

    wanted = [f.strip() for f in args.formats.split(",") if f.strip()] if args.formats.strip() != "all" else None
    for f in wanted or []:
        if f not in KNOWN_FORMATS:
            raise BenchError(f"unknown format {f!r}; formats are {', '.join(KNOWN_FORMATS)}")
    if wanted == []:
        raise BenchError(f"--formats {args.formats!r} names no format")
    if args.recalibrate is None and args.model is None:
        raise BenchError("profile: name the model to profile (MODEL_OR_RUN) or a table to --recalibrate")
    threads = parse_threads(args.threads or _default_threads())
    board = Board()
    if args.host:
        from .deploy import BoardConfig, board_call
        from .ssh import SshOptions, parse_target

        target = parse_target(args.host, args.port)
        opts = SshOptions(identity=args.identity, known_hosts=args.known_hosts,
                          accept_new_host_key=args.accept_new_host_key, connect_timeout=args.connect_timeout).checked()
        board_cfg = BoardConfig(python=args.python, remote_dir=args.remote_dir, keep=args.keep).checked()
        board = Board((target, opts, board_cfg))
    out = Path(args.out) if args.out else None
    if out is not None and (out.is_dir() or out.suffix != ".json"):
        raise BenchError(f"--out {out}: a latency table is a .json file")
    ignore = [x.strip() for x in args.ignore.split(",") if x.strip()]
    if args.recalibrate is not None:
        return _recalibrate(args, board, out, ignore)
    source = resolve_model(args.model, args.num_classes, args.width, args.input_size, ignore)
    if args.host:  # what the board can run: its interpreters, from deploy's probe
        backends = board_call(target, opts, board_cfg, "probe", [])["backends"]
    else:
        backends = installed_backends()
    formats = [f for f in (wanted or KNOWN_FORMATS) if wanted or runnable(f, backends)]
    missing = [f for f in formats if not runnable(f, backends)]
    if missing:
        raise BenchError(f"{board.label} has no interpreter for {', '.join(missing)} (installed: "
                         f"{', '.join(d for d, v in backends.items() if v) or 'none'})")
    if not formats:
        raise BenchError(f"{board.label} has no TFLite or ONNX interpreter: pip install ai-edge-litert")
    from .probes import default_cache

    cfg = ProfileConfig(formats=formats, threads=threads, cache=Path(args.cache) if args.cache else default_cache(),
                        rounds=args.rounds, burst_ms=args.burst_ms, grid=args.grid)
    out = out or Path("tables") / f"{_slug(source.info['spec'])}-{_slug(board.label)}.json"
    table = profile(source, cfg, board, out, _log)
    for e in table["entries"]:
        dense = next(a for a in e["anchors"] if a["name"] == "dense")
        _log(f"{e['format']:<12} x{e['threads']:<2} dense network {dense['measured_ms']:.3f} ms measured, "
             f"{dense['sum_ms']:.3f} ms sum of layers; calibrated on {len(e['anchors'])} whole networks, "
             f"worst anchor {max(abs(a['predicted_ms'] / a['measured_ms'] - 1) for a in e['anchors']) * 100:.1f} % off, "
             f"probes {e['noise']['median_spread'] * 100:.1f} % apart between rounds (median)")
        if e["noise"]["median_spread"] > NOISY:
            _log(f"warning: {e['format']} x{e['threads']}: the probes' timings varied "
                 f"{e['noise']['median_spread'] * 100:.0f} % between rounds (median): predictions from this entry "
                 "will be rough; profile it again on an idle board")
    p = table["profile"]
    print(f"latency table: {out} ({len(table['entries'])} entries, {p['probes_converted']} probes converted, "
          f"{p['wall_seconds']:.0f} s)")
    return 0


def _recalibrate(args, board, out: Optional[Path], ignore: List[str]) -> int:
    """profile --recalibrate TABLE: the model from the table (or MODEL_OR_RUN, checked against it);
    formats and threads are the table's entries."""
    from . import latency_table as lt
    from .probes import default_cache
    from .profile import ProfileConfig, recalibrate, resolve_model

    path = Path(args.recalibrate)
    try:
        table = lt.load_table(path)
    except lt.TableError as e:
        raise BenchError(str(e)) from None
    info = table.model
    size = (info.get("input") or [1, 3, args.input_size, args.input_size])[2]
    source = resolve_model(args.model or str(info.get("spec")), int(info.get("num_classes") or args.num_classes),
                           float(info.get("width") or args.width), int(size), ignore)
    cfg = ProfileConfig(formats=sorted({e.format for e in table.entries}),
                        threads=sorted({e.threads for e in table.entries}),
                        cache=Path(args.cache) if args.cache else default_cache(),
                        rounds=args.rounds, burst_ms=args.burst_ms)
    recalibrate(source, table, cfg, board, out or path, _log)
    print(f"latency table: {out or path} (recalibrated)")
    return 0


def cmd_report(args) -> int:
    from .report import summarize

    out = summarize(args.reports, Path(args.out))
    print(f"summary: {out / 'README.md'}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    commands = {"run": cmd_run, "deploy": cmd_deploy, "remote": cmd_remote, "report": cmd_report,
                "profile": cmd_profile}
    try:
        args = build_parser().parse_args(argv)
        return commands[args.command](args)
    except BenchError as e:
        print(f"device_bench: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("device_bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
