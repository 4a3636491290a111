"""A hostile (compromised or broken) gateway must not turn the agent into a door to the volunteer's
machine: connections go only to the node's own Ray port block at its virtual loopback address,
their number is bounded, and the gateway's text cannot forge log lines.

A small gateway written here (grpc.aio over plain TCP) plays the hostile part against a real Agent
that runs no Ray node."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from koinon_agent.agent import Agent, JoinRefused, accepted_connections_limit
from koinon_agent.config import AgentConfig
from koinon_gateway.rpc import EOF, add_tunnel_service, tunnel_stub
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import channel_for, cluster, echo_handler

VIP = "127.0.20.1"


def port_block() -> pb.PortBlock:
    base = random.randrange(40000, 60000)  # apart from other test runs on this machine
    return pb.PortBlock(
        node_manager_port=base, object_manager_port=base + 1, dashboard_agent_grpc_port=base + 2,
        dashboard_agent_listen_port=base + 3, metrics_export_port=base + 4, runtime_env_agent_port=base + 5,
        min_worker_port=base + 6, max_worker_port=base + 15,
    )  # fmt: skip


class HostileGateway:
    def __init__(self, address: str = VIP, opens: Callable[[pb.PortBlock], list[pb.GatewayMessage]] | None = None):
        self.address = address
        self.ports = port_block()
        self.opens = opens(self.ports) if opens else []
        self.results: list[pb.DialResult] = []
        self.received: list[bytes] = []
        self.hold_connect = False
        self.controls = 0  # Control calls taken
        self.later_address = address  # what Registered names from the second Control call on
        self.end_after_register = False
        self.heartbeat_interval_ms = 200
        self.heartbeats = 0  # Heartbeats read on Control

    def assignment(self, address: str | None = None) -> pb.Assignment:
        return pb.Assignment(
            node_name="n1", address=address or self.address, ports=self.ports, ray_address="127.0.0.9:6379",
            heartbeat_interval_ms=self.heartbeat_interval_ms, heartbeat_timeout_ms=5000,
        )  # fmt: skip

    async def Join(self, request: pb.JoinRequest, context: Any) -> pb.JoinResponse:
        expires = int(time.time()) + 3600
        return pb.JoinResponse(credential="cred", assignment=self.assignment(), credential_expires_at=expires)

    async def Control(self, request_iterator: Any, context: Any) -> None:
        await context.read()  # Register
        self.controls += 1
        address = self.address if self.controls == 1 else self.later_address
        await context.write(pb.GatewayMessage(registered=pb.Registered(assignment=self.assignment(address))))
        if self.end_after_register:
            return
        for message in self.opens:
            await context.write(message)
        while (message := await context.read()) is not EOF:
            if message.HasField("heartbeat"):
                self.heartbeats += 1

    async def Connect(self, request_iterator: Any, context: Any) -> None:
        await context.read()  # Accept
        result = await context.read()
        self.results.append(result.dial_result)
        if self.hold_connect:
            await asyncio.sleep(3600)
        if result.dial_result.ok:
            await context.write(b"hello")
            data = await context.read()
            self.received.append(bytes(data))
            await context.write(pb.Frame(close=pb.Close(reason="done")))


LIMIT = 300  # accepted connections, for the test (the agent's own comes from its descriptors)


def test_the_limit_is_half_the_descriptors_and_never_below_256(monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    for soft, limit in ((1024, 512), (100, 256), (1 << 20, 1 << 19), (resource.RLIM_INFINITY, 32768)):
        monkeypatch.setattr(resource, "getrlimit", lambda _, soft=soft: (soft, resource.RLIM_INFINITY))
        assert accepted_connections_limit() == limit


@contextlib.asynccontextmanager
async def agent_of(
    tmp_path: Path, gateway: HostileGateway, max_accepted: int | None = None
) -> AsyncIterator[tuple[Agent, asyncio.Future[Any]]]:
    server = grpc.aio.server()
    add_tunnel_service(gateway, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    config = AgentConfig(
        gateway=f"127.0.0.1:{port}", token="abcdef.0123456789abcdef", state_dir=tmp_path / "state",
        insecure=True, start_ray=False, simulate_gpus=0, backoff_initial_s=0.05, backoff_max_s=0.5,
    )  # fmt: skip
    agent = Agent(config)
    if max_accepted is not None:
        agent.max_accepted_connections = max_accepted
    task = asyncio.ensure_future(agent.run())
    try:
        yield agent, task
    finally:
        agent.request_drain(now=True)
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, 10)
        await server.stop(0)


@contextlib.asynccontextmanager
async def local_service(host: str, port: int = 0) -> AsyncIterator[tuple[int, list[bytes]]]:
    """Stands in for sshd or a LAN admin page: answers whatever reaches it."""
    got: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(await reader.read(100))
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, host, port)
    try:
        yield server.sockets[0].getsockname()[1], got
    finally:
        server.close()


def open_connection(port: int, connection_id: int = 1) -> pb.GatewayMessage:
    return pb.GatewayMessage(open_connection=pb.OpenConnection(connection_id=connection_id, port=port, source="x"))


async def until(predicate: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def test_a_connection_to_a_port_outside_the_block_is_refused(tmp_path: Path) -> None:
    async with local_service(VIP) as (port, got):
        gateway = HostileGateway(opens=lambda block: [open_connection(port), open_connection(70000, 2)])
        assert not gateway.ports.node_manager_port <= port <= gateway.ports.max_worker_port
        async with agent_of(tmp_path, gateway) as (agent, _):
            await until(lambda: agent.refused_open_connections == 2)
            await asyncio.sleep(0.3)
    assert agent.refused_open_connections == 2 and gateway.results == [] and got == []


async def test_a_connection_inside_the_block_is_served(tmp_path: Path) -> None:
    """The check lets through what Ray needs: a port of the block at the node's own address."""
    gateway = HostileGateway()
    async with local_service(VIP, gateway.ports.min_worker_port + 3) as (port, got):
        gateway.opens = [open_connection(port)]
        async with agent_of(tmp_path, gateway):
            await until(lambda: bool(gateway.received))
    assert [r.ok for r in gateway.results] == [True] and gateway.received == [b"SSH-2.0-OpenSSH_9.6\r\n"]
    assert got == [b"hello"]


