"""Refusals and faults at the protocol level, against a real gateway over TLS."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from koinon_agent.local_proxy import LocalProxy
from koinon_gateway import credentials
from koinon_gateway.registry import JSON, InMemoryNodeRegistry
from koinon_gateway.rpc import EOF, tunnel_stub
from koinon_gateway.server import Gateway
from koinon_gateway.service import CONTROL_STREAMS_OPENING_MAX
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import (
    Cluster,
    channel_for,
    cluster,
    connect_via_proxy,
    control_call,
    echo_handler,
    echo_roundtrip,
    next_message,
    next_open_connection,
    registered_mute_node,
)


@pytest.fixture
async def c(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with cluster(tmp_path, first_frame_timeout_s=0.5) as result:
        yield result


async def join(c: Cluster, token: str) -> grpc.aio.AioRpcError | pb.JoinResponse:
    async with channel_for(c) as channel:
        try:
            response: pb.JoinResponse = await tunnel_stub(channel).Join(
                pb.JoinRequest(token=token, name_hint="x"), timeout=5
            )
            return response
        except grpc.aio.AioRpcError as exc:
            return exc


@pytest.mark.parametrize("case", ["wrong-secret", "unknown", "malformed", "expired", "revoked", "usage-limit"])
async def test_bad_tokens_are_refused_with_reason_and_create_nothing(c: Cluster, case: str) -> None:
    good = c.tokens.add(usage_limit=1)
    token = {
        "wrong-secret": good[:7] + "0" * 16,
        "unknown": "zzzzzz.0123456789abcdef",
        "malformed": "not-a-token",
        "expired": c.tokens.add(expiration=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)),
        "revoked": good,
        "usage-limit": good,
    }[case]
    if case == "revoked":
        c.tokens.revoke(good)
    if case == "usage-limit":
        assert isinstance(await join(c, good), pb.JoinResponse)
        created = dict(c.registry.objects)
    else:
        created = {}
    result = await join(c, token)
    assert isinstance(result, grpc.aio.AioRpcError)
    assert result.code() == grpc.StatusCode.PERMISSION_DENIED
    reason = {"wrong-secret": "invalid-secret"}.get(case, case)
    # Without the secret the caller is not told whether the id exists (the metrics are).
    told = "invalid-token" if case in ("wrong-secret", "unknown") else reason
    assert f"join refused: {told}" in (result.details() or "")
    assert c.registry.objects == created
    assert c.gateway.metrics.joins[reason] == 1


async def test_a_full_address_pool_refuses_the_join_and_keeps_the_tokens_use(tmp_path: Path) -> None:
    async with cluster(tmp_path, vip_cidr="127.0.20.0/30") as c:  # two addresses
        token = c.tokens.add(usage_limit=3)
        assert isinstance(await join(c, token), pb.JoinResponse)
        assert isinstance(await join(c, token), pb.JoinResponse)
        nodes = dict(c.registry.objects)
        full = await join(c, token)
        assert isinstance(full, grpc.aio.AioRpcError)
        assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # the agent backs off and asks again
        assert "no free virtual address in vip_cidr 127.0.20.0/30" in (full.details() or "")
        assert c.registry.objects == nodes
        assert c.gateway.metrics.joins["address-pool-exhausted"] == 1
        assert next(iter(c.tokens.tokens.values())).usages_count == 2


class FailingRegistry(InMemoryNodeRegistry):
    """The in-memory registry with an API failure injected into the status write after a create."""

    def __init__(self) -> None:
        super().__init__()
        self.failures_left = 1

    async def patch_status(self, name: str, status: JSON, uid: str = "") -> None:
        if self.failures_left:
            self.failures_left -= 1
            raise RuntimeError("API server answered 500")
        await super().patch_status(name, status, uid)


async def test_a_join_that_cannot_be_recorded_leaves_nothing_and_can_be_retried(tmp_path: Path) -> None:
    registry = FailingRegistry()
    async with cluster(tmp_path, registry=registry) as c:
        token = c.tokens.add(usage_limit=1)
        failed = await join(c, token)
        assert isinstance(failed, grpc.aio.AioRpcError)
        assert failed.code() == grpc.StatusCode.UNAVAILABLE
        assert registry.objects == {}  # the half-made node was deleted
        assert c.gateway.allocator.holder("127.0.20.1") is None
        assert c.gateway.metrics.joins["registry-error"] == 1
        retried = await join(c, token)  # the use was given back: a limit-1 token still joins
        assert isinstance(retried, pb.JoinResponse) and retried.assignment.address == "127.0.20.1"
        assert list(registry.objects) == [retried.assignment.node_name]


async def test_invalid_join_request_names_the_field(c: Cluster) -> None:
    async with channel_for(c) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await tunnel_stub(channel).Join(
                pb.JoinRequest(token=c.tokens.add(), gpus=[pb.Gpu(model="", memory_mib=1)]), timeout=5
            )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "gpus[0].model" in (info.value.details() or "")
    assert c.registry.objects == {}


async def test_node_cannot_claim_another_nodes_identity_or_address(c: Cluster) -> None:
    a = await c.start_agent("alpha")
    b = await c.start_agent("beta")
    assert a.identity is not None and b.identity is not None
    cases = [
        (a.identity.credential, pb.Register(node_name=b.identity.node_name, address=a.identity.address)),
        (a.identity.credential, pb.Register(node_name=a.identity.node_name, address=b.identity.address)),
    ]
    for credential, register in cases:
        result = await control_call(c, credential, register)
        assert isinstance(result, grpc.aio.AioRpcError)
        assert result.code() == grpc.StatusCode.PERMISSION_DENIED
    # A credential forged with another key is not accepted at all.
    uid = c.registry.objects[b.identity.node_name]["metadata"]["uid"]
    forged = credentials.issue(b"\0" * 32, b.identity.node_name, b.identity.address, 3600, uid=uid).token
    result = await control_call(c, forged, pb.Register(node_name=b.identity.node_name, address=b.identity.address))
    assert isinstance(result, grpc.aio.AioRpcError) and result.code() == grpc.StatusCode.UNAUTHENTICATED
    assert c.gateway.metrics.refused_streams["identity-mismatch"] == 2
    # B's session is untouched.
    assert c.gateway.sessions.by_name[b.identity.node_name].address == b.identity.address


async def refused_accept(call: Any) -> str:
    """The reason an Accept was refused: by status (NOT_FOUND), not by a Close frame, which a node
    that never opens its stream's window would keep waiting for ever."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await asyncio.wait_for(call.read(), 5)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND, refused.value
    reason = re.match(r"accept refused \((\S+)\)", refused.value.details() or "")
    assert reason is not None, refused.value.details()
    return reason.group(1)


