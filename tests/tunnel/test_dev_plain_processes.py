"""`koinon dev up --no-netns`: volunteers as plain local processes, still reaching the head only
through the tunnel. (As root the control plane puts each volunteer in a network namespace; this is
the path every non-root user of `make demo` / `koinon dev up` takes.) An AIJob's driver and tasks
run on the volunteer, never on the head. And its Kubernetes API, which any local process reaches,
serves only clients holding its kubeconfig."""

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
from koinon_dev.cli import fetch_job_logs
from koinon_dev.cluster import DevCluster, DevClusterConfig, DevClusterInfo, kubectl
from koinon_gateway.kube_client import load_kubeconfig

from .ray_harness import marked_line

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SHELL_SECRET = "AWS_SECRET_ACCESS_KEY"
# The operator's own secret, documented "for development": `up` gives it to the operator only.
SUBMISSION_KEY = "KOINON_SUBMISSION_KEY"

# Where an AIJob's driver runs, and whether job code sees the operator's key. (Not where a task
# that needs no CPU runs: Ray places it on the head, which has no GPUs, in every mode: its
# scheduler keeps work that needs no GPU off GPU nodes, and nothing keeps it off a head.)
PROBE = """
apiVersion: koinon.dev/v1alpha1
kind: AIJob
metadata: {name: probe, namespace: default}
spec:
  entrypoint: >-
    python -c "import ray;
    ray.init();
    print('DRIVER_NODE', ray.get_runtime_context().get_node_id());
    print('DRIVER_NODE_IP', ray.util.get_node_ip_address());
    import os;
    print('DRIVER_SEES_KEY', os.environ.get('KOINON_SUBMISSION_KEY') is not None);
    print('KOINON_RESULT ok')"
  replicas: 1
  resources: {gpus: 1}
  backoffLimit: 0
"""


@pytest.fixture(scope="module")
def plain_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevCluster, DevClusterInfo]]:
    cluster = DevCluster(
        DevClusterConfig(state_dir=tmp_path_factory.mktemp("dev"), volunteers=1, network_namespaces=False)
    )
    # In the shell that ran `up`: none of the Ray processes job code runs in may see them.
    shell = {SHELL_SECRET: "from-the-developers-shell", SUBMISSION_KEY: "k" * 40}
    before = {name: os.environ.get(name) for name in shell}
    os.environ.update(shell)
    try:
        info = cluster.up(progress=False)
        yield cluster, info
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        cluster.down()


@pytest.fixture(scope="module")
def probe(plain_cluster: tuple[DevCluster, DevClusterInfo]) -> tuple[dict[str, str], str, str]:
    """What the PROBE job printed, the Ray node the operator recorded for it, and its log."""
    _, info = plain_cluster
    kubectl(info.kubeconfig, "apply", "-f", "-", input_text=PROBE)
    deadline = time.monotonic() + 120
    while True:
        job = json.loads(kubectl(info.kubeconfig, "get", "aij", "probe", "-o", "json"))
        if job.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            break
        assert time.monotonic() < deadline, job.get("status")
        time.sleep(0.5)
    log = fetch_job_logs(info, "probe", "default")
    assert job["status"]["phase"] == "Succeeded", (job["status"], log)
    fields = dict(line.split()[:2] for line in log.splitlines() if line.startswith("DRIVER_"))
    return fields, job["status"]["rayNodeIds"][0], log


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
print("RAN_ON", ray.get(where.options(resources={{"node:{address}": 0.01}}).remote()))
"""
    ran = subprocess.run([sys.executable, "-c", driver], env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert marked_line(ran.stdout, "RAN_ON ") == address

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


def test_a_jobs_driver_runs_on_its_volunteer_not_on_the_head(
    plain_cluster: tuple[DevCluster, DevClusterInfo], probe: tuple[dict[str, str], str, str]
) -> None:
    """A driver picks its Ray node among the raylets whose processes it sees, the head's first
    (Ray's get_node_to_connect_for_driver; ray.init() has no setting for it but an argument): a
    plain volunteer saw the head's, and the driver attached there, a worker of the head."""
    cluster, _ = plain_cluster
    fields, volunteer_node, log = probe
    assert cluster.head is not None and cluster.agents[0].own_processes
    assert fields["DRIVER_NODE"] == volunteer_node, log
    assert fields["DRIVER_NODE_IP"] != cluster.head.address, log


def test_job_code_does_not_see_the_operators_submission_key(probe: tuple[dict[str, str], str, str]) -> None:
    """With it, job code could name the submission ids of attempts the operator has yet to make."""
    fields, _, log = probe
    assert fields["DRIVER_SEES_KEY"] == "False", log
