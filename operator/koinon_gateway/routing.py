"""Access control and routing of proxied connections by virtual address.

A volunteer may reach only Ray ports of cluster addresses: the head's configured Ray ports, and
the port block of another connected volunteer. Everything else is refused and counted by reason.
Connections towards a volunteer are opened by asking its agent (OpenConnection on its Control stream)
to open an Accept stream back; the two ends are then spliced here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
from dataclasses import dataclass, field

from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .config import GatewayConfig
from .log_limit import LimitedLog
from .metrics import GatewayMetrics
from .sessions import NodeSession, SessionTable
from .tunnel_io import FrameChannel

log = logging.getLogger(__name__)

MAX_LOGGED_HOST = 256


class DialRefused(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Route:
    kind: str  # "head" or "node"
    host: str
    port: int
    node: NodeSession | None = None


@dataclass
class PendingConnection:
    node_name: str
    accepted: asyncio.Future[FrameChannel]
    # Set when the originator's splice is over: "" or, when the accepting stream broke the
    # protocol, what it did (its own handler then ends it with an error).
    finished: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    claimed: bool = False  # one Accept stream answers it; accept streams are not counted, so not more
    # The head proxy's task that opened it and splices it: cancelled when the accepting stream is
    # ended first (its node revoked), which the splice would otherwise wait on for as long as that
    # node's agent liked, holding the head's socket. (A dialling node's own stream is its own to
    # end, counted against it, and is told of a vanished peer by its splice.)
    originator: asyncio.Task[object] | None = None


class Router:
    def __init__(self, config: GatewayConfig, sessions: SessionTable, metrics: GatewayMetrics) -> None:
        self.config = config
        self.sessions = sessions
        self.metrics = metrics
        self.pending: dict[int, PendingConnection] = {}
        self._ids = itertools.count(1)
        self._refusals = LimitedLog(log)

    def refuse(self, source: str, host: str, port: int, reason: str, message: str) -> DialRefused:
        self.metrics.refused_dials[reason] += 1
        # %r and a cut: the host is whatever a volunteer sent, and must not forge log lines.
        self._refusals.warning(
            f"{source} {reason}",
            "refused dial %s -> %r:%d: %s (%.300r)", source, host[:MAX_LOGGED_HOST], port, reason, message,
        )  # fmt: skip
        return DialRefused(reason, message)

    def route(self, source: NodeSession | None, host: str, port: int) -> Route:
        """Decides where a dial goes; ``source`` is None for the head's own processes."""
        origin = source.node_name if source else "head"
        if source is not None and host == self.config.head_address:
            if not self.config.head_port_allowed(port):
                raise self.refuse(origin, host, port, "forbidden-port", f"port {port} is not a Ray port of the head")
            return Route("head", host, port)
        target = self.sessions.get_by_address(host)
        if target is None:
            reason = "unreachable" if self._is_vip(host) else "forbidden-address"
            raise self.refuse(origin, host, port, reason, f"{host} is not a connected cluster address")
        if source is not None and target is source:
            raise self.refuse(origin, host, port, "forbidden-address", "a node cannot dial itself through the tunnel")
        if not target.ports.allows(port, from_head=source is None):
            raise self.refuse(origin, host, port, "forbidden-port", f"port {port} is not a Ray port of {host}")
        return Route("node", host, port, target)

    def _is_vip(self, host: str) -> bool:
        try:
            return ipaddress.IPv4Address(host) in ipaddress.IPv4Network(self.config.vip_cidr)
        except ValueError:
            return False

    async def open_to_node(self, target: NodeSession, port: int, source: str) -> tuple[int, FrameChannel]:
        """Asks ``target``'s agent to open an Accept stream; returns (connection id, its channel)."""
        connection_id = next(self._ids)
        pending = PendingConnection(target.node_name, asyncio.get_running_loop().create_future())
        if source == "head":
            pending.originator = asyncio.current_task()
        self.pending[connection_id] = pending
        try:
            target.send(
                pb.GatewayMessage(
                    open_connection=pb.OpenConnection(connection_id=connection_id, port=port, source=source)
                )
            )
            channel = await asyncio.wait_for(asyncio.shield(pending.accepted), self.config.accept_timeout_s)
        except BaseException as exc:  # the dialer hanging up (CancelledError) included
            # Forget the connection: an Accept arriving later is refused instead of waiting forever.
            self.pending.pop(connection_id, None)
            if not pending.finished.done():
                pending.finished.set_result("")
            if not pending.accepted.done():
                pending.accepted.cancel()
            if not isinstance(exc, Exception):
                raise
            why = str(exc) if isinstance(exc, DialRefused) else f"its agent did not accept: {exc!r}"
            raise self.refuse(source, target.address, port, "unreachable", why) from exc
        return connection_id, channel

    def finish(self, connection_id: int, acceptor_violation: str = "") -> None:
        pending = self.pending.pop(connection_id, None)
        if pending is not None and not pending.finished.done():
            pending.finished.set_result(acceptor_violation)

    def claim(self, node_name: str, connection_id: int) -> PendingConnection:
        pending = self.pending.get(connection_id)
        if pending is None or pending.node_name != node_name or pending.accepted.done() or pending.claimed:
            raise DialRefused("unknown-connection", f"connection {connection_id} is not pending for {node_name}")
        pending.claimed = True
        return pending