async def test_node_cannot_accept_a_connection_meant_for_another(c: Cluster) -> None:
    a = await c.start_agent("alpha")
    b = await c.start_agent("beta")
    assert a.identity is not None and b.identity is not None
    target = c.gateway.sessions.by_name[b.identity.node_name]
    loop = asyncio.get_running_loop()
    from koinon_gateway.routing import PendingConnection

    c.gateway.router.pending[999] = PendingConnection(b.identity.node_name, loop.create_future())
    async with channel_for(c) as channel:
        call = tunnel_stub(channel).Connect(metadata=(("authorization", f"Bearer {a.identity.credential}"),))
        await call.write(pb.Frame(accept=pb.Accept(connection_id=999)))
        assert await refused_accept(call) == "unknown-connection"
    assert not c.gateway.router.pending[999].accepted.done()
    assert target is c.gateway.sessions.by_name[b.identity.node_name]


async def healthy(c: Cluster, proxy: LocalProxy | None) -> bool:
    status, reader, writer = await connect_via_proxy(proxy, "127.0.0.1", c.head_port)
    try:
        return status == 200 and await echo_roundtrip(reader, writer, b"still serving") == b"still serving"
    finally:
        writer.close()


async def test_oversized_and_malformed_frames_close_only_that_stream(c: Cluster) -> None:
    a = await c.start_agent("alpha")
    assert a.identity is not None and a._proxy is not None
    metadata = (("authorization", f"Bearer {a.identity.credential}"),)
    async with channel_for(c) as channel:
        # Oversized: a 4 MiB Data frame exceeds the gateway's message limit.
        call = tunnel_stub(channel).Connect(metadata=metadata)
        await call.write(pb.Frame(dial=pb.Dial(host="127.0.0.1", port=c.head_port)))
        assert (await call.read()).dial_result.ok
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.write(pb.Frame(data=pb.Data(payload=b"\0" * (4 << 20))))
            await call.read()
            await call.read()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Malformed: bytes that are not a Frame.
        raw = channel.stream_stream("/koinon.tunnel.v1.Tunnel/Connect", None, None)
        bad = raw(metadata=metadata)  # type: ignore[call-arg]
        await bad.write(b"\xff\xff\xff\xff\x0f")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(bad.read(), 5)
        # Refused for what it is, not timed out (the first-frame timeout would also raise).
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await healthy(c, a._proxy)


