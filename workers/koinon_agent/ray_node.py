"""Starts and supervises the volunteer's Ray worker node (``ray start --block``).

All of Ray's inter-node gRPC goes through the agent's local CONNECT proxy (DESIGN §2:
RAY_grpc_enable_http_proxy=1 with grpc_proxy/no_grpc_proxy; the URL carries the proxy's secret,
which gRPC sends as Proxy-Authorization, and which only Ray's environment holds); the node advertises its virtual
address and binds only the ports of its block. It starts through ray_launch.py, which keeps Ray and
its jobs out of the agent's state dir and ties Ray's life to the agent's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from koinon_gateway import event_loop
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from . import own_dir, ray_launch
from .config import ENV_VARS

log = logging.getLogger(__name__)

_REGISTERED = b"NodeManager server started"


@dataclass
class RaySettings:
    ray_bin: str
    temp_dir: Path
    # Holds the local proxy's secret (LocalProxy.url): for Ray's environment only, never a repr.
    proxy_url: str = field(repr=False)
    num_cpus: int | None
    num_gpus: int
    gpu_memory_mib: int
    object_store_memory: int | None
    # CUDA_VISIBLE_DEVICES for Ray: the detected GPUs' ids, so that Ray hands out the devices the
    # gateway was told about (with a GPU skipped, Ray's own numbering 0..n-1 named the wrong ones).
    # None for simulated GPUs, which no CUDA device backs: Ray then numbers them itself.
    gpu_devices: tuple[str, ...] | None = None
    # The agent's state dir (the node credential): Ray and its jobs get no file access in it but
    # beneath temp_dir. None: not confined.
    state_dir: Path | None = None


def ray_start_command(settings: RaySettings, assignment: pb.Assignment) -> list[str]:
    ports = assignment.ports
    command = [
        settings.ray_bin,
        "start",
        "--block",
        f"--address={assignment.ray_address}",
        f"--node-ip-address={assignment.address}",
        # The operator maps Ray nodes to VolunteerNodes by this label.
        f"--labels=koinon.dev/node={assignment.node_name}",
        f"--node-manager-port={ports.node_manager_port}",
        f"--object-manager-port={ports.object_manager_port}",
        f"--dashboard-agent-grpc-port={ports.dashboard_agent_grpc_port}",
        f"--dashboard-agent-listen-port={ports.dashboard_agent_listen_port}",
        f"--metrics-export-port={ports.metrics_export_port}",
        f"--runtime-env-agent-port={ports.runtime_env_agent_port}",
        f"--min-worker-port={ports.min_worker_port}",
        f"--max-worker-port={ports.max_worker_port}",
        f"--temp-dir={settings.temp_dir}",
        f"--num-gpus={settings.num_gpus}",
        "--disable-usage-stats",
    ]
    if settings.num_cpus is not None:
        command.append(f"--num-cpus={settings.num_cpus}")
    if settings.object_store_memory is not None:
        command.append(f"--object-store-memory={settings.object_store_memory}")
    if settings.num_gpus:
        # Lets jobs ask for GPU memory as a custom resource (MiB per node).
        command.append(f'--resources={{"gpu_memory_mib": {settings.num_gpus * settings.gpu_memory_mib}}}')
    return command


# What of the gateway's Assignment a Ray node is started with (ray_start_command, ray_environment);
# the rest (heartbeat timing) can change under a running node.
RAY_ASSIGNMENT_FIELDS = ("node_name", "address", "ports", "ray_address", "ray_auth_token")


def ray_assignment_changes(started_with: pb.Assignment, now: pb.Assignment) -> list[str]:
    """The names (never the values: one is Ray's token) of what a Ray node was started with and
    the gateway's current assignment holds otherwise; [] when the node still fits it."""
    return [name for name in RAY_ASSIGNMENT_FIELDS if getattr(started_with, name) != getattr(now, name)]


def _unusable_when_confined(path: str, settings: RaySettings) -> bool:
    """The state dir, what is in it but Ray's temp dir, and the dirs above it: what is created in
    those once Ray runs is covered by no confinement rule, so neither Ray nor its jobs could use it."""
    if settings.state_dir is None:
        return False
    place = Path(os.path.realpath(path))
    state = Path(os.path.realpath(settings.state_dir))
    if place.is_relative_to(os.path.realpath(settings.temp_dir)):
        return False
    return state.is_relative_to(place) or place.is_relative_to(state)


def scratch_dirs(settings: RaySettings) -> dict[str, Path]:
    """TMPDIR and HOME for Ray in its temp dir where the agent's would be unusable to it (a state
    dir in /tmp or $HOME: the default ~/.koinon/agent)."""
    places = {"TMPDIR": tempfile.gettempdir(), "HOME": os.environ.get("HOME", "")}
    return {
        variable: settings.temp_dir / variable.lower()
        for variable, place in places.items()
        if place and _unusable_when_confined(place, settings)
    }


def ray_environment(settings: RaySettings, assignment: pb.Assignment) -> dict[str, str]:
    # Not the agent's own settings: the join token and the CA must not reach job code on this node.
    env = {name: value for name, value in os.environ.items() if name not in ENV_VARS}
    env.update(
        RAY_grpc_enable_http_proxy="1",
        grpc_proxy=settings.proxy_url,
        # Only the node's own address (and loopback services) bypass the tunnel.
        no_grpc_proxy=f"{assignment.address},127.0.0.1,localhost",
    )
    for variable in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env.pop(variable, None)
    if event_loop.GRPC_EXPERIMENTS_SET_HERE:
        env.pop("GRPC_EXPERIMENTS", None)  # the agent's own gRPC tuning, not Ray's
    if assignment.ray_auth_token:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=assignment.ray_auth_token)
    if settings.gpu_devices is None:
        env.pop("CUDA_VISIBLE_DEVICES", None)  # Ray refuses more GPUs than that list names
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(settings.gpu_devices)
    # Job drivers run `python ...` from PATH: make it the interpreter that has Ray (beside `ray`).
    # A bare name is looked up on PATH (abspath would have put the working directory first).
    ray_path = shutil.which(settings.ray_bin, path=env.get("PATH"))
    if ray_path is not None:
        env["PATH"] = f"{os.path.dirname(os.path.abspath(ray_path))}{os.pathsep}{env.get('PATH', '')}"
    env.update((variable, str(place)) for variable, place in scratch_dirs(settings).items())
    return env


