"""What the gateway tells Ray's GCS when a volunteer drains (with a stand-in for GCS; the real GCS
is exercised in test_ray_netns.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from koinon_gateway import server as gateway_server
from koinon_gateway.rpc import tunnel_stub
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import Cluster, channel_for, cluster

RAY_NODE_ID = "ab" * 28


class RecordingGcs:
    """Confirms every Ray node at the address its session claims, and records drain requests,
    answering them with ``answers`` in turn (the last one from then on)."""

    addresses: dict[str, str] = {}
    drains: list[tuple[str, str, float]] = []
    answers: list[tuple[bool, str] | Exception] = [(True, "")]
    lookups = 0
    lookup_error: Exception | None = None

    def __init__(self, gcs_address: str, auth_token: str = "") -> None:
        pass

    async def address_of(self, node_id: str) -> str | None:
        RecordingGcs.lookups += 1
        if RecordingGcs.lookup_error is not None:
            raise RecordingGcs.lookup_error
        return self.addresses.get(node_id)

    async def drain(self, node_id: str, message: str, deadline_s: float) -> tuple[bool, str]:
        RecordingGcs.drains.append((node_id, message, deadline_s))
        answer = RecordingGcs.answers[min(len(RecordingGcs.drains), len(RecordingGcs.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer


async def _drain_twice(c: Cluster, grace_seconds: int, asks: int = 1, hold_s: float = 0.2) -> str:
    """Joins a node, makes it Ready and sends two drain requests; then, heartbeating as a draining
    agent does, waits until GCS has been asked ``asks`` times and ``hold_s`` more, and closes the
    stream (the node stays Draining until then). Returns the node's name."""
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
        heartbeat = pb.AgentMessage(heartbeat=pb.Heartbeat(ray_node_id=RAY_NODE_ID, ray_state="running"))
        while len(RecordingGcs.drains) < asks:
            assert time.monotonic() < deadline + 5, RecordingGcs.drains
            await call.write(heartbeat)
            await asyncio.sleep(0.1)
        hold_until = time.monotonic() + hold_s
        while time.monotonic() < hold_until:
            await call.write(heartbeat)
            await asyncio.sleep(0.1)
        assert c.registry.objects[name]["status"].get("phase") == "Draining"
        call.cancel()
        return name


@pytest.fixture(autouse=True)
def recording_gcs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway_server, "GcsRayNodeChecker", RecordingGcs)
    RecordingGcs.addresses, RecordingGcs.drains, RecordingGcs.answers = {}, [], [(True, "")]
    RecordingGcs.lookups, RecordingGcs.lookup_error = 0, None


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


async def test_gcs_refusing_is_not_asked_again_and_the_node_stays_draining(tmp_path: Path) -> None:
    RecordingGcs.answers = [(False, "not idle")]
    async with cluster(tmp_path, verify_ray_nodes=True) as c:
        await _drain_twice(c, grace_seconds=30, hold_s=1.2)  # longer than the first pause (0.5 s)
        assert len(RecordingGcs.drains) == 1


async def test_gcs_failing_or_timing_out_is_asked_again_until_it_answers(tmp_path: Path) -> None:
    RecordingGcs.answers = [ConnectionError("GCS unreachable"), TimeoutError("no answer in 5 s"), (True, "")]
    async with cluster(tmp_path, verify_ray_nodes=True) as c:
        await _drain_twice(c, grace_seconds=30, asks=3, hold_s=1.5)  # pauses of 0.5 s, then 1 s
        assert len(RecordingGcs.drains) == 3  # and not again once GCS said yes
        assert {d[2] for d in RecordingGcs.drains} == {RecordingGcs.drains[0][2]}  # the same deadline


async def test_a_gcs_that_keeps_failing_is_not_asked_after_the_node_is_gone(tmp_path: Path) -> None:
    RecordingGcs.answers = [ConnectionError("GCS unreachable")]
    async with cluster(tmp_path, verify_ray_nodes=True) as c:
        name = await _drain_twice(c, grace_seconds=30, asks=2)  # the stream closes after the 2nd ask
        await asyncio.sleep(3.5)  # past the next pauses (1 s, 2 s)
        assert len(RecordingGcs.drains) == 2  # none once the stream has closed
        assert c.registry.objects[name]["status"]["phase"] == "NotReady"


async def test_a_gcs_lookup_that_keeps_failing_is_logged_once_per_node_until_it_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The gateway asks again every 0.25 s while the head is away (a restart of its container takes
    # a minute): one warning per node, not four a second per node.
    RecordingGcs.lookup_error = ConnectionError("WrongClusterID")
    caplog.set_level(logging.WARNING, logger="koinon_gateway.service")
    async with cluster(tmp_path, verify_ray_nodes=True) as c, channel_for(c) as channel:
        joined = await tunnel_stub(channel).Join(pb.JoinRequest(token=c.tokens.add(), name_hint="x"), timeout=5)
        name, address = joined.assignment.node_name, joined.assignment.address
        call = tunnel_stub(channel).Control(metadata=(("authorization", f"Bearer {joined.credential}"),))
        await call.write(pb.AgentMessage(register=pb.Register(node_name=name, address=address, self_heartbeats=True)))
        assert (await call.read()).HasField("registered")
        heartbeat = pb.AgentMessage(heartbeat=pb.Heartbeat(ray_node_id=RAY_NODE_ID, ray_state="running"))
        deadline = time.monotonic() + 10
        while RecordingGcs.lookups < 6:
            assert time.monotonic() < deadline, RecordingGcs.lookups
            await call.write(heartbeat)
            await asyncio.sleep(0.1)
        RecordingGcs.addresses[RAY_NODE_ID] = address
        RecordingGcs.lookup_error = None  # GCS is back: the node is confirmed
        while c.registry.objects[name]["status"].get("phase") != "Ready":
            assert time.monotonic() < deadline, c.registry.objects[name]["status"]
            await call.write(heartbeat)
            await asyncio.sleep(0.1)
        call.cancel()
    failures = [r for r in caplog.records if "GCS lookup for" in r.getMessage() and r.levelno >= logging.WARNING]
    assert len(failures) == 1, [r.getMessage() for r in failures]
