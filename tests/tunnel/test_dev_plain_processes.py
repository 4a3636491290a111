"""`koinon dev up --no-netns`: volunteers as plain local processes, still reaching the head only
through the tunnel. (As root the control plane puts each volunteer in a network namespace; this is
the path every non-root user of `make demo` / `koinon dev up` takes.) And its Kubernetes API, which
any local process reaches, serves only clients holding its kubeconfig."""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from koinon_dev.cluster import DevCluster, DevClusterConfig, DevClusterInfo, kubectl
from koinon_gateway.kube_client import load_kubeconfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SHELL_SECRET = "AWS_SECRET_ACCESS_KEY"


@pytest.fixture(scope="module")
def plain_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevCluster, DevClusterInfo]]:
    cluster = DevCluster(
        DevClusterConfig(
            state_dir=tmp_path_factory.mktemp("dev"), volunteers=1, start_operator=False, network_namespaces=False
        )
    )
    # In the shell that ran `up`: none of the Ray processes job code runs in may see it.
    os.environ[SHELL_SECRET] = "from-the-developers-shell"
    try:
        info = cluster.up(progress=False)
        yield cluster, info
    finally:
        del os.environ[SHELL_SECRET]
        cluster.down()


def volunteer_connections(temp_dir: str) -> list[tuple[str, int]]:
    """Remote (address, port) of every TCP connection held by the volunteer's Ray processes."""
    remotes = []
    for process in psutil.process_iter(["cmdline"]):
        if not any(temp_dir in arg for arg in process.info["cmdline"] or []):
            continue
        try:
            for conn in process.net_connections(kind="tcp"):
                if conn.raddr and conn.status == psutil.CONN_ESTABLISHED:
                    remotes.append((conn.raddr.ip.removeprefix("::ffff:"), conn.raddr.port))  # IPv4-mapped
        except psutil.Error:
            continue
    return remotes


def test_volunteer_processes_reach_the_head_only_through_the_tunnel(
    plain_cluster: tuple[DevCluster, DevClusterInfo],
) -> None:
    cluster, info = plain_cluster
    assert info.network_namespaces == []
    agent, head, gateway = cluster.agents[0], cluster.head, cluster.gateway
    assert agent.netns is None and head is not None and gateway is not None
    # `up` returns once Ray counts the node alive; the gateway marks it Ready after checking GCS.
    deadline = time.monotonic() + 60
    while True:
        node = json.loads(kubectl(info.kubeconfig, "get", "volunteernode", str(agent.node_name()), "-o", "json"))
        if node.get("status", {}).get("phase") == "Ready":
            break
        assert time.monotonic() < deadline, node.get("status")
        time.sleep(0.5)
    address = node["status"]["address"]

    # A task placed on the volunteer runs there (the head reaches it through the gateway's proxy).
    env = {**os.environ, **gateway.head_environment()}
    token = info.ray_auth_token()
    if token:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    driver = f"""
import ray
ray.init(address={info.ray_address!r}, logging_level="ERROR")
@ray.remote
def where(): return ray.util.get_node_ip_address()
print(ray.get(where.options(resources={{"node:{address}": 0.01}}).remote()))
"""
    ran = subprocess.run([sys.executable, "-c", driver], env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.strip().splitlines()[-1] == address

    # Every connection the volunteer's Ray processes hold goes to loopback services on 127.0.0.1 (the
    # agent's CONNECT proxy among them) or to the volunteer's own address: none to the head.
    remotes = volunteer_connections(str(Path(gateway.work_dir) / f"ray-{agent.name}"))
    assert remotes, "the volunteer's Ray processes hold no connections"
    assert {ip for ip, _ in remotes} <= {"127.0.0.1", address}, remotes
    assert head.address not in {ip for ip, _ in remotes}


def test_the_api_serves_only_clients_with_the_kubeconfigs_token(
    plain_cluster: tuple[DevCluster, DevClusterInfo],
) -> None:
    """It served anyone on 127.0.0.1: any local user could read the gateway's CA key (a Secret)
    or create AIJobs, which the operator runs as the user who ran `up` (root, for namespaces)."""
    _, info = plain_cluster
    assert stat.S_IMODE(info.kubeconfig.stat().st_mode) == 0o600
    config = load_kubeconfig(info.kubeconfig)
    assert info.api_url.startswith("https://") and config.token and config.ca_pem
    context = ssl.create_default_context(cadata=config.ca_pem.decode())
    url = f"{info.api_url}/api/v1/namespaces/koinon-system/secrets"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10, context=context)
    assert refused.value.code == 401
    # The gateway, with the same kubeconfig, stored its CA there (and the volunteer joined).
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {config.token}"})
    with urllib.request.urlopen(request, timeout=10, context=context) as reply:
        assert "koinon-gateway-ca" in {item["metadata"]["name"] for item in json.load(reply)["items"]}


def test_no_secret_of_the_shell_that_ran_up_reaches_the_volunteers_or_heads_ray(
    plain_cluster: tuple[DevCluster, DevClusterInfo],
) -> None:
    """Each passed on its whole environment to Ray and so to any AIJob's code (tunnel_plane's
    LocalAgent.start, ray_cluster's ray_environment)."""
    cluster, _ = plain_cluster
    agent, head, gateway = cluster.agents[0], cluster.head, cluster.gateway
    assert agent.process is not None and head is not None and gateway is not None
    temp_dirs = (str(Path(gateway.work_dir) / f"ray-{agent.name}"), str(head.temp_dir))
    processes = {"agent": [psutil.Process(agent.process.pid)], **{d: [] for d in temp_dirs}}
    for process in psutil.process_iter(["cmdline"]):
        for temp_dir in temp_dirs:
            if any(temp_dir in arg for arg in process.info["cmdline"] or []):
                processes[temp_dir].append(process)
    for group, members in processes.items():
        environs = []
        for process in members:
            with contextlib.suppress(psutil.NoSuchProcess):  # a worker that ended meanwhile
                environs.append((process.pid, process.environ()))
        assert environs, f"no process of {group}"
        assert not [pid for pid, environ in environs if SHELL_SECRET in environ], group
