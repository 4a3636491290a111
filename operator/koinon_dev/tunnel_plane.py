"""The local control plane's tunnel: a koinon gateway next to the Ray head, and volunteer agents that
reach the platform only through it.

When running as root, each agent runs in its own network namespace holding nothing but a loopback
interface: it has no route anywhere, and the gateway's unix socket (a path, visible across network
namespaces) is its only way out, as behind a home NAT that allows only outbound connections.
Because every unix socket path crosses network namespaces, the agent also gets its own view of
/tmp holding only that socket, the CA and its own directories (volunteer_sandbox): the head's Ray
sockets and the other volunteers' credentials are not there. It runs there as nobody, without
capabilities, with its own /dev and /proc and every host mount read-only.
Without root, agents run as plain processes; Ray's own traffic is still forced through the tunnel
(Ray's gRPC goes to the agent's local proxy, which only knows the gateway), but nothing confines the
job code Ray runs there: a task can connect to the head or read local files like any process.
Where the host allows it (volunteer_sandbox.processes_of_their_own), such a volunteer still gets
its own processes (``volunteer_sandbox --processes-only``): a Ray driver picks its node among the
raylets whose processes it sees, the head's first, so a job's driver on a plain volunteer attached
to the head's raylet (and ran there, and so did the tasks that raylet could take).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from koinon_dev.claims import claim, hold
from koinon_dev.processes import ManagedProcess, deferred_signals, wait_until
from koinon_dev.ray_cluster import LocalRayHead, shell_environment_for_ray

PORT_BLOCK_SIZE = 40
# Volunteers of one control plane at once: the gateway claims this many port blocks (the N-th
# volunteer gets the N-th block; beyond them lie other control planes' ports).
MAX_VOLUNTEERS = 16


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def netns_available() -> bool:
    """Root with a working `ip netns` (checked by creating and deleting a probe namespace)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"kprobe-{secrets.token_hex(3)}"
    with deferred_signals():  # a SIGTERM between add and del must not leave the probe behind
        if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
            return False
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return True


def create_netns(name: str) -> None:
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True, capture_output=True)


def delete_netns(name: str) -> None:
    """Kills whatever still runs in the namespace, then deletes it. Ray's helpers (dashboard agent,
    runtime env agent, workers) do not always exit with their raylet, and a process left inside
    would keep the (then nameless) namespace alive."""
    listed = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    for pid in listed.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


