"""The agent against a gateway that hangs up at awkward moments (real gRPC, no TLS)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
from koinon_agent import state
from koinon_agent.agent import Agent
from koinon_agent.config import AgentConfig
from koinon_gateway.rpc import Context, add_tunnel_service
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

PORTS = pb.PortBlock(
    node_manager_port=41000, object_manager_port=41001, dashboard_agent_grpc_port=41002,
    dashboard_agent_listen_port=41003, metrics_export_port=41004, runtime_env_agent_port=41005,
    min_worker_port=41008, max_worker_port=41015,
)  # fmt: skip


class HangUpAfterPing:
    """Acknowledges the registration, pings, then ends the call before the agent can answer."""

    def __init__(self) -> None:
        self.registrations = 0

    async def Join(self, request: pb.JoinRequest, context: Context) -> pb.JoinResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this test")
        raise AssertionError("unreachable")

    async def Control(self, request_iterator: Any, context: Context) -> None:
        first = await context.read()
        self.registrations += 1
        assignment = pb.Assignment(
            node_name=first.register.node_name,
            address=first.register.address,
            ports=PORTS,  # a block the agent takes (an assignment without one is refused)
            heartbeat_interval_ms=200,
            heartbeat_timeout_ms=5000,
        )
        await context.write(pb.GatewayMessage(registered=pb.Registered(assignment=assignment)))
        await context.write(pb.GatewayMessage(ping=pb.Ping(seq=1, gateway_time_ns=1)))
        # Returning ends the call with OK while the agent is about to write its heartbeat.

    async def Connect(self, request_iterator: Any, context: Context) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this test")


async def test_agent_reconnects_when_the_gateway_ends_the_call_under_a_write(tmp_path: Path) -> None:
    servicer = HangUpAfterPing()
    server = grpc.aio.server()
    add_tunnel_service(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    target = f"127.0.0.1:{port}"
    state.save(tmp_path, state.StoredIdentity(target, "alpha-000001", "127.0.20.1", "cred", trusted_ca="insecure"))
    config = AgentConfig(
        gateway=target,
        token="",
        state_dir=tmp_path,
        insecure=True,
        start_ray=False,
        simulate_gpus=0,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
    )
    agent = Agent(config)
    task = asyncio.ensure_future(agent.run())
    try:
        # Each hang-up is a lost stream like any other: the agent keeps dialling, it never dies.
        deadline = asyncio.get_running_loop().time() + 15
        while servicer.registrations < 5 or agent.registrations < 5:  # the agent took each one
            assert not task.done(), f"agent stopped: {task.exception()!r}"
            assert asyncio.get_running_loop().time() < deadline, "agent stopped reconnecting"
            await asyncio.sleep(0.02)
    finally:
        agent.request_drain()
        try:
            await asyncio.wait_for(task, 10)
        finally:
            await server.stop(0)
