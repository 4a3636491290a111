"""The volunteer agent: join, keep the Control stream up, proxy Ray's traffic, run the Ray node.

Programmatic use::

    agent = Agent(AgentConfig(gateway="gw:7443", token="abcdef.0123456789abcdef", ca_file=...))
    await agent.run()          # until agent.request_drain() (SIGTERM in the CLI) or a fatal error
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import random
import resource
import time
from collections.abc import Awaitable
from typing import TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from koinon_gateway.rpc import EOF, tunnel_stub
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from . import ca_discovery, health, ray_launch, state
from . import gpus as gpu_inventory
from .assignment_check import assignment_problem, port_allowed
from .channel import configured_ca, open_channel, server_name
from .config import MAX_GRACE_SECONDS, VERSION, AgentConfig
from .local_proxy import LocalProxy, Metadata, accept_connection
from .ray_node import RayNode, RaySettings, ray_assignment_changes

log = logging.getLogger(__name__)

T = TypeVar("T")

# UNIMPLEMENTED: the server does not serve this agent's protocol (another tunnel version, or not a
# Koinon gateway at all); retrying cannot change that, so the agent stops and says so.
FATAL_CODES = (
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNIMPLEMENTED,
)
TUNNEL_SERVICE = pb.DESCRIPTOR.services_by_name["Tunnel"].full_name  # koinon.tunnel.v1.Tunnel


def accepted_connections_limit() -> int:
    """Connections the gateway may have open towards this node at once: half of this process's
    file descriptors (each holds a local socket and a gRPC stream). The gateway caps what each
    node dials, not what one node is asked to accept (every other node and the head may dial it),
    so no fixed number is right; running out of descriptors is what must not happen."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    budget = 65536 if soft == resource.RLIM_INFINITY else soft
    return max(256, budget // 2)


# Text the gateway sends (drain reasons, errors) is logged quoted and cut to this many characters.
MAX_GATEWAY_TEXT = 256
# How often a running Ray node's raylet process is checked (RayNode.raylet_alive).
RAYLET_CHECK_INTERVAL_S = 1.0
# The shortest heartbeat interval taken from the gateway: a broken or hostile gateway that says 1 ms
# (or 0 after the default) would otherwise have the agent spin, sending a heartbeat every loop.
MIN_HEARTBEAT_INTERVAL_S = 0.1


def outage_clock() -> float:
    """Seconds on a clock for measuring gateway outages (--ray-restart-after): CLOCK_BOOTTIME, which
    also counts while the machine is suspended (a laptop asleep for hours was offline for hours,
    and its Ray node long dropped by the head); time.monotonic() stops then on Linux. Monotonic where
    CLOCK_BOOTTIME is missing (not Linux)."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if boottime is not None:
        with contextlib.suppress(OSError):
            return time.clock_gettime(boottime)
    return time.monotonic()


def utc_time(seconds: int) -> str:
    """``seconds`` (Unix time) as an ISO 8601 UTC time for a message; as a number where no calendar
    holds it (an expiry a broken or hostile gateway renewed to, say, 2**62)."""
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
    except (OverflowError, OSError, ValueError):
        return f"{seconds} (Unix time)"


class JoinRefused(Exception):
    """The gateway refused the token or the stored credential; retrying cannot help."""


class DrainedBeforeJoining(JoinRefused):
    """Asked to stop (SIGTERM) before the node had joined: nothing to drain, a clean exit."""


class _DrainDone(Exception):
    """The drain finished (Ray stopped) while a session was still waiting for the gateway."""


def _refusal(exc: grpc.aio.AioRpcError, prefix: str) -> JoinRefused:
    if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
        return JoinRefused(
            f"gateway does not serve {TUNNEL_SERVICE}, the tunnel protocol this agent "
            f"(koinon-agent {VERSION}) speaks: {exc.details()}; run an agent that matches the gateway's version"
        )
    return JoinRefused(f"{prefix}{exc.details() or exc.code().name}")


def backoff_delays(initial: float, maximum: float) -> BackoffIterator:
    return BackoffIterator(initial, maximum)


class BackoffIterator:
    """Exponential backoff with "equal jitter" (AWS architecture blog): each delay is drawn from the
    upper half of a ceiling that doubles up to ``maximum``, so agents that lost the gateway together
    spread their reconnects out, yet none retries sooner than half the ceiling. Reset after a good
    session."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial, self.maximum, self.attempt = initial, maximum, 0

    def next(self) -> float:
        # The exponent stops growing once the ceiling reached the maximum: an agent that retries
        # for days would otherwise overflow a float at attempt ~1,024.
        ceiling = min(self.maximum, self.initial * 2.0**self.attempt)
        if ceiling < self.maximum:
            self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


# trust_fingerprint of the system's trust store. Not "": that marks an identity stored before trust
# was recorded (LEGACY_TRUST), which says nothing of how its gateway was trusted.
SYSTEM_TRUST = "system"
LEGACY_TRUST = ""


def trust_fingerprint(config: AgentConfig) -> str:
    """How this agent trusts its gateway, comparable across runs: SHA-256 of the DER of the
    configured (or discovered) CA certificates; "insecure" without TLS; SYSTEM_TRUST for the
    system's trust store, which tells one platform from another by nothing but the name the
    gateway's certificate is for (the address): never enough for an identity at another address."""
    if config.insecure:
        return "insecure"
    pem = configured_ca(config)
    if not pem:
        return SYSTEM_TRUST
    digest = hashlib.sha256()
    for certificate in x509.load_pem_x509_certificates(pem):
        digest.update(certificate.public_bytes(serialization.Encoding.DER))
    return "sha256:" + digest.hexdigest()


def trust_words(fingerprint: str) -> str:
    """A trust_fingerprint for a message."""
    if fingerprint == "insecure":
        return "no TLS (--insecure)"
    if fingerprint == SYSTEM_TRUST:
        return "the system's trust store"
    return f"CA {fingerprint}" if fingerprint != LEGACY_TRUST else "trust not recorded (an older agent's identity)"


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        config.validate()
        self.config = config
        if config.simulate_gpus is not None:
            self.gpus = gpu_inventory.simulated(config.simulate_gpus, config.simulate_gpu_memory_mib)
        else:
            self.gpus = gpu_inventory.detect()
        self.identity: state.StoredIdentity | None = None
        self.assignment: pb.Assignment | None = None
        self.connected = asyncio.Event()
        self.registrations = 0
        self._drain = asyncio.Event()
        self._drain_deadline = 0.0  # monotonic; the grace counts from the first drain request
        self._drain_now = asyncio.Event()  # skip what is left of the grace (a second SIGTERM)
        self._drain_done = asyncio.Event()  # the drain has stopped Ray
        self._control_channel: grpc.aio.Channel | None = None
        self._data_channel: grpc.aio.Channel | None = None
        self._proxy: LocalProxy | None = None
        self.ray: RayNode | None = None
        self._ray_supervisor: asyncio.Task[None] | None = None
        self._ray_restart: asyncio.Task[None] | None = None  # replacing the Ray node after an outage
        self._tasks: set[asyncio.Task[None]] = set()
        # Connections the gateway opened towards this node, still being served.
        self._accepted: set[asyncio.Task[None]] = set()
        self.refused_open_connections = 0  # asked for a port outside the block, or over the cap
        self.max_accepted_connections = accepted_connections_limit()
        self._disconnected_at: float | None = None  # monotonic: when the loss of the session was noticed
        # outage_clock() time of the last message read from the gateway on a Control stream; an
        # outage counts from there, not from when its loss was noticed (up to the heartbeat timeout
        # plus the probe interval later). None: no session yet.
        self._last_heard_at: float | None = None
        self._connected_at = 0.0  # when the current (or last) session registered
        self._identity_changed = False  # joined again at a new address: the Ray node must follow
        self._rejoined = False  # joined again and not registered since: a second refusal is final
        # In use, and not on disk as it is: kept there under another gateway address until the
        # gateway takes it (_moved_identity), or not stored at all (a renewal the disk could not
        # take). _keep_identity tries again at each registration. Never a join's credential: no
        # session is opened before that is on disk (_store_joined).
        self._identity_unsaved = False
        self._last_heartbeat_at = 0.0  # monotonic time of the last Heartbeat sent

    # ---- public ----

    def request_drain(self, *, now: bool = False) -> None:
        """Drain: tell the gateway, give running Ray tasks the grace period (counted from the first
        request), stop Ray, return from run(). ``now``: skip what is left of the grace."""
        if not self._drain.is_set():
            self._drain_deadline = time.monotonic() + self.config.drain_grace_s
            self._drain.set()
        if now:
            self._drain_now.set()

    def _channel(self, which: str) -> grpc.aio.Channel:
        channel = self._control_channel if which == "control" else self._data_channel
        assert channel is not None, "channels are opened by run()"
        return channel

    def _metadata(self) -> Metadata:
        assert self.identity is not None
        return (("authorization", f"Bearer {self.identity.credential}"),)

    def _proxy_metadata(self) -> Metadata | None:
        return self._metadata() if self.identity is not None else None  # None: not joined yet

    def _pb_gpus(self) -> list[pb.Gpu]:
        return [pb.Gpu(model=g.model, memory_mib=g.memory_mib) for g in self.gpus]

    async def run(self) -> None:
        # Before anything writes there (the health report, Ray's session dir by default): the
        # state dir holds the credential and must not be listable by others.
        with contextlib.suppress(OSError):  # ensure_writable says why before a join needs it
            self.config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # One agent per state dir: a second would present the same credential (each session
        # replacing the other's) and start a second Ray node on the same address.
        with state.exclusive(self.config.state_dir):
            health_writer = asyncio.ensure_future(self._write_health())
            try:
                await self._run()
            finally:
                health_writer.cancel()

    async def _run(self) -> None:
        await self._trust_pinned_ca()
        self._control_channel = open_channel(self.config)
        self._data_channel = open_channel(self.config)
        try:
            # Before the join: a port that cannot be had must not cost a token use first.
            self._proxy = LocalProxy(
                lambda: tunnel_stub(self._channel("data")), self._proxy_metadata, secret=self.config.proxy_secret
            )
            try:
                await self._proxy.start(port=self.config.proxy_port)
            except OSError as exc:
                raise ValueError(
                    f"proxy_port: cannot listen on 127.0.0.1:{self.config.proxy_port}: {exc.strerror}"
                ) from exc
            self.identity = await self._ensure_identity()
            # The drain runs beside the sessions, not in one: a Control stream lost mid-drain (or
            # none at all, SIGTERM during an outage) must not cut the running tasks' grace short.
            drainer = asyncio.ensure_future(self._drain_ray())
            try:
                await self._session_loop()
            finally:
                drainer.cancel()
        finally:
            await self._shutdown()

    async def _trust_pinned_ca(self) -> None:
        """With --ca-cert-hash: check a configured CA against it, or take the CA from the gateway."""
        pin = self.config.ca_cert_hash
        if not pin:
            return
        delays = backoff_delays(self.config.backoff_initial_s, self.config.backoff_max_s)
        while True:
            try:
                configured = configured_ca(self.config)
                if configured:
                    ca_discovery.check_pin(configured, pin)
                    return
                ca_pem = await self._unless_drained(
                    ca_discovery.discover_ca(self.config.gateway, pin, server_name(self.config))
                )
                break
            except ca_discovery.GatewayUnreachable as exc:
                delay = delays.next()
                log.warning("%s; retrying in %.1fs", exc, delay)
                await self._pause_joining(delay, "drained before joining", exc)
            except ca_discovery.CADiscoveryError as exc:
                raise JoinRefused(str(exc)) from exc
        log.info("trusting the gateway's CA %s", pin)
        self.config = dataclasses.replace(self.config, ca_pem=ca_pem)

    # ---- join ----

    def _no_token(self) -> str:
        """Where the missing token should have come from (the chart's Secret and key), as the tail
        of a message; empty without KOINON_TOKEN_HINT."""
        return f"; none came: {self.config.token_hint}" if self.config.token_hint else ""

    async def _ensure_identity(self, refused: str = "") -> state.StoredIdentity:
        """The stored identity while it is good, else a new one from a join with the token.
        ``refused``: why the gateway no longer takes the stored credential (it expired during an
        outage, or the gateway's signing key changed), though its expiry may not say so."""
        if self.identity is not None and self._identity_unsaved:
            # Joining again (_rejoin) with an identity the disk does not hold yet (a renewal it could
            # not take, or one kept under another address): the one in memory is the node the
            # gateway just refused, the one to name as the previous node.
            stored: state.StoredIdentity | None = self.identity
        else:
            stored = state.load(self.config.state_dir, can_rejoin=bool(self.config.token))
        if stored is not None and stored.gateway != self.config.gateway:
            stored = self._moved_identity(stored, refused)
        elif stored is not None and self.config.insecure and stored.trusted_ca != "insecure":
            # Issued over TLS, now to be sent in plaintext (--insecure at the same address): anyone
            # on the path would read a bearer credential of the node. Joining afresh sends only the
            # token the volunteer configured for plaintext; the old node is left to expire.
            log.warning(
                "the stored identity %s was issued over TLS; not sending its credential without TLS "
                "(--insecure), joining afresh",
                stored.node_name,
            )
            stored = None
        elif (
            stored is not None
            and stored.trusted_ca != LEGACY_TRUST
            and stored.trusted_ca != trust_fingerprint(self.config)
        ):
            # The same address, trusted through another CA (or the system's trust store then, a CA
            # now, or the reverse): perhaps another platform there now. An identity from before
            # trust was recorded tells nothing either way and is reused here, as it always was;
            # so is one an agent from before SYSTEM_TRUST joined through the system's trust store
            # (it stored "" too). Accepted: that agent reused it at this address before the upgrade
            # as well, and its next join records SYSTEM_TRUST.
            self._refuse_identity_of_another_ca(stored)
            stored = None
        if stored is not None and not refused and not stored.expired(time.time()):
            log.info("reusing stored identity %s (%s)", stored.node_name, stored.address)
            return stored
        if stored is not None:
            # Offline for longer than a credential lives: only a join token gets back in.
            why = f"refused by the gateway ({refused})" if refused else f"expired at {utc_time(stored.expires_at)}"
            if not self.config.token:
                raise JoinRefused(
                    f"credential of {stored.node_name} {why}; join again with a new token{self._no_token()}"
                )
            log.warning("credential of %s %s; joining again with the configured token", stored.node_name, why)
        if not self.config.token:
            raise ValueError(f"token: required for the first join (--token or KOINON_TOKEN){self._no_token()}")
        state.ensure_writable(self.config.state_dir)
        stub = tunnel_stub(self._channel("control"))
        delays = backoff_delays(self.config.backoff_initial_s, self.config.backoff_max_s)
        if self.config.join_name_hint != self.config.name_hint:
            log.info(
                "node name hint cut to its first %d characters for the join (%d given)",
                len(self.config.join_name_hint),
                len(self.config.name_hint),
            )
        request = pb.JoinRequest(
            token=self.config.token,
            name_hint=self.config.join_name_hint,
            region=self.config.region,
            gpus=self._pb_gpus(),
            agent_version=VERSION,
            # Lets the gateway retire the node this volunteer was before, instead of a NotReady ghost.
            previous_credential=stored.credential if stored is not None else "",
            join_id=state.pending_join_id(self.config.state_dir, self.config.gateway),
        )
        while True:
            try:
                response = await self._unless_drained(stub.Join(request, timeout=15))
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() in FATAL_CODES:
                    raise _refusal(exc, "") from exc
                delay = delays.next()
                # gRPC's details tell a TLS mistake (wrong CA, an IP without tlsServerName) from a
                # gateway that is down; the code alone (UNAVAILABLE) is the same for both.
                log.warning("join failed (%s: %s); retrying in %.1fs", exc.code().name, exc.details(), delay)
                await self._pause_joining(delay, "drained before joining", exc)
        problem = assignment_problem(response.assignment)
        if problem is not None:
            # Nothing is stored: the gateway's answer names a place this agent will not serve.
            raise JoinRefused(f"refused the gateway's assignment: {problem}")
        identity = state.StoredIdentity(
            self.config.gateway,
            response.assignment.node_name,
            response.assignment.address,
            response.credential,
            response.credential_expires_at,
            trust_fingerprint(self.config),
        )
        log.info("joined as %s with address %s", identity.node_name, identity.address)
        await self._store_joined(identity)
        self._identity_unsaved = False
        state.finish_join(self.config.state_dir)
        return identity

    async def _store_joined(self, identity: state.StoredIdentity) -> None:
        """Stores a joined identity, trying again (with backoff) until the disk takes it, before
        any session: the gateway gives a join's node back to a retry of the same join id only while
        that node never had a session, so one opened with the credential in memory alone would
        leave an agent restarted before the disk had room (eviction, OOM, reboot) to join anew:
        refused with a one-use token, a second VolunteerNode and a NotReady ghost with another.
        Stopped meanwhile (DrainedBeforeJoining), the join id stays pending: the next start gets
        the same node back."""
        delays = backoff_delays(self.config.backoff_initial_s, self.config.backoff_max_s)
        while True:
            try:
                state.save(self.config.state_dir, identity)
                return
            except OSError as exc:
                delay = delays.next()
                log.error(
                    "joined as %s but cannot store its identity in %s (%s); not connecting until it is "
                    "stored there, trying again in %.1fs",
                    identity.node_name,
                    self.config.state_dir,
                    exc.strerror or exc,
                    delay,
                )
                await self._pause_joining(delay, "drained before the joined identity was stored", exc)

    async def _pause_joining(self, delay: float, why: str, cause: BaseException) -> None:
        """Waits ``delay`` before a step of joining is tried again; DrainedBeforeJoining (``why``)
        when the agent is drained meanwhile."""
        await self._sleep_or_drain(delay)
        if self._drain.is_set():
            raise DrainedBeforeJoining(why) from cause

    def _moved_identity(self, stored: state.StoredIdentity, refused: str) -> state.StoredIdentity | None:
        """An identity stored under another gateway address than the configured one: the same
        gateway under another name (a DNS rename, an IP instead of a name, localhost for 127.0.0.1)
        or another gateway. Its credential is a bearer secret of the gateway that issued it, so it
        is shown only to a gateway trusted as that one was (the same CA, see trust_fingerprint):
        another platform never sees it. Then it is presented at the new address first: a gateway
        takes only credentials signed with its own key, so one that takes it issued it, and the
        node goes on as it was (no token use, no second VolunteerNode; it is stored under the new
        address once registered). One that refuses it joins the agent with its token, naming the
        credential as its previous node, which it retires only if it signed it itself. Dropping the
        identity instead left the same gateway with a NotReady ghost holding an address; that is
        still what happens under another CA (None: a fresh join, the credential not sent)."""
        # Not one from before trust was recorded, nor one trusted through the system's store, which
        # any publicly trusted certificate for the other address would pass: another platform.
        if stored.trusted_ca in (LEGACY_TRUST, SYSTEM_TRUST) or stored.trusted_ca != trust_fingerprint(self.config):
            log.warning(
                "the stored identity %s was kept for gateway %r, trusted otherwise than the configured "
                "%r; not showing it its credential, joining afresh",
                stored.node_name,
                stored.gateway,
                self.config.gateway,
            )
            return None
        if not refused:
            log.warning(
                "the stored identity %s was kept for gateway %r, not the configured %r; "
                "presenting its credential there (the gateway that issued it takes it)",
                stored.node_name,
                stored.gateway,
                self.config.gateway,
            )
        self._identity_unsaved = True
        return dataclasses.replace(stored, gateway=self.config.gateway)

    def _refuse_identity_of_another_ca(self, stored: state.StoredIdentity) -> None:
        """An identity stored for the configured gateway address, issued while the gateway was
        trusted otherwise than it is now (another CA, or none: --insecure then, TLS now): the
        address may now lead to another platform (a `kubectl port-forward` to localhost:7443, a
        DNS name moved to another operator), which must not see the credential, not even as the
        Join's previous one. With a token the agent joins afresh (the old node, if the gateway is
        the same one under a new CA, is left to expire); without one it cannot go on
        (JoinRefused)."""
        if not self.config.token:
            raise JoinRefused(
                f"the stored identity {stored.node_name} was issued under another CA than the configured "
                f"one ({trust_words(stored.trusted_ca)} then, {trust_words(trust_fingerprint(self.config))} "
                "now); its credential is not shown to a gateway trusted otherwise: join again with a token"
                f"{self._no_token()}, or configure the CA the identity was issued under"
            )
        log.warning(
            "the stored identity %s was issued under another CA than the configured one; not showing "
            "this gateway its credential, joining afresh with the configured token",
            stored.node_name,
        )

    def _keep_identity(self) -> None:
        """Stores the identity in use (a renewed one, or the one the gateway just took at a new
        address); one the disk does not take stays in memory, _identity_unsaved, and each
        registration and renewal tries again. Its node has had sessions, and what the disk still
        holds is good until it expires."""
        assert self.identity is not None
        try:
            state.save(self.config.state_dir, self.identity)
        except OSError as exc:  # still good in memory
            log.error("cannot store the identity in %s (trying again later): %s", self.config.state_dir, exc)
            return
        self._identity_unsaved = False

    # ---- sessions ----

    async def _session_loop(self) -> None:
        delays = backoff_delays(self.config.backoff_initial_s, self.config.backoff_max_s)
        drain_seen = False
        while True:
            registered_before = self.registrations
            refused = ""  # why the gateway no longer takes the credential, when a token can replace it
            try:
                finished = await self._session()
                if finished:
                    return
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED and self.config.token and not self._rejoined:
                    refused = exc.details() or "credential refused"
                elif exc.code() in FATAL_CODES and self._drain.is_set():
                    # Reconnecting mid-drain is for the running tasks; a refusal for good (the
                    # node deleted meanwhile, the credential refused without a token to join
                    # again, another protocol) must not cut their grace short: they keep it, as
                    # without a session, and the drain ends as asked (exit 0).
                    refused = str(_refusal(exc, "gateway refused this node: "))
                    log.warning("%s; no reconnecting during the drain, Ray keeps the grace left", refused)
                elif exc.code() in FATAL_CODES:
                    raise _refusal(exc, "gateway refused this node: ") from exc
                else:
                    log.warning("control stream lost: %s %s", exc.code().name, exc.details())
            except TimeoutError:
                log.warning("gateway silent for longer than the heartbeat timeout")
            except ConnectionError as exc:
                log.warning("control stream lost: %s", exc)
            self.connected.clear()
            if self._disconnected_at is None:
                self._disconnected_at = time.monotonic()
            if refused and not self._drain.is_set():
                await self._rejoin(refused)
            if self._drain.is_set() and (refused or self._drain_done.is_set()):
                # No session to be had: a refused credential is replaced only by a join, which a
                # drain does not make (not even begun: a Join sent and then cancelled could still
                # be served). Running tasks keep what is left of their grace without it.
                await self._drain_done.wait()
                return
            if self._drain.is_set() and not drain_seen:
                # Reconnecting during a drain matters (see _wait_to_reconnect) and the grace runs
                # out: retry soon rather than after the delay a long outage had grown to.
                drain_seen = True
                delays.reset()
            elif self.registrations > registered_before and self._connected_for() > self.config.backoff_reset_after_s:
                delays.reset()
            delay = delays.next()
            log.info("reconnecting in %.2fs", delay)
            await self._wait_to_reconnect(delay)
            if self._drain_done.is_set():
                return

    async def _wait_to_reconnect(self, delay: float) -> None:
        """The backoff before the next session. It ends early on a drain request (so the gateway
        hears of it), and during a drain once the drain is done. A draining agent keeps
        reconnecting: its Ray node reaches the cluster only while a Control session is up (the
        gateway refuses Connect streams of a node without one), so the running tasks the grace
        is for could return nothing; and the gateway learns of the drain (Draining, GCS asked to
        drain the node) from the DrainRequest the next session sends with the grace left."""
        event = self._drain_done if self._drain.is_set() else self._drain
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), delay)

    def _connected_for(self) -> float:
        """How long the last session was up (until now, or until the loss was noticed)."""
        end = self._disconnected_at if self._disconnected_at is not None else time.monotonic()
        return max(0.0, end - self._connected_at)

    async def _rejoin(self, refused: str) -> None:
        """The gateway no longer takes this node's credential: join again with the token (the
        gateway retires the old node) and move the Ray node to the new identity."""
        before = self.identity
        self._rejoined = True
        try:
            self.identity = await self._ensure_identity(refused)
        except DrainedBeforeJoining:
            return
        if before is not None and (self.identity.address, self.identity.node_name) != (
            before.address,
            before.node_name,
        ):
            # A Ray node started for the old identity must be replaced: its address, or its
            # koinon.dev/node label, which names the node the gateway just retired.
            self._identity_changed = True

    async def _unless_drained(self, work: Awaitable[T]) -> T:
        """``work``'s result; DrainedBeforeJoining as soon as a drain is asked for instead (a Join
        waiting on a silent gateway must not hold SIGTERM up for its whole timeout)."""
        return await self._unless(self._drain, work, DrainedBeforeJoining("drained before joining"))

    @staticmethod
    async def _unless(event: asyncio.Event, work: Awaitable[T], interrupted: Exception) -> T:
        """``work``'s result; ``interrupted`` raised (and ``work`` cancelled) once ``event`` is set."""
        task = asyncio.ensure_future(work)
        waiter = asyncio.ensure_future(event.wait())
        try:
            done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            task.cancel()  # a no-op once done; else (interrupted, or we were cancelled) it must not linger
        if task not in done:
            raise interrupted
        return task.result()

    async def _sleep_or_drain(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drain.wait(), delay)

    async def _session(self) -> bool:
        """One Control stream; True when the agent drained and should exit."""
        assert self.identity is not None
        stub = tunnel_stub(self._channel("control"))
        call = stub.Control(metadata=self._metadata())
        write_lock = asyncio.Lock()

        async def send(message: pb.AgentMessage) -> None:
            async with write_lock:
                try:
                    await call.write(message)
                except asyncio.InvalidStateError as exc:
                    # The gateway ended the call between our read and this write (a restart, a
                    # replaced session): that is a lost stream like any other, so reconnect.
                    raise ConnectionError(f"control stream already finished: {exc}") from exc
            if message.HasField("heartbeat"):
                self._last_heartbeat_at = time.monotonic()

        async def register() -> object:
            assert self.identity is not None
            await send(
                pb.AgentMessage(
                    register=pb.Register(
                        node_name=self.identity.node_name,
                        address=self.identity.address,
                        gpus=self._pb_gpus(),
                        agent_version=VERSION,
                        session_epoch=self.registrations,
                        self_heartbeats=True,
                    )
                )
            )
            return await asyncio.wait_for(call.read(), 15)

        try:
            try:
                # A drain that ends (Ray stopped) while the gateway keeps us waiting here (up to
                # 15 s) ends the agent now, not when the registration times out.
                first = await self._unless(self._drain_done, register(), _DrainDone())
            except _DrainDone:
                return True
            if not isinstance(first, pb.GatewayMessage) or first.WhichOneof("msg") != "registered":
                raise ConnectionError("gateway did not acknowledge the registration")
            assert self.identity is not None
            problem = assignment_problem(first.registered.assignment, self.identity.address)
            if problem is not None:
                raise ConnectionError(f"refused the gateway's assignment: {problem}")
            # The outage this registration ends: since the gateway's last word on an earlier session
            # (a registration refused above ends none).
            heard_now = outage_clock()
            outage = heard_now - self._last_heard_at if self._last_heard_at is not None else 0.0
            self._last_heard_at = heard_now
            self.assignment = first.registered.assignment
            self.registrations += 1
            if self._identity_unsaved:
                self._keep_identity()
            # The gateway writes at least every probe interval (every heartbeat interval if it
            # does not say): a stream silent for that plus the heartbeat timeout is lost.
            timeout = max(1.0, self.assignment.heartbeat_timeout_ms / 1000) + (
                self.assignment.rtt_probe_interval_ms / 1000
            )
            interval = max(MIN_HEARTBEAT_INTERVAL_S, (self.assignment.heartbeat_interval_ms or 2000) / 1000)
            await self._after_registration(outage)
            self.connected.set()
            self._connected_at = time.monotonic()
            self._disconnected_at = None
            self._rejoined = False
            heartbeats = asyncio.ensure_future(self._heartbeat_sender(send, interval))
            drainer = asyncio.ensure_future(self._drain_watch(send))
            try:
                while True:
                    reader = asyncio.ensure_future(asyncio.wait_for(call.read(), timeout))
                    done, _ = await asyncio.wait({reader, drainer, heartbeats}, return_when=asyncio.FIRST_COMPLETED)
                    if heartbeats in done:  # it only ends by failing to write: the stream is gone
                        reader.cancel()
                        heartbeats.result()
                        raise ConnectionError("heartbeat sender stopped")
                    if drainer in done:
                        reader.cancel()
                        drainer.result()
                        await call.done_writing()
                        return True
                    message = reader.result()
                    if message is EOF:
                        return False
                    if message is None:
                        # grpc.aio's client logs a message that does not decode and hands out None:
                        # a broken stream (or gateway) like any other, so reconnect with backoff.
                        raise ConnectionError("gateway sent a malformed message")
                    self._last_heard_at = outage_clock()
                    await self._on_gateway_message(message, send)
            finally:
                heartbeats.cancel()
                drainer.cancel()
        finally:
            call.cancel()

    async def _on_gateway_message(self, message: pb.GatewayMessage, send: object) -> None:
        kind = message.WhichOneof("msg")
        if kind == "ping":
            assert callable(send)
            await send(pb.AgentMessage(heartbeat=self._heartbeat(message.ping)))
        elif kind == "open_connection":
            assert self.identity is not None and self._data_channel is not None
            request = message.open_connection
            refusal = self._open_connection_refusal(request)
            if refusal is not None:
                # Not answered at all: a gateway that means well never asks this, and an answer
                # per request would let one that does not keep this agent busy.
                self.refused_open_connections += 1
                if self.refused_open_connections % 1000 == 1:
                    log.warning("refused the gateway's connection %d: %s", request.connection_id, refusal)
                return
            task = asyncio.ensure_future(
                accept_connection(tunnel_stub(self._channel("data")), self._metadata(), request, self.identity.address)
            )
            for tasks in (self._tasks, self._accepted):
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        elif kind == "drain":
            log.info("gateway asked to drain: %r", message.drain.reason[:MAX_GATEWAY_TEXT])
            self.request_drain()
        elif kind == "credential":
            self._store_credential(message.credential)
        elif kind == "error":
            log.error(
                "gateway error %r: %r", message.error.code[:MAX_GATEWAY_TEXT], message.error.message[:MAX_GATEWAY_TEXT]
            )

    def _open_connection_refusal(self, request: pb.OpenConnection) -> str | None:
        """Why a connection the gateway opens towards this node is refused (None: it is served)."""
        if self.assignment is None or not port_allowed(self.assignment.ports, request.port):
            return f"port {request.port} is outside this node's Ray port block"
        if len(self._accepted) >= self.max_accepted_connections:
            return f"{self.max_accepted_connections} connections are open already"
        return None

    def _store_credential(self, renewal: pb.CredentialRenewal) -> None:
        # New calls (Connect streams, the next Control) carry it from now on; it is kept on disk so
        # that a restarted agent does not fall back to the older, sooner-expiring one.
        assert self.identity is not None
        if not renewal.credential or renewal.expires_at <= self.identity.expires_at:
            return
        self.identity = dataclasses.replace(
            self.identity, credential=renewal.credential, expires_at=int(renewal.expires_at)
        )
        try:
            state.save(self.config.state_dir, self.identity)
        except OSError as exc:  # a full disk: keep the new credential in memory; the next renewal tries again
            log.error("cannot store the renewed credential in %s: %s", self.config.state_dir, exc)
            self._identity_unsaved = True  # and so does the next registration
            return
        self._identity_unsaved = False
        log.debug("credential renewed; valid until %d", renewal.expires_at)

    def _ray_state(self) -> tuple[str, str]:
        if not self.config.start_ray:
            return "", "disabled"
        if self._ray_restart is not None and not self._ray_restart.done():
            return "", "restarting"
        if self.ray is None or not self.ray.running:
            return "", "stopped" if self.ray is not None else "starting"
        node_id = self.ray.node_id()
        return node_id, "running" if node_id else "starting"

    def _heartbeat(self, ping: pb.Ping | None) -> pb.Heartbeat:
        node_id, ray_state = self._ray_state()
        return pb.Heartbeat(
            seq=ping.seq if ping else 0,
            echo_gateway_time_ns=ping.gateway_time_ns if ping else 0,
            echo_seq=ping.seq if ping else 0,
            ray_node_id=node_id,
            ray_state=ray_state,
            gpus=self._pb_gpus(),
        )

    async def _heartbeat_sender(self, send: object, interval: float) -> None:
        """Heartbeats every interval (an answer to a ping counts as one), and at once when the Ray
        state changes, so the node turns Ready without waiting."""
        assert callable(send)
        last = self._ray_state()
        while True:
            await asyncio.sleep(min(0.2, interval))
            current = self._ray_state()
            if current != last or time.monotonic() - self._last_heartbeat_at >= interval:
                last = current
                await send(pb.AgentMessage(heartbeat=self._heartbeat(None)))

    def health_report(self) -> health.HealthReport:
        return health.HealthReport(
            written_at=time.time(),
            connected=self.connected.is_set(),
            ray_state=self._ray_state()[1],
            node_name=self.identity.node_name if self.identity else "",
        )

    async def _write_health(self) -> None:
        """Rewrites the health file from the event loop, so that a stale one means a stuck loop."""
        while True:
            try:
                health.write(self.config.health_path, self.health_report(), state_dir=self.config.state_dir)
            except OSError as exc:
                log.warning("cannot write the health report: %s", exc)
            await asyncio.sleep(health.WRITE_INTERVAL_S)

    # ---- Ray ----

    async def _after_registration(self, outage: float) -> None:
        """Starts Ray after the first registration; after a later one (``outage``: seconds since
        the gateway's last message before it) replaces the Ray node when it no longer fits."""
        if not self.config.start_ray or self._drain.is_set():
            return  # a drain stops Ray; a session registered meanwhile must not restart it
        if self._ray_restart is not None and not self._ray_restart.done():
            return  # a replacement is under way (a reconnect during it changes nothing)
        moved, self._identity_changed = self._identity_changed, False
        why = ""
        if self.ray is not None:
            # A gateway that came back with another port block, head or Ray token (restarted with
            # other settings), however soon: the gateway now routes and allows only the new one,
            # so a node left on the old one is out of the cluster while reported running.
            started_with, now = self.ray.started_with, self.assignment
            changed = ray_assignment_changes(started_with, now) if started_with is not None and now is not None else []
            if moved:
                why = "new identity after joining again"
            elif changed:
                why = f"the gateway's assignment changed ({', '.join(changed)})"
            elif outage > self.config.ray_restart_after_s:
                why = f"outage of {outage:.0f}s"
        if why:
            log.info("%s: restarting the Ray node", why)
            # In the background: stopping Ray takes seconds, and the session must heartbeat
            # meanwhile, or the gateway takes the node for lost and the outage starts over.
            self._ray_restart = asyncio.ensure_future(self._restart_ray())
        elif self._ray_supervisor is None or self._ray_supervisor.done():
            self._ray_supervisor = asyncio.ensure_future(self._supervise_ray())

    async def _restart_ray(self) -> None:
        await self._stop_ray_node()
        if not self._drain.is_set():
            self._ray_supervisor = asyncio.ensure_future(self._supervise_ray())

    async def _supervise_ray(self) -> None:
        assert self._proxy is not None and self.assignment is not None
        settings = RaySettings(
            ray_bin=self.config.ray_bin,
            # Absolute: Ray may start in another working directory (ray_node.RayNode.start).
            temp_dir=self.config.ray_temp_dir.absolute(),
            proxy_url=self._proxy.url,
            num_cpus=self.config.num_cpus,
            num_gpus=len(self.gpus),
            gpu_memory_mib=min((g.memory_mib for g in self.gpus), default=0),
            object_store_memory=self.config.object_store_memory,
            gpu_devices=None if self.config.simulate_gpus else tuple(g.device for g in self.gpus),
            state_dir=self.config.state_dir.absolute(),
        )
        delays = backoff_delays(1.0, 30.0)
        while not self._drain.is_set():
            self.ray = RayNode(settings)
            started = time.monotonic()
            try:
                await self.ray.start(self.assignment)
            except Exception as exc:  # no ray binary, no file descriptors, a full disk: try again later
                # Anything else too: a supervisor that ended here left the node without Ray until
                # the next reconnect, saying nothing. Not an OSError: logged with its traceback.
                delay = delays.next()
                log.error(
                    "cannot start the Ray node (%s); trying again in %.0fs",
                    exc if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}",
                    delay,
                    exc_info=not isinstance(exc, OSError),
                )
                await self.ray.stop()
                await self._sleep_or_drain(delay)
                continue
            assert self.ray.process is not None
            if await self._serving_within(self.ray, self.config.ray_start_timeout_s):
                code: int | str = await self._ray_run_ends(self.ray)
            else:
                code = f"no serving raylet after {self.config.ray_start_timeout_s:.0f}s"
            if self._drain.is_set():
                return
            if code == ray_launch.EXIT_CANNOT_CONFINE:
                log.error(
                    "Ray not started: it could not be confined away from %s (see %s); trying again%s",
                    self.config.state_dir,
                    self.ray.start_log,
                    self._start_log_excerpt(self.ray),
                )
            else:
                # Its reason (a version that does not match the head's, a port taken) is in ray
                # start's own output: quoted here, so that the agent's log (kubectl logs) shows it.
                log.warning(
                    "Ray node exited with %s; restarting (ray start's output: %s)%s",
                    code,
                    self.ray.start_log,
                    self._start_log_excerpt(self.ray),
                )
            await self.ray.stop()
            if time.monotonic() - started > 60:
                delays.reset()
            await self._sleep_or_drain(delays.next())

    @staticmethod
    def _start_log_excerpt(ray: RayNode) -> str:
        """The last lines of this run's ray-start.log, for a log line ("" when it wrote none)."""
        lines = ray.start_log_tail()
        return "; it ends: " + " | ".join(lines) if lines else ""

    @staticmethod
    async def _ray_run_ends(ray: RayNode) -> int | str:
        """Wait until ``ray start`` exits (its code) or its raylet is gone: ``ray start --block``
        outlives a raylet that exits 0 or by SIGTERM (a job's ``ray stop``, a drained idle node),
        which Ray counts as graceful, and the node would be reported running while out of the cluster."""
        assert ray.process is not None
        while ray.raylet_alive():
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(ray.process.wait(), timeout=RAYLET_CHECK_INTERVAL_S)
        if ray.process.returncode is not None:
            return ray.process.returncode
        return "its raylet gone"

    @staticmethod
    async def _serving_within(ray: RayNode, timeout: float) -> bool:
        """True once the node serves, or when ``ray start`` exits first (the caller sees its exit
        code); False when it neither serves nor exits in time (hung on a half-open connection to
        the head, say), so that it is replaced rather than left starting for ever."""
        deadline = time.monotonic() + timeout
        while ray.running and not ray.node_id():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.2)
        return True

    async def _stop_ray(self) -> None:
        if self._ray_restart is not None:
            self._ray_restart.cancel()
            with contextlib.suppress(BaseException):
                await self._ray_restart
            self._ray_restart = None
        await self._stop_ray_node()

    async def _stop_ray_node(self) -> None:
        if self._ray_supervisor is not None:
            self._ray_supervisor.cancel()
            with contextlib.suppress(BaseException):
                await self._ray_supervisor
            self._ray_supervisor = None
        if self.ray is not None:
            await self.ray.stop()

    def _grace_left(self) -> float:
        return 0.0 if self._drain_now.is_set() else max(0.0, self._drain_deadline - time.monotonic())

    async def _drain_ray(self) -> None:
        """On drain: let running tasks finish (up to the grace period, or until a second request
        says now), then stop Ray. Independent of the Control stream, which may come and go."""
        await self._drain.wait()
        try:
            while self.ray is not None and self.ray.busy_workers() > 0 and (left := self._grace_left()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._drain_now.wait(), min(0.5, left))
            await self._stop_ray()
        finally:
            self._drain_done.set()

    async def _drain_watch(self, send: object) -> None:
        """On drain: tell the gateway (best effort: _drain_ray does the draining with or without a
        session), keep the session up (heartbeating) until Ray has stopped."""
        assert callable(send)
        await self._drain.wait()
        seconds = math.ceil(min(self._grace_left(), MAX_GRACE_SECONDS))  # a uint32 on the wire
        grace = pb.DrainRequest(reason="agent stopping", grace_seconds=seconds)
        await send(pb.AgentMessage(drain=grace))
        await self._drain_done.wait()

    async def _shutdown(self) -> None:
        await self._stop_ray()
        for task in list(self._tasks):
            task.cancel()
        if self._proxy is not None:
            await self._proxy.stop()
        for channel in (self._control_channel, self._data_channel):
            if channel is not None:
                await channel.close(None)
