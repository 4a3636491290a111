"""Starts and supervises the volunteer's Ray worker node (``ray start --block``).

All of Ray's inter-node gRPC goes through the agent's local CONNECT proxy (DESIGN §2:
RAY_grpc_enable_http_proxy=1 with grpc_proxy/no_grpc_proxy); the node advertises its virtual
address and binds only the ports of its block.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from koinon_gateway import event_loop
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .config import ENV_VARS

log = logging.getLogger(__name__)

_REGISTERED = b"NodeManager server started"


@dataclass
class RaySettings:
    ray_bin: str
    temp_dir: Path
    proxy_url: str
    num_cpus: int | None
    num_gpus: int
    gpu_memory_mib: int
    object_store_memory: int | None
    # CUDA_VISIBLE_DEVICES for Ray: the detected GPUs' ids, so that Ray hands out the devices the
    # gateway was told about (with a GPU skipped, Ray's own numbering 0..n-1 named the wrong ones).
    # None for simulated GPUs, which no CUDA device backs: Ray then numbers them itself.
    gpu_devices: tuple[str, ...] | None = None


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
    return env


class RayNode:
    def __init__(self, settings: RaySettings) -> None:
        self.settings = settings
        self.process: asyncio.subprocess.Process | None = None
        self._serving_node_id = ""
        self._started_at = 0.0

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self, assignment: pb.Assignment) -> None:
        self.settings.temp_dir.mkdir(parents=True, exist_ok=True)
        self._serving_node_id = ""
        self._started_at = time.time() - 1.0  # file times are coarser than this clock on some filesystems
        log_file = open(self.settings.temp_dir / "ray-start.log", "ab")  # noqa: SIM115 - owned by the child
        try:
            self.process = await asyncio.create_subprocess_exec(
                *ray_start_command(self.settings, assignment),
                env=ray_environment(self.settings, assignment),
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # our own process group, so stop() reaches all of it
            )
        finally:
            log_file.close()
        log.info("ray start (pid %d) joining %s as %s", self.process.pid, assignment.ray_address, assignment.address)

    def node_id(self) -> str:
        """The node id of this run's raylet once it is serving, else ""."""
        if not self.running:
            return ""
        if not self._serving_node_id:
            node_id = self._raylet_node_id()
            if node_id and self._raylet_serving(node_id):
                self._serving_node_id = node_id  # read the logs no more for this run
        return self._serving_node_id

    def raylet_alive(self) -> bool:
        """``ray start`` runs and, once the node served, the raylet it served with is still there."""
        if not self.running:
            return False
        if not self._serving_node_id:
            return True
        return self._raylet_node_id() == self._serving_node_id

    def _raylet_node_id(self) -> str:
        """The --node_id flag of the raylet this run's ``ray start`` spawned (Ray's own tools find
        raylets the same way)."""
        assert self.process is not None
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.process.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if child.name() != "raylet":
                        continue
                    for arg in child.cmdline():
                        if arg.startswith("--node_id="):
                            return arg.removeprefix("--node_id=")
        return ""

    def _raylet_serving(self, node_id: str) -> bool:
        # A raylet that joins a session whose logs already hold a raylet.out (a restart while the
        # head lives on) writes raylet.1.out, raylet.2.out, ...: look for this node id in each.
        # Only files written since this run started: an earlier raylet's log can be hundreds of MB.
        logs = self.settings.temp_dir / "session_latest" / "logs"
        marker = f"node_id={node_id}".encode()
        for path in logs.glob("raylet*.out"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < self._started_at:
                    continue
                text = path.read_bytes()
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
