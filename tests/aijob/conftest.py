"""Fixtures for operator tests: one real local control plane (API emulator, Ray head, two volunteers
with 2 simulated GPUs each) per module, and an operator process per test in its own namespace."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from koinon_dev.cluster import DevCluster, DevClusterConfig, DevClusterInfo, kubectl, operator_process
from koinon_dev.processes import ManagedProcess


@dataclass
class ControlPlane:
    cluster: DevCluster
    info: DevClusterInfo

    def kubectl(self, *args: str, input_text: str | None = None) -> str:
        return kubectl(self.info.kubeconfig, *args, input_text=input_text)

    def kubectl_result(self, *args: str, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        from koinon_dev.binaries import ensure_binaries

        return subprocess.run(
            [str(ensure_binaries().kubectl), f"--kubeconfig={self.info.kubeconfig}", *args],
            input=input_text, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    def apply(self, document: dict[str, Any]) -> str:
        return self.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(document))

    def get(self, name: str, namespace: str) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.kubectl("get", "aijob", name, "-n", namespace, "-o", "json"))
        return result

    def events(self, name: str, namespace: str) -> list[dict[str, Any]]:
        selector = f"--field-selector=involvedObject.name={name}"
        listed = json.loads(self.kubectl("get", "events", "-n", namespace, "-o", "json", selector))
        return sorted(listed["items"], key=lambda e: e["metadata"].get("resourceVersion", "0"))

    def wait_for(
        self, name: str, namespace: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 90
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.get(name, namespace)
            if predicate(last):
                return last
            time.sleep(0.3)
        raise AssertionError(f"timed out; last status of {namespace}/{name}: {json.dumps(last.get('status'))}")

    def wait_phase(self, name: str, namespace: str, phase: str, timeout: float = 90) -> dict[str, Any]:
        return self.wait_for(name, namespace, lambda o: o.get("status", {}).get("phase") == phase, timeout)

    def ray_jobs(self) -> list[dict[str, Any]]:
        request = urllib.request.Request(f"{self.info.ray_dashboard_url}/api/jobs/", headers=self.info.ray_headers())
        with urllib.request.urlopen(request, timeout=10) as reply:
            jobs: list[dict[str, Any]] = json.load(reply)
        return jobs

    def ray_job(self, submission_id: str) -> dict[str, Any]:
        url = f"{self.info.ray_dashboard_url}/api/jobs/{submission_id}"
        request = urllib.request.Request(url, headers=self.info.ray_headers())
        with urllib.request.urlopen(request, timeout=10) as r:
            job: dict[str, Any] = json.load(r)
        return job

    def start_operator(
        self,
        namespace: str,
        dashboard_url: str | None = None,
        name: str = "operator",
        extra_env: dict[str, str] | None = None,
    ) -> ManagedProcess:
        process = operator_process(
            self.info.kubeconfig, dashboard_url or self.info.ray_dashboard_url, self.info.log_dir,
            poll_interval_seconds=0.5, namespace=namespace, name=f"{name}-{namespace}",
            ray_auth_token_file=self.info.ray_auth_token_file,
            # A killed operator's Lease runs out in 3 s here, not 15: the next one takes over fast.
            extra_env={"KOINON_LEASE_DURATION": "3", **(extra_env or {})},
            # In the control plane's work dir, as `koinon dev up`'s operator: removed by `down`.
            tmp_dir=self.info.work_dir / f"tmp-{name}-{namespace}" if self.info.work_dir else None,
        )  # fmt: skip
        process.start()
        return process


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    state_dir = tmp_path_factory.mktemp("control-plane")
    cluster = DevCluster(DevClusterConfig(state_dir=state_dir, start_operator=False))
    info = cluster.up(progress=False)
    try:
        yield ControlPlane(cluster, info)
    finally:
        cluster.down()


@pytest.fixture
def namespace(control_plane: ControlPlane) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    control_plane.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    return name


@pytest.fixture
def operator(control_plane: ControlPlane, namespace: str) -> Iterator[ManagedProcess]:
    process = control_plane.start_operator(namespace)
    try:
        yield process
    finally:
        process.stop(grace_seconds=5)
        log = Path(process.log_path)
        if log.exists():
            print(f"--- operator log tail ({log}) ---\n{process.log_tail(3000)}")


def aijob(name: str, namespace: str, entrypoint: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "koinon.dev/v1alpha1",
        "kind": "AIJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"entrypoint": entrypoint, **spec},
    }


def python_entrypoint(code: str) -> str:
    """A driver entrypoint running ``code`` (kept free of shell quoting problems)."""
    return "python -c " + json.dumps(code)
