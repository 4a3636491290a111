"""The agent's local CONNECT proxy serves only clients that were handed its URL (Ray's gRPC).

It listens on 127.0.0.1, where every local user's processes can reach it, and each connection it
takes dials into the cluster as the node: without the proxy's secret a client gets 407.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import urllib.parse
from pathlib import Path

import grpc
import pytest
from koinon_agent import local_proxy
from koinon_agent.ray_node import RaySettings, ray_environment
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import cluster, connect_via_proxy, echo_roundtrip, proxy_authorization


async def connect_status(port: int, headers: str, host: str, target_port: int) -> bytes:
    """The head of the proxy's answer to a CONNECT sent with ``headers``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"CONNECT {host}:{target_port} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        await writer.drain()
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()


def _userinfo(url: str) -> str:
    """``user:password`` of a proxy URL."""
    parsed = urllib.parse.urlsplit(url)
    return f"{parsed.username}:{parsed.password}"


def basic(credentials: str) -> str:
    return f"Proxy-Authorization: Basic {base64.b64encode(credentials.encode()).decode()}\r\n"


async def test_the_local_proxy_refuses_a_process_that_does_not_know_its_secret(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        agent = await c.start_agent("alpha")
        assert agent._proxy is not None
        head = await connect_status(agent._proxy.port, "", "127.0.0.1", c.head_port)  # no credentials
        assert head.startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n"), head
        secret = urllib.parse.urlsplit(agent._proxy.url).password
        assert secret
        wrong = [
            "",  # none at all
            basic("koinon:" + "0" * len(secret)),  # a guess
            basic("someone:" + secret),  # the secret under another user
            f"Proxy-Authorization: Bearer {secret}\r\n",  # another scheme
            f"Proxy-Authorization: Basic {base64.b64encode(f'koinon:{secret}'.encode()).decode()}!\r\n",
            basic(f"koinon:{secret}") * 2,  # twice: ambiguous
        ]
        for headers in wrong:
            head = await connect_status(agent._proxy.port, headers, "127.0.0.1", c.head_port)
            assert head.startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n"), (headers, head)
            assert b'\r\nProxy-Authenticate: Basic realm="koinon"\r\n' in head
        assert agent._proxy.refused_local == {"unauthorized": 1 + len(wrong)}
        # Nothing reached the gateway: no stream was opened in the node's name.
        assert c.gateway.metrics.connections_opened == 0 and not c.gateway.metrics.refused_streams
        # The header's name and scheme are case-insensitive, as HTTP has them.
        lowercase = basic(f"koinon:{secret}").replace("Proxy-Authorization: Basic", "proxy-authorization: basic")
        head = await connect_status(agent._proxy.port, lowercase, "127.0.0.1", c.head_port)
        assert head.startswith(b"HTTP/1.1 200"), head
        status, reader, writer = await connect_via_proxy(agent._proxy, "127.0.0.1", c.head_port)
        assert status == 200 and await echo_roundtrip(reader, writer, b"ok") == b"ok"
        writer.close()


async def test_grpc_goes_through_the_proxy_with_the_url_the_agent_hands_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What gRPC itself makes of grpc_proxy=http://user:secret@host:port (Ray's C++ core does the
    same, test_ray_netns.py): the proxy takes it, and a URL with another secret is refused."""
    for variable in ("no_grpc_proxy", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(variable, raising=False)  # 127.0.0.1 must not bypass the proxy

    def echo(request: bytes, _context: object) -> bytes:
        return request

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler("t.T", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with cluster(tmp_path, head_ports=[port]) as c:
            agent = await c.start_agent("alpha")
            assert agent._proxy is not None
            url = ray_environment(settings(agent._proxy.url), pb.Assignment(address="127.0.20.2"))["grpc_proxy"]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.http_proxy", url)]) as channel:
                assert await channel.unary_unary("/t.T/Echo", None, None)(b"through", timeout=10) == b"through"
            assert c.gateway.metrics.connections_opened == 1
            forged = url.replace(urllib.parse.urlsplit(url).password or "", "f" * 32)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.http_proxy", forged)]) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await channel.unary_unary("/t.T/Echo", None, None)(b"x", timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert agent._proxy.refused_local["unauthorized"] >= 1
            assert c.gateway.metrics.connections_opened == 1
    finally:
        await server.stop(0)


def settings(proxy_url: str) -> RaySettings:
    return RaySettings(
        ray_bin="ray", temp_dir=Path("/nonexistent"), proxy_url=proxy_url, num_cpus=1, num_gpus=0,
        gpu_memory_mib=0, object_store_memory=None,
    )  # fmt: skip


async def test_the_secret_is_new_each_start_and_shown_nowhere(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with cluster(tmp_path) as c:
        a = await c.start_agent("alpha")
        b = await c.start_agent("beta")
        assert a._proxy is not None and b._proxy is not None
        secrets = [urllib.parse.urlsplit(p.url).password or "" for p in (a._proxy, b._proxy)]
        assert len(set(secrets)) == 2 and all(len(s) == 32 for s in secrets)
        await connect_status(a._proxy.port, basic("koinon:wrong-secret-here"), "127.0.0.1", c.head_port)
        for _ in range(3):
            await connect_status(a._proxy.port, "", "127.0.0.1", c.head_port)
        report = f"{a.health_report()!r} {a.config.health_path.read_text()}"
        node = str(c.registry.objects)
    shown = [caplog.text, report, node, repr(a._proxy), repr(settings(a._proxy.url))]
    assert not any(secret in text for secret in secrets for text in shown)
    # Refusals are counted and logged once a minute, not once each.
    assert a._proxy.refused_local == {"unauthorized": 4}
    assert caplog.text.count("local proxy: refused a local client") == 1


async def test_the_proxy_serves_at_most_so_many_local_connections_at_once(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        agent = await c.start_agent("alpha")
        assert agent._proxy is not None
        agent._proxy.max_connections = 2
        held = [await connect_via_proxy(agent._proxy, "127.0.0.1", c.head_port) for _ in range(2)]
        assert [status for status, _, _ in held] == [200, 200]
        head = await connect_status(agent._proxy.port, basic(_userinfo(agent._proxy.url)), "127.0.0.1", c.head_port)
        assert head.startswith(b"HTTP/1.1 503 too-many-connections"), head
        assert agent._proxy.refused_local == {"over-capacity": 1}
        for _, _, writer in held:
            writer.close()
        for _ in range(50):
            if agent._proxy.active == 0:
                break
            await asyncio.sleep(0.1)
        assert agent._proxy.active == 0
        status, reader, writer = await connect_via_proxy(agent._proxy, "127.0.0.1", c.head_port)
        assert status == 200 and await echo_roundtrip(reader, writer, b"ok") == b"ok"
        writer.close()


async def test_strangers_that_never_send_a_request_cannot_lock_ray_out(tmp_path: Path) -> None:
    """Idle sockets of another local user (no secret) filled the connection cap: every new
    connection of Ray's was answered 503, and the node dropped out of the cluster."""
    async with cluster(tmp_path) as c:
        agent = await c.start_agent("alpha")
        assert agent._proxy is not None
        agent._proxy.max_connections = agent._proxy.max_unauthenticated = 4
        squatters = [await asyncio.open_connection("127.0.0.1", agent._proxy.port) for _ in range(4)]
        await asyncio.sleep(local_proxy.PUSH_OUT_AFTER_S + 0.1)  # each had its time to send a request
        squatters.append(await asyncio.open_connection("127.0.0.1", agent._proxy.port))
        try:
            # The fifth pushed the first out.
            assert await asyncio.wait_for(squatters[0][0].read(), 5) == b""
            status, reader, writer = await connect_via_proxy(agent._proxy, "127.0.0.1", c.head_port)
            assert status == 200 and await echo_roundtrip(reader, writer, b"ok") == b"ok"
            writer.close()
            assert agent._proxy.refused_local["pushed-out"] == 2  # by the fifth squatter, and by Ray
            assert agent._proxy.refused_local["bad-request"] == 0  # each counted once
        finally:
            for _, squatter in squatters:
                squatter.close()


