"""What a hostile node can send on its own Control stream must not reach other nodes, the API's
write budget or the log's integrity. Against a real gateway over TLS."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from koinon_gateway import server
from koinon_gateway.rpc import tunnel_stub
from koinon_operator.reputation_book import uptime_sample
from koinon_operator.scheduler.config import ReputationConfig
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import Cluster, channel_for, cluster, control_call, next_message, registered_mute_node

VICTIM_RAY_ID = "ab" * 28
VICTIM_ADDRESS = "127.0.20.9"
OWN_RAY_ID = "cd" * 28


class FakeGcs:
    """GCS as the gateway's RayNodeChecker sees it: the victim's Ray node lives at another address."""

    drained: list[str] = []
    known: dict[str, str] = {}  # Ray node id -> address
    down = False  # GCS does not answer
    lookups = 0

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    async def address_of(self, node_id: str) -> str | None:
        FakeGcs.lookups += 1
        if FakeGcs.down:
            raise ConnectionError("GCS unreachable")
        return FakeGcs.known.get(node_id)

    async def drain(self, node_id: str, message: str, deadline_s: float) -> tuple[bool, str]:
        FakeGcs.drained.append(node_id)
        return True, ""


@asynccontextmanager
async def node_with_fake_gcs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recheck_s: float = 5.0
) -> AsyncIterator[tuple[Cluster, pb.JoinResponse, grpc.aio.StreamStreamCall]]:  # type: ignore[type-arg]
    """A registered node of a gateway that checks Ray node ids against FakeGcs."""
    monkeypatch.setattr(server, "GcsRayNodeChecker", FakeGcs)
    FakeGcs.drained, FakeGcs.known, FakeGcs.down, FakeGcs.lookups = [], {}, False, 0
    async with (
        cluster(tmp_path, verify_ray_nodes=True, heartbeat_timeout_s=30.0, ray_recheck_interval_s=recheck_s) as c,
        channel_for(c) as channel,
        registered(c, channel) as (joined, control),
    ):
        yield c, joined, control


@asynccontextmanager
async def registered(
    c: Cluster, channel: grpc.aio.Channel
) -> AsyncIterator[tuple[pb.JoinResponse, grpc.aio.StreamStreamCall]]:  # type: ignore[type-arg]
    joined, control = await registered_mute_node(c, channel, "evil")
    try:
        yield joined, control
    finally:
        control.cancel()


async def test_a_node_cannot_have_gcs_drain_a_ray_node_that_is_not_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray node ids are no secret inside the cluster; the drain goes to the id GCS confirmed at
    the node's own address, and a drain asked before that confirmation waits for it."""
    async with node_with_fake_gcs(tmp_path, monkeypatch) as (_, joined, control):
        assert joined.assignment.address != VICTIM_ADDRESS
        FakeGcs.known = {VICTIM_RAY_ID: VICTIM_ADDRESS, OWN_RAY_ID: joined.assignment.address}
        claim = pb.Heartbeat(seq=1, ray_node_id=VICTIM_RAY_ID, ray_state="running")
        await control.write(pb.AgentMessage(heartbeat=claim))
        await asyncio.sleep(0.3)
        await control.write(pb.AgentMessage(drain=pb.DrainRequest(reason="bye", grace_seconds=5)))
        await asyncio.sleep(0.3)
        assert FakeGcs.drained == []
        # Its own Ray node, once GCS has it at its address, is drained as asked.
        own = pb.Heartbeat(seq=2, ray_node_id=OWN_RAY_ID, ray_state="running")
        await control.write(pb.AgentMessage(heartbeat=own))
        for _ in range(50):
            if FakeGcs.drained:
                break
            await asyncio.sleep(0.05)
        assert FakeGcs.drained == [OWN_RAY_ID]


async def test_repeated_drain_requests_buy_no_status_writes(tmp_path: Path) -> None:
    async with (
        cluster(tmp_path, heartbeat_timeout_s=30.0, status_write_interval_s=30.0) as c,
        channel_for(c) as channel,
        registered(c, channel) as (_, control),
    ):
        await asyncio.sleep(0.2)
        before = c.registry.status_writes
        for i in range(100):
            gpus = [pb.Gpu(model=f"gpu-{i}", memory_mib=1024)]  # each heartbeat changes what status says
            await control.write(pb.AgentMessage(heartbeat=pb.Heartbeat(seq=i, ray_state="starting", gpus=gpus)))
            await control.write(pb.AgentMessage(drain=pb.DrainRequest(reason="x", grace_seconds=60)))
        await asyncio.sleep(0.5)
        assert c.registry.status_writes - before <= c.gateway.config.status_write_burst + 2


