"""Start and stop the local control plane's child processes without leaving any behind.

Every child runs in its own session (process group), so stopping it also stops what it spawned
(Ray's raylet, GCS, dashboard workers...). Stop is TERM, a grace period, then KILL of the group.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ManagedProcess:
    """One child process group with its log file."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                list(self.argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(self.env) if self.env is not None else None,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, grace_seconds: float = 10.0) -> None:
        if self.popen is None:
            return
        stop_process_group(self.popen.pid, grace_seconds)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=1)

    def log_tail(self, max_bytes: int = 4000) -> str:
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return ""
        return data[-max_bytes:].decode(errors="replace")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A group whose members are all zombies still answers signal 0; treat it as gone once the
    # leader is reaped or a zombie.
    return _has_live_member(pgid)


def _has_live_member(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError, PermissionError):
            continue
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            return True
    return False


def stop_process_group(pgid: int, grace_seconds: float = 10.0) -> None:
    """TERM the whole group, wait up to ``grace_seconds``, then KILL whatever is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(-pgid, os.WNOHANG)
        if not _group_alive(pgid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


# Ports this process already handed out: the kernel may offer a just-released port again, and two
# Ray nodes given the same port would fail to bind only later, inside the raylet.
_handed_out: set[int] = set()


# Where single ports come from: below the kernel's ephemeral range (32768-60999 by default) and
# below the worker-port blocks (20000-32700). A port the kernel offers for bind(0) is an ephemeral
# one, and an outgoing connection (Ray's own, among others) may take it as its source port between
# the probe and Ray's bind: the Ray head then failed to start now and then ("address already in use").
SINGLE_PORTS = (10000, 20000)


def free_ports(count: int, host: str = "0.0.0.0") -> list[int]:
    """``count`` distinct TCP ports that are free now and were never handed out by this process.

    Ray binds several of its ports on the wildcard address, so the probe binds the wildcard too.
    """
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    chosen: list[int] = []
    attempts = 0
    while len(chosen) < count:
        attempts += 1
        if attempts > 2000:
            raise RuntimeError(f"no {count} free ports between {SINGLE_PORTS[0]} and {SINGLE_PORTS[1]}")
        port = rng.randrange(*SINGLE_PORTS)
        if port not in _handed_out and port not in chosen and _port_free(port, host):
            chosen.append(port)
    _handed_out.update(chosen)
    return chosen


def free_port_range(length: int, low: int = 20000, high: int = 30000, reserve: bool = True) -> tuple[int, int]:
    """A contiguous block of ``length`` ports that are free right now (Ray's worker port range).

    With ``reserve`` the block is never handed out again by this process; without it the block is
    only checked to be free now (for blocks that live as long as one control plane does)."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        start = rng.randrange(low, high - length)
        block = range(start, start + length)
        if not _handed_out.intersection(block) and all(_port_free(port) for port in block):
            if reserve:
                _handed_out.update(block)
            return start, start + length - 1
    raise RuntimeError(f"no free block of {length} ports between {low} and {high}")


def _port_free(port: int, host: str = "0.0.0.0") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.2, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def kill_processes_mentioning(marker: str) -> None:
    """SIGKILL every process whose command line contains ``marker`` (a path unique to one run)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command_line = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in command_line:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)
