"""Talking to a board with the system's OpenSSH client, safely.

Local side: subprocess argument lists only. Far side: ssh joins the remote words into ONE shell
command line, so every word we send is shlex.quote'd here; host strings and paths are validated
before they get near a command line. Host keys are always checked (BatchMode, no prompts):
StrictHostKeyChecking=yes, or accept-new when the user says the board is new.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import threading
from dataclasses import dataclass
from typing import IO, Callable, List, Optional, Sequence

from .errors import FAILED, BenchError

_NAME = r"[A-Za-z0-9_][A-Za-z0-9._-]*"
_USER = re.compile(rf"^{_NAME}$")
_HOST = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")
_IPV6 = re.compile(r"^[0-9A-Fa-f:.]+$")


@dataclass(frozen=True)
class Target:
    """One board: [user@]host[:port]."""

    host: str
    user: Optional[str] = None
    port: int = 22

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    @property
    def label(self) -> str:
        """How reports and logs name the board."""
        return self.destination + (f":{self.port}" if self.port != 22 else "")

    @property
    def slug(self) -> str:
        """A file-name-safe label."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.label.replace("@", "_at_").replace(":", "_p"))


def parse_target(spec: str, default_port: int = 22) -> Target:
    """'pi@raspberrypi.local', 'board', 'pi@10.0.0.7:2222', 'pi@[fe80::1]:22' -> Target.
    Anything an ssh command line could mistake for an option or a shell word is refused."""
    text = spec.strip()
    if not text or text.startswith("-") or any(c.isspace() for c in text):
        raise BenchError(f"bad host {spec!r}: expected [user@]host[:port]")
    user, at, rest = text.rpartition("@")
    if at and not user:
        raise BenchError(f"bad host {spec!r}: empty user name before '@'")
    port = default_port
    if rest.startswith("["):  # [ipv6]:port
        host, _, tail = rest[1:].partition("]")
        if not _IPV6.match(host) or (tail and not re.match(r"^:\d+$", tail)):
            raise BenchError(f"bad host {spec!r}: expected [user@][ipv6]:port")
        if tail:
            port = int(tail[1:])
    else:
        host, sep, port_text = rest.partition(":")
        if sep:
            if not port_text.isdigit():
                raise BenchError(f"bad host {spec!r}: port {port_text!r} is not a number")
            port = int(port_text)
        if not _HOST.match(host):
            raise BenchError(f"bad host {spec!r}: {host!r} is not a host name or address")
    if user and not _USER.match(user):
        raise BenchError(f"bad host {spec!r}: {user!r} is not a user name")
    if not 1 <= port <= 65535:
        raise BenchError(f"bad host {spec!r}: port {port} is out of range")
    return Target(host=host, user=user or None, port=port)


