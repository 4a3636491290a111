"""Ray worker nodes joining through the tunnel from network namespaces that have no other way out."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import pytest

from .ray_harness import RayTunnelHarness, netns_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.skipif(not netns_available(), reason="needs root and ip netns"),
]


@pytest.fixture
def harness() -> Iterator[RayTunnelHarness]:
    h = RayTunnelHarness()
    try:
        h.start_gateway()
        h.start_head()
        yield h
    finally:
        h.stop()


def test_namespace_has_no_route_to_head(harness: RayTunnelHarness) -> None:
    ns = harness.make_netns("iso")
    probe = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            ns,
            "python3",
            "-c",
            f"import socket; socket.create_connection(('{harness.head_ip}', {harness.gcs_port}), 3)",
        ],
        capture_output=True,
        text=True,
    )
    assert probe.returncode != 0 and "ConnectionRefused" in probe.stderr


def test_two_volunteers_run_tasks_actors_and_objects_through_the_tunnel(harness: RayTunnelHarness) -> None:
    a = harness.start_volunteer("a")
    b = harness.start_volunteer("b")
    node_a = harness.wait_ready(a)
    node_b = harness.wait_ready(b)
    ip_a, ip_b = node_a["status"]["address"], node_b["status"]["address"]
    assert node_a["status"]["gpus"] == [{"model": "Simulated GPU", "memoryMiB": 24576}]
    assert node_a["status"]["latency"]["smoothedMs"] > 0
    out = harness.run_driver(f"""
import numpy as np
alive = {{n['NodeID']: n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']}}
A, B = '{ip_a}', '{ip_b}'

@ray.remote
def echo_size(x):
    return ray.util.get_node_ip_address(), len(x), np.ones(40_000_000, dtype='u1')

@ray.remote
def produce():
    return np.arange(10_000_000, dtype='i8')  # 80 MB, lives on the producing volunteer

@ray.remote
def consume(arr):
    return ray.util.get_node_ip_address(), int(arr.sum())

@ray.remote(num_gpus=1)
class Counter:
    def __init__(self): self.n = 0
    def add(self, k): self.n += k; return ray.util.get_node_ip_address(), self.n

on = lambda ip: {{'resources': {{f'node:{{ip}}': 0.01}}}}
where, n, back = ray.get(echo_size.options(**on(A)).remote(b'x' * 80_000_000))
made = produce.options(**on(A)).remote()
consumer_ip, total = ray.get(consume.options(**on(B)).remote(made))
counter = Counter.options(**on(B)).remote()
ray.get(counter.add.remote(2)); actor_ip, value = ray.get(counter.add.remote(3))
print(json.dumps(dict(alive=alive, where=where, n=n, back=int(back.sum()), consumer=consumer_ip,
                      total=total, actor_ip=actor_ip, value=value)))
""")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["alive"][node_a["status"]["rayNodeId"]] == ip_a
    assert result["alive"][node_b["status"]["rayNodeId"]] == ip_b
    assert (result["where"], result["n"], result["back"]) == (ip_a, 80_000_000, 40_000_000)
    assert (result["consumer"], result["total"]) == (ip_b, sum(range(10_000_000)))
    assert (result["actor_ip"], result["value"]) == (ip_b, 5)


def test_agent_sigkill_marks_node_not_ready_and_gateway_restart_recovers(harness: RayTunnelHarness) -> None:
    a = harness.start_volunteer("a")
    b = harness.start_volunteer("b")
    harness.wait_ready(a)
    name_b = harness.wait_ready(b)["metadata"]["name"]

    # Gateway killed and restarted: agents reconnect by themselves, their Ray nodes serve again.
    harness.kill_gateway()
    time.sleep(2)
    harness.start_gateway()
    node_a = harness.wait_ready(a, timeout=90)
    assert node_a["status"]["connected"] is True
    out = harness.run_driver(f"""
@ray.remote
def where(): return ray.util.get_node_ip_address()
print(ray.get(where.options(resources={{'node:{node_a["status"]["address"]}': 0.01}}).remote()))
""")
    assert out.strip().splitlines()[-1] == node_a["status"]["address"]

    # Agent killed with SIGKILL: NotReady within the heartbeat timeout.
    harness.wait_ready(b, timeout=90)
    b.process.kill()
    killed = time.monotonic()
    # The bound allows for this test's own polling lagging on a loaded 2-core CI machine; it is
    # still far below Ray's own 20-55 s failure detection.
    while harness.nodes()[name_b]["status"]["phase"] != "NotReady":
        assert time.monotonic() - killed < 2 * harness.heartbeat_timeout + 4, "node stayed Ready"
        time.sleep(0.1)
    status = harness.nodes()[name_b]["status"]
    assert status["connected"] is False
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] in ("Disconnected", "HeartbeatTimeout")
