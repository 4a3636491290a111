"""Gateway and agent over real gRPC with TLS: join, identity, routing, access control."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from koinon_gateway.tunnel_io import CHUNK_BYTES

from .helpers import cluster, connect_via_proxy, echo_roundtrip, echo_server


async def wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_join_creates_node_and_status(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        agent = await c.start_agent("alpha")
        name = agent.identity.node_name  # type: ignore[union-attr]
        node = c.registry.objects[name]
        assert node["spec"] == {
            "owner": "alice",
            "region": "eu",
            "gpus": [{"model": "Simulated GPU", "memoryMiB": 8192}],
        }
        await wait_for(lambda: "latency" in c.registry.objects[name]["status"])
        status = c.registry.objects[name]["status"]
        assert status["connected"] is True
        assert status["address"] == agent.identity.address  # type: ignore[union-attr]
        assert status["gpus"] == [{"model": "Simulated GPU", "memoryMiB": 8192}]
        assert status["latency"]["smoothedMs"] >= 0
        # Without a Ray node the node is connected but not Ready.
        assert status["phase"] == "NotReady"
        assert status["conditions"][0]["reason"] == "RayNotRunning"


async def test_dial_head_through_tunnel_with_large_payload(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        agent = await c.start_agent("alpha")
        status, reader, writer = await connect_via_proxy(agent._proxy.port, "127.0.0.1", c.head_port)  # type: ignore[union-attr]
        assert status == 200
        payload = os.urandom(3 * CHUNK_BYTES + 12345)
        assert await echo_roundtrip(reader, writer, payload) == payload
        # Half-close propagates: the echo server sees EOF and closes its side.
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()


async def test_volunteer_to_volunteer_and_head_to_volunteer(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        a = await c.start_agent("alpha")
        b = await c.start_agent("beta")
        b_address = b.identity.address  # type: ignore[union-attr]
        port = b.assignment.ports.node_manager_port  # type: ignore[union-attr]
        async with echo_server(b_address, port):
            status, reader, writer = await connect_via_proxy(a._proxy.port, b_address, port)  # type: ignore[union-attr]
            assert status == 200
            payload = os.urandom(2 * CHUNK_BYTES)
            assert await echo_roundtrip(reader, writer, payload) == payload
            writer.close()
            # The head's processes reach the volunteer through the head-side CONNECT proxy.
            head_proxy_port = int(c.gateway.head_proxy_url.rsplit(":", 1)[1])
            status, reader, writer = await connect_via_proxy(head_proxy_port, b_address, port)
            assert status == 200
            assert await echo_roundtrip(reader, writer, b"hello from the head") == b"hello from the head"
            writer.close()


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("head-bad-port", "forbidden-port"),
        ("kube-api", "forbidden-address"),
        ("admin", "forbidden-port"),
        ("self", "forbidden-address"),
        ("peer-bad-port", "forbidden-port"),
    ],
)
async def test_access_control_refuses_and_counts(tmp_path: Path, target: str, reason: str) -> None:
    async with cluster(tmp_path) as c:
        a = await c.start_agent("alpha")
        b = await c.start_agent("beta")
        admin_port = int(c.gateway.admin_url.rsplit(":", 1)[1])
        host, port = {
            "head-bad-port": ("127.0.0.1", 22),
            "kube-api": ("10.96.0.1", 443),
            "admin": ("127.0.0.1", admin_port),
            "self": (a.identity.address, a.assignment.ports.node_manager_port),  # type: ignore[union-attr]
            "peer-bad-port": (b.identity.address, 22),  # type: ignore[union-attr]
        }[target]
        status, _, writer = await connect_via_proxy(a._proxy.port, host, port)  # type: ignore[union-attr]
        writer.close()
        assert status == 403
        assert c.gateway.metrics.refused_dials[reason] == 1
        assert f'refused_dials_total{{reason="{reason}"}} 1' in c.gateway.metrics.render()


async def test_head_proxy_refuses_non_volunteer_targets(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        await c.start_agent("alpha")
        head_proxy_port = int(c.gateway.head_proxy_url.rsplit(":", 1)[1])
        status, _, writer = await connect_via_proxy(head_proxy_port, "10.0.0.1", 6443)
        writer.close()
        assert status == 403


async def test_agent_without_ca_cannot_talk_to_tls_gateway(tmp_path: Path) -> None:
    from koinon_agent.agent import Agent, JoinRefused

    async with cluster(tmp_path) as c:
        config = c.agent_config("mallory", backoff_max_s=0.1)
        config.ca_pem = b""  # system roots do not know the gateway's CA
        agent = Agent(config)
        task = asyncio.ensure_future(agent.run())
        await asyncio.sleep(1.0)
        assert not task.done() and not agent.connected.is_set()  # still retrying; TLS fails
        agent.request_drain()
        with pytest.raises(JoinRefused):
            await asyncio.wait_for(task, 5)
        assert c.registry.objects == {}


async def test_insecure_mode_works_when_configured(tmp_path: Path) -> None:
    async with cluster(tmp_path, tls=False) as c:
        agent = await c.start_agent("alpha")
        status, reader, writer = await connect_via_proxy(agent._proxy.port, "127.0.0.1", c.head_port)  # type: ignore[union-attr]
        assert status == 200
        assert await echo_roundtrip(reader, writer, b"x" * 1000) == b"x" * 1000
        writer.close()
