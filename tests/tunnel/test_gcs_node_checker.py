"""GcsRayNodeChecker, the gateway's reader of the Ray head's GCS, against a GCS that goes away and
comes back: the ray-head container of the gateway pod (manifests/gateway/deployment.yaml) restarts
on its own (OOMKilled at its memory limit, or its liveness probe) while the gateway container keeps
running. A new GCS refuses the client made for the old one for ever (WrongClusterID), so the
checker must build a new client after a failure, or no volunteer's Ray node is confirmed again."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from koinon_gateway import ray_check
from koinon_gateway.ray_check import ALIVE, GcsRayNodeChecker

NODE_ID = "ab" * 28


@dataclass
class _Info:
    node_manager_address: str
    state: int = ALIVE


@dataclass
class FakeGcsClients:
    """Stands in for ``ray._raylet.GcsClient``: every client it makes answers from ``nodes`` until
    it is broken (as the client of a GCS that restarted: refused for ever), or raises when made
    while ``down`` (what Ray does once its connect timeout passes)."""

    nodes: dict[str, str] = field(default_factory=dict)
    down: bool = False
    made: list[FakeClient] = field(default_factory=list)

    def __call__(self, address: str) -> FakeClient:
        if self.down:
            raise ConnectionError("Timed out while waiting for GCS to become available.")
        client = FakeClient(self)
        self.made.append(client)
        return client

    def restart_gcs(self) -> None:
        for client in self.made:
            client.broken = True


@dataclass
class FakeClient:
    gcs: FakeGcsClients
    broken: bool = False

    def _check(self) -> None:
        if self.broken:
            raise ConnectionError("WrongClusterID: this client was made for another cluster")

    def get_all_node_info(self, timeout: float) -> dict[bytes, _Info]:
        self._check()
        return {bytes.fromhex(k): _Info(v) for k, v in self.gcs.nodes.items()}

    def drain_node(self, node_id: str, reason: int, message: str, deadline_ms: int, timeout: float) -> tuple[bool, str]:
        self._check()
        return True, ""


@pytest.fixture
def fake_gcs(monkeypatch: pytest.MonkeyPatch) -> FakeGcsClients:
    gcs = FakeGcsClients(nodes={NODE_ID: "127.0.20.1"})
    importlib.import_module("ray._raylet")
    monkeypatch.setattr("ray._raylet.GcsClient", lambda address: gcs(address))
    return gcs


async def test_a_failed_read_drops_the_client_and_the_next_read_uses_a_new_one(fake_gcs: FakeGcsClients) -> None:
    checker = GcsRayNodeChecker("127.0.0.1:6379", cache_s=0.0)
    assert await checker.address_of(NODE_ID) == "127.0.20.1"
    fake_gcs.restart_gcs()
    with pytest.raises(ConnectionError, match="WrongClusterID"):
        await checker.address_of(NODE_ID)
    assert await checker.address_of(NODE_ID) == "127.0.20.1"
    assert len(fake_gcs.made) == 2


async def test_a_failed_drain_drops_the_client_too(fake_gcs: FakeGcsClients) -> None:
    checker = GcsRayNodeChecker("127.0.0.1:6379", cache_s=0.0)
    assert await checker.address_of(NODE_ID) == "127.0.20.1"
    fake_gcs.restart_gcs()
    with pytest.raises(ConnectionError):
        await checker.drain(NODE_ID, "volunteer draining", time.time() + 30)
    assert await checker.drain(NODE_ID, "volunteer draining", time.time() + 30) == (True, "")
    assert await checker.address_of(NODE_ID) == "127.0.20.1"  # the new client serves reads as well
    assert len(fake_gcs.made) == 2


async def test_a_gcs_that_keeps_failing_is_logged_once_and_its_recovery_once(
    fake_gcs: FakeGcsClients, caplog: pytest.LogCaptureFixture
) -> None:
    checker = GcsRayNodeChecker("127.0.0.1:6379", cache_s=0.0)
    fake_gcs.down = True
    caplog.set_level(logging.INFO, logger=ray_check.__name__)
    for _ in range(20):  # the gateway's _verify_loop asks every 0.25 s
        with pytest.raises(ConnectionError):
            await checker.address_of(NODE_ID)
    fake_gcs.down = False
    for _ in range(3):
        assert await checker.address_of(NODE_ID) == "127.0.20.1"
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == ray_check.__name__]
    assert len(records) == 2, records
    assert records[0][0] == logging.WARNING and "Timed out while waiting for GCS" in records[0][1]
    assert records[1][0] == logging.INFO and "20 failed" in records[1][1]


# The real thing: a Ray head killed and started again on the same ports, as the kubelet restarts the
# ray-head container, while one checker (the gateway container's) lives on.


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _start_head(tmp: Path, tag: str, ports: list[int]) -> subprocess.Popen[bytes]:
    gcs, nm, om, ag, al, re, me, rc = ports[:8]
    ray = str(Path(sys.executable).parent / "ray")
    command = [
        ray, "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=0",
        "--include-dashboard=false", f"--temp-dir={tmp / tag}", f"--node-manager-port={nm}",
        f"--object-manager-port={om}", f"--dashboard-agent-grpc-port={ag}", f"--dashboard-agent-listen-port={al}",
        f"--runtime-env-agent-port={re}", f"--metrics-export-port={me}", f"--ray-client-server-port={rc}",
        f"--min-worker-port={ports[8]}", f"--max-worker-port={ports[8] + 10}",
    ]  # fmt: skip
    log = open(tmp / f"{tag}.log", "wb")  # noqa: SIM115
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _kill(process: subprocess.Popen[bytes]) -> None:
    # Only what this test started: the session of its own `ray start`.
    subprocess.run(["pkill", "-9", "-s", str(process.pid)], check=False)
    process.wait(timeout=30)


def _head_node(gcs: str) -> tuple[str, str]:
    gcs_client = importlib.import_module("ray._raylet").GcsClient
    deadline = time.monotonic() + 90
    host, port = gcs.rsplit(":", 1)
    while time.monotonic() < deadline:  # GCS listening first: a GcsClient made earlier waits 30 s
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    while time.monotonic() < deadline:
        try:
            infos = gcs_client(address=gcs).get_all_node_info(timeout=2)
            alive = [(k.hex(), i.node_manager_address) for k, i in infos.items() if i.state == ALIVE]
            if alive:
                return alive[0]
        except Exception:
            pass
        time.sleep(1)
    raise AssertionError("head never registered")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_checker_confirms_nodes_of_a_ray_head_restarted_beside_it() -> None:
    tmp_path = Path(tempfile.mkdtemp(prefix="koinon-gcs-", dir="/tmp"))  # AF_UNIX paths: short
    ports = _free_ports(9)
    gcs = f"127.0.0.1:{ports[0]}"
    checker = GcsRayNodeChecker(gcs, cache_s=0.0)
    try:
        _restart_head_under(checker, tmp_path, gcs, ports)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _restart_head_under(checker: GcsRayNodeChecker, tmp_path: Path, gcs: str, ports: list[int]) -> None:
    first = _start_head(tmp_path, "first", ports)
    try:
        node_id, address = _head_node(gcs)
        assert asyncio.run(checker.address_of(node_id)) == address  # the gateway sees the first head
    finally:
        _kill(first)
    second = _start_head(tmp_path, "second", ports)  # the kubelet restarts the ray-head container
    try:
        node_id, address = _head_node(gcs)
        # The gateway container was not restarted: its checker must see the new GCS's nodes (the
        # gateway's _verify_loop asks again every 0.25 s; give it 10 tries).
        errors: list[str] = []
        for _ in range(10):
            try:
                if asyncio.run(checker.address_of(node_id)) == address:
                    break
            except Exception as error:
                errors.append(repr(error)[:90])
            time.sleep(1)
        else:
            raise AssertionError(f"new head's node never verified; {len(errors)} errors, last: {errors[-1:]}")
    finally:
        _kill(second)
