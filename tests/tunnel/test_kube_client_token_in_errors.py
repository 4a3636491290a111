"""The gateway's Kubernetes client never puts its bearer token in errors or logs.

aiohttp turns a response it cannot parse (a proxy or load balancer in front of the API server
answering garbage, a truncated header) into ClientResponseError, whose repr() carries the
request's headers, the service-account token among them. The gateway logs such errors with %r
(kube_registry.deleted_nodes, service.py's join paths): the token landed in the pod log that
anyone with `pods/log` (or the log pipeline) can read."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import pytest
from koinon_gateway.kube_client import KubeClient, KubeConfig
from koinon_gateway.kube_registry import KubeNodeRegistry

TOKEN = "eyJhbGciOi-SERVICE-ACCOUNT-TOKEN"


@contextlib.asynccontextmanager
async def malformed_api_server() -> AsyncIterator[str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n{}")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


async def test_an_unparsable_api_reply_does_not_carry_the_token_in_its_error() -> None:
    async with malformed_api_server() as url:
        client = KubeClient(KubeConfig(server=url, token=TOKEN))
        try:
            with pytest.raises(Exception) as caught:
                await client.get("/apis/koinon.dev/v1alpha1/volunteernodes")
        finally:
            await client.close()
    assert TOKEN not in repr(caught.value), f"the bearer token is in the error's repr: {caught.value!r}"


async def test_the_volunteer_node_watch_does_not_log_the_token(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with malformed_api_server() as url:
        client = KubeClient(KubeConfig(server=url, token=TOKEN))
        registry = KubeNodeRegistry(client)

        async def follow() -> None:
            async for _ in registry.deleted_nodes():
                pass

        task = asyncio.create_task(follow())
        try:
            await asyncio.sleep(0.5)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await client.close()
    assert "VolunteerNode watch" in caplog.text
    assert TOKEN not in caplog.text, "the gateway logged its Kubernetes bearer token"
