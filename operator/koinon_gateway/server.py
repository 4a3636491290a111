"""The gateway process: gRPC server for agents, head-side CONNECT proxy, admin HTTP, liveness.

Programmatic use (the local control plane calls this)::

    gateway = Gateway(GatewayConfig(...), tokens=..., registry=..., ca_store=...)
    await gateway.start()
    gateway.agent_target, gateway.head_proxy_url, gateway.ca_pem
    await gateway.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
from dataclasses import dataclass

import grpc
from aiohttp import web

from . import http_connect
from .addresses import AddressAllocator, AddressTaken
from .config import GatewayConfig
from .head_proxy import HeadProxy
from .log_limit import LimitedLog
from .metrics import GatewayMetrics
from .pki import CAStore, InMemoryCAStore, issue_server_cert, load_or_create_ca
from .ray_check import GcsRayNodeChecker
from .registry import JSON, InMemoryNodeRegistry, NodeDeletionSource, NodeRegistry, being_deleted, status_address
from .routing import Router
from .rpc import add_tunnel_service
from .send_stalls import SWEEP_INTERVAL_S
from .server_tls import RenewingServerCert
from .service import TunnelService
from .sessions import SessionTable
from .tokens import ExpiredTokenCleaner, InMemoryTokenStore, TokenStore
from .tunnel_io import GRPC_OPTIONS, SEND_STALLED
from .unconnected_nodes import unconnected_too_long

log = logging.getLogger(__name__)
# How long a stopping gateway waits for work it owes the API (a token use to give back) after its
# server stopped: the process ends next, and asyncio would cancel that work half-done.
BACKGROUND_FINISH_TIMEOUT_S = 3.0


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r}: expected host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


def reachable_host_port(host: str, port: int) -> str:
    """``host:port`` to connect to a listener bound to ``host``: a wildcard is reached on loopback,
    an IPv6 address in brackets (as URLs and gRPC targets want it)."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _timestamp(value: object) -> float:
    """Seconds since the epoch of an RFC 3339 time; 0.0 when absent or unreadable."""
    try:
        when = dt.datetime.fromisoformat(str(value))
    except ValueError:
        return 0.0
    return when.timestamp() if when.tzinfo is not None else 0.0


def connected(node: JSON) -> bool:
    """Whether an agent ever registered as the node (every session writes lastHeartbeat)."""
    return "lastHeartbeat" in (node.get("status") or {})


def claim_order(node: JSON) -> tuple[bool, float, float]:
    """Ranks the nodes recording one address, the rightful holder highest: one that has connected
    (the newest heartbeat first), then the newest made (a retry's node, the one its agent got)."""
    status, metadata = node.get("status") or {}, node.get("metadata") or {}
    return connected(node), _timestamp(status.get("lastHeartbeat")), _timestamp(metadata.get("creationTimestamp"))


@dataclass
class _Listeners:
    grpc_port: int = 0
    head_proxy_port: int = 0
    admin_port: int = 0


