"""The local control plane: Kubernetes API emulator + koinon operator + Ray head + local volunteers.

``up`` starts every part as its own process group and records them in a state file, so ``down``
(possibly from another process) stops exactly what was started, and nothing else.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from koinon_dev.binaries import ensure_binaries
from koinon_dev.processes import ManagedProcess, free_ports, stop_process_group, wait_until
from koinon_dev.ray_cluster import LocalRayHead, LocalRayVolunteer

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = REPO_ROOT / "manifests" / "crds"
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


def volunteer_manifest(volunteer: LocalRayVolunteer, owner: str) -> dict[str, object]:
    return {
        "apiVersion": "koinon.dev/v1alpha1",
        "kind": "VolunteerNode",
        "metadata": {"name": volunteer.name, "labels": {"koinon.dev/local": "true"}},
        "spec": {
            "owner": owner,
            "region": "local",
            "gpus": [{"model": "simulated", "memoryMiB": volunteer.gpu_memory_mib}] * volunteer.gpus,
        },
    }


class DevCluster:
    def __init__(self, config: DevClusterConfig | None = None) -> None:
        self.config = config or DevClusterConfig()
        self.state_dir = self.config.state_dir.resolve()
        self.log_dir = self.state_dir / "logs"
        self._started: list[ManagedProcess] = []
        self.head: LocalRayHead | None = None
        self.volunteers: list[LocalRayVolunteer] = []

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

        # A short, unique temp dir: Ray's unix socket paths must stay under ~107 characters.
        temp_dir = Path("/tmp") / f"koinon-{secrets.token_hex(4)}"
        # Ray token authentication is on: anyone who reaches Ray's ports could otherwise run code.
        token_file = self.state_dir / "ray-auth-token"
        token_file.touch(mode=0o600)
        token_file.write_text(secrets.token_urlsafe(32))
        head = LocalRayHead(
            address=HEAD_ADDRESS, temp_dir=temp_dir, log_dir=self.log_dir, auth_token=token_file.read_text()
        )
        head.start()
        assert head.process is not None
        self._started.append(head.process)
        head.wait_ready()
        say(f"- Ray head (no CPUs for user work) at {head.gcs_address}, dashboard {head.dashboard_url}")

        volunteers = [
            LocalRayVolunteer(
                name=f"volunteer-{index + 1}",
                address=f"127.0.20.{index + 1}",
                head=head,
                log_dir=self.log_dir,
                gpus=self.config.gpus_per_volunteer,
                cpus=self.config.cpus_per_volunteer,
                gpu_memory_mib=self.config.gpu_memory_mib,
            )
            for index in range(self.config.volunteers)
        ]
        for volunteer in volunteers:
            volunteer.start()
            assert volunteer.process is not None
            self._started.append(volunteer.process)
        manifests = [volunteer_manifest(v, owner=f"owner-{i + 1}") for i, v in enumerate(volunteers)]
        kubectl(kubeconfig, "apply", "-f", "-", input_text=yaml.safe_dump_all(manifests))
        wait_until(lambda: _alive_workers(head) >= len(volunteers), 60, what="volunteers to join Ray")
        say(f"- {len(volunteers)} local volunteers joined, {self.config.gpus_per_volunteer} simulated GPUs each")

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
        self.head = head
        self.volunteers = volunteers
        return DevClusterInfo(
            kubeconfig=kubeconfig,
            api_url=api_url,
            ray_dashboard_url=head.dashboard_url,
            ray_address=head.gcs_address,
            process_groups={p.name: p.pid for p in self._started},
            log_dir=self.log_dir,
            ray_auth_token_file=token_file,
        )

    def add_volunteer(self, name: str, address: str, gpus: int, owner: str = "owner-extra") -> LocalRayVolunteer:
        """Start one more local volunteer (and its VolunteerNode) on a running control plane."""
        if self.head is None:
            raise RuntimeError("the control plane was not started by this process")
        volunteer = LocalRayVolunteer(name=name, address=address, head=self.head, log_dir=self.log_dir, gpus=gpus)
        volunteer.start()
        assert volunteer.process is not None
        self._started.append(volunteer.process)
        self.volunteers.append(volunteer)
        info = self.info()
        # Record it first, so `down` stops it even if joining fails below.
        info.process_groups[volunteer.process.name] = volunteer.process.pid
        self.state_path.write_text(info.to_json())
        manifest = yaml.safe_dump(volunteer_manifest(volunteer, owner))
        kubectl(info.kubeconfig, "apply", "-f", "-", input_text=manifest)
        head, expected = self.head, len(self.volunteers)
        wait_until(lambda: _alive_workers(head) >= expected, 60, what=f"{name} to join Ray")
        return volunteer

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
