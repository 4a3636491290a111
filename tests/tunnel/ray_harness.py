"""Processes for end-to-end tunnel tests and benchmarks: gateway, Ray head, agents in netns.

Each volunteer runs in its own network namespace holding only a loopback interface, so it has no
route to anything; the gateway's unix socket (a path, visible across network namespaces) is the
only way out. The head runs with --num-cpus=0 on a 127.x address and reaches volunteers through the
gateway's head-side CONNECT proxy.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")


def netns_available() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    name = f"kn-probe-{os.getpid()}"
    ok = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ok


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        for proc in [*root.children(recursive=True), root]:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)


def head_port_range() -> tuple[int, int]:
    """Where head port blocks come from: outside the kernel's ephemeral range (Ray's own outgoing
    connections take ephemeral source ports, and one landing in the block before Ray bound that port
    made the head fail to start now and then), and outside the ranges the dev plane draws from on the
    wildcard address (10000-20000 single ports, 20000-30000 worker blocks: a dev plane running at the
    same time took a head's port once). Above the ephemeral range where there is room, else below."""
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return (high + 1, 65535) if high <= 65000 else (2000, min(low, 10000))


def free_port_block(host: str, size: int) -> int:
    # Volunteers' blocks use 20000-28000 on other IPs.
    first, last = head_port_range()
    for _ in range(200):
        base = random.randrange(first, last - size)
        try:
            for port in range(base, base + size):
                with socket.socket() as s:
                    s.bind((host, port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port block")


def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


@dataclass
class Volunteer:
    name: str
    netns: str | None
    process: subprocess.Popen[bytes]
    state_dir: Path
    log_path: Path

    def identity(self) -> dict[str, str]:
        path = self.state_dir / "identity.json"
        return json.loads(path.read_text()) if path.exists() else {}


def marked_line(output: str, marker: str) -> str:
    """The rest of the one line of a driver's output that starts with `marker`: Ray prints lines of its
    own (warnings, autoscaler notices) before and after what a test's driver prints."""
    found = [line.removeprefix(marker) for line in output.splitlines() if line.startswith(marker)]
    assert len(found) == 1, f"expected one line starting {marker!r} in the driver's output:\n{output}"
    return found[0]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"({error})"


@dataclass
class RayTunnelHarness:
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix=f"kn{os.getpid()}-", dir="/tmp")))
    tls: bool = True
    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 3.0
    ray_auth: bool = True
    head_ip: str = field(default_factory=lambda: f"127.0.{random.randrange(100, 200)}.{random.randrange(2, 250)}")
    vip_cidr: str = field(default_factory=lambda: f"127.{random.randrange(200, 250)}.{random.randrange(0, 250)}.0/28")
    gateway_process: subprocess.Popen[bytes] | None = None
    head_process: subprocess.Popen[bytes] | None = None
    volunteers: list[Volunteer] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    agent_target: str = ""
    head_proxy_url: str = ""
    ca_path: str = ""
    admin_url: str = ""

    def __post_init__(self) -> None:
        self.base = free_port_block(self.head_ip, 50)
        self.gcs_port = self.base
        self.auth_token = secrets.token_hex(32) if self.ray_auth else ""
        (self.workdir / "ray-token").write_text(self.auth_token)
        self.token = f"{secrets.token_hex(3)}.{secrets.token_hex(8)}"
        self.vip_port_base = random.randrange(20000, 28000)

    # ---- gateway ----

    @property
    def gateway_socket(self) -> str:
        """In a directory of its own, which volunteers' sandboxes expose (see start_volunteer)."""
        directory = self.workdir / "gateway-socket"
        directory.mkdir(exist_ok=True)
        directory.chmod(0o755)  # sandboxed volunteers run as nobody
        return str(directory / "gw.sock")

    @property
    def dashboard_agent_grpc_port(self) -> int:
        return self.base + 3

    def head_ports_spec(self) -> str:
        """Raylet, object manager, workers: as the manifest's --head-ports (not the dashboard agent)."""
        b = self.base
        return f"{b + 1},{b + 2},{b + 10}-{b + 49}"

    def start_gateway(self) -> None:
        ready = self.workdir / "gateway.ready"
        ready.unlink(missing_ok=True)
        command = [
            str(VENV_BIN / "python"),
            "-m",
            "koinon_gateway.main",
            f"--listen=unix:{self.gateway_socket}",
            "--head-proxy-listen=127.0.0.1:0",
            "--admin-listen=127.0.0.1:0",
            f"--head-address={self.head_ip}",
            f"--head-gcs-port={self.gcs_port}",
            f"--head-ports={self.head_ports_spec()}",
            f"--vip-cidr={self.vip_cidr}",
            f"--port-base={self.vip_port_base}",
            "--port-block-size=40",
            f"--heartbeat-interval={self.heartbeat_interval}",
            f"--heartbeat-timeout={self.heartbeat_timeout}",
            f"--state-dir={self.workdir}/gateway-state",
            f"--bootstrap-token={self.token}",
            f"--ready-file={ready}",
        ]
        if self.ray_auth:
            command.append(f"--ray-auth-token-file={self.workdir / 'ray-token'}")
        if not self.tls:
            command.append("--insecure")
        log = open(self.workdir / "gateway.log", "ab")  # noqa: SIM115
        self.gateway_process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_until(lambda: ready.exists() and len(ready.read_text().splitlines()) == 4, 20, "gateway")
        self.agent_target, self.head_proxy_url, self.ca_path, self.admin_url = ready.read_text().splitlines()

    def kill_gateway(self) -> None:
        assert self.gateway_process is not None
        kill_tree(self.gateway_process.pid)
        self.gateway_process.wait()
        Path(self.gateway_socket).unlink(missing_ok=True)

    def nodes(self) -> dict[str, Any]:
        path = self.workdir / "gateway-state" / "volunteernodes.json"
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            return dict(json.loads(path.read_text()))
        return {}

    # ---- head ----

    def ray_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            RAY_grpc_enable_http_proxy="1",
            grpc_proxy=self.head_proxy_url,
            no_grpc_proxy=f"{self.head_ip},127.0.0.1,localhost",
        )
        if self.ray_auth:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.auth_token)
        return env

    def start_head(self, object_store_memory: int = 600 * 1024 * 1024) -> None:
        b = self.base
        command = [
            RAY,
            "start",
            "--head",
            "--block",
            f"--node-ip-address={self.head_ip}",
            f"--port={b}",
            f"--node-manager-port={b + 1}",
            f"--object-manager-port={b + 2}",
            f"--dashboard-agent-grpc-port={self.dashboard_agent_grpc_port}",
            f"--dashboard-agent-listen-port={b + 4}",
            f"--metrics-export-port={b + 5}",
            f"--runtime-env-agent-port={b + 6}",
            f"--ray-client-server-port={b + 7}",
            f"--dashboard-port={b + 8}",
            f"--min-worker-port={b + 10}",
            f"--max-worker-port={b + 49}",
            "--num-cpus=0",
            f"--object-store-memory={object_store_memory}",
            "--include-dashboard=false",
            f"--temp-dir={self.workdir}/head",
            "--disable-usage-stats",
        ]
        log = open(self.workdir / "head.log", "ab")  # noqa: SIM115
        self.head_process = subprocess.Popen(
            command, env=self.ray_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        logs = self.workdir / "head" / "session_latest" / "logs"
        raylet = logs / "raylet.out"
        # The head counts as up once its raylet is registered in GCS (raylet.out says "Raylet of id ...
        # started" right after), not when its gRPC server listens: a worker's `ray start` that finds no
        # head node in GCS sleeps 2 s before asking again, which would land in every join measured.
        try:
            wait_until(lambda: raylet.exists() and b"Raylet of id" in raylet.read_bytes(), 60, "head")
        except TimeoutError as error:
            raise TimeoutError(
                f"{error}\n--- head log ---\n{_tail(self.workdir / 'head.log')}\n"
                f"--- GCS log ---\n{_tail(logs / 'gcs_server.out')}\n--- raylet log ---\n{_tail(raylet)}"
            ) from None

    # ---- volunteers ----

    def make_netns(self, name: str) -> str:
        ns = f"kn{os.getpid()}-{name}"[:15]
        subprocess.run(["ip", "netns", "add", ns], check=True)
        self.namespaces.append(ns)
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        return ns

    def start_volunteer(
        self,
        name: str,
        netns: bool = True,
        num_cpus: int = 2,
        gpus: int = 1,
        extra: list[str] | None = None,
        object_store_memory: int = 600 * 1024 * 1024,
    ) -> Volunteer:
        ns = self.make_netns(name) if netns else None
        state_dir = self.workdir / f"agent-{name}"
        command = [
            str(VENV_BIN / "python"),
            "-m",
            "koinon_agent.cli",
            "join",
            f"--gateway={self.agent_target}",
            f"--token={self.token}",
            f"--state-dir={state_dir}",
            f"--temp-dir={self.workdir}/ray-{name}",
            f"--node-name={name}",
            f"--num-cpus={num_cpus}",
            f"--simulate-gpus={gpus}",
            "--simulate-gpu-memory=24576",
            f"--ray-bin={RAY}",
            f"--object-store-memory={object_store_memory}",
            "--drain-grace=10",
            *(["--insecure"] if not self.tls else [f"--ca-file={self.ca_path}"]),
            *(extra or []),
        ]
        if ns is not None:
            # Unix socket paths cross network namespaces: the volunteer sees of /tmp only the
            # gateway's socket, the CA and its own directories, not the head's Ray sockets.
            own = [state_dir, self.workdir / f"ray-{name}"]
            for directory in own:
                directory.mkdir(mode=0o700, exist_ok=True)
            # The socket's directory, not the socket: a restarted gateway makes a new socket file.
            # Shared by every volunteer, read-only (as the dev plane exposes them); its own
            # directories the sandbox makes its user's.
            shared = [str(Path(self.gateway_socket).parent), *([str(self.ca_path)] if self.tls else [])]
            sandbox = [
                "-m",
                "koinon_dev.volunteer_sandbox",
                *(f"--expose-ro={path}" for path in shared),
                *(f"--expose={path}" for path in own),
                "--",
            ]
            command = ["ip", "netns", "exec", ns, str(VENV_BIN / "python"), *sandbox, *command]
        log_path = self.workdir / f"agent-{name}.log"
        log = open(log_path, "ab")  # noqa: SIM115
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        volunteer = Volunteer(name, ns, process, state_dir, log_path)
        self.volunteers.append(volunteer)
        return volunteer

    def wait_ready(self, volunteer: Volunteer, timeout: float = 60, ray_node_other_than: str = "") -> dict[str, Any]:
        """The volunteer's VolunteerNode once Ready with a Ray node id (one other than
        ray_node_other_than, when given: a restarted Ray node)."""

        def ready() -> dict[str, Any] | None:
            name = volunteer.identity().get("node_name")
            node = self.nodes().get(name or "", {})
            status = node.get("status", {})
            ray_node_id = status.get("rayNodeId")
            fresh = ray_node_id and ray_node_id != ray_node_other_than
            return node if status.get("phase") == "Ready" and fresh else None

        try:
            result: dict[str, Any] = wait_until(ready, timeout, f"{volunteer.name} Ready")
        except TimeoutError as error:
            # Say why: what the gateway wrote to the VolunteerNode and the last lines of both logs.
            name = volunteer.identity().get("node_name") or "(agent has no identity yet)"
            status = self.nodes().get(name, {}).get("status")
            raise TimeoutError(
                f"{error}\nnode {name} status: {status}\n"
                f"--- agent log ---\n{_tail(volunteer.log_path)}\n"
                f"--- gateway log ---\n{_tail(self.workdir / 'gateway.log')}\n"
                f"--- head log ---\n{_tail(self.workdir / 'head.log')}\n"
                f"--- head GCS log ---\n{_tail(self.workdir / 'head' / 'session_latest' / 'logs' / 'gcs_server.out')}"
            ) from None
        return result

    def alive_ray_nodes(self) -> set[str]:
        """The Ray node ids GCS holds ALIVE, as GCS itself records them."""
        code = (
            "import json, ray._raylet\n"
            f"gcs = ray._raylet.GcsClient(address='{self.head_ip}:{self.gcs_port}')\n"
            "infos = gcs.get_all_node_info(timeout=10)\n"
            "print('ALIVE', json.dumps([k.hex() for k, info in infos.items() if info.state == 0]))\n"
        )
        result = subprocess.run(
            [str(VENV_BIN / "python"), "-c", code], env=self.ray_env(), capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return set(json.loads(marked_line(result.stdout, "ALIVE ")))

    def wait_retired(self, ray_node_id: str, timeout: float = 90) -> None:
        """Until GCS no longer holds ``ray_node_id`` ALIVE (its health check retires a Ray node that
        died). A Ray node restarted at the same address and ports shares its node:<ip> resource with
        the old one until then, and a task placed on that address in between once waited past the
        driver's 180 s (the old node's lease requests reach the new raylet at the same port)."""
        wait_until(lambda: ray_node_id not in self.alive_ray_nodes(), timeout, f"GCS to retire {ray_node_id}")

    def draining_nodes(self) -> dict[str, int]:
        """The nodes GCS is draining (Ray node id -> deadline, Unix ms), as GCS itself records them."""
        code = (
            "import json, ray._raylet\n"
            f"gcs = ray._raylet.GcsClient(address='{self.head_ip}:{self.gcs_port}')\n"
            "print('DRAINING', json.dumps({str(k): int(v) for k, v in gcs.get_draining_nodes(timeout=10).items()}))\n"
        )
        result = subprocess.run(
            [str(VENV_BIN / "python"), "-c", code], env=self.ray_env(), capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr[-3000:]
        draining: dict[str, int] = json.loads(marked_line(result.stdout, "DRAINING "))
        return draining

    def driver_prelude(self) -> str:
        return (
            "import ray, json, time\n"
            f"ray.init(address='{self.head_ip}:{self.gcs_port}', _node_ip_address='{self.head_ip}',"
            " log_to_driver=False)\n"
        )

    def run_driver(self, code: str, timeout: float = 180) -> str:
        """Runs a Ray driver on the head's address; returns its stdout (raises with logs on failure)."""
        result = subprocess.run(
            [str(VENV_BIN / "python"), "-c", self.driver_prelude() + code],
            env=self.ray_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise AssertionError(f"driver failed:\n{result.stdout}\n{result.stderr[-4000:]}")
        return result.stdout

    def stop(self) -> None:
        for volunteer in self.volunteers:
            kill_tree(volunteer.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for volunteer in self.volunteers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                volunteer.process.wait(max(0.1, deadline - time.monotonic()))
            kill_tree(volunteer.process.pid)
        # Ray processes a SIGKILLed agent left behind (their temp dir names them as ours).
        for proc in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error, TypeError):
                if any(str(self.workdir) in part for part in proc.info["cmdline"] or []):
                    proc.kill()
        if self.head_process is not None:
            kill_tree(self.head_process.pid)
        if self.gateway_process is not None:
            kill_tree(self.gateway_process.pid)
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for proc in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error, TypeError):
                if any(str(self.workdir) in part for part in proc.info["cmdline"] or []):
                    proc.kill()
        if os.environ.get("KOINON_KEEP_TEST_DIRS") != "1":
            shutil.rmtree(self.workdir, ignore_errors=True)