@pytest.mark.parametrize("requests_sent", ["with each connect", "after a loop turn"])
async def test_a_burst_of_rays_own_authenticated_connections_is_not_pushed_out(
    tmp_path: Path, requests_sent: str
) -> None:
    """More of Ray's connections than the pool holds (raylet and core workers starting together),
    their CONNECTs in the sockets when the proxy's loop gets to them, or sent once it has accepted
    the lot: the last pushed out the first before its request was read."""
    async with cluster(tmp_path) as c:
        agent = await c.start_agent("alpha")
        proxy = agent._proxy
        assert proxy is not None
        request = (f"CONNECT 127.0.0.1:{c.head_port} HTTP/1.1\r\nHost: x\r\n{proxy_authorization(proxy)}\r\n").encode()
        burst = proxy.max_unauthenticated + 1
        socks = []
        for _ in range(burst):  # the loop does not run meanwhile: all land in one accept batch
            socks.append(socket.create_connection(("127.0.0.1", proxy.port)))
            if requests_sent == "with each connect":
                socks[-1].sendall(request)
        if requests_sent == "after a loop turn":
            for _ in range(5):
                await asyncio.sleep(0)
            for sock in socks:
                sock.sendall(request)
        statuses: list[int | str] = []
        writers = []
        for sock in socks:
            sock.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=sock)
            writers.append(writer)
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
                statuses.append(int(head.split()[1]))
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                statuses.append(repr(exc)[:40])
        for writer in writers:
            writer.close()
        assert statuses == [200] * burst, (statuses[:3], dict(proxy.refused_local))