async def test_silent_stream_is_closed_and_others_keep_working(c: Cluster) -> None:
    a = await c.start_agent("alpha")
    assert a.identity is not None and a._proxy is not None
    async with channel_for(c) as channel:
        call = tunnel_stub(channel).Connect(metadata=(("authorization", f"Bearer {a.identity.credential}"),))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(call.read(), 5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert c.gateway.metrics.refused_streams["no-first-frame"] == 1
    assert await healthy(c, a._proxy)


async def test_heartbeat_loss_marks_node_not_ready(c: Cluster) -> None:
    """A node that stays connected but stops answering pings goes NotReady after the timeout."""
    token = c.tokens.add()
    joined = await join(c, token)
    assert isinstance(joined, pb.JoinResponse)
    name = joined.assignment.node_name
    async with channel_for(c) as channel:
        call = tunnel_stub(channel).Control(metadata=(("authorization", f"Bearer {joined.credential}"),))
        await call.write(pb.AgentMessage(register=pb.Register(node_name=name, address=joined.assignment.address)))
        assert (await call.read()).HasField("registered")
        assert c.registry.objects[name]["status"]["connected"] is True
        # Never answer pings; the liveness check must notice within the timeout (+ one check period).
        start = asyncio.get_running_loop().time()
        while c.registry.objects[name]["status"]["connected"]:
            assert asyncio.get_running_loop().time() - start < c.gateway.config.heartbeat_timeout_s + 1.5
            await asyncio.sleep(0.05)
        status = c.registry.objects[name]["status"]
        assert status["phase"] == "NotReady"
        assert status["conditions"][0]["reason"] == "HeartbeatTimeout"
        call.cancel()


@pytest.mark.parametrize("self_heartbeats", [True, False])
async def test_pings_are_rtt_probes_for_agents_that_heartbeat_by_themselves(c: Cluster, self_heartbeats: bool) -> None:
    """An agent that heartbeats every interval by itself is pinged only every rtt_probe_every
    intervals; one that only answers pings (an older agent) is pinged every interval. Both stay
    connected over several heartbeat timeouts, and both get RTT measured."""
    joined = await join(c, c.tokens.add())
    assert isinstance(joined, pb.JoinResponse)
    name, interval = joined.assignment.node_name, c.gateway.config.heartbeat_interval_s
    every = c.gateway.config.rtt_probe_every
    assert joined.assignment.rtt_probe_interval_ms == round(interval * every * 1000)
    register = pb.Register(node_name=name, address=joined.assignment.address, self_heartbeats=self_heartbeats)
    pings = 0
    async with channel_for(c) as channel:
        call = tunnel_stub(channel).Control(metadata=(("authorization", f"Bearer {joined.credential}"),))
        await call.write(pb.AgentMessage(register=register))
        assert (await call.read()).HasField("registered")

        one_write_at_a_time = asyncio.Lock()  # grpc.aio allows one outstanding write per call

        async def answer_pings() -> None:
            nonlocal pings
            while True:
                message = await call.read()
                if message.HasField("ping"):
                    pings += 1
                    echo = pb.Heartbeat(
                        echo_seq=message.ping.seq,
                        echo_gateway_time_ns=message.ping.gateway_time_ns,
                        ray_state="running",
                    )
                    async with one_write_at_a_time:
                        await call.write(pb.AgentMessage(heartbeat=echo))

        async def heartbeat() -> None:
            while self_heartbeats:
                await asyncio.sleep(interval)
                async with one_write_at_a_time:
                    await call.write(pb.AgentMessage(heartbeat=pb.Heartbeat(ray_state="running")))

        tasks = [asyncio.ensure_future(answer_pings()), asyncio.ensure_future(heartbeat())]
        watched = 3 * c.gateway.config.heartbeat_timeout_s
        await asyncio.sleep(watched)
        failed = [t.exception() for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
        assert not failed, failed
        for task in tasks:
            task.cancel()
        status = c.registry.objects[name]["status"]
        assert status["connected"] is True and status["latency"]["smoothedMs"] >= 0
        expected = watched / interval / (every if self_heartbeats else 1)
        assert 0.6 * expected <= pings <= expected + 2
        call.cancel()


async def test_reconnect_is_idempotent(c: Cluster) -> None:
    a = await c.start_agent("alpha")
    assert a.identity is not None
    name = a.identity.node_name
    first = c.gateway.sessions.by_name[name]
    # Same credential registers again (e.g. after a network blip): the newer session wins, one node.
    result = await control_call(c, a.identity.credential, pb.Register(node_name=name, address=a.identity.address))
    assert isinstance(result, pb.GatewayMessage) and result.registered.assignment.address == a.identity.address
    assert first.closed
    # The agent notices, reconnects by itself, and keeps its identity.
    await asyncio.sleep(0.5)
    deadline = asyncio.get_running_loop().time() + 10
    while name not in c.gateway.sessions.by_name:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    assert list(c.registry.objects) == [name]
    assert a.registrations >= 2


async def test_a_session_replaced_by_a_newer_one_is_told_at_once(tmp_path: Path) -> None:
    """Not left open and quiet until the agent's heartbeat timeout (30 s here)."""
    async with cluster(tmp_path, heartbeat_timeout_s=30.0) as c, channel_for(c) as channel:
        joined, older = await registered_mute_node(c, channel)
        register = pb.Register(node_name=joined.assignment.node_name, address=joined.assignment.address)
        newer = await control_call(c, joined.credential, register)
        assert isinstance(newer, pb.GatewayMessage) and newer.WhichOneof("msg") == "registered"

        async def older_ends() -> grpc.StatusCode:
            while await older.read() is not EOF:
                pass
            code: grpc.StatusCode = await older.code()
            return code

        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(older_ends(), 3)
        assert ended.value.code() == grpc.StatusCode.ABORTED
        assert "newer session" in (ended.value.details() or "")


async def test_gateway_crash_leaves_no_node_connected_until_it_reconnects(c: Cluster) -> None:
    """A SIGKILLed gateway writes no 'disconnected' status; its successor must not trust what it left."""
    agent = await c.start_agent("alpha")
    assert agent.identity is not None
    name = agent.identity.node_name
    assert c.registry.objects[name]["status"]["connected"] is True
    left_behind = copy.deepcopy(c.registry.objects)  # what the registry holds after a crash
    listen = c.gateway.agent_target
    await c.gateway.stop(0)
    c.registry.objects = left_behind
    c.registry.objects["ghost"] = {"metadata": {"name": "ghost"}, "status": {"phase": "NotReady", "connected": False}}
    writes_before = c.registry.status_writes

    # The successor listens where agents dial and signs with the same CA, as in the Deployment.
    c.gateway = Gateway(replace(c.gateway.config, listen=listen), c.tokens, c.registry, c.gateway.ca_store)
    await c.gateway.start()
    status = c.registry.objects[name]["status"]
    assert (status["phase"], status["connected"]) == ("NotReady", False)
    assert status["conditions"][0]["reason"] == "GatewayRestarted"
    assert status["address"] == agent.identity.address  # its address stays reserved for it
    assert c.registry.objects["ghost"]["status"] == {"phase": "NotReady", "connected": False}
    assert c.registry.status_writes == writes_before + 1

    # The agent dials again by itself and its node is connected once more, under the same name.
    deadline = asyncio.get_running_loop().time() + 15
    while not c.registry.objects[name]["status"]["connected"]:
        assert asyncio.get_running_loop().time() < deadline, "agent did not reconnect"
        await asyncio.sleep(0.05)
    assert c.registry.objects[name]["status"]["conditions"][0]["reason"] != "GatewayRestarted"


async def test_a_dialer_that_hangs_up_leaves_nothing_pending(tmp_path: Path) -> None:
    async with cluster(tmp_path, heartbeat_timeout_s=30.0) as c:
        a = await c.start_agent("alpha")
        assert a.identity is not None
        async with channel_for(c) as channel:
            mute, control = await registered_mute_node(c, channel)
            metadata = (("authorization", f"Bearer {a.identity.credential}"),)
            for _ in range(5):
                dial = tunnel_stub(channel).Connect(metadata=metadata)
                await dial.write(
                    pb.Frame(dial=pb.Dial(host=mute.assignment.address, port=mute.assignment.ports.node_manager_port))
                )
                await asyncio.sleep(0.1)  # the gateway waits for the mute node's Accept...
                dial.cancel()  # ...and the dialer gives up first
            await asyncio.sleep(0.3)
            assert c.gateway.router.pending == {}
            # An Accept that comes late is refused at once, not left waiting for ever.
            opened = [
                m.open_connection
                for m in [await next_message(control) for _ in range(5)]
                if m.HasField("open_connection")
            ]
            assert opened
            accept = tunnel_stub(channel).Connect(metadata=(("authorization", f"Bearer {mute.credential}"),))
            await accept.write(pb.Frame(accept=pb.Accept(connection_id=opened[0].connection_id)))
            assert await refused_accept(accept) == "unknown-connection"
            control.cancel()


async def test_a_node_may_hold_only_so_many_connections(tmp_path: Path) -> None:
    async with cluster(tmp_path, max_streams_per_node=3) as c:
        a = await c.start_agent("alpha")
        assert a.identity is not None
        metadata = (("authorization", f"Bearer {a.identity.credential}"),)
        async with channel_for(c) as channel:
            calls = []
            for _ in range(3):
                call = tunnel_stub(channel).Connect(metadata=metadata)
                await call.write(pb.Frame(dial=pb.Dial(host="127.0.0.1", port=c.head_port)))
                assert (await asyncio.wait_for(call.read(), 5)).dial_result.ok
                calls.append(call)
            extra = tunnel_stub(channel).Connect(metadata=metadata)
            await extra.write(pb.Frame(dial=pb.Dial(host="127.0.0.1", port=c.head_port)))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await asyncio.wait_for(extra.read(), 5)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert c.gateway.metrics.refused_streams["too-many-streams"] == 1
            status, _, writer = await connect_via_proxy(a._proxy, "127.0.0.1", c.head_port)
            writer.close()
            assert status == 502  # its own proxy's connections count too, and get a clear answer
            calls.pop().cancel()
            await asyncio.sleep(0.2)
            assert await healthy(c, a._proxy)
            for call in calls:
                call.cancel()


class StalledStream:
    """A Control call whose agent has stopped reading: every write waits for ever."""

    async def write(self, message: object) -> None:
        await asyncio.Event().wait()


async def test_an_agent_that_stops_reading_its_control_stream_loses_its_session() -> None:
    from koinon_gateway.addresses import PortBlock
    from koinon_gateway.sessions import CONTROL_OUTBOX_LIMIT, NodeSession, SessionEnded

    handler = asyncio.ensure_future(asyncio.Event().wait())  # stands for the Control handler
    session = NodeSession("vn-a", "127.0.20.1", PortBlock(*range(20000, 20008)), StalledStream(), handler)
    writer = asyncio.ensure_future(session.write_outbox())
    try:
        session.send(pb.GatewayMessage(ping=pb.Ping(seq=0)))
        await asyncio.sleep(0.01)  # the writer took it and is stuck writing it
        # Sending never waits (a dial that gives up can never cancel a write half-done)...
        for seq in range(CONTROL_OUTBOX_LIMIT):
            session.send(pb.GatewayMessage(ping=pb.Ping(seq=seq + 1)))
        # ...and once the outbox is full the session ends.
        with pytest.raises(SessionEnded):
            session.send(pb.GatewayMessage(ping=pb.Ping(seq=0)))
        await asyncio.sleep(0)
        assert handler.cancelled()
    finally:
        writer.cancel()
        handler.cancel()


class OutageRegistry(InMemoryNodeRegistry):
    """Status writes hang while ``outage`` is set, as writes to an API server that went away."""

    def __init__(self) -> None:
        super().__init__()
        self.outage = False
        self.back = asyncio.Event()

    async def patch_status(self, name: str, status: JSON, uid: str = "") -> None:
        if self.outage:
            await self.back.wait()
        await super().patch_status(name, status, uid)


async def test_a_gateway_stopping_during_an_api_outage_takes_no_new_sessions(tmp_path: Path) -> None:
    # Stopping waits (bounded) for the NotReady writes; agents that reconnect meanwhile must not be
    # registered and marked connected to a gateway that is about to go.
    registry = OutageRegistry()
    async with cluster(tmp_path, registry=registry) as c:
        agent = await c.start_agent("alpha")
        assert agent.identity is not None
        name = agent.identity.node_name
        registrations = agent.registrations
        registry.outage = True
        stopping = asyncio.ensure_future(c.gateway.stop(0))
        deadline = asyncio.get_running_loop().time() + 10
        while c.gateway.metrics.refused_streams["gateway-stopping"] < 2:  # the agent retried, twice
            assert asyncio.get_running_loop().time() < deadline, "no reconnect was refused"
            await asyncio.sleep(0.05)
        assert not stopping.done()
        assert name not in c.gateway.sessions.by_name
        registry.outage = False
        registry.back.set()
        await asyncio.wait_for(stopping, 15)
        assert agent.registrations == registrations
        status = registry.objects[name]["status"]
        assert (status["phase"], status["connected"]) == ("NotReady", False)
        assert status["conditions"][0]["reason"] == "GatewayStopped"


async def test_a_stream_opened_before_its_node_was_revoked_cannot_dial_afterwards(tmp_path: Path) -> None:
    async with cluster(tmp_path, first_frame_timeout_s=10.0) as c:
        a = await c.start_agent("alpha")
        assert a.identity is not None
        metadata = (("authorization", f"Bearer {a.identity.credential}"),)
        async with channel_for(c) as channel:
            early = tunnel_stub(channel).Connect(metadata=metadata)
            await early.wait_for_connection()
            await asyncio.sleep(0.3)  # open at the gateway, no first frame yet
            await c.registry.delete(a.identity.node_name)
            assert c.gateway.sessions.revoke(a.identity.node_name)  # what the deletion watch does
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await early.write(pb.Frame(dial=pb.Dial(host="127.0.0.1", port=c.head_port)))
                await asyncio.wait_for(early.read(), 5)
            assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert c.gateway.metrics.connections_opened == 0


async def hold_silent_streams_up_to_the_cap(
    open_call: Callable[[], grpc.aio.StreamStreamCall],  # type: ignore[type-arg]
    counted: Callable[[], int],
    cap: int,
) -> None:
    """Opens ``cap`` streams that never send, waits until the gateway counts them all, checks that
    one more is refused (RESOURCE_EXHAUSTED), then hangs the silent ones up."""
    silent = [open_call() for _ in range(cap)]
    for call in silent:
        await call.wait_for_connection()
    deadline = asyncio.get_running_loop().time() + 5
    while counted() < cap:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await asyncio.wait_for(open_call().read(), 5)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for call in silent:
        call.cancel()


async def test_streams_that_never_send_count_against_the_nodes_cap(tmp_path: Path) -> None:
    async with cluster(tmp_path, max_streams_per_node=3, first_frame_timeout_s=10.0) as c:
        a = await c.start_agent("alpha")
        assert a.identity is not None
        name, metadata = a.identity.node_name, (("authorization", f"Bearer {a.identity.credential}"),)
        async with channel_for(c) as channel:
            await hold_silent_streams_up_to_the_cap(
                lambda: tunnel_stub(channel).Connect(metadata=metadata),
                lambda: c.gateway.sessions.streams.counted(name, "opening"),
                3,
            )


async def test_control_streams_that_never_register_are_capped(tmp_path: Path) -> None:
    async with cluster(tmp_path, first_frame_timeout_s=10.0) as c, channel_for(c) as channel:
        joined: pb.JoinResponse = await tunnel_stub(channel).Join(pb.JoinRequest(token=c.tokens.add(), name_hint="x"))
        metadata = (("authorization", f"Bearer {joined.credential}"),)
        service = c.gateway.service
        assert service is not None
        await hold_silent_streams_up_to_the_cap(
            lambda: tunnel_stub(channel).Control(metadata=metadata),
            lambda: service._controls_opening[joined.assignment.node_name],
            CONTROL_STREAMS_OPENING_MAX,
        )
        # Once they are gone, the node registers as usual.
        deadline = asyncio.get_running_loop().time() + 5
        while joined.assignment.node_name in service._controls_opening:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        register = pb.Register(node_name=joined.assignment.node_name, address=joined.assignment.address)
        assert isinstance(await control_call(c, joined.credential, register), pb.GatewayMessage)


async def test_a_pending_connection_is_answered_by_one_accept_stream(tmp_path: Path) -> None:
    """Accept streams are not counted against the acceptor, so one claim each: else a node could
    hold any number of them for one connection, each for the accept timeout."""
    async with cluster(tmp_path, heartbeat_timeout_s=30.0) as c, channel_for(c) as channel:
        a = await c.start_agent("alpha")
        assert a.identity is not None
        b, control = await registered_mute_node(c, channel)
        b_metadata = (("authorization", f"Bearer {b.credential}"),)
        dial = tunnel_stub(channel).Connect(metadata=(("authorization", f"Bearer {a.identity.credential}"),))
        await dial.write(pb.Frame(dial=pb.Dial(host=b.assignment.address, port=b.assignment.ports.node_manager_port)))
        opened = await next_open_connection(control)
        accept = pb.Frame(accept=pb.Accept(connection_id=opened.connection_id))
        first = tunnel_stub(channel).Connect(metadata=b_metadata)
        await first.write(accept)
        await asyncio.sleep(0.2)
        second = tunnel_stub(channel).Connect(metadata=b_metadata)
        await second.write(accept)
        assert await refused_accept(second) == "unknown-connection"
        # The first claim still completes the connection.
        await first.write(pb.Frame(dial_result=pb.DialResult(ok=True)))
        assert (await asyncio.wait_for(dial.read(), 5)).dial_result.ok
        for call in (first, second, dial, control):
            call.cancel()


async def test_dials_to_a_node_do_not_use_up_that_nodes_own_connections(tmp_path: Path) -> None:
    # Each of A's dials to B makes B's agent accept on a stream of its own: charged to B, they
    # left B unable to reach the head (GCS included) once A had dialled it max_streams_per_node times.
    async with cluster(tmp_path, max_streams_per_node=3, heartbeat_timeout_s=30.0) as c:
        a = await c.start_agent("alpha")
        b = await c.start_agent("beta")
        assert a.identity is not None and b.identity is not None and b.assignment is not None
        port = b.assignment.ports.node_manager_port
        server = await asyncio.start_server(echo_handler, b.identity.address, port)
        metadata = (("authorization", f"Bearer {a.identity.credential}"),)
        try:
            async with channel_for(c) as channel:
                calls = []
                for _ in range(3):  # A's whole allowance, spent on B
                    call = tunnel_stub(channel).Connect(metadata=metadata)
                    await call.write(pb.Frame(dial=pb.Dial(host=b.identity.address, port=port)))
                    assert (await asyncio.wait_for(call.read(), 5)).dial_result.ok
                    calls.append(call)
                assert c.gateway.sessions.streams.open(b.identity.node_name) == 3
                status, reader, writer = await connect_via_proxy(b._proxy, "127.0.0.1", c.head_port)
                assert status == 200
                assert await echo_roundtrip(reader, writer, b"B still reaches the head") == b"B still reaches the head"
                writer.close()
                for call in calls:
                    call.cancel()
        finally:
            server.close()


async def test_a_volunteer_whose_peer_hangs_up_hears_a_close_not_a_clean_end(tmp_path: Path) -> None:
    # Node to node through the gateway: the accepting side's stream is cancelled mid-connection.
    # The dialer must hear a Close saying so, not a call that ends OK like a clean end would.
    async with cluster(tmp_path, heartbeat_timeout_s=30.0) as c:
        a = await c.start_agent("alpha")
        assert a.identity is not None
        async with channel_for(c) as channel:
            mute, control = await registered_mute_node(c, channel)
            dial = tunnel_stub(channel).Connect(metadata=(("authorization", f"Bearer {a.identity.credential}"),))
            target = pb.Dial(host=mute.assignment.address, port=mute.assignment.ports.node_manager_port)
            await dial.write(pb.Frame(dial=target))
            opened = await next_open_connection(control)
            accept = tunnel_stub(channel).Connect(metadata=(("authorization", f"Bearer {mute.credential}"),))
            await accept.write(pb.Frame(accept=pb.Accept(connection_id=opened.connection_id)))
            await accept.write(pb.Frame(dial_result=pb.DialResult(ok=True)))
            assert (await asyncio.wait_for(dial.read(), 5)).dial_result.ok
            accept.cancel()
            frame = await asyncio.wait_for(dial.read(), 5)
            assert isinstance(frame, pb.Frame) and frame.close.reason == "peer-ended", frame
            control.cancel()
            dial.cancel()


async def test_a_caller_without_the_secret_cannot_tell_which_token_ids_exist(c: Cluster) -> None:
    token_id = c.tokens.add(owner="alice").split(".")[0]
    unknown_id = "zzzzzz" if token_id != "zzzzzz" else "yyyyyy"
    existing = await join(c, f"{token_id}.{'0' * 16}")
    missing = await join(c, f"{unknown_id}.{'0' * 16}")
    assert isinstance(existing, grpc.aio.AioRpcError) and isinstance(missing, grpc.aio.AioRpcError)
    assert (existing.code(), existing.details()) == (missing.code(), missing.details())
    assert (c.gateway.metrics.joins["invalid-secret"], c.gateway.metrics.joins["unknown"]) == (1, 1)
