"""Test helpers for the tunnel: echo servers, CONNECT clients, gateway/agent factories."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from koinon_agent.agent import Agent
from koinon_agent.config import AgentConfig
from koinon_agent.local_proxy import LocalProxy
from koinon_gateway.config import GatewayConfig
from koinon_gateway.registry import InMemoryNodeRegistry
from koinon_gateway.rpc import EOF, tunnel_stub
from koinon_gateway.server import Gateway
from koinon_gateway.tokens import InMemoryTokenStore
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

ConnectionHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 20):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except ConnectionError:
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def echo_server(
    host: str = "127.0.0.1", port: int = 0, handler: ConnectionHandler = echo_handler
) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, host, port)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def connect_via_proxy(
    proxy: int | LocalProxy | None, host: str, port: int
) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter]:
    """Opens a CONNECT tunnel through the gateway's head proxy (its port) or an agent's local proxy
    (which asks for its credentials, as gRPC sends them); returns (HTTP status, reader, writer)."""
    assert proxy is not None, "the agent has not started its proxy"
    proxy_port, headers = (proxy, "") if isinstance(proxy, int) else (proxy.port, proxy_authorization(proxy))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port, limit=4 << 20)
    writer.write(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n{headers}\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
    status = int(head.split()[1])
    return status, reader, writer


def proxy_authorization(proxy: LocalProxy) -> str:
    """The header line gRPC sends for the URL the agent hands Ray (grpc_proxy=http://user:pw@...)."""
    return f"Proxy-Authorization: {proxy.authorization}\r\n"


async def echo_roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> bytes:
    writer.write(payload)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(payload)), 15)


def random_port_base() -> int:
    # Blocks of 16 ports for a /28: 14 nodes; spread to avoid other test runs on this machine.
    return random.randrange(30000, 60000 - 14 * 16)


