"""The emulated board running: the root's own sshd (aarch64, under qemu-user) on 127.0.0.1 at a free
port, with a host key and a client key made for this run.

    with EmulatedBoard(root, workdir) as board:
        board.host                      # "pi@127.0.0.1:PORT", for device_bench --host
        board.ssh_args()                # --identity KEY --known-hosts FILE
        board.run(["python3", "-V"])    # one command on the board (device_bench.ssh)

The client's private key and known_hosts stay in `workdir` on the host; inside the root only
/run/edgeslim-board (sshd_config, host key, authorized_keys) is written, and removed on exit.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import List, Optional

from device_bench import ssh

from .errors import BoardError
from .root import UID, USER, children, env_for, in_root, kill_namespace

RUN_DIR = "/run/edgeslim-board"  # inside the root
START_TIMEOUT = 120  # s: an emulated sshd takes a while to start and to answer its first key exchange


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path, comment: str) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True)
    return path


def processes_in(root: Path) -> List[int]:
    """Pids of the processes whose root directory is `root` (what runs inside the chroot)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "root") == str(root):
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile, or a kernel thread
                pass
    return found


class EmulatedBoard:
    def __init__(self, root: Path, workdir: Path):
        self.root, self.workdir = root.resolve(), workdir
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None
        self.identity = workdir / "id_ed25519"
        self.known_hosts = workdir / "known_hosts"
        self.log_path = workdir / "sshd.log"

    @property
    def host(self) -> str:
        return f"{USER}@127.0.0.1:{self.port}"

    def ssh_args(self) -> List[str]:
        return ["--identity", str(self.identity), "--known-hosts", str(self.known_hosts)]

    def target(self) -> ssh.Target:
        return ssh.parse_target(self.host)

    def options(self) -> ssh.SshOptions:
        return ssh.SshOptions(identity=str(self.identity), known_hosts=str(self.known_hosts),
                              connect_timeout=60).checked()

    def run(self, words: List[str], stdin_writer=None, timeout: float = 900) -> ssh.Result:
        """One command on the board, every word quoted (device_bench.ssh: argument lists locally)."""
        return ssh.run(self.target(), self.options(), ssh.quote_command(words), stdin_writer=stdin_writer,
                       timeout=timeout)

    # ------------------------------------------------------------------ start / stop

    def __enter__(self) -> EmulatedBoard:
        try:
            self._start()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stop()

    def _start(self) -> None:
        if processes_in(self.root):
            raise BoardError(f"processes are already running in {self.root} (pids "
                             f"{', '.join(map(str, processes_in(self.root)))}); stop them first")
        run_dir = self.root / RUN_DIR.lstrip("/")
        if run_dir.exists():
            for path in run_dir.iterdir():  # left by a run that was killed
                path.unlink()
        else:
            run_dir.mkdir(mode=0o755, parents=True)
        host_key = keygen(self.workdir / "ssh_host_ed25519_key", "edgeslim-emulated-board")
        keygen(self.identity, "edgeslim-board-run")
        for name in ("ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"):
            (run_dir / name).write_bytes((self.workdir / name).read_bytes())
        os.chmod(run_dir / "ssh_host_ed25519_key", 0o600)
        authorized = run_dir / "authorized_keys"
        authorized.write_bytes(Path(str(self.identity) + ".pub").read_bytes())
        os.chown(authorized, UID, UID)  # sshd reads it as the user, and insists it is theirs (or root's)
        os.chmod(authorized, 0o600)
        # sshd's privilege-separation child chroots into this empty folder; Debian's init script
        # would create it at boot, and there is no boot here.
        (self.root / "run" / "sshd").mkdir(mode=0o755, exist_ok=True)
        self.port = free_port()
        config = "\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {RUN_DIR}/ssh_host_ed25519_key",
            f"PidFile {RUN_DIR}/sshd.pid", f"AuthorizedKeysFile {RUN_DIR}/authorized_keys",
            f"AllowUsers {USER}", "PermitRootLogin no", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
            "UsePAM no",  # no PAM stack is configured for a boot that never happened
            "UseDNS no", "PrintMotd no", "X11Forwarding no", "LogLevel ERROR",
            "MaxStartups 20:30:60", "MaxSessions 20", ""])
        (run_dir / "sshd_config").write_text(config)
        self.known_hosts.write_text(
            f"[127.0.0.1]:{self.port} {' '.join(host_key.with_suffix('.pub').read_text().split()[:2])}\n")
        log = open(self.log_path, "w")  # noqa: SIM115 - the child keeps it; closed below
        try:
            # sshd -D: stays in the foreground as the pid namespace's first process, so stopping
            # `unshare` (our child, by its pid) ends sshd and every session it started.
            self.proc = subprocess.Popen(
                in_root(self.root, ["/usr/sbin/sshd", "-D", "-e", "-f", f"{RUN_DIR}/sshd_config"]),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env_for("/root"))
        finally:
            log.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Until sshd sends its banner (listening is not enough: it must have started under qemu)."""
        deadline = time.time() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise BoardError(f"the board's sshd exited ({self.proc.returncode}): {self._log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    s.settimeout(30)
                    if s.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            if time.time() > deadline:
                raise BoardError(f"the board's sshd did not answer within {START_TIMEOUT} s: {self._log_tail()}")
            time.sleep(0.5)

    def _log_tail(self) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text().splitlines() if ln.strip()]
        except OSError:
            lines = []
        return lines[-1] if lines else "no output"

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # unshare passes no SIGTERM on to its child: stop sshd (its child, by pid) and unshare
            # follows; failing that, kill the namespace.
            for pid in children(self.proc.pid):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                kill_namespace(self.proc)
        # The kernel ends a pid namespace with its first process; check rather than trust.
        deadline = time.time() + 20
        while processes_in(self.root) and time.time() < deadline:
            time.sleep(0.2)
        left = processes_in(self.root)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        run_dir = self.root / RUN_DIR.lstrip("/")
        if run_dir.is_dir():
            for path in run_dir.iterdir():
                path.unlink()
            run_dir.rmdir()
        if left:
            raise BoardError(f"processes {left} outlived the board's sshd and were killed")


def check_stopped(root: Path) -> None:
    """Nothing of the board is left on the host: no process inside the root, nothing mounted in it."""
    from .host import mounts_under

    if processes_in(root.resolve()):
        raise BoardError(f"processes still run in {root}: {processes_in(root.resolve())}")
    if mounts_under(root):
        raise BoardError(f"still mounted in {root}: {', '.join(map(str, mounts_under(root)))}")