@functools.cache
def _check_confinement(state_dir: Path) -> None:
    # Once per agent, not per start: each start's own warning goes only to its ray-start.log.
    abi = ray_launch.landlock_abi()
    if abi == 0:
        log.warning("%s", ray_launch.warning(str(state_dir), "this kernel has no Landlock"))
    elif abi == 1:
        log.warning("%s", ray_launch.warning(str(state_dir), "Landlock ABI 1 (Linux before 5.19) would break renames"))
    elif abi == 2:
        log.warning("Landlock ABI 2 (Linux before 6.2): job code can truncate (not read) the node credential")


class RayStartProcess:
    """``ray start``, spawned by the standard library (vfork and exec, no Python in the child) in a
    worker thread, not by the event loop: uvloop forks and runs Python's at-fork handlers in the
    child, whose other threads (gRPC's) may hold locks at that moment, and a child stuck before its
    exec kept the agent's event loop waiting for good (seen once: no heartbeat, no Ray, the node
    NotReady). The part of asyncio.subprocess.Process the agent uses. The launcher's parent-death
    signal follows the thread that spawned it: a thread of the loop's default executor, which
    lives as long as the agent's loop."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()  # reaps it once it has exited, as the event loop's watcher did

    def send_signal(self, signum: int) -> None:
        if self._popen.poll() is not None:
            raise ProcessLookupError(self._popen.pid)
        self._popen.send_signal(signum)

    async def wait(self) -> int:
        # Polled: a thread blocked in waitpid() would outlive every wait_for() that gives up on it.
        while (code := self._popen.poll()) is None:
            await asyncio.sleep(_WAIT_POLL_S)
        return code


_WAIT_POLL_S = 0.05


def _spawn(
    command: list[str], env: dict[str, str], cwd: Path | None, log_fd: int, keep_fd: int | None
) -> subprocess.Popen[bytes]:
    """``ray start`` through the launcher, in a worker thread; closes ``log_fd`` and ``keep_fd``
    (copies made for it) once the child has them."""
    try:
        return subprocess.Popen(
            command,
            env=env,
            cwd=cwd,
            stdout=log_fd,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # our own process group, so stop() reaches all of it
            pass_fds=(keep_fd,) if keep_fd is not None else (),
        )
    finally:
        os.close(log_fd)
        if keep_fd is not None:
            os.close(keep_fd)


def _stop_unwanted(spawn: asyncio.Future[subprocess.Popen[bytes]]) -> None:
    """Stops the ``ray start`` of a start() cancelled while it was being spawned."""
    if spawn.cancelled() or spawn.exception() is not None:
        return
    popen = spawn.result()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout=1)  # killed: reaped at once (else subprocess reaps it at its next spawn)


# Ray logs the node id and its registration within the first lines of raylet.out.
_LOG_HEAD_BYTES = 4 << 20


def _read_log_head(path: Path, since: float) -> bytes:
    """The start of a log file written since ``since``; b"" for anything else. Job code can create
    names in Ray's temp dir: a symlink is not followed, a FIFO not waited on (O_NONBLOCK), and a
    huge file costs at most the head read."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_mtime < since:
            return b""
        return os.read(fd, _LOG_HEAD_BYTES)
    finally:
        os.close(fd)


