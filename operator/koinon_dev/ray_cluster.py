"""A local Ray cluster for the dev control plane: a head that runs no user work and volunteer
worker nodes with simulated GPUs, each on its own loopback address with every port fixed.

Every port is chosen explicitly: Ray's defaults (GCS 6379, dashboard agent 52365, client server
10001...) would collide with any other Ray on the machine, because several bind the wildcard.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from koinon_agent.config import ENV_VARS as AGENT_ENV_VARS

from koinon_dev.processes import ManagedProcess, free_port_range, free_ports, wait_until

_WORKER_PORTS = 40
# What Ray's dashboard agent logs when its HTTP server cannot bind (it stays alive without it): seen,
# `up` need not wait out AGENT_TIMEOUT_SECONDS. Only a shortcut: a Ray that words it otherwise is
# still caught by that timeout.
_AGENT_HTTP_DISABLED = "the HTTP service will be disabled"
# After the dashboard answers, how long the head's dashboard agent may take to register; it
# normally has by then (it binds within 5 tries over ~3 s, then registers at once).
AGENT_TIMEOUT_SECONDS = 30.0


def ray_executable() -> str:
    beside_python = Path(sys.executable).parent / "ray"
    found = str(beside_python) if beside_python.exists() else shutil.which("ray")
    if found is None:
        raise RuntimeError("the `ray` command is not installed in this environment")
    return found


# What the Ray head and the volunteer agents of the local control plane keep of the environment of
# the shell that ran `up`: Ray passes it on to job code (a volunteer's agent passes its own on, as a
# real volunteer's should), so the rest of a developer's shell (cloud keys, GITHUB_TOKEN, a real
# cluster's KUBECONFIG, proxy credentials, OTEL headers) would be readable by any AIJob's code.
RAY_SHELL_ENV_NAMES = frozenset(
    {
        "PATH", "LANG", "LANGUAGE", "TZ", "TERM",
        # The sandbox sets HOME, USER and LOGNAME itself; the head and a plain volunteer need them.
        "HOME", "USER", "LOGNAME", "TMPDIR",
        "VIRTUAL_ENV", "LD_LIBRARY_PATH",  # the Python environment and the libraries it loads
        # Of KOINON_*, only the agent's own settings, by name: not a prefix, which passed on
        # KOINON_SUBMISSION_KEY (the operator's, which `up` gives the operator alone) and would pass
        # whatever secret a component reads next. The agent keeps them from its Ray
        # (ray_node.ray_environment drops config.ENV_VARS); the head's ray_environment drops them.
        *AGENT_ENV_VARS,
    }
)  # fmt: skip
RAY_SHELL_ENV_PREFIXES = (
    "LC_",  # locale
    "PYTHON",  # PYTHONPATH, PYTHONHOME and the like: what Python imports and how
    "RAY_",  # Ray's tuning (tests set RAY_* for the whole control plane)
    "GRPC_",  # the agent's gRPC tuning (GRPC_EXPERIMENTS, GRPC_VERBOSITY, GRPC_TRACE)
    "CUDA_", "NVIDIA_",  # real GPUs
)  # fmt: skip
# Ray's credentials are the control plane's to give (the assignment's token), not the shell's.
RAY_SHELL_ENV_DENIED_PREFIXES = ("RAY_AUTH_",)


def shell_environment_for_ray(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of ``environ`` the dev plane's Ray head and volunteer agents (and so job code) get."""
    return {
        name: value
        for name, value in environ.items()
        if (name in RAY_SHELL_ENV_NAMES or name.startswith(RAY_SHELL_ENV_PREFIXES))
        and not name.startswith(RAY_SHELL_ENV_DENIED_PREFIXES)
    }


def ray_environment(auth_token: str | None = None) -> dict[str, str]:
    env = shell_environment_for_ray(os.environ)
    for name in AGENT_ENV_VARS:  # an agent's settings (a join token among them) are no job's business
        env.pop(name, None)
    if auth_token:
        # Ray token authentication: every node, driver and client must present this token.
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=auth_token)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Job drivers run `python ...` from PATH: make that this environment's interpreter, which has
    # the example workloads and Ray installed.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # Keep Ray from importing its own (heavy) metrics exporters' defaults for a dev cluster.
    env.setdefault("RAY_DEDUP_LOGS", "0")
    return env


@dataclass(frozen=True)
class NodePorts:
    """The fixed ports one Ray node uses (all needed to route it through a tunnel later)."""

    node_manager: int
    object_manager: int
    dashboard_agent_grpc: int
    dashboard_agent_listen: int
    metrics_export: int
    runtime_env_agent: int
    min_worker: int
    max_worker: int

    @classmethod
    def allocate(cls) -> NodePorts:
        manager, objects, agent_grpc, agent_http, metrics, runtime_env = free_ports(6)
        low, high = free_port_range(_WORKER_PORTS)
        return cls(manager, objects, agent_grpc, agent_http, metrics, runtime_env, low, high)

    def as_flags(self) -> list[str]:
        return [
            f"--node-manager-port={self.node_manager}",
            f"--object-manager-port={self.object_manager}",
            f"--dashboard-agent-grpc-port={self.dashboard_agent_grpc}",
            f"--dashboard-agent-listen-port={self.dashboard_agent_listen}",
            f"--metrics-export-port={self.metrics_export}",
            f"--runtime-env-agent-port={self.runtime_env_agent}",
            f"--min-worker-port={self.min_worker}",
            f"--max-worker-port={self.max_worker}",
        ]