@pytest.mark.parametrize("address", ["127.0.0.1", "192.168.1.1", "169.254.169.254", "metadata.google.internal"])
async def test_a_node_address_that_is_no_virtual_loopback_address_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, address: str
) -> None:
    """Joined at 127.0.0.1, the agent served the volunteer's own services (its sshd answered the
    gateway); at a LAN or metadata address it dialled out into the volunteer's network."""
    tried: list[tuple[str, int]] = []

    async def recording(host: str, port: int, **_: Any) -> Any:
        tried.append((host, port))
        raise OSError("blocked by the test")

    monkeypatch.setattr(asyncio, "open_connection", recording)  # what the agent dials with
    gateway = HostileGateway(address=address, opens=lambda block: [open_connection(block.node_manager_port)])
    async with agent_of(tmp_path, gateway) as (_, run):
        with pytest.raises(JoinRefused, match="refused the gateway's assignment"):
            await asyncio.wait_for(asyncio.shield(run), 10)
    assert tried == [] and not (tmp_path / "state" / "identity.json").exists()


async def test_a_registration_naming_another_address_is_refused(tmp_path: Path) -> None:
    """Registered carries the assignment again: one naming another address than the node joined
    with (another node's, or the volunteer's own services') is not taken; the agent tries again."""
    gateway = HostileGateway()
    gateway.later_address = "127.0.0.1"
    gateway.end_after_register = True  # each session ends at once: the agent registers again
    async with agent_of(tmp_path, gateway) as (agent, _):
        await until(lambda: gateway.controls >= 4)
    assert gateway.controls >= 4 and agent.registrations == 1
    assert agent.assignment is not None and agent.assignment.address == VIP