# What of ray start's output the agent's log quotes when a start fails: its last lines, bounded.
START_LOG_TAIL_BYTES = 2048
START_LOG_TAIL_LINES = 5
START_LOG_LINE_CHARS = 300


def read_start_log_tail(path: Path, since_offset: int = 0) -> list[str]:
    """The last few lines ``ray start`` wrote to ``path`` from ``since_offset`` on (this run's
    output: the file is appended to across runs), for the agent's own log; [] when there are none
    or it cannot be read. Job code can write in Ray's temp dir: the guards of _read_log_head (no
    symlink followed, no FIFO waited on, a regular file only), at most START_LOG_TAIL_BYTES read,
    and every character that is not printable (terminal escapes, a forged newline) shown as "?"."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return []
        # A file smaller than the offset was replaced since the start: all of it is this run's.
        first = since_offset if info.st_size >= since_offset else 0
        start = max(first, info.st_size - START_LOG_TAIL_BYTES)
        data = os.pread(fd, START_LOG_TAIL_BYTES, start)
    except OSError:
        return []
    finally:
        os.close(fd)
    lines = data.decode("utf-8", errors="replace").splitlines()
    if start > first:
        lines = lines[1:]  # the byte bound cut the first one short
    shown = ["".join(c if c.isprintable() else "?" for c in line.strip())[:START_LOG_LINE_CHARS] for line in lines]
    return [line for line in shown if line][-START_LOG_TAIL_LINES:]


def _open_start_log(dir_fd: int, name: str) -> int:
    """A descriptor appending to ``ray start``'s log ``name`` in Ray's temp dir (``dir_fd``, in
    which every name below is taken: a temp dir swapped for a symlink meanwhile is not followed),
    a regular file whatever job code put there.

    Job code can create names in Ray's temp dir. A symlink (to ../identity.json, say) is not
    followed (O_NOFOLLOW); a FIFO must not block the event loop in open(2) (O_NONBLOCK: with no
    reader open(2) fails ENXIO, with one it is seen by fstat); a directory is moved aside; a file
    made unwritable is replaced. Each is
    replaced by a new file: a Ray restarted after it would otherwise never start again (the emptyDir
    behind the chart's temp dir outlives container restarts).
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        # EACCES/EPERM: a file job code made unwritable (chmod 000); the dir is the agent's to unlink in.
        if exc.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.EACCES, errno.EPERM):
            raise
        fd = -1
    if fd >= 0 and stat.S_ISREG(os.fstat(fd).st_mode):
        os.set_blocking(fd, True)
        return fd
    if fd >= 0:
        os.close(fd)
    if stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
        os.rename(name, f"{name}.moved-{time.time_ns()}", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)
    fd = os.open(name, flags | os.O_EXCL, 0o600, dir_fd=dir_fd)
    os.set_blocking(fd, True)
    return fd