class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        tokens: TokenStore | None = None,
        registry: NodeRegistry | None = None,
        ca_store: CAStore | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.tokens: TokenStore = tokens if tokens is not None else InMemoryTokenStore()
        self.registry: NodeRegistry = registry if registry is not None else InMemoryNodeRegistry()
        self.ca_store: CAStore = ca_store if ca_store is not None else InMemoryCAStore()
        self.metrics = GatewayMetrics()
        self.allocator = AddressAllocator(config.vip_cidr, config.port_base, config.port_block_size)
        self.sessions = SessionTable(config, self.registry)
        self.router = Router(config, self.sessions, self.metrics)
        self.ca_pem = b""
        self._ports = _Listeners()
        self._server: grpc.aio.Server | None = None
        self._server_started = False
        self._server_cert: RenewingServerCert | None = None
        self.service: TunnelService | None = None  # set by start()
        self._head_proxy: asyncio.Server | None = None
        self._admin: web.AppRunner | None = None
        self._liveness: asyncio.Task[None] | None = None
        self._stall_sweeper: asyncio.Task[None] | None = None
        self._stall_log = LimitedLog(log)  # a node can stall connections many times a second
        self._revoker: asyncio.Task[None] | None = None
        self._token_cleaner: asyncio.Task[None] | None = None
        self._unconnected_cleaner: asyncio.Task[None] | None = None
        self._ray_rechecker: asyncio.Task[None] | None = None

    @property
    def agent_target(self) -> str:
        if self.config.listen.startswith("unix:"):
            return self.config.listen
        host, _ = split_host_port(self.config.listen)
        return reachable_host_port(host, self._ports.grpc_port)

    @property
    def head_proxy_url(self) -> str:
        host, _ = split_host_port(self.config.head_proxy_listen)
        return f"http://{reachable_host_port(host, self._ports.head_proxy_port)}"

    @property
    def admin_url(self) -> str:
        host, _ = split_host_port(self.config.admin_listen)
        return f"http://{reachable_host_port(host, self._ports.admin_port)}"

    async def start(self) -> Gateway:
        bundle = await load_or_create_ca(self.ca_store)
        self.ca_pem = bundle.cert_pem
        nodes = await self.registry.list()
        # Two nodes may record one address (a join whose undo failed left one behind, before that
        # kept its address): the one that has connected keeps it, whatever order they are listed
        # in, so that a live volunteer is not refused (address-taken) because of a ghost.
        kept: dict[str, JSON] = {}  # address -> the node that holds it
        for node in sorted(nodes, key=claim_order, reverse=True):
            address = status_address(node)
            name = node["metadata"]["name"]
            # A node being deleted (a finalizer holds the object) has given its address back: the
            # deletion freed it before the restart, and another node may hold it now.
            if not address or not self.allocator.contains(address) or being_deleted(node):
                continue
            try:
                self.allocator.reserve(address, name)
            except AddressTaken:
                holder = kept[address]
                log.error(
                    "VolunteerNode %s records address %s, which VolunteerNode %s also records and keeps (%s): "
                    "%s cannot register (address-taken); delete it%s",
                    name, address, holder["metadata"]["name"],
                    "connected more recently" if connected(node) else
                    "it has connected" if connected(holder) else "made later, neither has connected",
                    name, "" if connected(node) else ", or the unconnected-node sweep will once it is old enough",
                )  # fmt: skip
            else:
                kept[address] = node
        self.sessions.disown_stale_connections(nodes)
        service = TunnelService(
            self.config,
            self.tokens,
            self.registry,
            bundle.credential_key,
            self.allocator,
            self.sessions,
            self.router,
            self.metrics,
            GcsRayNodeChecker(f"{self.config.head_address}:{self.config.head_gcs_port}", self.config.ray_auth_token)
            if self.config.verify_ray_nodes
            else None,
        )
        self.service = service
        self._server = grpc.aio.server(options=GRPC_OPTIONS)
        add_tunnel_service(service, self._server)
        if self.config.tls:
            # issue_server_cert is looked up at each renewal, so a test can shorten its lifetime.
            self._server_cert = RenewingServerCert(
                bundle, self.config.tls_hostnames, issue=lambda b, names: issue_server_cert(b, names)
            )
            port = self._server.add_secure_port(self.config.listen, self._server_cert.credentials())
        else:
            port = self._server.add_insecure_port(self.config.listen)
        if self.config.listen.startswith("unix:"):
            # Made with the umask (0755: only root may connect). Every local user may reach the
            # gateway, as on its TCP port: join tokens and certificates are what it checks, and who
            # reaches the path is its directory's business. Volunteers in the dev plane's sandbox
            # connect as nobody.
            os.chmod(self.config.listen.removeprefix("unix:"), 0o666)
        self._ports.grpc_port = port
        host, head_port = split_host_port(self.config.head_proxy_listen)
        self._head_proxy = await asyncio.start_server(
            HeadProxy(self.router).handle, host, head_port, limit=http_connect.REQUEST_READER_LIMIT
        )
        self._ports.head_proxy_port = self._head_proxy.sockets[0].getsockname()[1]
        await self._start_admin()
        try:
            # A listener on port 0 got its port only now, and it may lie within the head's Ray
            # ports: volunteers could then dial the gateway's own port through the tunnel.
            self.config.validate_bound_ports(
                {
                    "listen": self._ports.grpc_port,
                    "head_proxy_listen": self._ports.head_proxy_port,
                    "admin_listen": self._ports.admin_port,
                }
            )
        except ValueError:
            await self.stop(grace=0)  # nothing was served yet: close what is bound
            raise
        # Agents are served last, once every port is known to be safe: no Connect stream can
        # exist before the check above.
        await self._server.start()
        self._server_started = True
        self._liveness = asyncio.ensure_future(self._liveness_loop())
        self._stall_sweeper = asyncio.ensure_future(self._sweep_send_stalls())
        if isinstance(self.registry, NodeDeletionSource):
            self._revoker = asyncio.ensure_future(self._revoke_deleted(self.registry))
        if isinstance(self.tokens, ExpiredTokenCleaner):
            self._token_cleaner = asyncio.ensure_future(self._clean_tokens(self.tokens))
        self._unconnected_cleaner = asyncio.ensure_future(self._clean_unconnected_nodes())
        if service.ray_checker is not None:
            self._ray_rechecker = asyncio.ensure_future(self._recheck_ray_nodes(service))
        log.info("gateway serving agents on %s, head proxy %s", self.agent_target, self.head_proxy_url)
        return self

    async def _start_admin(self) -> None:
        app = web.Application()

        async def healthz(_: web.Request) -> web.Response:
            return web.Response(text="ok\n")

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(text=self.metrics.render(sessions_connected=len(self.sessions.by_name)))

        app.router.add_get("/healthz", healthz)
        app.router.add_get("/metrics", metrics)
        self._admin = web.AppRunner(app, access_log=None)
        await self._admin.setup()
        host, port = split_host_port(self.config.admin_listen)
        site = web.TCPSite(self._admin, host, port)
        await site.start()
        # asyncio.Server or uvloop's Server (not a subclass); both have ``sockets``.
        server = site._server
        assert server is not None
        self._ports.admin_port = getattr(server, "sockets")[0].getsockname()[1]  # noqa: B009

    async def _liveness_loop(self) -> None:
        period = min(1.0, self.config.heartbeat_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            try:
                self.sessions.expire_stale()
            except Exception:
                log.exception("liveness check failed")

    async def _sweep_send_stalls(self) -> None:
        # Ends the connections of nodes with more stalled than they may hold (send_stalls.py).
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                for node_name, count in self.sessions.send_stalls.sweep().items():
                    self.metrics.refused_streams[SEND_STALLED] += count
                    self._stall_log.warning(
                        f"{node_name} {SEND_STALLED}",
                        "node %s: %d connection(s) ended: more of its connections held data the other end "
                        "did not take than max_stalled_bytes_per_node allows",
                        node_name,
                        count,
                    )
            except Exception:
                log.exception("sweeping stalled connections failed")

    async def _recheck_ray_nodes(self, service: TunnelService) -> None:
        # Ready requires the Ray node to be ALIVE in GCS at the node's address, not only once.
        while True:
            await asyncio.sleep(self.config.ray_recheck_interval_s)
            try:
                await service.recheck_ray_nodes()
            except Exception:
                log.exception("rechecking Ray nodes in GCS failed; trying again later")

    async def _revoke_deleted(self, source: NodeDeletionSource) -> None:
        # Deleting the VolunteerNode revokes the node: its live session ends now, and its next
        # stream is refused because Control checks that the object exists. Its virtual address (and
        # port block) goes back to the pool: the old credential names it, but no stream can use a
        # credential whose VolunteerNode is gone.
        while True:
            try:
                async for node in source.deleted_nodes():
                    if self.sessions.revoke(node.name, replaced=node.replaced):
                        self.metrics.refused_streams["node-deleted-while-connected"] += 1
                    freed = node.address if self.allocator.release(node.address, node.name) else None
                    if not node.replaced:
                        # One a failed join's undo left holds the address its status may not
                        # record (service._record_node): freed by name. (A replaced one's name
                        # is another object's now.)
                        freed = self.allocator.release_holder(node.name) or freed
                    if freed:
                        log.info("node %s deleted; address %s released", node.name, freed)
            except Exception:
                log.exception("watching VolunteerNode deletions failed; restarting the watch")
                await asyncio.sleep(1.0)

    async def _clean_tokens(self, tokens: ExpiredTokenCleaner) -> None:
        grace = dt.timedelta(seconds=self.config.token_cleanup_grace_s)
        while True:
            try:
                await tokens.delete_expired(grace)
            except Exception:
                log.exception("deleting expired join tokens failed; trying again later")
            await asyncio.sleep(self.config.token_cleanup_interval_s)

    async def _clean_unconnected_nodes(self) -> None:
        while True:
            await asyncio.sleep(self.config.unconnected_node_sweep_s)
            try:
                await self.delete_unconnected_nodes()
            except Exception:
                log.exception("deleting VolunteerNodes that never connected failed; trying again later")

    async def delete_unconnected_nodes(self) -> list[str]:
        """Deletes the nodes that joined more than ``unconnected_node_ttl_s`` ago and whose agent
        never connected, and frees their addresses; returns their names."""
        found = unconnected_too_long(
            await self.registry.list(),
            dt.datetime.now(dt.UTC),
            self.config.unconnected_node_ttl_s,
            self.sessions.by_name,
        )
        deleted = []
        for node in found:
            # Connected during an earlier delete's await, or its session's first status write (the
            # one that says it connected) has not landed yet.
            if node.name in self.sessions.by_name or self.sessions.writer.busy(node.name):
                continue
            # Only the object as listed: one that connected since (its status changed) or was
            # created again under the name stays.
            preconditions = {"uid": node.uid, "resourceVersion": node.resource_version}
            if not await self.registry.delete(node.name, {k: v for k, v in preconditions.items() if v}):
                continue
            # As for any deleted node (the file and memory stores report no deletions): forgets its
            # Ready condition, and ends a session that attached since the list, if one did.
            self.sessions.revoke(node.name)
            # Only what this node holds (by name: a failed join's undo may have left it holding an
            # address its status does not record, service._record_node). Never the address it
            # records when another node holds it: two recorded it, and the live one kept it (start).
            freed = self.allocator.release_holder(node.name)
            self.metrics.unconnected_nodes_deleted += 1
            deleted.append(node.name)
            if node.address and freed != node.address:
                log.info(
                    "node %s joined at %s and its agent never connected; deleted (its address %s is %s's)",
                    node.name, node.created.isoformat(), node.address, self.allocator.holder(node.address) or "free",
                )  # fmt: skip
            else:
                log.info(
                    "node %s joined at %s and its agent never connected; deleted, address %s freed",
                    node.name, node.created.isoformat(), freed or "-",
                )  # fmt: skip
        return deleted

    async def stop(self, grace: float = 1.0) -> None:
        for task in (
            self._liveness,
            self._stall_sweeper,
            self._revoker,
            self._token_cleaner,
            self._unconnected_cleaner,
            self._ray_rechecker,
        ):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self._head_proxy is not None:
            self._head_proxy.close()
        await self.sessions.close_all()  # refuses new sessions from here on
        if self._server is not None:
            if not self._server_started:
                # Bound, never started (start() refused a port): grpc.aio releases the port only
                # when a started server stops. It serves nothing meanwhile: sessions are closed
                # above, so Join and Control refuse, and Connect needs a session.
                await self._server.start()
                self._server_started = True  # a second stop() must not start it again
            await self._server.stop(grace)
        if self.service is not None:
            await self.service.finish_background(BACKGROUND_FINISH_TIMEOUT_S)
        if self._admin is not None:
            await self._admin.cleanup()
