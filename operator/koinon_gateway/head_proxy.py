"""HTTP CONNECT proxy for the head's Ray processes (grpc_proxy=http://<this>).

The head reaches a volunteer's virtual address only through here: each CONNECT becomes an
OpenConnection to that volunteer's agent and is spliced to the Accept stream it opens back.

The proxy asks for no credentials (it listens on the gateway pod's loopback, which the head's
container shares), so anything on the head may open connections here, a volunteer's task pinned
there included. Each holds a pipe against its target node's read budget, and two small buffers
past it: at most max_head_connections_per_node are open (or opening) to one node at once, so that
the head's connections count in what one node can make the gateway hold (one_node_memory_bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Iterator

from . import http_connect
from .routing import DialRefused, Router
from .tunnel_io import FrameChannel, ProtocolViolation, splice_tcp

log = logging.getLogger(__name__)


TOO_MANY_CONNECTIONS = "too-many-head-connections"


class HeadProxy:
    def __init__(self, router: Router) -> None:
        self.router = router
        # Connections open or being opened to each node (by node name), from its route to the end
        # of its splice.
        self.to_node: Counter[str] = Counter()

    @contextlib.contextmanager
    def _counted(self, node_name: str, host: str, port: int) -> Iterator[None]:
        """Holds one of ``node_name``'s head connections while the block runs; DialRefused
        (TOO_MANY_CONNECTIONS) when it has max_head_connections_per_node already."""
        held = self.to_node[node_name]
        if held >= self.router.config.max_head_connections_per_node:
            raise self.router.refuse(
                "head", host, port, TOO_MANY_CONNECTIONS, f"the head has {held} connections to {host} open already"
            )
        self.to_node[node_name] = held + 1
        metrics = self.router.metrics
        metrics.head_connections_peak = max(metrics.head_connections_peak, held + 1)
        try:
            yield
        finally:
            self.to_node[node_name] -= 1
            if not self.to_node[node_name]:
                del self.to_node[node_name]

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
        with contextlib.ExitStack() as held:
            try:
                route = self.router.route(None, host, port)
                assert route.node is not None
                held.enter_context(self._counted(route.node.node_name, host, port))
                connection_id, channel = await self.router.open_to_node(route.node, port, "head")
            except DialRefused as exc:
                await _refuse(writer, exc)
                return
            await self._splice(reader, writer, connection_id, channel, route.node.node_name)

    async def _splice(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        connection_id: int,
        channel: FrameChannel,
        node_name: str,
    ) -> None:
        violation = ""
        try:
            with self.router.metrics.connection():
                http_connect.send(writer, http_connect.ESTABLISHED)
                await writer.drain()
                # Data from the head that the node does not read is held against its budget.
                await splice_tcp(reader, writer, channel, self.router.sessions.read_budget(node_name))
        except ConnectionError:
            pass
        except ProtocolViolation as exc:  # the volunteer got a Close saying so; its session carries on
            violation = str(exc) or "protocol violation"
        finally:
            # The accepting stream's handler counts the violation and ends that stream with an error.
            self.router.finish(connection_id, violation)


async def _refuse(writer: asyncio.StreamWriter, exc: DialRefused) -> None:
    if exc.reason.startswith("forbidden"):
        status = 403
    elif exc.reason == TOO_MANY_CONNECTIONS:  # the head may try again once some have ended
        status = 503
    else:
        status = 502
    with contextlib.suppress(ConnectionError):
        http_connect.send(writer, http_connect.response(status, exc.reason))
    await _close(writer)


async def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        await writer.drain()
        writer.close()
        await writer.wait_closed()
