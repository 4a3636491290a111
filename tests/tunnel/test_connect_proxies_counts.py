"""Both CONNECT proxies (the head's, in the gateway, and the agent's local one) survive a client that
resets while its request head is still being read; a dial counts as opened only once it is."""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from .helpers import cluster, connect_via_proxy, echo_roundtrip


@asynccontextmanager
async def loop_errors() -> AsyncIterator[Callable[[], list[str]]]:
    """What reaches the event loop's exception handler (a connection handler that died) meanwhile."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))

    def seen() -> list[str]:
        gc.collect()  # Python reports a failed handler task when the task is collected
        return [f"{context.get('exception')!r} {context.get('message')}" for context in errors]

    try:
        yield seen
    finally:
        loop.set_exception_handler(previous)


async def reset_mid_request(port: int) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"CONNECT 127.0.20.1:2 HTTP/1.1\r\n")  # no blank line: the proxy is still reading
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # RST


async def test_head_proxy_counts_a_client_that_resets_mid_request_as_a_bad_request(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c, loop_errors() as seen:
        head_proxy_port = int(c.gateway.head_proxy_url.rsplit(":", 1)[1])
        for _ in range(2):
            await reset_mid_request(head_proxy_port)
        await asyncio.sleep(0.3)
        assert seen() == []
        assert c.gateway.metrics.refused_dials["bad-connect-request"] == 2


async def test_local_proxy_survives_clients_that_reset_mid_request(tmp_path: Path) -> None:
    async with cluster(tmp_path, tls=False) as c, loop_errors() as seen:
        agent = await c.start_agent("alpha")
        assert agent._proxy is not None
        for _ in range(3):
            await reset_mid_request(agent._proxy.port)
        await asyncio.sleep(0.3)
        assert seen() == []
        status, reader, writer = await connect_via_proxy(agent._proxy, "127.0.0.1", c.head_port)
        assert status == 200 and await echo_roundtrip(reader, writer, b"ok") == b"ok"
        writer.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_dial_counts_as_opened_only_once_it_is(tmp_path: Path) -> None:
    dead = _closed_port()
    async with cluster(tmp_path, head_ports=[dead]) as c:  # a Ray port of the head, nothing listening
        agent = await c.start_agent("alpha")
        assert agent._proxy is not None
        status, _, writer = await connect_via_proxy(agent._proxy, "127.0.0.1", dead)
        writer.close()
        assert status == 502
        assert c.gateway.metrics.refused_dials["unreachable"] == 1
        assert c.gateway.metrics.connections_opened == 0
        status, reader, writer = await connect_via_proxy(agent._proxy, "127.0.0.1", c.head_port)
        assert status == 200 and await echo_roundtrip(reader, writer, b"ok") == b"ok"
        writer.close()
        assert c.gateway.metrics.connections_opened == 1


async def test_the_admin_endpoint_counts_connected_agents(tmp_path: Path) -> None:
    import aiohttp

    async with cluster(tmp_path) as c, aiohttp.ClientSession() as http:

        async def connected() -> int:
            async with http.get(f"{c.gateway.admin_url}/metrics") as reply:
                text = await reply.text()
            return int(
                next(
                    line for line in text.splitlines() if line.startswith("koinon_gateway_sessions_connected ")
                ).split()[1]
            )

        assert await connected() == 0
        await c.start_agent("alpha")
        await c.start_agent("beta")
        assert await connected() == 2
        _, task = c.agents[0]
        task.cancel()
        for _ in range(50):
            if await connected() == 1:
                break
            await asyncio.sleep(0.1)
        assert await connected() == 1