FORGED = "bye\nINFO koinon_gateway.service: node admin joined with token abcdef at 127.0.20.1 " + "y" * 5000


async def test_text_a_node_chooses_is_logged_on_one_short_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="koinon_gateway")
    async with cluster(tmp_path) as c, channel_for(c) as channel, registered(c, channel) as (joined, control):
        refused = await control_call(c, joined.credential, pb.Register(node_name=FORGED, address=FORGED))
        assert isinstance(refused, grpc.aio.AioRpcError) and refused.code() == grpc.StatusCode.PERMISSION_DENIED
        await control.write(pb.AgentMessage(drain=pb.DrainRequest(reason=FORGED, grace_seconds=1)))
        await asyncio.sleep(0.3)
    logged = [r.getMessage() for r in caplog.records if "node admin joined" in r.getMessage()]
    assert len(logged) == 2  # the claim and the drain reason, both there to read
    assert all("\n" not in m and len(m) < 400 for m in logged), logged


async def test_a_drain_after_a_ray_restart_drains_the_new_ray_node_once_confirmed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent restarted its Ray node in the same session (a new id) and drains before GCS has
    confirmed the new one: nothing goes to the old, dead id; the new one is drained once confirmed."""
    old_id, new_id = "11" * 28, "22" * 28
    async with node_with_fake_gcs(tmp_path, monkeypatch) as (c, joined, control):
        FakeGcs.known = {old_id: joined.assignment.address}
        await control.write(pb.AgentMessage(heartbeat=pb.Heartbeat(seq=1, ray_node_id=old_id, ray_state="running")))
        session = c.gateway.sessions.by_name[joined.assignment.node_name]
        for _ in range(40):
            if session.ray_verified_id == old_id:
                break
            await asyncio.sleep(0.05)
        assert session.ray_verified_id == old_id
        FakeGcs.known = {}  # the old node is gone, GCS does not know the new one yet
        await control.write(pb.AgentMessage(heartbeat=pb.Heartbeat(seq=2, ray_node_id=new_id, ray_state="running")))
        await asyncio.sleep(0.1)
        await control.write(pb.AgentMessage(drain=pb.DrainRequest(reason="bye", grace_seconds=30)))
        await asyncio.sleep(0.3)
        assert FakeGcs.drained == []
        FakeGcs.known = {new_id: joined.assignment.address}
        for _ in range(40):
            if FakeGcs.drained:
                break
            await asyncio.sleep(0.05)
        assert FakeGcs.drained == [new_id]


async def test_reconnecting_in_a_loop_buys_no_status_writes_beyond_the_nodes_budget(tmp_path: Path) -> None:
    """Each new session writes Ready at once and each ended one NotReady; a node that registers
    again and again (one credential, a fresh Control stream each time) stays within one budget."""
    async with (
        cluster(tmp_path, heartbeat_timeout_s=30.0, status_write_interval_s=30.0, status_write_window_s=3.0) as c,
        channel_for(c) as channel,
        registered(c, channel) as (joined, _first),
    ):
        await c.gateway.sessions.flush()
        before, started = c.registry.status_writes, time.monotonic()
        register = pb.Register(node_name=joined.assignment.node_name, address=joined.assignment.address)
        for _ in range(15):
            control = tunnel_stub(channel).Control(metadata=(("authorization", f"Bearer {joined.credential}"),))
            await control.write(pb.AgentMessage(register=register))
            assert (await next_message(control)).WhichOneof("msg") == "registered"
            control.cancel()
        await asyncio.sleep(0.2)
        config = c.gateway.config
        windows = math.ceil((time.monotonic() - started) / config.status_write_window_s)
        # Two writes per reconnect (30) used to go out within a second.
        assert c.registry.status_writes - before <= config.status_write_burst * (1 + windows) + 2
        # What was held back is written once the budget allows: the node's last word is its own.
        await asyncio.sleep(config.status_write_window_s)
        await c.gateway.sessions.flush()
        assert c.registry.objects[joined.assignment.node_name]["status"]["connected"] is False


async def test_a_node_claiming_another_nodes_ray_id_is_logged_and_counted_once_per_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Such a claim is never confirmed (right), but every 0.25 s retry logged a WARNING for as
    long as the session lasted: some 14,400 lines an hour per lying node, and nothing on /metrics."""
    caplog.set_level(logging.WARNING, logger="koinon_gateway.service")
    other_ray_id = "ef" * 28
    async with node_with_fake_gcs(tmp_path, monkeypatch) as (c, _, control):
        FakeGcs.known = {VICTIM_RAY_ID: VICTIM_ADDRESS, other_ray_id: "127.0.20.10"}
        for seq, claimed in enumerate([VICTIM_RAY_ID, other_ray_id, VICTIM_RAY_ID, other_ray_id], start=1):
            await control.write(
                pb.AgentMessage(heartbeat=pb.Heartbeat(seq=seq, ray_node_id=claimed, ray_state="running"))
            )
            await asyncio.sleep(0.6)  # a few retries each
        logged = [r.getMessage() for r in caplog.records if "which GCS has at" in r.getMessage()]
        assert len(logged) == 2, logged  # one per id claimed, however often and long
        assert c.gateway.metrics.ray_node_claims_refused == 2
        assert "koinon_gateway_ray_node_claims_refused_total 2" in c.gateway.metrics.render()


