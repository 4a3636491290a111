"""Draining the agent whatever the Control stream does, a second signal, and a gateway that does not
speak the agent's tunnel protocol (real agent and gRPC; Ray is a stand-in)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from koinon_agent import cli, state
from koinon_agent.agent import Agent, JoinRefused
from koinon_agent.config import AgentConfig
from koinon_gateway.rpc import Context, add_tunnel_service
from koinon_gateway.server import Gateway
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import Cluster, cluster, connect_via_proxy, start_agent_process

GRACE_S = 2.0


class BusyRay:
    """A Ray node whose task never finishes: only the grace period (or a second signal) ends it."""

    def __init__(self) -> None:
        self.stopped_at: float | None = None
        self.running = True

    def node_id(self) -> str:
        return "ab" * 28

    def busy_workers(self) -> int:
        return 1 if self.running else 0

    async def stop(self) -> None:
        if self.stopped_at is None:
            self.stopped_at = time.monotonic()
        self.running = False


@pytest.mark.parametrize("outage", ["none", "during-drain", "before-drain"])
async def test_running_tasks_get_the_grace_whatever_the_control_stream_does(tmp_path: Path, outage: str) -> None:
    async with cluster(tmp_path, tls=False) as c:
        agent = await c.start_agent("a", drain_grace_s=GRACE_S)
        task = c.agents[-1][1]
        ray = BusyRay()
        agent.ray = ray  # type: ignore[assignment]
        if outage == "before-drain":  # SIGTERM while the gateway is unreachable
            await c.gateway.stop(0)
            await asyncio.sleep(0.3)
        asked = time.monotonic()
        agent.request_drain()
        if outage == "during-drain":  # the stream drops while the tasks still run
            await asyncio.sleep(0.3)
            await c.gateway.stop(0)
        await asyncio.wait_for(task, GRACE_S + 10)
        assert ray.stopped_at is not None
        assert GRACE_S - 0.1 <= ray.stopped_at - asked <= GRACE_S + 1.5


async def test_tasks_that_finish_end_the_drain_early(tmp_path: Path) -> None:
    async with cluster(tmp_path, tls=False) as c:
        agent = await c.start_agent("a", drain_grace_s=30.0)
        task = c.agents[-1][1]
        ray = BusyRay()
        agent.ray = ray  # type: ignore[assignment]
        asked = time.monotonic()
        agent.request_drain()
        await asyncio.sleep(0.3)
        ray.running = False  # the task finished (Ray not stopped yet: stop() stamps that)
        await asyncio.wait_for(task, 10)
        assert ray.stopped_at is not None and ray.stopped_at - asked < 2


async def test_a_second_request_skips_the_rest_of_the_grace(tmp_path: Path) -> None:
    async with cluster(tmp_path, tls=False) as c:
        agent = await c.start_agent("a", drain_grace_s=60.0)
        task = c.agents[-1][1]
        ray = BusyRay()
        agent.ray = ray  # type: ignore[assignment]
        agent.request_drain()
        await asyncio.sleep(0.5)
        assert ray.stopped_at is None and not task.done()  # draining: the task runs on
        now = time.monotonic()
        agent.request_drain(now=True)
        await asyncio.wait_for(task, 10)
        assert ray.stopped_at is not None and ray.stopped_at - now < 1.5


FAKE_RAY = """#!/bin/bash
# A Ray node with one task that never ends: a child whose title says it runs a task.
(exec -a "ray::busy_task" sleep 600) &
echo $! > {task_pid}
exec sleep 600
"""


async def test_cli_second_sigterm_stops_ray_without_waiting(tmp_path: Path) -> None:
    # Made before Ray starts: confined Ray can create no entry in tmp_path, above the state dir.
    (tmp_path / "records").mkdir()
    task_pid = tmp_path / "records" / "task.pid"
    fake_ray = tmp_path / "ray"
    fake_ray.write_text(FAKE_RAY.format(task_pid=task_pid))
    fake_ray.chmod(0o755)
    async with cluster(tmp_path, tls=False) as c:
        process = await start_agent_process(
            c, tmp_path / "agent", fake_ray, "--drain-grace", "120", stderr=asyncio.subprocess.PIPE
        )
        try:
            deadline = time.monotonic() + 60  # importing on a busy machine, joining, `ray start`
            while not task_pid.exists() or not task_pid.read_text().strip():
                assert process.returncode is None and time.monotonic() < deadline, "the Ray task never started"
                await asyncio.sleep(0.2)
            ray_task = psutil.Process(int(task_pid.read_text()))
            await asyncio.sleep(1.5)  # the agent sees the task as busy (it polls every 0.5 s)
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(2.0)
            assert process.returncode is None and ray_task.is_running()  # draining: 120 s of grace
            process.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(process.communicate(), 20)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode == 0, err.decode()
        assert "second signal" in err.decode()
        assert not ray_task.is_running() or ray_task.status() == psutil.STATUS_ZOMBIE  # Ray stopped, not left


class NoTunnelService:
    """A gRPC server without koinon.tunnel.v1 (another protocol version, or not a gateway)."""

    async def __aenter__(self) -> str:
        self.server = grpc.aio.server()
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return f"127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop(0)


def _config(target: str, state_dir: Path, token: str) -> AgentConfig:
    return AgentConfig(
        gateway=target,
        token=token,
        state_dir=state_dir,
        insecure=True,
        start_ray=False,
        simulate_gpus=0,
        backoff_initial_s=0.05,
        backoff_max_s=0.1,
    )


async def test_a_gateway_without_the_tunnel_protocol_is_fatal_on_join(tmp_path: Path) -> None:
    async with NoTunnelService() as target:
        agent = Agent(_config(target, tmp_path, "abcdef.0123456789abcdef"))
        with pytest.raises(JoinRefused, match=r"does not serve koinon\.tunnel\.v1"):
            await asyncio.wait_for(agent.run(), 10)


async def test_a_gateway_without_the_tunnel_protocol_is_fatal_on_control(tmp_path: Path) -> None:
    async with NoTunnelService() as target:
        state.save(tmp_path, state.StoredIdentity(target, "alpha-000001", "127.0.20.1", "cred", trusted_ca="insecure"))
        agent = Agent(_config(target, tmp_path, ""))
        with pytest.raises(JoinRefused, match=r"does not serve koinon\.tunnel\.v1"):
            await asyncio.wait_for(agent.run(), 10)


async def test_cli_exits_3_naming_the_protocol(tmp_path: Path) -> None:
    async with NoTunnelService() as target:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KOINON_")}
        process = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "koinon_agent.cli", "join", "--gateway", target, "--insecure", "--no-ray"],
            *["--token", "abcdef.0123456789abcdef", "--state-dir", str(tmp_path)],
            env=env,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, err = await asyncio.wait_for(process.communicate(), 60)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert process.returncode == 3, err.decode()
    assert "does not serve koinon.tunnel.v1" in err.decode()


class NeverRegisters:
    """Takes the Register and never answers it (a gateway stuck, or a proxy holding the stream)."""

    def __init__(self) -> None:
        self.registers = asyncio.Event()

    async def Join(self, request: pb.JoinRequest, context: Context) -> pb.JoinResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this test")
        raise AssertionError("unreachable")

    async def Control(self, request_iterator: Any, context: Context) -> None:
        await context.read()
        self.registers.set()
        await asyncio.sleep(60)

    async def Connect(self, request_iterator: Any, context: Context) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this test")


async def test_a_drain_does_not_wait_for_the_registration_timeout(tmp_path: Path) -> None:
    servicer = NeverRegisters()
    server = grpc.aio.server()
    add_tunnel_service(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        target = f"127.0.0.1:{port}"
        state.save(tmp_path, state.StoredIdentity(target, "alpha-000001", "127.0.20.1", "cred", trusted_ca="insecure"))
        agent = Agent(_config(target, tmp_path, ""))
        task = asyncio.ensure_future(agent.run())
        await asyncio.wait_for(servicer.registers.wait(), 10)
        asked = time.monotonic()
        agent.request_drain()
        await asyncio.wait_for(task, 20)
        assert time.monotonic() - asked < 3  # not the 15 s the registration may take
    finally:
        await server.stop(0)


def test_signal_handler_counts_signals() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.calls: list[bool] = []

        def request_drain(self, *, now: bool = False) -> None:
            self.calls.append(now)

    class Loop:
        def __init__(self) -> None:
            self.handlers: dict[int, Any] = {}

        def add_signal_handler(self, signum: int, handler: Any) -> None:
            self.handlers[signum] = handler

    recorder, loop = Recorder(), Loop()
    cli.drain_on_signals(recorder, loop)  # type: ignore[arg-type]
    loop.handlers[signal.SIGTERM]()
    loop.handlers[signal.SIGINT]()  # Ctrl-C after SIGTERM counts as the second
    loop.handlers[signal.SIGTERM]()
    assert recorder.calls == [False, True, True]


async def test_a_grace_beyond_what_the_drain_request_carries_still_drains(tmp_path: Path) -> None:
    # The CLI refuses such a grace; an AgentConfig built in code could still hold one. Building the
    # DrainRequest (grace_seconds is a uint32) used to crash the agent, and Ray stopped at once.
    async with cluster(tmp_path, tls=False) as c:
        agent = await c.start_agent("a")
        agent.config.drain_grace_s = 1e10  # past validation, as code could set it
        task = c.agents[-1][1]
        ray = BusyRay()
        agent.ray = ray  # type: ignore[assignment]
        agent.request_drain()
        await asyncio.sleep(1.0)
        assert not task.done(), f"agent.run() ended on drain: {task.exception() if task.done() else None!r}"
        assert ray.stopped_at is None, "Ray stopped without giving running tasks their grace"
        agent.request_drain(now=True)
        await asyncio.wait_for(task, 10)
        assert ray.stopped_at is not None


async def _restart_gateway(c: Cluster, down_s: float) -> None:
    """A gateway restart (a rolling update): down for ``down_s``, back at the same address."""
    listen = c.gateway.agent_target
    await c.gateway.stop(0)
    await asyncio.sleep(down_s)
    c.gateway = Gateway(replace(c.gateway.config, listen=listen), c.tokens, c.registry, c.gateway.ca_store)
    await c.gateway.start()


async def _registered(c: Cluster, name: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while name not in c.gateway.sessions.by_name and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return name in c.gateway.sessions.by_name


@pytest.mark.parametrize("outage", ["during-drain", "before-drain"])
async def test_a_drain_reconnects_when_the_gateway_comes_back(tmp_path: Path, outage: str) -> None:
    """The draining Ray node reaches the cluster only through a Control session (the gateway
    refuses Connect streams of a node without one). A draining agent that lost its session never
    reconnected (and one drained during an outage tried once): the running tasks the grace is for
    spent it cut off, and the gateway never learnt of the drain (NotReady, GCS not asked)."""
    grace = 20.0
    async with cluster(tmp_path, tls=False) as c:
        agent = await c.start_agent("a", drain_grace_s=grace)
        task = c.agents[-1][1]
        agent.ray = BusyRay()  # type: ignore[assignment]
        assert agent.identity is not None
        name = agent.identity.node_name
        if outage == "before-drain":  # SIGTERM while the gateway is down; it comes back later
            listen = c.gateway.agent_target
            await c.gateway.stop(0)
            await asyncio.sleep(0.3)
            asked = time.monotonic()
            agent.request_drain()
            await asyncio.sleep(1.5)  # reconnects that fail meanwhile
            c.gateway = Gateway(replace(c.gateway.config, listen=listen), c.tokens, c.registry, c.gateway.ca_store)
            await c.gateway.start()
        else:
            asked = time.monotonic()
            agent.request_drain()
            await asyncio.sleep(0.5)
            await _restart_gateway(c, 0.5)
        assert await _registered(c, name, 8), "the draining agent never reconnected"
        assert not task.done()
        # What the draining node's Ray does meanwhile: dial the head through the agent's proxy.
        status, _, writer = await connect_via_proxy(agent._proxy, c.gateway.config.head_address, c.head_port)
        writer.close()
        assert status == 200, f"the draining node cannot reach the cluster (CONNECT answered {status})"
        # The new session told the gateway of the drain, with the grace that is left, not a new one.
        session = c.gateway.sessions.by_name[name]
        for _ in range(50):
            if session.draining:
                break
            await asyncio.sleep(0.1)
        assert session.draining and session.drain_request is not None
        assert session.drain_request[1] - time.time() <= grace - (time.monotonic() - asked) + 1.5
        agent.request_drain(now=True)
        await asyncio.wait_for(task, 15)


async def test_a_draining_agent_stops_reconnecting_once_ray_stopped(tmp_path: Path) -> None:
    """The gateway stays away: the agent retries until the grace is over, then exits on time."""
    async with cluster(tmp_path, tls=False) as c:
        agent = await c.start_agent("a", drain_grace_s=GRACE_S)
        task = c.agents[-1][1]
        ray = BusyRay()
        agent.ray = ray  # type: ignore[assignment]
        await c.gateway.stop(0)
        asked = time.monotonic()
        agent.request_drain()
        await asyncio.wait_for(task, GRACE_S + 5)
        assert ray.stopped_at is not None and ray.stopped_at - asked >= GRACE_S - 0.1
        assert time.monotonic() - asked < GRACE_S + 1.5  # not held up by a backoff sleep


@pytest.mark.parametrize("refusal", ["node-deleted", "credential-refused-without-token", "not-a-gateway"])
async def test_a_draining_agent_refused_for_good_on_reconnect_still_drains_and_exits_0(
    tmp_path: Path, refusal: str
) -> None:
    """The gateway comes back refusing the node for good (PERMISSION_DENIED: the node was deleted
    meanwhile; UNAUTHENTICATED with no token to join again; UNIMPLEMENTED). Since the draining
    agent reconnects, that refusal escaped run() (JoinRefused, exit 3) and Ray stopped at once;
    the running tasks keep their grace and the drain ends as asked (exit 0)."""
    grace = 4.0
    async with cluster(tmp_path, tls=False) as c:
        agent = await c.start_agent("a", drain_grace_s=grace)
        task = c.agents[-1][1]
        ray = BusyRay()
        agent.ray = ray  # type: ignore[assignment]
        assert agent.identity is not None
        listen = c.gateway.agent_target
        asked = time.monotonic()
        agent.request_drain()
        await asyncio.sleep(0.3)
        await c.gateway.stop(0)
        config = replace(c.gateway.config, listen=listen)
        other: grpc.aio.Server | None = None
        if refusal == "node-deleted":  # e.g. the platform retired the node meanwhile
            await c.registry.delete(agent.identity.node_name)
        elif refusal == "credential-refused-without-token":  # another --vip-cidr: the credential is refused
            agent.config = replace(agent.config, token="")
            config = replace(config, vip_cidr="127.0.21.0/28")
        if refusal == "not-a-gateway":
            other = grpc.aio.server()
            other.add_insecure_port(listen)
            await other.start()
        else:
            c.gateway = Gateway(config, c.tokens, c.registry, c.gateway.ca_store)
            await c.gateway.start()
        try:
            await asyncio.wait([task], timeout=grace + 5)
        finally:
            if other is not None:
                await other.stop(0)
        assert task.done()
        assert task.exception() is None, f"the drain ended with {task.exception()!r}"
        assert ray.stopped_at is not None and ray.stopped_at - asked >= grace - 0.1


async def test_a_draining_agent_whose_credential_is_refused_does_not_join_again(tmp_path: Path) -> None:
    """README: no join during a drain. A Join would use the token, create a VolunteerNode and
    retire the draining one."""
    grace = 3.0
    async with cluster(tmp_path, tls=False) as c:
        agent = await c.start_agent("a", drain_grace_s=grace)
        task = c.agents[-1][1]
        agent.ray = BusyRay()  # type: ignore[assignment]
        listen = c.gateway.agent_target
        nodes_before = set(c.registry.objects)
        agent.request_drain()
        await asyncio.sleep(0.3)
        await c.gateway.stop(0)
        config = replace(c.gateway.config, listen=listen, vip_cidr="127.0.21.0/28")
        c.gateway = Gateway(config, c.tokens, c.registry, c.gateway.ca_store)
        await c.gateway.start()
        await asyncio.wait_for(task, grace + 5)
        assert set(c.registry.objects) == nodes_before
        assert not c.gateway.metrics.joins, dict(c.gateway.metrics.joins)
