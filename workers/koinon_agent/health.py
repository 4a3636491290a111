"""The agent's health, written to its state dir and checked by ``koinon-agent health``.

A volunteer takes no inbound connections, so Kubernetes probes the agent with an exec probe that
reads this file instead of an HTTP endpoint: the agent rewrites it every few seconds from its event
loop, so a stale file means a stuck agent (liveness), and ``ready`` means connected to the gateway
with its Ray node serving (readiness: the pod shows READY 1/1 once the volunteer is in the pool).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import own_dir

FILE_NAME = "health.json"
WRITE_INTERVAL_S = 5.0


@dataclass(frozen=True)
class HealthReport:
    written_at: float  # Unix seconds
    connected: bool  # the control stream to the gateway is up
    ray_state: str  # "running", "starting", "stopped", "restarting" or "disabled" (--no-ray)
    node_name: str = ""

    @property
    def ready(self) -> bool:
        return self.connected and self.ray_state in ("running", "disabled")


def write(path: Path, report: HealthReport, state_dir: Path | None = None) -> None:
    """Writes ``report`` to ``path``. Its dir may be one that job code can write (the chart's
    /tmp): what it planted there must not fail every later write, and with it liveness, for good
    (own_dir: a file or symlink in the dir's place is replaced). The agent's ``state_dir`` (the
    default place) is the operator's, out of job code's reach, and may be a symlink on purpose:
    used as it is. Compared by name, not by where it leads: a symlink planted elsewhere that leads
    to the state dir is replaced like any other, never written through."""
    if state_dir is not None and os.path.abspath(path.parent) == os.path.abspath(state_dir):
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    else:
        dir_fd = own_dir.open_own_dir(path.parent, 0o700)
    try:
        _write_in(dir_fd, path, report)
    finally:
        os.close(dir_fd)


def _write_in(dir_fd: int, path: Path, report: HealthReport) -> None:
    # Everything relative to the dir's descriptor: a dir swapped for a symlink meanwhile is not
    # written through. A new file of a fresh name (O_EXCL), never a fixed one: a symlink planted
    # at a fixed name would have the agent write through it.
    tmp = f".{path.name}.{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(asdict(report)))
        try:
            os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # a probe never reads half a file
        except IsADirectoryError:
            # A dir planted at the report's name: every later write would fail. Moved aside (not
            # removed: renaming never follows what is in it), then the report takes its place.
            aside = f"{path.name}.moved-{time.time_ns()}"
            os.rename(path.name, aside, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def processes_started_at() -> float | None:
    """When PID 1 of the caller's PID namespace started (Unix seconds), None when /proc cannot
    say. In a container that is the container's start: a report written before it comes from a
    previous container whose state dir (a PVC, a hostPath, an emptyDir kept across a container
    restart) the new one inherited, and says nothing about the agent running now."""
    try:
        stat = Path("/proc/1/stat").read_text()
        # Field 22, counted after the command name, which may hold spaces and parentheses.
        start_ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
        boot = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime ")
        )
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def parse(data: object) -> HealthReport:
    """The report in a health file's JSON; ValueError saying what is wrong with one of another
    shape. The file may sit where job code of the agent's user can write (the chart's /tmp): a
    written_at of NaN passed every age comparison (fresh for ever), one of another type raised."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - {"written_at", "connected", "ray_state", "node_name"})
    if unknown:
        raise ValueError(f"unknown fields {_brief(unknown)}")
    written_at = data.get("written_at")
    seconds = math.nan
    if isinstance(written_at, int | float) and not isinstance(written_at, bool):  # a bool is no time
        with contextlib.suppress(OverflowError):  # an int past a float's range
            seconds = float(written_at)
    if not math.isfinite(seconds):
        raise ValueError(f"written_at: expected a finite number of Unix seconds, got {_brief(written_at)}")
    connected = data.get("connected")
    if not isinstance(connected, bool):
        raise ValueError(f"connected: expected true or false, got {_brief(connected)}")
    ray_state, node_name = data.get("ray_state"), data.get("node_name", "")
    if not isinstance(ray_state, str):
        raise ValueError(f"ray_state: expected a string, got {_brief(ray_state)}")
    if not isinstance(node_name, str):
        raise ValueError(f"node_name: expected a string, got {_brief(node_name)}")
    return HealthReport(seconds, connected, ray_state, node_name)


def _brief(value: object) -> str:
    """A value from the file, shown in a probe's one line: cut short (whoever wrote it chose its size)."""
    try:
        text = repr(value)
    except ValueError:  # an int of more digits than Python converts to text
        text = f"an int of over {sys.get_int_max_str_digits()} digits"
    return text if len(text) <= 60 else text[:60] + "..."


def check(
    path: Path,
    max_age_s: float,
    need_ready: bool,
    now: float | None = None,
    started_at: float | None = None,
) -> tuple[bool, str]:
    """(healthy, a line saying why) for the agent that writes the report at ``path``. ``started_at``:
    when the caller's container started (processes_started_at()); an older report is not this agent's."""
    try:
        report = parse(json.loads(path.read_text()))
    except FileNotFoundError:
        return False, f"{path}: no health report yet (agent not started, or another --state-dir/--health-file)"
    except (ValueError, TypeError, RecursionError, OSError) as exc:  # RecursionError: JSON nested too deep
        return False, f"{path}: unreadable health report ({exc})"
    # btime is whole seconds: allow one, so that the running agent's own report is never refused.
    if started_at is not None and report.written_at < started_at - 1.0:
        return False, f"{path}: health report of a previous container (written before this one started)"
    age = (time.time() if now is None else now) - report.written_at
    if age < -max_age_s:
        return (
            False,
            f"{path}: health report written {-age:.0f}s in the future (clock stepped back, or not the agent's)",
        )
    if age > max_age_s:
        return False, f"agent stuck: last health report {age:.0f}s ago (more than {max_age_s:.0f}s)"
    summary = f"connected={report.connected} ray={report.ray_state} node={report.node_name or '-'}"
    if need_ready and not report.ready:
        return False, f"not ready: {summary}"
    return True, f"ok: {summary}"
