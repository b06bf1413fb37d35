"""device_bench deploy / remote against a REAL OpenSSH server started here on 127.0.0.1 (own host and
client keys, sshd_config, known_hosts in a temp folder; skipped with the reason if openssh-server
is not installed — `make system-deps`):
deploy, re-deploy, remote run + fetch, a cut-off upload, a fleet with an unreachable board, a wrong
host key, a board Python without numpy/interpreter; plus host-string and quoting checks."""
from __future__ import annotations

import getpass
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import venv
from dataclasses import dataclass
from pathlib import Path

import pytest

from device_bench import deploy as dep
from device_bench import ssh
from device_bench.bundle import read_bundle
from device_bench.errors import BenchError
from tests.device_bench_helpers import bench

REPO = Path(__file__).resolve().parents[1]
SSHD = "/usr/sbin/sshd"
RUN_FAST = ["--formats", "tflite", "--threads", "1", "--runs", "5", "--warmup", "1"]


def one_line_error(proc) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("device_bench: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# --------------------------------------------------------------------------- no server needed


@pytest.mark.parametrize("spec, host, user, port", [
    ("pi@raspberrypi.local", "raspberrypi.local", "pi", 22),
    ("board7", "board7", None, 22),
    ("pi@10.0.0.7:2222", "10.0.0.7", "pi", 2222),
    ("ubuntu@[fe80::1]:2200", "fe80::1", "ubuntu", 2200),
])
def test_parse_target(spec, host, user, port):
    t = ssh.parse_target(spec)
    assert (t.host, t.user, t.port) == (host, user, port)


@pytest.mark.parametrize("spec", ["-oProxyCommand=touch /tmp/x", "pi@-oProxyCommand=x", "pi@host;rm -rf ~",
                                  "pi@", "@host", "pi@host:99999", "pi@host:22x", "a b", "pi@$(id)",
                                  "-p@host", "pi@host/../x", ""])
def test_parse_target_refuses(spec):
    with pytest.raises(BenchError, match="bad host"):
        ssh.parse_target(spec)


def test_remote_words_are_quoted():
    weird = "dir with space/$(touch x);`id`"
    word = dep.remote_path(weird)
    assert word == '"$HOME"/' + shlex.quote(weird)
    assert dep.remote_path("/abs/x y") == shlex.quote("/abs/x y")
    argv = ssh.ssh_argv(ssh.Target("h", "u", 2222), ssh.SshOptions(), "cmd")
    assert argv[0] == "ssh" and argv[-3:] == ["--", "u@h", "cmd"]
    assert "BatchMode=yes" in argv and "StrictHostKeyChecking=yes" in argv
    argv = ssh.ssh_argv(ssh.Target("h"), ssh.SshOptions(accept_new_host_key=True), "cmd")
    assert "StrictHostKeyChecking=accept-new" in argv


@pytest.mark.parametrize("args, message", [
    (["deploy", "{bundle}", "--host=-oProxyCommand=sh"], "bad host"),
    (["deploy", "{bundle}", "--host", "-oProxyCommand=sh"], "expected one argument"),
    (["deploy", "{bundle}", "--host", "pi@bad host"], "bad host"),
    (["remote", "{bundle}", "--hosts", "{nofile}", "--out", "{tmp}/fleet"], "cannot read hosts file"),
    (["remote", "{bundle}", "--hosts", "{badhosts}", "--out", "{tmp}/fleet"], "bad host"),
    (["remote", "{bundle}", "--hosts", "{emptyhosts}"], "names no host"),
    (["remote", "{bundle}", "--host", "pi@h", "--formats", "pytorch"], "unknown format"),
    (["remote", "{bundle}", "--host", "pi@h", "--threads", "-1"], "bad --threads"),
    (["deploy", "{tmp}/nobundle", "--host", "pi@h"], "bundle not found"),
    (["deploy", "{bundle}"], "one of the arguments --host --hosts is required"),
    (["deploy", "{bundle}", "--host", "pi@h", "--identity", "{nofile}"], "identity file not found"),
    (["deploy", "{bundle}", "--host", "pi@h", "--python", "python3;reboot"], "bad --python"),
])
def test_bad_board_input_is_one_line_and_exit_2(bundle, tmp_path, args, message):
    (tmp_path / "bad_hosts").write_text("pi@good\npi@evil;reboot\n")
    (tmp_path / "empty_hosts").write_text("# nothing\n\n")
    subs = {"{bundle}": str(bundle), "{nofile}": str(tmp_path / "missing"), "{tmp}": str(tmp_path),
            "{badhosts}": str(tmp_path / "bad_hosts"), "{emptyhosts}": str(tmp_path / "empty_hosts")}
    argv = []
    for a in args:
        for k, v in subs.items():
            a = a.replace(k, v)
        argv.append(a)
    proc = bench(*argv)
    assert proc.returncode == 2, proc.stderr
    assert message in one_line_error(proc)
    assert not (tmp_path / "fleet").exists()


# --------------------------------------------------------------------------- a real sshd


def free_port() -> int:
    """A port nothing listens on (also what an unreachable board looks like)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "device_bench-test", "-f", str(path)],
                   check=True, capture_output=True)
    return path


@dataclass
class SshServer:
    port: int
    identity: Path  # the client's private key
    known_hosts: Path  # holds this server's real host key
    host_pub: Path
    dir: Path
    proc: subprocess.Popen
    log: object  # sshd's stderr file

    @property
    def host(self) -> str:
        return f"{getpass.getuser()}@127.0.0.1:{self.port}"

    def ssh_args(self) -> list:
        return ["--identity", str(self.identity), "--known-hosts", str(self.known_hosts)]


def missing_tools() -> str:
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make system-deps)"
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} is not installed (make system-deps: apt-get install openssh-server)"
    return ""


def start_sshd(tmp: Path) -> SshServer:
    reason = missing_tools()
    if reason:
        pytest.skip(reason)
    if os.getuid() == 0 and not os.path.isdir("/run/sshd"):
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    host_key = keygen(tmp / "ssh_host_ed25519_key")
    identity = keygen(tmp / "id_ed25519")
    shutil.copy(tmp / "id_ed25519.pub", tmp / "authorized_keys")
    port = free_port()
    config = tmp / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}", f"PidFile {tmp / 'sshd.pid'}",
        f"AuthorizedKeysFile {tmp / 'authorized_keys'}", "UsePAM no", "PermitRootLogin prohibit-password",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "StrictModes no",
        "PubkeyAuthentication yes", "LogLevel ERROR", "MaxStartups 50:30:100", "MaxSessions 50", ""]))
    log = open(tmp / "sshd.log", "w")  # noqa: SIM115  (closed in stop_sshd)
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 10
    while True:
        if proc.poll() is not None:  # installed but broken: a failure, not a skip
            pytest.fail(f"sshd did not start: {(tmp / 'sshd.log').read_text().strip()[-300:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if time.time() > deadline:
                proc.kill()
                pytest.fail("sshd did not start listening within 10 s")
            time.sleep(0.1)
    known = tmp / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {(tmp / 'ssh_host_ed25519_key.pub').read_text().split(' device')[0]}\n")
    return SshServer(port=port, identity=identity, known_hosts=known, host_pub=tmp / "ssh_host_ed25519_key.pub",
                     dir=tmp, proc=proc, log=log)


def stop_sshd(server: SshServer) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
    server.log.close()




@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield s
    stop_sshd(s)


@pytest.fixture
def board(tmp_path):
    """The board's deploy folder (absolute, so nothing lands in the test user's home)."""
    return tmp_path / "board"


def board_args(server, board, python=sys.executable):
    return ["--host", server.host, *server.ssh_args(), "--python", python, "--remote-dir", board]


def current(board: Path) -> str:
    return os.readlink(board / "current")


def run_on_board(server, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(ssh.ssh_argv(ssh.parse_target(server.host), ssh.SshOptions(
        identity=str(server.identity), known_hosts=str(server.known_hosts)), command),
        capture_output=True, text=True, timeout=120)


def test_deploy_remote_run_and_redeploy(server, board, bundle, tmp_path):
    proc = bench("deploy", bundle, *board_args(server, board))
    assert proc.returncode == 0, proc.stderr
    link = current(board)
    release = board / link
    assert link.startswith("releases/tiny-slim-") and release.is_dir()
    manifest = json.loads((bundle / "manifest.json").read_text())
    for entry in manifest["artifacts"].values():  # the bundle arrived intact
        assert (release / "bundle" / entry["file"]).read_bytes() == (bundle / entry["file"]).read_bytes()
    assert (release / "code" / "runtime" / "__init__.py").is_file()
    assert (release / "code" / "device_bench" / "_worker.py").is_file()
    assert "verified" in proc.stderr and "uploading" in proc.stderr

    # the board can run the bundle through `current` with the shipped code only
    check = run_on_board(server, f"cd {shlex.quote(str(board / 'current' / 'code'))} && "
                                 f"{shlex.quote(sys.executable)} -m runtime verify ../bundle")
    assert check.returncode == 0, check.stdout + check.stderr

    # remote = deploy (already there: verified, not re-sent) + run on the board + fetch
    out = tmp_path / "reports" / "board.json"
    proc = bench("remote", bundle, *board_args(server, board), *RUN_FAST, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "already on the board" in proc.stderr and "uploading" not in proc.stderr
    report = json.loads(out.read_text())
    assert report["remote"]["host"] == server.host and report["remote"]["release"] == link.split("/")[1]
    assert [(r["format"], r["status"], r["runs"]) for r in report["results"]] == [("tflite", "ok", 5)]
    assert report["bundle"]["manifest_sha256"] == read_bundle(str(bundle)).manifest_sha256
    assert (release / "reports").is_dir() and len(list((release / "reports").glob("*.json"))) == 1

    # a new version of the bundle: a new release, `current` moves, the old one is kept
    v2 = tmp_path / "dist" / "tiny-slim"
    shutil.copytree(bundle, v2)
    manifest["created"] = "2026-11-26T00:00:00Z"
    (v2 / "manifest.json").write_text(json.dumps(manifest))
    proc = bench("deploy", v2, *board_args(server, board))
    assert proc.returncode == 0, proc.stderr
    assert current(board) != link and (board / link).is_dir()
    assert sorted(p.name for p in (board / "releases").iterdir()) == sorted([link.split("/")[1],
                                                                            current(board).split("/")[1]])


def second_release(bundle, tmp_path):
    """A release of the same files under another bundle name: a new version to deploy over the first."""
    v2 = tmp_path / "v2"
    shutil.copytree(bundle, v2)
    manifest = json.loads((v2 / "manifest.json").read_text())
    manifest["name"] = "tiny-slim-v2"
    (v2 / "manifest.json").write_text(json.dumps(manifest))
    return dep.build_release(read_bundle(str(v2)))


def test_cut_off_upload_leaves_previous_release_running(server, board, bundle, tmp_path):
    proc = bench("deploy", bundle, *board_args(server, board))
    assert proc.returncode == 0, proc.stderr
    before = current(board)

    release = second_release(bundle, tmp_path)

    def upload_half(pipe):  # the connection drops halfway through the tar stream
        import io

        buf = io.BytesIO()
        release.stream_to(buf)
        pipe.write(buf.getvalue()[: len(buf.getvalue()) // 2])

    target = ssh.parse_target(server.host)
    opts = ssh.SshOptions(identity=str(server.identity), known_hosts=str(server.known_hosts))
    cfg = dep.BoardConfig(python=sys.executable, remote_dir=str(board))
    with pytest.raises(BenchError, match="cut off"):
        dep.board_call(target, opts, cfg, "install", [release.name, release.checksums_sha, "3"],
                       stdin_writer=upload_half)
    assert current(board) == before
    assert [p.name for p in (board / "releases").iterdir()] == [before.split("/")[1]]  # no half release left
    # and the previous version still runs from `current`
    check = run_on_board(server, f"cd {shlex.quote(str(board / 'current' / 'code'))} && "
                                 f"{shlex.quote(sys.executable)} -m device_bench run ../bundle "
                                 + " ".join(RUN_FAST) + f" --out {shlex.quote(str(tmp_path / 'after.json'))}")
    assert check.returncode == 0, check.stderr
    assert json.loads((tmp_path / "after.json").read_text())["results"][0]["status"] == "ok"


def test_killed_transfer_leaves_previous_release_running(server, board, bundle, tmp_path):
    """The host side dies mid-upload (Ctrl-C, laptop lid, network): the board throws the partial
    release away and `current` is untouched."""
    proc = bench("deploy", bundle, *board_args(server, board))
    assert proc.returncode == 0, proc.stderr
    before = current(board)
    release = second_release(bundle, tmp_path)
    import io

    buf = io.BytesIO()
    release.stream_to(buf)
    cfg = dep.BoardConfig(python=sys.executable, remote_dir=str(board))
    command = " ".join([dep.python_word(cfg), "-c", shlex.quote(Path(dep._board.__file__).read_text()), "install",
                        dep.remote_path(cfg.remote_dir), release.name, release.checksums_sha, "3"])
    argv = ssh.ssh_argv(ssh.parse_target(server.host), ssh.SshOptions(
        identity=str(server.identity), known_hosts=str(server.known_hosts)), command)
    upload = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    upload.stdin.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    upload.stdin.flush()
    incoming = lambda: [p for p in (board / "releases").iterdir() if ".incoming-" in p.name]  # noqa: E731
    deadline = time.time() + 30
    while not incoming() and time.time() < deadline:  # the board is receiving
        time.sleep(0.05)
    assert incoming()
    upload.kill()
    upload.wait()
    deadline = time.time() + 30
    while incoming() and time.time() < deadline:  # the board notices the cut and cleans up
        time.sleep(0.1)
    assert not incoming()
    assert current(board) == before
    assert [p.name for p in (board / "releases").iterdir()] == [before.split("/")[1]]


def test_damaged_release_on_the_board_is_replaced(server, board, bundle):
    proc = bench("deploy", bundle, *board_args(server, board))
    assert proc.returncode == 0, proc.stderr
    release = board / current(board)
    model = release / "bundle" / "model.tflite"
    good = model.read_bytes()
    model.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # bit rot on the SD card
    proc = bench("deploy", bundle, *board_args(server, board))
    assert proc.returncode == 0, proc.stderr
    assert "uploading" in proc.stderr  # not trusted, sent again
    assert (board / current(board) / "bundle" / "model.tflite").read_bytes() == good
    assert [p.name for p in (board / "releases").iterdir()] == [release.name]


def test_damaged_upload_is_refused(server, board, bundle):
    """Bytes changed in transit (not just cut off): the sha256 check on the board refuses them."""
    release = dep.build_release(read_bundle(str(bundle)))

    def tampered(pipe):
        import io

        buf = io.BytesIO()
        release.stream_to(buf)
        data = bytearray(buf.getvalue())
        at = data.find(b"TFL3")  # inside a model file's bytes
        data[at + 100] ^= 0xFF
        pipe.write(bytes(data))

    target = ssh.parse_target(server.host)
    opts = ssh.SshOptions(identity=str(server.identity), known_hosts=str(server.known_hosts))
    cfg = dep.BoardConfig(python=sys.executable, remote_dir=str(board))
    with pytest.raises(BenchError, match="does not match its sha256"):
        dep.board_call(target, opts, cfg, "install", [release.name, release.checksums_sha, "3"],
                       stdin_writer=tampered)
    assert not (board / "current").exists()
    assert list((board / "releases").iterdir()) == []


def test_fleet_with_an_unreachable_board(server, board, bundle, tmp_path):
    closed = free_port()
    hosts = tmp_path / "boards.txt"
    hosts.write_text(f"# the lab\n{server.host}\nroot@127.0.0.1:{closed}   # switched off\n")
    out = tmp_path / "fleet"
    proc = bench("remote", bundle, "--hosts", hosts, *server.ssh_args(), "--python", sys.executable,
                 "--remote-dir", board, *RUN_FAST, "--out", out)
    assert proc.returncode == 1
    summary = json.loads((out / "summary.json").read_text())
    status = {h["host"]: h for h in summary["hosts"]}
    assert summary["ok"] == 1 and summary["failed"] == 1
    assert status[server.host]["status"] == "ok"
    good = json.loads(Path(status[server.host]["report"]).read_text())
    assert good["results"][0]["status"] == "ok"
    bad = status[f"root@127.0.0.1:{closed}"]
    assert bad["status"] == "failed" and "unreachable" in bad["error"]
    assert f"127.0.0.1:{closed} is unreachable" in proc.stderr
    assert (out / f"{ssh.parse_target(server.host).slug}.log").read_text()


def test_wrong_host_key_is_refused_and_nothing_deployed(server, board, bundle, tmp_path):
    impostor = keygen(tmp_path / "other_host_key")
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{server.port} {Path(str(impostor) + '.pub').read_text().rsplit(' ', 1)[0]}\n")
    proc = bench("deploy", bundle, "--host", server.host, "--identity", server.identity,
                 "--known-hosts", known, "--python", sys.executable, "--remote-dir", board)
    assert proc.returncode == 1
    line = one_line_error(proc)
    assert "host key" in line and "does NOT match" in line and "nothing was sent" in line
    assert not board.exists()
    # --accept-new-host-key does not override a CHANGED key
    proc = bench("deploy", bundle, "--host", server.host, "--identity", server.identity, "--known-hosts", known,
                 "--accept-new-host-key", "--python", sys.executable, "--remote-dir", board)
    assert proc.returncode == 1 and not board.exists()


def test_unknown_host_key_needs_accept_new(server, board, bundle, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text("")
    args = ["--host", server.host, "--identity", server.identity, "--known-hosts", known,
            "--python", sys.executable, "--remote-dir", board]
    proc = bench("deploy", bundle, *args)
    assert proc.returncode == 1
    assert "--accept-new-host-key" in one_line_error(proc) and not board.exists()
    proc = bench("deploy", bundle, *args, "--accept-new-host-key")
    assert proc.returncode == 0, proc.stderr
    assert (board / "current").is_symlink()
    found = subprocess.run(["ssh-keygen", "-F", f"[127.0.0.1]:{server.port}", "-f", str(known)],
                           capture_output=True, text=True)  # the key was learned (maybe hashed)
    assert found.returncode == 0 and server.host_pub.read_text().split()[1] in found.stdout


def test_board_without_an_interpreter_gets_install_advice(server, board, bundle, tmp_path):
    bare = tmp_path / "bare-venv"
    venv.EnvBuilder(with_pip=False, system_site_packages=False).create(bare)
    python = bare / "bin" / "python"
    probe = subprocess.run([python, "-c", "import numpy"], capture_output=True)
    assert probe.returncode != 0  # the venv really has no numpy
    proc = bench("remote", bundle, *board_args(server, board, python=str(python)), *RUN_FAST,
                 "--out", tmp_path / "r.json")
    assert proc.returncode == 1
    line = one_line_error(proc)
    assert "no numpy and a TFLite/ONNX interpreter" in line
    assert f"{python} -m pip install numpy ai-edge-litert" in line and "ensurepip" in line  # no pip either
    assert not board.exists() and not (tmp_path / "r.json").exists()


def test_missing_board_python(server, board, bundle):
    proc = bench("deploy", bundle, *board_args(server, board, python="/nonexistent/python3"))
    assert proc.returncode == 1
    assert "no Python at '/nonexistent/python3'" in one_line_error(proc)
