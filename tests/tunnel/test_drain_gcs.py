"""What the gateway tells Ray's GCS when a volunteer drains (with a stand-in for GCS; the real GCS
is exercised in test_ray_netns.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from koinon_gateway import server as gateway_server
from koinon_gateway.rpc import tunnel_stub
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import Cluster, channel_for, cluster

RAY_NODE_ID = "ab" * 28


class RecordingGcs:
    """Confirms every Ray node at the address its session claims, and records drain requests."""

    addresses: dict[str, str] = {}
    drains: list[tuple[str, str, float]] = []
    answer: tuple[bool, str] | Exception = (True, "")

    def __init__(self, gcs_address: str, auth_token: str = "") -> None:
        pass

    async def address_of(self, node_id: str) -> str | None:
        return self.addresses.get(node_id)

    async def drain(self, node_id: str, message: str, deadline_s: float) -> tuple[bool, str]:
        RecordingGcs.drains.append((node_id, message, deadline_s))
        if isinstance(RecordingGcs.answer, Exception):
            raise RecordingGcs.answer
        return RecordingGcs.answer


async def _drain_twice(c: Cluster, grace_seconds: int) -> str:
    token = c.tokens.add()
    async with channel_for(c) as channel:
        joined = await tunnel_stub(channel).Join(pb.JoinRequest(token=token, name_hint="x"), timeout=5)
        name: str = joined.assignment.node_name
        address: str = joined.assignment.address
        RecordingGcs.addresses[RAY_NODE_ID] = address
        call = tunnel_stub(channel).Control(metadata=(("authorization", f"Bearer {joined.credential}"),))
        await call.write(pb.AgentMessage(register=pb.Register(node_name=name, address=address, self_heartbeats=True)))
        assert (await call.read()).HasField("registered")
        await call.write(pb.AgentMessage(heartbeat=pb.Heartbeat(ray_node_id=RAY_NODE_ID, ray_state="running")))
        deadline = time.monotonic() + 5
        while c.registry.objects[name]["status"].get("phase") != "Ready":
            assert time.monotonic() < deadline, c.registry.objects[name]["status"]
            await asyncio.sleep(0.05)
        for _ in range(2):  # a second request (an agent repeating itself) asks GCS nothing more
            drain = pb.DrainRequest(reason="agent stopping", grace_seconds=grace_seconds)
            await call.write(pb.AgentMessage(drain=drain))
        while c.registry.objects[name]["status"].get("phase") != "Draining" or not RecordingGcs.drains:
            assert time.monotonic() < deadline + 5
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        call.cancel()
        return name


@pytest.fixture(autouse=True)
def recording_gcs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway_server, "GcsRayNodeChecker", RecordingGcs)
    RecordingGcs.addresses, RecordingGcs.drains, RecordingGcs.answer = {}, [], (True, "")


async def test_drain_asks_gcs_once_with_the_grace_as_deadline(tmp_path: Path) -> None:
    async with cluster(tmp_path, verify_ray_nodes=True) as c:
        before = time.time()
        await _drain_twice(c, grace_seconds=30)
        assert len(RecordingGcs.drains) == 1
        node_id, message, deadline = RecordingGcs.drains[0]
        assert node_id == RAY_NODE_ID and "agent stopping" in message
        assert before + 30 <= deadline <= time.time() + 30


async def test_a_volunteers_grace_is_capped_before_gcs_hears_it(tmp_path: Path) -> None:
    async with cluster(tmp_path, verify_ray_nodes=True) as c:
        await _drain_twice(c, grace_seconds=4_000_000_000)
        assert RecordingGcs.drains[0][2] <= time.time() + 24 * 3600


@pytest.mark.parametrize("answer", [(False, "not idle"), ConnectionError("GCS unreachable")])
async def test_gcs_refusing_or_failing_leaves_the_node_draining(
    tmp_path: Path, answer: tuple[bool, str] | Exception
) -> None:
    RecordingGcs.answer = answer
    async with cluster(tmp_path, verify_ray_nodes=True) as c:
        name = await _drain_twice(c, grace_seconds=30)
        assert len(RecordingGcs.drains) == 1
        assert c.registry.objects[name]["status"]["phase"] == "Draining"