def read_hosts_file(path: str, default_port: int = 22) -> List[Target]:
    """One [user@]host[:port] per line; blank lines and # comments ignored."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"cannot read hosts file {path}: {getattr(e, 'strerror', None) or e}") from None
    targets = []
    for n, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            targets.append(parse_target(text, default_port))
        except BenchError as e:
            raise BenchError(f"{path}:{n}: {e}") from None
    if not targets:
        raise BenchError(f"hosts file {path} names no host")
    labels = [t.label for t in targets]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise BenchError(f"hosts file {path} names {dup[0]} twice")
    return targets


def _ssh_path_option(value: str, what: str) -> str:
    """A local file for an ssh -o/-i option: absolute, existing, no characters ssh would expand."""
    path = os.path.abspath(os.path.expanduser(value))
    if "%" in path or '"' in path or any(c.isspace() for c in path):
        raise BenchError(f"{what} path {value!r} has a space, quote or %, which ssh would misread")
    return path


@dataclass(frozen=True)
class SshOptions:
    identity: Optional[str] = None
    known_hosts: Optional[str] = None
    accept_new_host_key: bool = False
    connect_timeout: int = 10

    def checked(self) -> SshOptions:
        identity = known = None
        if self.identity:
            identity = _ssh_path_option(self.identity, "--identity")
            if not os.path.isfile(identity):
                raise BenchError(f"identity file not found: {self.identity}")
        if self.known_hosts:
            known = _ssh_path_option(self.known_hosts, "--known-hosts")
            if not os.path.isfile(known) and not self.accept_new_host_key:
                raise BenchError(f"known_hosts file not found: {self.known_hosts} "
                                 "(pass --accept-new-host-key to create it on first contact)")
        if shutil.which("ssh") is None:
            raise BenchError("the ssh client is not installed (apt-get install openssh-client)")
        return SshOptions(identity, known, self.accept_new_host_key, self.connect_timeout)


def quote_command(words: Sequence[str]) -> str:
    """Words -> one remote shell command line, each word quoted."""
    return " ".join(shlex.quote(w) for w in words)


def ssh_argv(target: Target, opts: SshOptions, remote_command: str) -> List[str]:
    argv = ["ssh", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=" + ("accept-new" if opts.accept_new_host_key else "yes"),
            "-o", f"ConnectTimeout={opts.connect_timeout}",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
            "-p", str(target.port)]
    if opts.identity:
        argv += ["-i", opts.identity, "-o", "IdentitiesOnly=yes"]
    if opts.known_hosts:
        argv += ["-o", "UserKnownHostsFile=" + opts.known_hosts]
    return argv + ["--", target.destination, remote_command]


def explain_ssh_failure(target: Target, opts: SshOptions, stderr: str) -> str:
    """ssh's exit status 255 means ssh itself failed: say which way, in one line."""
    text = stderr.lower()
    where = f" in {opts.known_hosts}" if opts.known_hosts else ""
    if "remote host identification has changed" in text or "host key for" in text and "has changed" in text:
        return (f"{target.label}: the board's host key does NOT match the one{where} in known_hosts; "
                "nothing was sent. If the board was re-imaged, remove the old key "
                f"(ssh-keygen -R {target.host}) and connect again; otherwise suspect an impostor")
    if "host key verification failed" in text or "no matching host key" in text:
        hint = "" if opts.accept_new_host_key else "; if the board is new, pass --accept-new-host-key"
        return (f"{target.label}: host key verification failed (the key is unknown or does not match "
                f"known_hosts{where}); nothing was sent{hint}")
    if "permission denied" in text:
        return (f"{target.label}: ssh login refused (no usable key: pass --identity KEY or add it to "
                "ssh-agent; password logins are off in batch mode)")
    for needle, why in (("connection refused", "connection refused"), ("timed out", "connection timed out"),
                        ("no route to host", "no route to host"),
                        ("could not resolve", "host name does not resolve"),
                        ("name or service not known", "host name does not resolve"),
                        ("network is unreachable", "network unreachable"),
                        ("connection closed", "connection closed by the board"),
                        ("connection reset", "connection reset")):
        if needle in text:
            return f"{target.label} is unreachable ({why})"
    last = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return f"{target.label}: ssh failed: {last[-1].strip() if last else 'no message'}"


def _pump(stream: IO[bytes], sink: Callable[[bytes], None]) -> None:
    for chunk in iter(lambda: stream.readline(), b""):
        sink(chunk)
    stream.close()


@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: str


def run(target: Target, opts: SshOptions, remote_command: str, *, stdin_writer=None,
        echo: Optional[Callable[[str], None]] = None, timeout: Optional[float] = None) -> Result:
    """Run one remote command. `stdin_writer(pipe)` streams input (e.g. a tar); `echo` sees the
    far side's stderr line by line as it comes (progress). ssh's own failures raise BenchError."""
    proc = subprocess.Popen(ssh_argv(target, opts, remote_command), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out: List[bytes] = []
    err: List[bytes] = []

    def on_err(line: bytes) -> None:
        err.append(line)
        if echo:
            echo(line.decode("utf-8", "replace").rstrip("\n"))

    threads = [threading.Thread(target=_pump, args=(proc.stdout, out.append), daemon=True),
               threading.Thread(target=_pump, args=(proc.stderr, on_err), daemon=True)]
    for t in threads:
        t.start()
    try:
        if stdin_writer is not None:
            try:
                stdin_writer(proc.stdin)
            except BrokenPipeError:
                pass  # the far side stopped reading; its exit status and stderr say why
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise BenchError(f"{target.label}: no answer within {timeout:.0f} s", exit_code=FAILED) from None
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        for t in threads:
            t.join(timeout=5)
    stderr = b"".join(err).decode("utf-8", "replace")
    if proc.returncode == 255:
        raise BenchError(explain_ssh_failure(target, opts, stderr), exit_code=FAILED)
    return Result(proc.returncode, b"".join(out), stderr)