class HeadCannotTakeJobsError(RuntimeError):
    """The head's dashboard answers, but its dashboard agent does not serve HTTP: the dashboard
    submits every job through that agent, so it refuses each ("No available agent to submit job")."""


@dataclass
class LocalRayHead:
    """Ray head with ``--num-cpus=0``: GCS and dashboard (Job Submission API) only, no user work."""

    address: str
    temp_dir: Path
    log_dir: Path
    gcs_port: int = 0
    dashboard_port: int = 0
    client_server_port: int = 0
    auth_token: str | None = field(default=None, repr=False)
    extra_env: dict[str, str] = field(default_factory=dict)
    ports: NodePorts = field(default_factory=NodePorts.allocate)
    process: ManagedProcess | None = None

    def __post_init__(self) -> None:
        if not (self.gcs_port and self.dashboard_port and self.client_server_port):
            self.gcs_port, self.dashboard_port, self.client_server_port = free_ports(3)

    @property
    def gcs_address(self) -> str:
        return f"{self.address}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.address}:{self.dashboard_port}"

    def start(self) -> None:
        argv = [
            ray_executable(), "start", "--head", "--block", "--disable-usage-stats",
            f"--node-ip-address={self.address}", f"--port={self.gcs_port}",
            "--num-cpus=0", "--num-gpus=0", "--object-store-memory=100000000",
            "--include-dashboard=true", f"--dashboard-host={self.address}",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self.client_server_port}",
            f"--temp-dir={self.temp_dir}", *self.ports.as_flags(),
        ]  # fmt: skip
        self.process = ManagedProcess(
            "ray-head", argv, self.log_dir / "ray-head.log", {**ray_environment(self.auth_token), **self.extra_env}
        )
        self.process.start()

    def wait_ready(self, timeout: float = 90.0, agent_timeout: float = AGENT_TIMEOUT_SECONDS) -> None:
        """Wait until the head takes jobs: its dashboard answers and its dashboard agent serves HTTP.

        Raises HeadCannotTakeJobsError when the agent does not (its HTTP port was taken between
        the probe that chose it and Ray's bind, by another control plane or a test's Ray)."""

        def dashboard_answers() -> bool:
            self._check_alive()
            try:
                request = urllib.request.Request(f"{self.dashboard_url}/api/version", headers=self.auth_headers())
                with urllib.request.urlopen(request, timeout=2) as reply:
                    return bool(reply.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        wait_until(dashboard_answers, timeout, interval=0.3, what="the Ray dashboard")

        def agent_serves() -> bool:
            self._check_alive()
            if _AGENT_HTTP_DISABLED in self.agent_log_tail():
                raise self._cannot_take_jobs("its HTTP server could not start")
            return self.agent_registered()

        try:
            wait_until(agent_serves, agent_timeout, interval=0.3, what="the head's dashboard agent")
        except TimeoutError as error:
            raise self._cannot_take_jobs(f"it did not register ({error})") from None

    def agent_registered(self) -> bool:
        """Whether the head's dashboard agent has registered its HTTP server with the GCS.

        The dashboard's job module submits a job through the agent whose address it finds in the
        GCS (internal KV, DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX:<head node>); without that entry it
        answers every job "No available agent to submit job". Ray's agent writes it, with its twin
        DASHBOARD_AGENT_ADDR_IP_PREFIX:<node ip>, only once its HTTP server listens. The state API's
        log listing by node IP looks the node up by that twin (404 without it), then asks that
        agent: a 200 means the head's agent is registered and answers."""
        query = urllib.parse.urlencode({"node_ip": self.address, "glob": "dashboard_agent.log", "timeout": 5})
        request = urllib.request.Request(f"{self.dashboard_url}/api/v0/logs?{query}", headers=self.auth_headers())
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):  # HTTPError (404: not registered yet) among them
            return False

    @property
    def agent_log(self) -> Path:
        return self.temp_dir / "session_latest" / "logs" / "dashboard_agent.log"

    def agent_log_tail(self, max_bytes: int = 3000) -> str:
        try:
            data = self.agent_log.read_bytes()
        except OSError:
            return ""
        return data[-max_bytes:].decode(errors="replace")

    def move_agent_ports(self, temp_dir: Path) -> None:
        """Fresh ports for what a Ray node's agents bind, and a fresh temp dir, for the next start.

        The GCS, node manager, object manager and worker ports stay: the gateway, started first,
        routes volunteers to them (LocalGateway.head_ports_spec), and the head's own processes,
        stopped, released them. The temp dir is new so that nothing of the last start (its
        dashboard_agent.log above all) is taken for the next one's."""
        agent_grpc, agent_http, metrics, runtime_env = free_ports(4)
        self.ports = dataclasses.replace(
            self.ports,
            dashboard_agent_grpc=agent_grpc,
            dashboard_agent_listen=agent_http,
            metrics_export=metrics,
            runtime_env_agent=runtime_env,
        )
        self.temp_dir = temp_dir

    def _check_alive(self) -> None:
        if self.process is not None and not self.process.alive():
            raise RuntimeError(f"Ray head exited:\n{self.process.log_tail()}")

    def _cannot_take_jobs(self, why: str) -> HeadCannotTakeJobsError:
        return HeadCannotTakeJobsError(
            f"the Ray head's dashboard agent does not serve HTTP on "
            f"{self.address}:{self.ports.dashboard_agent_listen}: {why}, so the head refuses every job "
            f"(the port may have been taken after it was chosen). The end of {self.agent_log}:\n"
            f"{self.agent_log_tail()}"
        )

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.auth_token}"} if self.auth_token else {}

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(grace_seconds=8)
