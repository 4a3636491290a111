"""`koinon dev up` when the Ray head's dashboard-agent port is taken between the probe that chose it
and Ray's bind (another control plane, a test cluster): Ray's agent then stays alive without its
HTTP server, and the head refuses every job ("No available agent to submit job"). `up` starts the
head again on other ports, or fails saying so; it never reports such a head as up."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from koinon_dev import cluster as dev_cluster
from koinon_dev.cluster import DevCluster, DevClusterConfig, DevClusterInfo
from koinon_dev.ray_cluster import LocalRayHead

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def take_agent_port_of_head_starts(monkeypatch: pytest.MonkeyPatch, how_many: int) -> list[socket.socket]:
    """Bind the head's dashboard-agent HTTP port just before each of its first ``how_many`` starts,
    as another process does between `up`'s probe and Ray's bind. Returns the sockets (open)."""
    holders: list[socket.socket] = []
    original = LocalRayHead.start

    def start(self: LocalRayHead) -> None:
        if len(holders) < how_many:
            holder = socket.socket()
            holder.bind((self.address, self.ports.dashboard_agent_listen))
            holder.listen()
            holders.append(holder)
        original(self)

    monkeypatch.setattr(LocalRayHead, "start", start)
    return holders


def submit(info: DevClusterInfo) -> tuple[int, str]:
    body = json.dumps({"entrypoint": "echo hi", "entrypoint_num_cpus": 0}).encode()
    request = urllib.request.Request(
        f"{info.ray_dashboard_url}/api/jobs/",
        data=body,
        headers={"Content-Type": "application/json", **info.ray_headers()},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_up_starts_the_head_again_on_other_ports_when_its_agent_port_was_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    holders = take_agent_port_of_head_starts(monkeypatch, how_many=1)
    cluster = DevCluster(DevClusterConfig(state_dir=tmp_path / "dev", volunteers=1, network_namespaces=False))
    try:
        info = cluster.up(progress=False)
        status, text = submit(info)
        assert status == 200, f"`up` reported success, but the head refuses every job: {status} {text[:300]}"
        assert cluster.head is not None
        (held,) = [holder.getsockname()[1] for holder in holders]
        assert cluster.head.ports.dashboard_agent_listen != held, "the head kept the taken port"
        # What `up` recorded is the head that runs now (the volunteer joined that one: `up` waits for it).
        assert info.ray_dashboard_url == cluster.head.dashboard_url
        assert info.ray_address == cluster.head.gcs_address
    finally:
        cluster.down()
        for holder in holders:
            holder.close()


def test_up_fails_naming_the_cause_when_every_head_start_loses_its_agent_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dev_cluster, "HEAD_START_TRIES", 2, raising=False)  # absent before the fix
    holders = take_agent_port_of_head_starts(monkeypatch, how_many=2)
    state_dir = tmp_path / "dev"
    cluster = DevCluster(DevClusterConfig(state_dir=state_dir, volunteers=1, network_namespaces=False))
    try:
        with pytest.raises(RuntimeError) as raised:
            cluster.up(progress=False)
        message = str(raised.value)
        assert "could not take jobs" in message and "2 starts" in message, message
        assert f":{holders[-1].getsockname()[1]}" in message, message  # the port it could not serve on
        assert "dashboard_agent.log" in message and "Failed to start HTTP server" in message, message
        assert not (state_dir / "cluster.json").exists(), "a failed `up` left its state file"
    finally:
        cluster.down()
        for holder in holders:
            holder.close()