async def test_a_claim_is_counted_once_per_session_and_id_even_when_the_id_comes_and_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A heartbeat without a Ray node id ends the verify loop; the ids counted were kept in that
    loop, so the next claim of the same id counted again, each cycle: a counter without bound."""
    async with node_with_fake_gcs(tmp_path, monkeypatch) as (c, _, control):
        FakeGcs.known = {VICTIM_RAY_ID: VICTIM_ADDRESS}
        seq = 0
        for _ in range(4):
            for claimed in (VICTIM_RAY_ID, ""):
                seq += 1
                await control.write(
                    pb.AgentMessage(heartbeat=pb.Heartbeat(seq=seq, ray_node_id=claimed, ray_state="running"))
                )
                await asyncio.sleep(0.4)
        assert c.gateway.metrics.ray_node_claims_refused == 1


async def test_the_ids_a_session_is_counted_for_are_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ids are kept for the session's life: at most MAX_RAY_IDS_ELSEWHERE of them (a cluster
    of thousands of nodes has as many ids to claim), and no count beyond."""
    from koinon_gateway.sessions import MAX_RAY_IDS_ELSEWHERE

    async with node_with_fake_gcs(tmp_path, monkeypatch) as (c, joined, control):
        session = c.gateway.sessions.by_name[joined.assignment.node_name]
        session.ray_ids_elsewhere.update(f"{i:056x}" for i in range(MAX_RAY_IDS_ELSEWHERE))
        FakeGcs.known = {VICTIM_RAY_ID: VICTIM_ADDRESS}
        await control.write(
            pb.AgentMessage(heartbeat=pb.Heartbeat(seq=1, ray_node_id=VICTIM_RAY_ID, ray_state="running"))
        )
        await asyncio.sleep(0.6)
        assert len(session.ray_ids_elsewhere) == MAX_RAY_IDS_ELSEWHERE
        assert c.gateway.metrics.ray_node_claims_refused == 0
        assert not session.ray_verified_id


async def heartbeat_until(
    c: Cluster,
    control: grpc.aio.StreamStreamCall,  # type: ignore[type-arg]
    name: str,
    phase: str,
    seconds: float,
) -> dict[str, Any]:
    """Heartbeats (Ray node OWN_RAY_ID running) until the node's status says ``phase`` or
    ``seconds`` pass; returns the status last read."""
    deadline = time.monotonic() + seconds
    seq = 0
    while True:
        seq += 1
        beat = pb.Heartbeat(seq=seq, ray_node_id=OWN_RAY_ID, ray_state="running")
        await control.write(pb.AgentMessage(heartbeat=beat))
        await asyncio.sleep(0.1)
        # No flush: the writer's budget may hold a write back for its window (10 s).
        status: dict[str, Any] = (await c.registry.get(name) or {}).get("status", {})
        if status.get("phase") == phase or time.monotonic() > deadline:
            return status


