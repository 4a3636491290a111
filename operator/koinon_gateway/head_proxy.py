"""HTTP CONNECT proxy for the head's Ray processes (grpc_proxy=http://<this>).

The head reaches a volunteer's virtual address only through here: each CONNECT becomes an
OpenConnection to that volunteer's agent and is spliced to the Accept stream it opens back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from . import http_connect
from .routing import DialRefused, Router
from .tunnel_io import ProtocolViolation, splice_tcp

log = logging.getLogger(__name__)


class HeadProxy:
    def __init__(self, router: Router) -> None:
        self.router = router

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            host, port, _ = await http_connect.read_connect_request(reader)
        except http_connect.BadConnectRequest as exc:
            with contextlib.suppress(ConnectionError):
                http_connect.send(writer, http_connect.response(400, "Bad Request"))
            self.router.metrics.refused_dials["bad-connect-request"] += 1
            log.warning("head proxy: %.300r", str(exc))
            await _close(writer)
            return
        try:
            route = self.router.route(None, host, port)
            assert route.node is not None
            connection_id, channel = await self.router.open_to_node(route.node, port, "head")
        except DialRefused as exc:
            status = 403 if exc.reason.startswith("forbidden") else 502
            with contextlib.suppress(ConnectionError):
                http_connect.send(writer, http_connect.response(status, exc.reason))
            await _close(writer)
            return
        violation = ""
        try:
            with self.router.metrics.connection():
                http_connect.send(writer, http_connect.ESTABLISHED)
                await writer.drain()
                # Data from the head that the node does not read is held against its budget.
                await splice_tcp(reader, writer, channel, self.router.sessions.read_budget(route.node.node_name))
        except ConnectionError:
            pass
        except ProtocolViolation as exc:  # the volunteer got a Close saying so; its session carries on
            violation = str(exc) or "protocol violation"
        finally:
            # The accepting stream's handler counts the violation and ends that stream with an error.
            self.router.finish(connection_id, violation)


async def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        await writer.drain()
        writer.close()
        await writer.wait_closed()