class RayNode:
    def __init__(self, settings: RaySettings) -> None:
        self.settings = settings
        self.process: RayStartProcess | None = None
        self._serving_node_id = ""
        self._raylet: psutil.Process | None = None  # the serving raylet's process, once found
        self._started_at = 0.0
        # The assignment this node was last started with (a copy); see ray_assignment_changes.
        self.started_with: pb.Assignment | None = None
        self._start_log_offset = 0  # the size of ray-start.log when this run began writing to it

    @property
    def start_log(self) -> Path:
        """Where ``ray start``'s stdout and stderr go (appended to, run after run)."""
        return self.settings.temp_dir / "ray-start.log"

    def start_log_tail(self) -> list[str]:
        """The last lines this run of ``ray start`` wrote (read_start_log_tail)."""
        return read_start_log_tail(self.start_log, self._start_log_offset)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self, assignment: pb.Assignment) -> None:
        settings = self.settings
        self.started_with = pb.Assignment()
        self.started_with.CopyFrom(assignment)
        # Job code can replace the temp dir (the chart's /tmp/ray) by a file or a symlink before it
        # kills its raylet: a real dir of the agent's takes its place again, or no Ray would ever
        # start again (that emptyDir outlives container restarts). Mode 0o777: the umask decides,
        # as it did for the mkdir before.
        temp_fd = own_dir.open_own_dir(settings.temp_dir, 0o777)
        try:
            await self._start(assignment, temp_fd)
        finally:
            os.close(temp_fd)

    async def _start(self, assignment: pb.Assignment, temp_fd: int) -> None:
        settings = self.settings
        for place in scratch_dirs(settings).values():
            # Before Ray runs: made later, it could not use them. Job code can plant there too.
            os.close(own_dir.open_own_dir_at(temp_fd, place.name, 0o700, place))
        env = ray_environment(settings, assignment)
        command = ray_start_command(settings, assignment)
        # Looked up here, as the launcher would: a missing binary is still an OSError of start().
        ray_path = shutil.which(command[0], path=env.get("PATH"))
        if ray_path is None:
            raise FileNotFoundError(errno.ENOENT, "no Ray executable", command[0])
        command[0] = os.path.abspath(ray_path)
        if settings.state_dir is not None:
            _check_confinement(settings.state_dir)
        # The launcher grants Ray's temp dir by this descriptor, of the dir start() checked, never
        # by its path: job code that outlived its Ray can swap the path (for a symlink to the
        # credential) at any moment. A swap then only leaves Ray without its temp dir (it fails and
        # is restarted, and the path is made a real dir again), never grants what the path leads to.
        confined = settings.state_dir is not None
        self._serving_node_id = ""
        self._raylet = None
        self._started_at = time.time() - 1.0  # file times are coarser than this clock on some filesystems
        log_fd = _open_start_log(temp_fd, self.start_log.name)
        try:
            self._start_log_offset = os.fstat(log_fd).st_size
            # The spawn's own copies of the descriptors (closed by it once Popen has them): a start()
            # cancelled meanwhile closes its own while the worker thread may still be in Popen.
            spawn_log_fd = os.dup(log_fd)
            spawn_temp_fd = os.dup(temp_fd) if confined else None
        finally:
            os.close(log_fd)
        command = ray_launch.launcher_command(os.getpid(), command, settings.state_dir, spawn_temp_fd)
        spawn = asyncio.ensure_future(
            asyncio.to_thread(
                _spawn,
                command,
                env,
                # Not a directory above the state dir: files a job makes there would be unusable.
                # A path: one swapped meanwhile gives Ray a working dir it has no access to, no grant.
                settings.temp_dir if _unusable_when_confined(os.getcwd(), settings) else None,
                spawn_log_fd,
                spawn_temp_fd,
            )
        )
        try:
            # The launcher execs `ray start`: this process is Ray's, pid and process group alike.
            popen = await asyncio.shield(spawn)
        except asyncio.CancelledError:
            # A thread cannot be cancelled: the spawn goes on, and what it starts is stopped once it
            # is there (a drain or a new assignment that came meanwhile must not leave a Ray running
            # that no one tracks, holding the node's ports).
            spawn.add_done_callback(_stop_unwanted)
            raise
        self.process = RayStartProcess(popen)
        log.info("ray start (pid %d) joining %s as %s", self.process.pid, assignment.ray_address, assignment.address)

    def node_id(self) -> str:
        """The node id of this run's raylet once it is serving, else ""."""
        if not self.running:
            return ""
        if not self._serving_node_id:
            node_id, raylet = self._find_raylet()
            if node_id and self._raylet_serving(node_id):
                self._serving_node_id = node_id  # read the logs no more for this run
                self._raylet = raylet
        return self._serving_node_id

    def raylet_alive(self) -> bool:
        """``ray start`` runs and, once the node served, the raylet it served with is still there.
        The raylet's process is checked, not found again: a scan of ``ray start``'s children can
        miss it while other children come and go."""
        if not self.running:
            return False
        if self._raylet is None:
            return True
        try:
            return self._raylet.is_running() and self._raylet.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
        except psutil.Error:  # AccessDenied and the like say nothing about its end
            return True

    def _find_raylet(self) -> tuple[str, psutil.Process | None]:
        """The --node_id flag of the raylet this run's ``ray start`` spawned (Ray's own tools find
        raylets the same way), and its process."""
        assert self.process is not None
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.process.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if child.name() != "raylet":
                        continue
                    for arg in child.cmdline():
                        if arg.startswith("--node_id="):
                            return arg.removeprefix("--node_id="), child
        return "", None

    def _raylet_serving(self, node_id: str) -> bool:
        # A raylet that joins a session whose logs already hold a raylet.out (a restart while the
        # head lives on) writes raylet.1.out, raylet.2.out, ...: look for this node id in each.
        # Only files written since this run started: an earlier raylet's log can be hundreds of MB.
        logs = self.settings.temp_dir / "session_latest" / "logs"
        marker = f"node_id={node_id}".encode()
        for path in logs.glob("raylet*.out"):
            with contextlib.suppress(OSError):
                text = _read_log_head(path, self._started_at)
                at = text.find(marker)
                if at >= 0 and text.find(_REGISTERED, at) >= 0:
                    return True
        return False

    def busy_workers(self) -> int:
        """Ray worker processes running a task (their process title is not ray::IDLE)."""
        if not self.running or self.process is None:
            return 0
        busy = 0
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.process.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    title = " ".join(child.cmdline())
                    if title.startswith("ray::") and not title.startswith(
                        ("ray::IDLE", "ray::RuntimeEnv", "ray::Dashboard")
                    ):
                        busy += 1
        return busy

    async def stop(self, timeout: float = 10.0) -> None:
        process = self.process
        if process is None:
            return
        tree: list[psutil.Process] = []
        # Once ``ray start`` has exited and been reaped, its PID may name someone else's process:
        # look it up only while it runs. Its process group (below) cannot be reused while any
        # member lives, so the group still reaches what it left behind.
        if process.returncode is None:
            with contextlib.suppress(psutil.Error):
                tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), timeout)
        # Whatever of this node is left (raylet, workers) goes too; only processes we started. When
        # ``ray start`` had already exited, its process group still names what it left behind.
        for proc in tree:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, TimeoutError):
            await asyncio.wait_for(process.wait(), 5)
        self.process = None