async def test_a_ray_node_gcs_no_longer_has_alive_is_not_ready_with_reason_ray_node_not_alive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GCS was asked once per Ray node id: a node whose Ray node died (or left GCS) while its agent
    kept reporting the id as running stayed Ready with a dead rayNodeId for the whole session, and
    earned uptime for it. It is NotReady until GCS has a live Ray node of its at its address again."""
    async with node_with_fake_gcs(tmp_path, monkeypatch, recheck_s=0.3) as (c, joined, control):
        name = joined.assignment.node_name
        FakeGcs.known = {OWN_RAY_ID: joined.assignment.address}
        status = await heartbeat_until(c, control, name, "Ready", 5.0)
        assert (status["phase"], status["rayNodeId"]) == ("Ready", OWN_RAY_ID)
        FakeGcs.known = {}  # the Ray node is gone from GCS; the agent still says it runs
        status = await heartbeat_until(c, control, name, "NotReady", 5.0)
        assert status["phase"] == "NotReady"
        assert status.get("rayNodeId") is None
        assert status["conditions"][0]["reason"] == "RayNodeNotAlive"
        # Alive at another node's address is not alive at its own.
        FakeGcs.known = {OWN_RAY_ID: VICTIM_ADDRESS}
        await asyncio.sleep(1.0)
        assert (await c.registry.get(name) or {})["status"]["phase"] == "NotReady"
        FakeGcs.known = {OWN_RAY_ID: joined.assignment.address}  # back, as GCS lists it
        status = await heartbeat_until(c, control, name, "Ready", 5.0)
        assert (status["phase"], status["rayNodeId"]) == ("Ready", OWN_RAY_ID)


async def test_a_gcs_that_does_not_answer_leaves_confirmed_nodes_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outage of GCS (the ray-head container restarting) must not take every node out of Ready:
    the last verdict stands until GCS answers."""
    async with node_with_fake_gcs(tmp_path, monkeypatch, recheck_s=0.2) as (c, joined, control):
        name = joined.assignment.node_name
        FakeGcs.known = {OWN_RAY_ID: joined.assignment.address}
        assert (await heartbeat_until(c, control, name, "Ready", 5.0))["phase"] == "Ready"
        FakeGcs.down, asked = True, FakeGcs.lookups
        status = await heartbeat_until(c, control, name, "NotReady", 1.5)
        assert FakeGcs.lookups > asked  # it was asked again, and did not answer
        assert (status["phase"], status["rayNodeId"]) == ("Ready", OWN_RAY_ID)


async def test_confirmed_ray_nodes_are_checked_in_one_sweep_not_one_lookup_per_heartbeat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cheap at a thousand nodes: a confirmed node is looked up once per ray_recheck_interval_s
    (one cached read of GCS's node table serves the whole sweep), however often it heartbeats."""
    async with node_with_fake_gcs(tmp_path, monkeypatch, recheck_s=1.0) as (c, joined, control):
        name = joined.assignment.node_name
        FakeGcs.known = {OWN_RAY_ID: joined.assignment.address}
        assert (await heartbeat_until(c, control, name, "Ready", 5.0))["phase"] == "Ready"
        asked, started = FakeGcs.lookups, time.monotonic()
        await heartbeat_until(c, control, name, "never", 2.5)  # some 20 heartbeats
        assert FakeGcs.lookups - asked <= (time.monotonic() - started) / 1.0 + 1


async def test_a_draining_node_whose_ray_node_gcs_lost_is_not_ready_and_earns_no_uptime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Draining counts as up for reputation: an agent that asked for a day's drain and kept
    heartbeating with its Ray node gone would earn uptime all that time."""
    async with node_with_fake_gcs(tmp_path, monkeypatch, recheck_s=0.3) as (c, joined, control):
        name = joined.assignment.node_name
        FakeGcs.known = {OWN_RAY_ID: joined.assignment.address}
        assert (await heartbeat_until(c, control, name, "Ready", 5.0))["phase"] == "Ready"
        await control.write(pb.AgentMessage(drain=pb.DrainRequest(reason="bye", grace_seconds=86400)))
        assert (await heartbeat_until(c, control, name, "Draining", 5.0))["phase"] == "Draining"
        FakeGcs.known = {}  # its Ray node is gone from GCS; the agent keeps its session and heartbeats
        status = await heartbeat_until(c, control, name, "NotReady", 5.0)
        assert status["phase"] == "NotReady" and status.get("rayNodeId") is None, status
        assert status["conditions"][0]["reason"] == "RayNodeNotAlive"
        now = time.time()
        sampled = {**status, "reputation": {"uptimeSampledAt": now - 60}}

        def uptime(sample: dict[str, Any]) -> float:
            reputation = uptime_sample(sample, now, ReputationConfig(), max_gap_s=600)
            assert reputation is not None
            return float(reputation["reputation"]["uptime"])

        # The minute since the last sample counts as down; the same minute Draining counted as up.
        assert uptime(sampled) < 0.5 < uptime({**sampled, "phase": "Draining"})


async def test_a_drain_before_any_ray_node_was_confirmed_is_not_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with node_with_fake_gcs(tmp_path, monkeypatch) as (c, joined, control):
        name = joined.assignment.node_name
        FakeGcs.known = {}  # the id it reports is alive nowhere
        await control.write(pb.AgentMessage(drain=pb.DrainRequest(reason="bye", grace_seconds=86400)))
        status = await heartbeat_until(c, control, name, "never", 2.0)
        assert status["phase"] == "NotReady", status