@dataclass
class LocalGateway:
    head: LocalRayHead
    work_dir: Path
    log_dir: Path
    kubeconfig: Path
    namespace: str = "koinon-system"
    heartbeat_timeout: float = 6.0
    process: ManagedProcess | None = None
    agent_target: str = ""
    head_proxy_url: str = ""
    ca_path: str = ""
    admin_url: str = ""

    def socket_dir(self) -> Path:
        """The gateway's socket lives in a directory of its own: volunteers' sandboxes expose the
        directory (a restarted gateway makes a new socket file, which a bind of the file would miss)."""
        directory = self.work_dir / "gateway-socket"
        directory.mkdir(exist_ok=True)
        directory.chmod(0o755)  # whatever the umask: sandboxed volunteers (nobody) pass through it
        return directory

    def head_ports_spec(self) -> str:
        """Ports of the head that volunteers may reach (besides its GCS): nothing else. Not its
        dashboard agent: Ray dials a node's agent only from the head (see the gateway manifest)."""
        ports = self.head.ports
        return f"{ports.node_manager},{ports.object_manager},{ports.min_worker}-{ports.max_worker}"

    def start(self) -> None:
        ready = self.work_dir / "gateway.ready"
        # The volunteers' port blocks: in network namespaces they never meet the host's ports;
        # as plain processes they must be free on the host when the control plane starts.
        # Claimed across the control planes of this host (claims.py): a bind probe alone would
        # hand out ports another control plane's volunteers hold but do not bind yet.
        taken = claim(self.work_dir, PORT_BLOCK_SIZE * MAX_VOLUNTEERS, low=30000, high=32700)
        low, octet = taken.port_low, taken.vip_octet
        argv = [
            _bin("koinon-gateway"),
            f"--listen=unix:{self.socket_dir()}/gw.sock",
            "--head-proxy-listen=127.0.0.1:0",
            "--admin-listen=127.0.0.1:0",
            f"--head-address={self.head.address}",
            f"--head-gcs-port={self.head.gcs_port}",
            f"--head-ports={self.head_ports_spec()}",
            f"--vip-cidr=127.{octet}.0.0/24",
            f"--port-base={low}",
            f"--port-block-size={PORT_BLOCK_SIZE}",
            "--heartbeat-interval=1",
            f"--heartbeat-timeout={self.heartbeat_timeout}",
            # Join tokens, the CA and VolunteerNodes live in the Kubernetes API, as in a cluster.
            "--store=kube",
            f"--kubeconfig={self.kubeconfig}",
            f"--namespace={self.namespace}",
            f"--state-dir={self.work_dir}/gateway-state",
            f"--ready-file={ready}",
        ]
        if self.head.auth_token:
            token_file = self.work_dir / "ray-auth-token"
            token_file.touch(mode=0o600)
            token_file.write_text(self.head.auth_token)
            argv.append(f"--ray-auth-token-file={token_file}")
        self.process = ManagedProcess("gateway", argv, self.log_dir / "gateway.log")
        self.process.start()
        hold(self.work_dir, self.process.pid)  # the claim lasts as long as the gateway runs

        def serving() -> bool:
            if self.process is not None and not self.process.alive():
                raise RuntimeError(f"gateway exited:\n{self.process.log_tail()}")
            return ready.exists() and len(ready.read_text().splitlines()) == 4

        wait_until(serving, 30, what="the gateway")
        self.agent_target, self.head_proxy_url, self.ca_path, self.admin_url = ready.read_text().splitlines()

    def create_join_token(self, owner: str, ttl: str = "1h") -> str:
        """A single-use join token for one volunteer of ``owner`` (printed once by the token CLI)."""
        completed = subprocess.run(
            [_bin("koinon-gateway"), "token", f"--kubeconfig={self.kubeconfig}", f"--namespace={self.namespace}",
             "create", f"--owner={owner}", f"--ttl={ttl}", "--usage-limit=1"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if completed.returncode != 0:
            raise RuntimeError(f"creating a join token failed: {completed.stderr.strip()}")
        return completed.stdout.strip().splitlines()[-1]

    def head_environment(self) -> dict[str, str]:
        """Ray's gRPC from the head to volunteers goes through the gateway's CONNECT proxy."""
        return {
            "RAY_grpc_enable_http_proxy": "1",
            "grpc_proxy": self.head_proxy_url,
            "no_grpc_proxy": f"{self.head.address},127.0.0.1,localhost",
        }


@dataclass
class LocalAgent:
    """A volunteer: `koinon-agent join` with simulated GPUs, in its own network namespace if possible."""

    name: str
    gateway: LocalGateway
    join_token: str = field(repr=False)
    log_dir: Path
    gpus: int = 2
    gpu_memory_mib: int = 16384
    cpus: int = 2
    netns: str | None = None
    # Without a network namespace: its own PID namespace and /proc all the same (see the module's
    # docstring), so that a job's driver finds this volunteer's raylet, not the head's.
    own_processes: bool = False
    # Directories outside /tmp a volunteer in a namespace must not see (the control plane's state).
    hide: tuple[Path, ...] = ()
    extra_env: dict[str, str] = field(default_factory=dict)
    process: ManagedProcess | None = None

    def start(self) -> None:
        work_dir = self.gateway.work_dir
        argv = [
            _bin("koinon-agent"), "join",
            f"--gateway={self.gateway.agent_target}",
            f"--ca-file={self.gateway.ca_path}",
            f"--state-dir={work_dir}/agent-{self.name}",
            f"--temp-dir={work_dir}/ray-{self.name}",
            f"--node-name={self.name}",
            "--region=local",
            f"--num-cpus={self.cpus}",
            f"--simulate-gpus={self.gpus}",
            f"--simulate-gpu-memory={self.gpu_memory_mib}",
            f"--ray-bin={_bin('ray')}",
            "--object-store-memory=300000000",
            "--drain-grace=5",
        ]  # fmt: skip
        if self.netns:
            create_netns(self.netns)
            argv = ["ip", "netns", "exec", self.netns, *self._sandbox(), *argv]
        elif self.own_processes:
            argv = [sys.executable, "-m", "koinon_dev.volunteer_sandbox", "--processes-only", "--", *argv]
        # The join token goes through the environment, not argv (argv is visible to every user).
        env = {**shell_environment_for_ray(os.environ), "KOINON_TOKEN": self.join_token, **self.extra_env}
        self.process = ManagedProcess(f"agent-{self.name}", argv, self.log_dir / f"agent-{self.name}.log", env)
        self.process.start()

    def _sandbox(self) -> list[str]:
        """The volunteer_sandbox prefix: of /tmp the volunteer sees only the gateway's socket, the
        CA and its own directories (unix socket paths cross network namespaces; see that module)."""
        work_dir = self.gateway.work_dir
        own = [work_dir / f"agent-{self.name}", work_dir / f"ray-{self.name}"]
        for directory in own:
            directory.mkdir(mode=0o700, exist_ok=True)
        shared = [str(self.gateway.socket_dir()), self.gateway.ca_path]  # every volunteer's: read-only
        return [
            sys.executable, "-m", "koinon_dev.volunteer_sandbox",
            *(f"--expose-ro={path}" for path in shared),
            *(f"--expose={path}" for path in own),
            *(f"--hide={path}" for path in self.hide),
            "--",
        ]  # fmt: skip

    def node_name(self) -> str | None:
        """The name the gateway gave this volunteer (its VolunteerNode), once it has joined."""
        identity = self.gateway.work_dir / f"agent-{self.name}" / "identity.json"
        if not identity.exists():
            return None
        name = json.loads(identity.read_text()).get("node_name")
        return str(name) if name else None

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(grace_seconds=10)
        if self.netns:
            with contextlib.suppress(OSError):
                delete_netns(self.netns)
