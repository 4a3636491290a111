"""The local control plane: Kubernetes API emulator + koinon operator + Ray head + local volunteers.

``up`` starts every part as its own process group and records them in a state file, so ``down``
(possibly from another process) stops exactly what was started, and nothing else.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from koinon_dev.binaries import ensure_binaries
from koinon_dev.processes import (
    ManagedProcess,
    free_ports,
    kill_processes_mentioning,
    stop_process_group,
    wait_until,
)
from koinon_dev.ray_cluster import LocalRayHead
from koinon_dev.tunnel_plane import LocalAgent, LocalGateway, delete_netns, netns_available

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = REPO_ROOT / "manifests" / "crds"
NAMESPACE_MANIFEST = REPO_ROOT / "manifests" / "operator" / "namespace.yaml"
HEAD_ADDRESS = "127.0.10.1"
STATE_FILE = "cluster.json"


@dataclass(frozen=True)
class DevClusterConfig:
    state_dir: Path = field(default_factory=lambda: Path.cwd() / ".koinon" / "dev")
    volunteers: int = 2
    gpus_per_volunteer: int = 2
    gpu_memory_mib: int = 16384
    cpus_per_volunteer: int = 2
    poll_interval_seconds: float = 1.0
    start_operator: bool = True
    # Each volunteer in its own network namespace: None = where possible (root with `ip netns`),
    # False = plain local processes (Ray's traffic still goes through the tunnel, by proxy settings).
    network_namespaces: bool | None = None


@dataclass
class DevClusterInfo:
    """What a user (or a test) needs to talk to a running local control plane."""

    kubeconfig: Path
    api_url: str
    ray_dashboard_url: str
    ray_address: str
    process_groups: dict[str, int]
    log_dir: Path
    ray_auth_token_file: Path | None = None
    work_dir: Path | None = None
    network_namespaces: list[str] = field(default_factory=list)

    def ray_auth_token(self) -> str | None:
        if self.ray_auth_token_file is None or not self.ray_auth_token_file.exists():
            return None
        return self.ray_auth_token_file.read_text().strip()

    def ray_headers(self) -> dict[str, str]:
        token = self.ray_auth_token()
        return {"Authorization": f"Bearer {token}"} if token else {}

    def to_json(self) -> str:
        data = {
            "kubeconfig": str(self.kubeconfig),
            "api_url": self.api_url,
            "ray_dashboard_url": self.ray_dashboard_url,
            "ray_address": self.ray_address,
            "process_groups": self.process_groups,
            "log_dir": str(self.log_dir),
            "ray_auth_token_file": str(self.ray_auth_token_file) if self.ray_auth_token_file else None,
            "work_dir": str(self.work_dir) if self.work_dir else None,
            "network_namespaces": self.network_namespaces,
        }
        return json.dumps(data, indent=2)

    @classmethod
    def load(cls, path: Path) -> DevClusterInfo:
        data = json.loads(path.read_text())
        return cls(
            kubeconfig=Path(data["kubeconfig"]),
            api_url=data["api_url"],
            ray_dashboard_url=data["ray_dashboard_url"],
            ray_address=data["ray_address"],
            process_groups={k: int(v) for k, v in data["process_groups"].items()},
            log_dir=Path(data["log_dir"]),
            ray_auth_token_file=Path(data["ray_auth_token_file"]) if data.get("ray_auth_token_file") else None,
            work_dir=Path(data["work_dir"]) if data.get("work_dir") else None,
            network_namespaces=list(data.get("network_namespaces") or []),
        )


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def kubectl(kubeconfig: Path, *args: str, input_text: str | None = None, timeout: float = 60) -> str:
    """Run the real kubectl against ``kubeconfig``; raise with its stderr on failure."""
    binaries = ensure_binaries()
    completed = subprocess.run(
        [str(binaries.kubectl), f"--kubeconfig={kubeconfig}", *args],
        input=input_text,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed: {completed.stderr.strip()}")
    return completed.stdout


def operator_process(
    kubeconfig: Path,
    dashboard_url: str,
    log_dir: Path,
    poll_interval_seconds: float = 1.0,
    namespace: str | None = None,
    name: str = "operator",
    ray_auth_token_file: Path | None = None,
) -> ManagedProcess:
    argv = [
        _bin("koinon-operator"),
        f"--kubeconfig={kubeconfig}",
        f"--ray-dashboard={dashboard_url}",
        f"--poll-interval={poll_interval_seconds}",
    ]
    if namespace:
        argv.append(f"--namespace={namespace}")
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    if ray_auth_token_file is not None:
        env["RAY_AUTH_TOKEN_PATH"] = str(ray_auth_token_file)
    return ManagedProcess(name, argv, log_dir / f"{name}.log", env=env)


class DevCluster:
    def __init__(self, config: DevClusterConfig | None = None) -> None:
        self.config = config or DevClusterConfig()
        self.state_dir = self.config.state_dir.resolve()
        self.log_dir = self.state_dir / "logs"
        self._started: list[ManagedProcess] = []
        self.head: LocalRayHead | None = None
        self.gateway: LocalGateway | None = None
        self.agents: list[LocalAgent] = []
        self._use_netns = False
        self._agents_started = 0
        self._work_dir = Path("/tmp")

    @property
    def state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    def up(self, progress: bool = True) -> DevClusterInfo:
        if self.state_path.exists():
            raise RuntimeError(
                f"a local control plane is already recorded in {self.state_path}; run `koinon dev down` first"
            )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        ensure_binaries()
        say: Callable[[str], None] = print if progress else (lambda _line: None)
        try:
            info = self._start_all(say)
        except BaseException:
            self._stop_started()
            raise
        self.state_path.write_text(info.to_json())
        return info

    def _start_all(self, say: Callable[[str], None]) -> DevClusterInfo:
        kubeconfig = self.state_dir / "kubeconfig"
        (api_port,) = free_ports(1)
        api_url = f"http://127.0.0.1:{api_port}"
        emulator = ManagedProcess(
            "kube-emulator",
            [
                _bin("koinon-kube-emulator"),
                "--host=127.0.0.1",
                f"--port={api_port}",
                f"--kubeconfig={kubeconfig}",
            ],
            self.log_dir / "kube-emulator.log",
        )
        emulator.start()
        self._started.append(emulator)
        say(f"- Kubernetes API emulator on {api_url}")
        wait_until(lambda: _http_ok(f"{api_url}/version", emulator), 30, what="the Kubernetes API emulator")
        wait_until(kubeconfig.exists, 10, what="the kubeconfig")
        kubectl(kubeconfig, "apply", "-f", str(CRD_DIR))
        say("- CRDs applied: aijobs.koinon.dev, volunteernodes.koinon.dev")

        # A short, unique work dir: Ray's unix socket paths must stay under ~107 characters.
        work_dir = Path("/tmp") / f"koinon-{secrets.token_hex(4)}"
        work_dir.mkdir(mode=0o700)
        self._work_dir = work_dir
        # Ray token authentication is on: anyone who reaches Ray's ports could otherwise run code.
        token_file = self.state_dir / "ray-auth-token"
        token_file.touch(mode=0o600)
        token_file.write_text(secrets.token_urlsafe(32))
        head = LocalRayHead(
            address=HEAD_ADDRESS, temp_dir=work_dir / "head", log_dir=self.log_dir, auth_token=token_file.read_text()
        )
        kubectl(kubeconfig, "apply", "-f", str(NAMESPACE_MANIFEST))
        gateway = LocalGateway(head=head, work_dir=work_dir, log_dir=self.log_dir, kubeconfig=kubeconfig)
        gateway.start()
        assert gateway.process is not None
        self._started.append(gateway.process)
        say(f"- gateway for volunteers at {gateway.agent_target} (TLS, join tokens)")
        head.extra_env = gateway.head_environment()
        head.start()
        assert head.process is not None
        self._started.append(head.process)
        head.wait_ready()
        say(f"- Ray head (no CPUs for user work) at {head.gcs_address}, dashboard {head.dashboard_url}")
        self.head, self.gateway = head, gateway
        self._use_netns = self._network_namespaces()
        for index in range(self.config.volunteers):
            self._start_agent(f"volunteer-{index + 1}", self.config.gpus_per_volunteer, f"owner-{index + 1}")
        try:
            wait_until(lambda: _alive_workers(head) >= len(self.agents), 90, what="volunteers to join Ray")
        except TimeoutError as exc:
            alive = _alive_workers(head)
            raise TimeoutError(f"{exc}: {alive} of {len(self.agents)} alive\n{self._log_tails()}") from exc
        isolation = "each in its own network namespace" if self._use_netns else "as local processes"
        say(
            f"- {len(self.agents)} volunteers joined through the tunnel ({isolation}), "
            f"{self.config.gpus_per_volunteer} simulated GPUs each"
        )

        if self.config.start_operator:
            operator = operator_process(
                kubeconfig,
                head.dashboard_url,
                self.log_dir,
                self.config.poll_interval_seconds,
                ray_auth_token_file=token_file,
            )
            operator.start()
            self._started.append(operator)
            say("- koinon operator started")
        return DevClusterInfo(
            kubeconfig=kubeconfig,
            api_url=api_url,
            ray_dashboard_url=head.dashboard_url,
            ray_address=head.gcs_address,
            process_groups={p.name: p.pid for p in self._started},
            log_dir=self.log_dir,
            ray_auth_token_file=token_file,
            work_dir=work_dir,
            network_namespaces=[a.netns for a in self.agents if a.netns],
        )

    def _network_namespaces(self) -> bool:
        wanted = self.config.network_namespaces
        if wanted is False:
            return False
        available = netns_available()
        if wanted and not available:
            raise RuntimeError("network namespaces asked for, but `ip netns add` does not work here (needs root)")
        return available

    def _start_agent(self, name: str, gpus: int, owner: str, extra_env: dict[str, str] | None = None) -> LocalAgent:
        assert self.gateway is not None
        self._agents_started += 1
        netns = f"kn-{self._work_dir.name[-8:]}-{self._agents_started}" if self._use_netns else None
        agent = LocalAgent(
            name=name, gateway=self.gateway, join_token=self.gateway.create_join_token(owner),
            log_dir=self.log_dir, gpus=gpus,
            gpu_memory_mib=self.config.gpu_memory_mib, cpus=self.config.cpus_per_volunteer,
            netns=netns, extra_env=dict(extra_env or {}),
        )  # fmt: skip
        agent.start()
        assert agent.process is not None
        self._started.append(agent.process)
        self.agents.append(agent)
        return agent

    def _log_tails(self, max_bytes: int = 1500) -> str:
        """The ends of the gateway's and agents' logs, for errors a user (or CI) sees without the files."""
        processes = [self.gateway.process] if self.gateway is not None else []
        processes += [agent.process for agent in self.agents]
        return "\n".join(
            f"--- {process.log_path} ---\n{process.log_tail(max_bytes)}" for process in processes if process is not None
        )

    def add_volunteer(
        self, name: str, gpus: int, owner: str = "owner-extra", extra_env: dict[str, str] | None = None
    ) -> LocalAgent:
        """Start one more volunteer agent (and its VolunteerNode) on a control plane this process started."""
        if self.head is None:
            raise RuntimeError("the control plane was not started by this process")
        agent = self._start_agent(name, gpus, owner, extra_env)
        assert agent.process is not None
        info = self.info()
        # Recorded at once, so `down` stops it even if joining fails below.
        info.process_groups[agent.process.name] = agent.process.pid
        info.network_namespaces += [agent.netns] if agent.netns else []
        self.state_path.write_text(info.to_json())
        head, expected = self.head, len(self.agents)
        wait_until(lambda: _alive_workers(head) >= expected, 90, what=f"{name} to join Ray")
        return agent

    def kill_volunteer(self, name: str) -> None:
        """SIGKILL a volunteer's agent and its Ray node, as when the machine loses power."""
        agent = next(a for a in self.agents if a.name == name)
        assert agent.process is not None
        self.agents.remove(agent)
        stop_process_group(agent.process.pid, grace_seconds=0)
        kill_processes_mentioning(f"{self._work_dir}/ray-{name}")

    def _stop_started(self) -> None:
        for process in reversed(self._started):
            process.stop(grace_seconds=8)
        self._started.clear()

    def down(self) -> list[str]:
        """Stop everything recorded in the state file, operator first, Ray head last."""
        if not self.state_path.exists():
            self._stop_started()
            return []
        info = DevClusterInfo.load(self.state_path)
        stopped = []
        for name, pgid in reversed(list(info.process_groups.items())):
            stop_process_group(pgid, grace_seconds=8)
            stopped.append(name)
        if info.work_dir is not None:
            # Ray nodes run in their agents' own process groups; anything still naming our work dir
            # (an agent killed before it could stop its node) goes too.
            kill_processes_mentioning(str(info.work_dir))
            shutil.rmtree(info.work_dir, ignore_errors=True)
        for namespace in info.network_namespaces:
            delete_netns(namespace)
        self._started.clear()
        self.state_path.unlink()
        return stopped

    def info(self) -> DevClusterInfo:
        return DevClusterInfo.load(self.state_path)


def _http_ok(url: str, process: ManagedProcess) -> bool:
    if not process.alive():
        raise RuntimeError(f"{process.name} exited:\n{process.log_tail()}")
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _alive_workers(head: LocalRayHead) -> int:
    request = urllib.request.Request(f"{head.dashboard_url}/api/v0/nodes?limit=1000", headers=head.auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            rows: Sequence[dict[str, object]] = json.load(reply)["data"]["result"]["result"]
    except (urllib.error.URLError, OSError, KeyError, ValueError):
        return 0
    return sum(1 for row in rows if row.get("state") == "ALIVE" and not row.get("is_head_node"))
