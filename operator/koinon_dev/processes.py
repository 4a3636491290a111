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
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any


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
    stop_process_groups([pgid], grace_seconds)


def stop_process_groups(pgids: Sequence[int], grace_seconds: float) -> None:
    """``stop_process_group`` for several groups at once: all get TERM together and share one grace
    (volunteer agents drain for seconds each; one after the other would add up)."""
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
    left = list(pgids)
    deadline = time.monotonic() + grace_seconds
    while left and time.monotonic() < deadline:
        for pgid in left:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(-pgid, os.WNOHANG)
        left = [pgid for pgid in left if _group_alive(pgid)]
        if left:
            time.sleep(0.1)
    for pgid in left:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def boot_id() -> str:
    """This boot of the machine: pids and start times recorded under another one mean nothing now."""
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def process_start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, field 22 of /proc/PID/stat); None if it is gone.

    With the boot id, it tells a recorded process from a later one that was given the same pid."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19]) if fields[0] != "Z" else None  # fields[0] is field 3 (state)


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


def ports_free(start: int, length: int) -> bool:
    """Whether each port of ``start`` .. ``start + length - 1`` can be bound right now."""
    return all(_port_free(port) for port in range(start, start + length))


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


def _ancestors() -> set[int]:
    """This process and its parents: never killed, whatever they have open (a shell cd'd into a run)."""
    found, pid = set(), os.getpid()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return found


def _names(arg: str, path: str) -> bool:
    """Whether a command-line argument names ``path`` or something under it, alone or as a flag's
    value (``--temp-dir=PATH/x``): a bare substring test took ``ray-volunteer-10`` for ``ray-volunteer-1``."""
    value = arg.split("=", 1)[1] if arg.startswith("-") and "=" in arg else arg
    return value == path or value.startswith(path + "/")


def _uses(pid: int, path: str, env_marker: bytes | None) -> bool:
    """Whether ``pid`` names ``path`` in its command line, has a file under it open, or (with
    ``env_marker``, b"NAME=value") carries the marker in its environment."""
    proc = Path(f"/proc/{pid}")
    with contextlib.suppress(OSError):
        if any(_names(arg.decode(errors="replace"), path) for arg in (proc / "cmdline").read_bytes().split(b"\0")):
            return True
    with contextlib.suppress(OSError):
        for fd in os.listdir(proc / "fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(proc / "fd" / fd).removesuffix(" (deleted)")
                if target == path or target.startswith(path + "/"):
                    return True
    if env_marker is not None:
        with contextlib.suppress(OSError):
            if b"\0" + env_marker + b"\0" in b"\0" + (proc / "environ").read_bytes() + b"\0":
                return True
    return False


def kill_processes_using(path: Path, env_marker: str | None = None, rounds: int = 10) -> list[int]:
    """SIGKILL every process that uses ``path`` (a directory unique to one run; see ``_uses``), and
    the process group of each whose group leader is gone or uses it too. Returns the pids killed.

    This reaches what stopping the recorded process groups cannot: the Ray node a volunteer agent
    runs in a session of its own, once the agent is gone. Command lines alone miss most of it
    (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent`` and workers rewrite theirs), but every Ray
    process keeps its log files open under its node's temp dir, and inherits the environment marker.
    """
    target, marker = str(path), env_marker.encode() if env_marker else None
    spared, own_group = _ancestors(), os.getpgrp()
    killed: list[int] = []
    for _ in range(rounds):  # again: a process may fork while we look
        pids = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
        found = [
            pid
            for pid in pids
            if pid not in spared and process_start_time(pid) is not None and _uses(pid, target, marker)
        ]
        if not found:
            break
        for pid in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                group = os.getpgid(pid)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                # Its group too (members that closed their files), unless that is someone else's group.
                if group != own_group and group not in spared and (group in found or not _exists(group)):
                    os.killpg(group, signal.SIGKILL)
        time.sleep(0.1)
    return killed


def _exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


class TerminatedBySignal(BaseException):
    """SIGTERM or SIGHUP turned into an exception (like KeyboardInterrupt for Ctrl-C), so that the
    cleanup of whatever was interrupted runs; a BaseException so that no ``except Exception`` eats it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


_Handler = Callable[[int, FrameType | None], Any] | int


def _install(signums: Iterable[int], handler: _Handler) -> dict[int, _Handler]:
    previous: dict[int, _Handler] = {}
    for signum in signums:
        old = signal.signal(signum, handler)
        previous[signum] = old if old is not None else signal.SIG_DFL  # None: not set from Python
    return previous


def _restore(previous: Mapping[int, _Handler]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGHUP raise TerminatedBySignal in it (main thread only:
    Python delivers signals there), instead of killing the process before it could clean up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, _frame: FrameType | None) -> None:
        raise TerminatedBySignal(signum)

    previous = _install(TERMINATING_SIGNALS, terminate)
    try:
        yield
    finally:
        _restore(previous)


@contextlib.contextmanager
def deferred_signals(signums: Sequence[int] = (signal.SIGINT, *TERMINATING_SIGNALS)) -> Iterator[None]:
    """Hold ``signums`` back while the block runs, then deliver them as they would have been: for
    steps that must not be cut in half (a process started but not yet recorded, a cleanup)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = _install(signums, lambda signum, _frame: received.append(signum))
    try:
        yield
    finally:
        _restore(previous)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)


@contextlib.contextmanager
def cleanup_signals(notice: str) -> Iterator[None]:
    """For a cleanup that must not stop half-way: SIGTERM, SIGHUP and a first Ctrl-C are held back
    until the block is done, then delivered (as ``deferred_signals`` does), and the first one prints
    ``notice``. A second Ctrl-C raises KeyboardInterrupt in the block at once, for a user who will
    not wait; what was held back is then dropped (that exception already ends the program)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGINT and signal.SIGINT in received:
            raise KeyboardInterrupt
        if not received:
            print(notice, file=sys.stderr, flush=True)
        received.append(signum)

    # An ignored SIGINT stays ignored (`koinon dev down &` in a script): held, its second one would
    # abort the cleanup that the process was started not to be interrupted in.
    held = (
        TERMINATING_SIGNALS
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        else (signal.SIGINT, *TERMINATING_SIGNALS)
    )
    previous = _install(held, hold)
    try:
        yield
    except BaseException:
        _restore(previous)
        raise
    _restore(previous)
    for signum in dict.fromkeys(received):
        signal.raise_signal(signum)