@dataclass
class Cluster:
    gateway: Gateway
    tokens: InMemoryTokenStore
    registry: InMemoryNodeRegistry
    head_port: int
    tmp: Path
    agents: list[tuple[Agent, asyncio.Task[None]]] = field(default_factory=list)

    def agent_config(self, name: str, token: str | None = None, **overrides: object) -> AgentConfig:
        config = AgentConfig(
            gateway=self.gateway.agent_target,
            token=token if token is not None else self.tokens.add(owner="alice", region="eu"),
            state_dir=self.tmp / f"agent-{name}",
            ca_pem=self.gateway.ca_pem if self.gateway.config.tls else b"",
            insecure=not self.gateway.config.tls,
            name_hint=name,
            start_ray=False,
            simulate_gpus=1,
            simulate_gpu_memory_mib=8192,
            backoff_initial_s=0.05,
            backoff_max_s=0.5,
        )
        for key, value in overrides.items():
            setattr(config, key, value)
        return config

    async def start_agent(self, name: str, **overrides: object) -> Agent:
        agent = Agent(self.agent_config(name, **overrides))  # type: ignore[arg-type]
        task = asyncio.ensure_future(agent.run())
        self.agents.append((agent, task))
        waiter = asyncio.ensure_future(agent.connected.wait())
        done, _ = await asyncio.wait({waiter, task}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            waiter.cancel()
            task.result()
        assert waiter in done, f"agent {name} did not connect"
        return agent

    async def stop(self) -> None:
        for agent, _ in self.agents:
            agent.request_drain()
        for _, task in self.agents:
            try:
                await asyncio.wait_for(task, 10)
            except BaseException:
                task.cancel()
        await self.gateway.stop(0)


@contextlib.asynccontextmanager
async def cluster(
    tmp: Path,
    tls: bool = True,
    registry: InMemoryNodeRegistry | None = None,
    head_handler: ConnectionHandler = echo_handler,
    **config_overrides: object,
) -> AsyncIterator[Cluster]:
    """A gateway whose "head" is a TCP server running ``head_handler`` (an echo server by default)."""
    async with echo_server(handler=head_handler) as head_port:
        config = GatewayConfig(
            listen="127.0.0.1:0",
            tls=tls,
            head_address="127.0.0.1",
            head_gcs_port=head_port,
            vip_cidr="127.0.20.0/28",
            port_base=random_port_base(),
            port_block_size=16,
            heartbeat_interval_s=0.2,
            # 2 s: with 1 s, an event loop held up a second on a busy 2-core host (CI beside Ray
            # tests) ended sessions mid-test; a test that times a loss overrides it or scales by it.
            heartbeat_timeout_s=2.0,
            status_write_interval_s=0.2,
            verify_ray_nodes=False,  # no Ray head in tunnel-level tests
        )
        for key, value in config_overrides.items():
            setattr(config, key, value)
        tokens, registry = InMemoryTokenStore(), registry if registry is not None else InMemoryNodeRegistry()
        gateway = Gateway(config, tokens=tokens, registry=registry)
        await gateway.start()
        result = Cluster(gateway, tokens, registry, head_port, tmp)
        try:
            yield result
        finally:
            await result.stop()


def channel_for(c: Cluster) -> grpc.aio.Channel:
    return gateway_channel(c.gateway)


def gateway_channel(gateway: Gateway) -> grpc.aio.Channel:
    """An agent's TLS channel to ``gateway``, trusting its CA."""
    return grpc.aio.secure_channel(
        gateway.agent_target,
        grpc.ssl_channel_credentials(gateway.ca_pem),
        options=[("grpc.ssl_target_name_override", "koinon-gateway")],
    )


async def control_call(c: Cluster, credential: str, register: pb.Register) -> grpc.aio.AioRpcError | pb.GatewayMessage:
    async with channel_for(c) as channel:
        call = tunnel_stub(channel).Control(metadata=(("authorization", f"Bearer {credential}"),))
        try:
            await call.write(pb.AgentMessage(register=register))
            message = await asyncio.wait_for(call.read(), 5)
            if message is EOF:
                await call.code()  # raises the refusal
            assert isinstance(message, pb.GatewayMessage)
            return message
        except grpc.aio.AioRpcError as exc:
            return exc
        finally:
            call.cancel()


async def next_message(control: grpc.aio.StreamStreamCall) -> pb.GatewayMessage:  # type: ignore[type-arg]
    message = await asyncio.wait_for(control.read(), 5)
    assert isinstance(message, pb.GatewayMessage), message
    return message


async def next_open_connection(control: grpc.aio.StreamStreamCall) -> pb.OpenConnection:  # type: ignore[type-arg]
    """The next OpenConnection the gateway sends a mute node's Control stream (others skipped)."""
    while not (message := await next_message(control)).HasField("open_connection"):
        pass
    return message.open_connection


async def registered_mute_node(
    c: Cluster, channel: grpc.aio.Channel, name_hint: str = "mute"
) -> tuple[pb.JoinResponse, grpc.aio.StreamStreamCall]:  # type: ignore[type-arg]
    """A node with a live Control stream whose agent never serves connections (the caller reads
    that stream, and cancels it when done)."""
    request = pb.JoinRequest(token=c.tokens.add(), name_hint=name_hint)
    response: pb.JoinResponse = await tunnel_stub(channel).Join(request)
    control = tunnel_stub(channel).Control(metadata=(("authorization", f"Bearer {response.credential}"),))
    register = pb.Register(node_name=response.assignment.node_name, address=response.assignment.address)
    await control.write(pb.AgentMessage(register=register))
    assert (await next_message(control)).WhichOneof("msg") == "registered"
    return response, control


async def start_agent_process(
    c: Cluster, state_dir: Path, ray_bin: Path, *extra: str, stderr: int | None = asyncio.subprocess.DEVNULL
) -> asyncio.subprocess.Process:
    """A real `koinon-agent join` process (as a volunteer runs it), with a fresh token, no KOINON_*
    settings of the caller's, no GPUs and ``ray_bin`` for Ray."""
    token = c.tokens.add(owner="alice", region="eu")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOINON_")}
    return await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "koinon_agent.cli", "join", "--gateway", c.gateway.agent_target],
        *["--insecure", "--token", token, "--state-dir", str(state_dir), "--simulate-gpus", "0"],
        *["--ray-bin", str(ray_bin), *extra],
        env=env,
        stderr=stderr,
    )


def as_non_root(uid: int, work: Callable[[], None]) -> str:
    """Runs ``work`` in a forked child that dropped root (as the agent runs); its error or ""."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        message = b""
        try:
            if os.geteuid() == 0:
                os.setgid(uid)
                os.setuid(uid)
            work()
        except BaseException as exc:
            message = repr(exc).encode() or b"error"
        os.write(write, message)
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 4096):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()