async def test_connections_the_gateway_opens_are_bounded(tmp_path: Path) -> None:
    """2,000 OpenConnections made the agent hold more than 1,000 local sockets (and tasks) within
    seconds, enough to use up a process's file descriptors (the limit is half of them)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()

    gateway = HostileGateway(opens=lambda block: [open_connection(block.node_manager_port, i) for i in range(2000)])
    gateway.hold_connect = True
    server = await asyncio.start_server(hold, VIP, gateway.ports.node_manager_port)
    try:
        async with agent_of(tmp_path, gateway, max_accepted=LIMIT) as (agent, _):
            # All 2,000 answered before counting (a loaded host took longer than the 0.5 s below).
            await until(lambda: agent.refused_open_connections >= 2000 - LIMIT and len(held) >= LIMIT, 30)
            await asyncio.sleep(0.5)
            assert len(held) == LIMIT
            assert agent.refused_open_connections == 2000 - LIMIT
    finally:
        for writer in held:
            writer.close()
        server.close()


async def test_gateway_text_is_logged_quoted_on_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="koinon_agent")
    forged = "x\nINFO koinon_agent.agent: joined as admin with address 10.0.0.1" + "y" * 5000
    gateway = HostileGateway(
        opens=lambda block: [
            pb.GatewayMessage(error=pb.Error(code="c\nd", message=forged)),
            pb.GatewayMessage(drain=pb.DrainRequest(reason=forged, grace_seconds=1)),
        ]
    )
    async with agent_of(tmp_path, gateway):
        await until(lambda: any("gateway asked to drain" in r.getMessage() for r in caplog.records))
    logged = [r.getMessage() for r in caplog.records if "joined as admin" in r.getMessage()]
    assert len(logged) == 2 and all("\n" not in m and len(m) < 700 for m in logged), logged


async def test_a_real_gateway_asking_more_than_256_connections_of_one_node_is_served(tmp_path: Path) -> None:
    """The gateway caps what each node dials, not what one node is asked to accept: two nodes
    dialling a third 150 times each are within its limits, and an agent capped at 256 dropped 44."""
    async with cluster(tmp_path, heartbeat_timeout_s=30.0, accept_timeout_s=5.0) as c:
        alpha = await c.start_agent("alpha")
        gamma = await c.start_agent("gamma")
        beta = await c.start_agent("beta")
        assert beta.identity is not None and beta.assignment is not None
        port = beta.assignment.ports.node_manager_port
        server = await asyncio.start_server(echo_handler, beta.identity.address, port)
        try:
            async with channel_for(c) as channel:

                async def dial(dialer: Agent) -> tuple[Any, pb.DialResult]:
                    assert dialer.identity is not None and beta.identity is not None
                    metadata = (("authorization", f"Bearer {dialer.identity.credential}"),)
                    call = tunnel_stub(channel).Connect(metadata=metadata)
                    await call.write(pb.Frame(dial=pb.Dial(host=beta.identity.address, port=port)))
                    return call, (await asyncio.wait_for(call.read(), 10)).dial_result

                results = await asyncio.gather(*[dial(d) for d in [alpha] * 150 + [gamma] * 150])
                for call, _ in results:
                    call.cancel()
        finally:
            server.close()
    assert sum(result.ok for _, result in results) == 300 and beta.refused_open_connections == 0


async def test_a_heartbeat_interval_of_a_millisecond_is_not_taken(tmp_path: Path) -> None:
    """Assignment.heartbeat_interval_ms had no floor: a gateway saying 1 ms had the agent send a
    heartbeat every pass of its loop (hundreds a second); it is taken as 100 ms at least."""
    gateway = HostileGateway()
    gateway.heartbeat_interval_ms = 1
    async with agent_of(tmp_path, gateway) as (agent, task):
        await until(lambda: agent.connected.is_set() or task.done())
        assert agent.connected.is_set()
        before = gateway.heartbeats
        await asyncio.sleep(1.0)
        assert gateway.heartbeats - before <= 15, f"{gateway.heartbeats - before} heartbeats in 1 s"


async def test_a_control_message_that_does_not_decode_makes_the_agent_reconnect(tmp_path: Path) -> None:
    """After Registered the gateway sends bytes that are no GatewayMessage. grpc.aio's client logs
    the failed deserialization and hands out None: the agent takes it for a broken stream and
    reconnects with backoff. It died of AttributeError (None.WhichOneof), which under Helm is a
    CrashLoopBackOff."""
    from koinon_gateway.rpc import SERVICE

    gateway = HostileGateway()

    async def control(request_iterator: Any, context: Any) -> None:
        await context.read()  # Register
        gateway.controls += 1
        await context.write(pb.GatewayMessage(registered=pb.Registered(assignment=gateway.assignment())))
        await context.write(b"\xff\xff\xff\xff\x0f")  # a varint that never ends: no message at all
        await asyncio.sleep(3600)

    handlers = {
        "Join": grpc.unary_unary_rpc_method_handler(
            gateway.Join,
            request_deserializer=pb.JoinRequest.FromString,
            response_serializer=pb.JoinResponse.SerializeToString,
        ),
        "Control": grpc.stream_stream_rpc_method_handler(
            control,
            request_deserializer=pb.AgentMessage.FromString,
            # Raw bytes go out as they are: what a broken or hostile gateway can put on the wire.
            response_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
        ),
    }
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    config = AgentConfig(
        gateway=f"127.0.0.1:{port}", token="abcdef.0123456789abcdef", state_dir=tmp_path / "state",
        insecure=True, start_ray=False, simulate_gpus=0, backoff_initial_s=0.05, backoff_max_s=0.5,
    )  # fmt: skip
    agent = Agent(config)
    task = asyncio.ensure_future(agent.run())
    try:
        await until(lambda: gateway.controls >= 2 or task.done(), 5)
        assert not task.done(), f"the agent died: {task.exception()!r}"
        assert gateway.controls >= 2  # it registered again on a new Control stream
    finally:
        agent.request_drain(now=True)
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, 10)
        await server.stop(0)
