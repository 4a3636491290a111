"""Gateway and agent over real gRPC with TLS: join, identity, routing, access control."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
import pytest
from koinon_gateway.rpc import tunnel_stub
from koinon_gateway.tunnel_io import CHUNK_BYTES
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import channel_for, cluster, connect_via_proxy, echo_roundtrip, echo_server


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
        status, reader, writer = await connect_via_proxy(agent._proxy, "127.0.0.1", c.head_port)
        assert status == 200
        payload = os.urandom(3 * CHUNK_BYTES + 12345)
        assert await echo_roundtrip(reader, writer, payload) == payload
        # Half-close propagates: the echo server sees EOF and closes its side.
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def test_idle_proxied_connections_do_not_hold_a_mebibyte_each(tmp_path: Path) -> None:
    """Ray keeps its gRPC connections to GCS open for a node's whole life (raylet, every core
    worker, the dashboard agent), mostly idle. After one small message each, a connection held
    its 1 MiB receive buffer (zero-filled, so resident) at the gateway and another at the agent:
    ~2 MiB per connection here, ~10-20 GiB at a gateway of 1,000 nodes."""
    count = 200
    async with cluster(tmp_path) as c:
        agent = await c.start_agent("alpha")
        assert agent._proxy is not None
        status, reader, writer = await connect_via_proxy(agent._proxy, "127.0.0.1", c.head_port)
        assert status == 200 and await echo_roundtrip(reader, writer, b"warm") == b"warm"
        before = rss_mib()
        held = []
        for _ in range(count):
            status, reader, writer = await connect_via_proxy(agent._proxy, "127.0.0.1", c.head_port)
            assert status == 200
            assert await echo_roundtrip(reader, writer, b"x" * 100) == b"x" * 100
            held.append(writer)
        grown_kib = (rss_mib() - before) * 1024
        for writer in held:
            writer.close()
    # Agent and gateway both run in this process: two pipes per connection (~80 KiB in all now,
    # sockets and gRPC streams; ~2,100 KiB before).
    assert grown_kib / count < 512, f"{grown_kib / count:.0f} KiB of RSS per idle connection"


async def test_metrics_count_the_bytes_carried_each_way(tmp_path: Path) -> None:
    def carried() -> tuple[int, int]:
        return c.gateway.metrics.tunnel_bytes["from_nodes"], c.gateway.metrics.tunnel_bytes["to_nodes"]

    async with cluster(tmp_path) as c:
        a = await c.start_agent("alpha")
        b = await c.start_agent("beta")
        payload = os.urandom(CHUNK_BYTES + 4321)
        # Volunteer to head and back: the payload comes from a node, its echo goes to it.
        status, reader, writer = await connect_via_proxy(a._proxy, "127.0.0.1", c.head_port)
        assert status == 200 and await echo_roundtrip(reader, writer, payload) == payload
        writer.close()
        assert carried() == (len(payload), len(payload))
        # Volunteer to volunteer: each byte is read from one node and written to the other.
        b_address, port = b.identity.address, b.assignment.ports.node_manager_port  # type: ignore[union-attr]
        async with echo_server(b_address, port):
            status, reader, writer = await connect_via_proxy(a._proxy, b_address, port)
            assert status == 200 and await echo_roundtrip(reader, writer, payload) == payload
            writer.close()
        assert carried() == (3 * len(payload), 3 * len(payload))
        text = c.gateway.metrics.render()
        assert f'koinon_gateway_tunnel_bytes_total{{direction="from_nodes"}} {3 * len(payload)}' in text
        assert f'koinon_gateway_tunnel_bytes_total{{direction="to_nodes"}} {3 * len(payload)}' in text


async def test_volunteer_to_volunteer_and_head_to_volunteer(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        a = await c.start_agent("alpha")
        b = await c.start_agent("beta")
        b_address = b.identity.address  # type: ignore[union-attr]
        port = b.assignment.ports.node_manager_port  # type: ignore[union-attr]
        async with echo_server(b_address, port):
            status, reader, writer = await connect_via_proxy(a._proxy, b_address, port)
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
        # The head may reach the volunteer's dashboard agent (logs, profiling); other volunteers may not.
        agent_port = b.assignment.ports.dashboard_agent_grpc_port  # type: ignore[union-attr]
        async with echo_server(b_address, agent_port):
            status, reader, writer = await connect_via_proxy(head_proxy_port, b_address, agent_port)
            assert status == 200
            assert await echo_roundtrip(reader, writer, b"logs please") == b"logs please"
            writer.close()


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("head-bad-port", "forbidden-port"),
        ("kube-api", "forbidden-address"),
        ("admin", "forbidden-port"),
        ("self", "forbidden-address"),
        ("peer-bad-port", "forbidden-port"),
        ("peer-dashboard-agent", "forbidden-port"),  # the head's alone
        ("peer-metrics", "forbidden-port"),
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
            "peer-dashboard-agent": (b.identity.address, b.assignment.ports.dashboard_agent_grpc_port),  # type: ignore[union-attr]
            "peer-metrics": (b.identity.address, b.assignment.ports.metrics_export_port),  # type: ignore[union-attr]
        }[target]
        status, _, writer = await connect_via_proxy(a._proxy, host, port)
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


@pytest.mark.parametrize("target", [b"127.0.20.1:\xb2", b"127.0.20.1:" + b"1" * 5000, b"127.0.20.1:0", b"nohost"])
async def test_head_proxy_answers_a_malformed_connect_with_400_and_counts_it(tmp_path: Path, target: bytes) -> None:
    async with cluster(tmp_path) as c:
        head_proxy_port = int(c.gateway.head_proxy_url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", head_proxy_port, limit=1 << 16)
        writer.write(b"CONNECT " + target + b" HTTP/1.1\r\n\r\n")
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 400")
        writer.close()
        assert c.gateway.metrics.refused_dials["bad-connect-request"] == 1


async def test_refusals_log_a_hostile_host_on_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with cluster(tmp_path) as c:
        a = await c.start_agent("alpha")
        assert a.identity is not None
        async with channel_for(c) as channel:
            call = tunnel_stub(channel).Connect(metadata=(("authorization", f"Bearer {a.identity.credential}"),))
            await call.write(pb.Frame(dial=pb.Dial(host="x\nnode admin joined " + "y" * 5000, port=1)))
            assert (await asyncio.wait_for(call.read(), 5)).dial_result.reason == "forbidden-address"
        refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused dial")]
        assert len(refusals) == 1
        assert "\n" not in refusals[0] and len(refusals[0]) < 1000


async def test_a_peer_that_never_accepts_is_refused_as_unreachable_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with cluster(tmp_path, accept_timeout_s=0.5, heartbeat_timeout_s=30.0) as c:
        a = await c.start_agent("alpha")
        assert a._proxy is not None
        async with channel_for(c) as channel:
            response = await tunnel_stub(channel).Join(pb.JoinRequest(token=c.tokens.add(), name_hint="mute"))
        mute = response.assignment
        metadata = (("authorization", f"Bearer {response.credential}"),)
        async with channel_for(c) as channel:  # a registered node that does not serve connections
            control = tunnel_stub(channel).Control(metadata=metadata)
            await control.write(pb.AgentMessage(register=pb.Register(node_name=mute.node_name, address=mute.address)))
            assert (await asyncio.wait_for(control.read(), 5)).WhichOneof("msg") == "registered"

            async def next_open_connection() -> pb.OpenConnection:
                while True:
                    message = await asyncio.wait_for(control.read(), 5)
                    if message.WhichOneof("msg") == "open_connection":
                        return message.open_connection  # type: ignore[no-any-return]

            # It ignores the OpenConnection...
            status, _, writer = await connect_via_proxy(a._proxy, mute.address, mute.ports.node_manager_port)
            writer.close()
            assert status == 502
            assert c.gateway.metrics.refused_dials["unreachable"] == 1
            await next_open_connection()
            # ...or opens the Accept stream and then never says whether it reached its port.
            dial = asyncio.ensure_future(connect_via_proxy(a._proxy, mute.address, mute.ports.node_manager_port))
            opened = await next_open_connection()
            accept = tunnel_stub(channel).Connect(metadata=metadata)
            await accept.write(pb.Frame(accept=pb.Accept(connection_id=opened.connection_id)))
            status, _, writer = await asyncio.wait_for(dial, 5)
            writer.close()
            assert status == 502
            assert await asyncio.wait_for(accept.code(), 5) == grpc.StatusCode.DEADLINE_EXCEEDED  # ended, not crashed
            assert c.gateway.metrics.refused_dials["unreachable"] == 2
            control.cancel()
        assert not [r for r in caplog.records if r.levelname == "ERROR"]


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
        status, reader, writer = await connect_via_proxy(agent._proxy, "127.0.0.1", c.head_port)
        assert status == 200
        assert await echo_roundtrip(reader, writer, b"x" * 1000) == b"x" * 1000
        writer.close()
