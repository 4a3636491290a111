"""The gRPC service agents talk to: Join, Control and Connect."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import hashlib
import itertools
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import grpc
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from . import credentials
from .addresses import AddressAllocator, AddressPoolExhausted, PortBlock
from .config import GatewayConfig, milliseconds
from .frame_codec import FrameDecodeError
from .limits import MAX_GPU_MEMORY_MIB, MAX_GPUS, MAX_TEXT
from .log_limit import LimitedLog
from .metrics import GatewayMetrics
from .ray_check import RayNodeChecker
from .registry import (
    JOIN_TOKEN_LABEL,
    JSON,
    NodeExists,
    NodeRegistry,
    being_deleted,
    created_at,
    node_uid,
    status_address,
    write_refused,
)
from .routing import DialRefused, Router
from .rpc import EOF, Context, MalformedMessage
from .sessions import MAX_RAY_IDS_ELSEWHERE, NodeSession, SessionTable, gpus_reported
from .status import never_connected_status, stored_ready_condition
from .stream_slots import StreamSlot, TooManyStreams
from .tcp_pipe import TcpPipe
from .tokens import COUNTED_JOIN_RETRY_S, HALF_MADE_WAIT_S, JoinGrant, TokenError, TokenStore
from .tunnel_io import (
    CHUNK_BYTES,
    STREAM_READER_LIMIT,
    CountedFrameChannel,
    GrpcFrameChannel,
    PeerProtocolViolation,
    ProtocolViolation,
    splice_channels,
    splice_pipe,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_DRAIN_GRACE_S = 24 * 3600
# A drain request to GCS that fails or does not answer in time is asked again after a pause that
# doubles up to the cap, while the node's drain lasts: one stuck call must not leave Ray placing
# new work on a node that is leaving.
GCS_DRAIN_RETRY_FIRST_S = 0.5
GCS_DRAIN_RETRY_MAX_S = 5.0
# A live agent has one Control stream waiting to register, two while a reconnect overtakes a lost one.
CONTROL_STREAMS_OPENING_MAX = 4
# How long a new session waits for its "connected" status to land before telling the agent.
REGISTER_STATUS_WAIT_S = 2.0
# Joins worked on at once (each reads and writes the token store and the registry) and how many
# more may wait their turn before a Join is refused as busy (the agent retries with backoff).
MAX_JOINS_AT_ONCE = 32
MAX_JOINS_WAITING = 4096
_NAME_RE = re.compile(r"[^a-z0-9-]+")
_JOIN_ID_RE = re.compile(r"[0-9a-f]{32}")
# A digest of the join id, not the id: whoever can list VolunteerNodes must not learn what, with a
# leaked single-use token, would get them a credential for a node that never connected.
JOIN_KEY_LABEL = "koinon.dev/join-key"
# A node of a join whose address was never written was left by a gateway that died between
# creating it and writing its status (a live one undoes it). Only once this gateway has seen it so,
# without an address, for this long (on its own monotonic clock) is it taken for that: a younger one
# may be another gateway replica's try, still writing the status or undoing the node and giving its
# use back (the agent's 15 s deadline ends that try, and its undo is a few API requests of at most
# 30 s each), so its retry is asked to come back. Not measured from creationTimestamp: that is the
# API server's clock, and a gateway host whose clock ran minutes ahead would take a live replica's
# node for a dead gateway's, delete it, and (that replica giving its use back) let a one-use token
# make two nodes.
HALF_MADE_JOIN_S = HALF_MADE_WAIT_S
# How many half-made nodes a gateway remembers having seen (HalfMadeSightings).
HALF_MADE_SEEN_MAX = 4096
# How many joins' kept uses a gateway remembers (KeptUses).
KEPT_USES_MAX = HALF_MADE_SEEN_MAX


@dataclass
class LeftBehind:
    """What a failed ``_record_node`` left: ``node_may_remain`` when its undo could not delete a
    node whose status write (with the address) may have landed. The node keeps its address and
    the join its counted use (KeptUses), so the agent's retry gets that node back as the join's
    (replayed); a retry that finds it without its address (the write never landed), or finds it
    gone or being deleted after all (the undo's delete landed unanswered), makes its node on that
    use (_earlier_join); the unconnected-node sweep deletes it if no retry comes."""

    node_may_remain: bool = False
    node_name: str = ""
    uid: str = ""


@dataclass(frozen=True)
class KeptUse:
    """The use a join's failed try kept counted for the node its undo could not delete (LeftBehind)."""

    grant: JoinGrant
    node_name: str
    uid: str

    def names(self, node: JSON) -> bool:
        """Whether ``node`` is the very object that try left (by uid; by name for a uid-less one)."""
        metadata = node.get("metadata") or {}
        if self.uid and node_uid(node):
            return node_uid(node) == self.uid
        return str(metadata.get("name") or "") == self.node_name


class KeptUses:
    """The uses this gateway's failed joins kept counted (LeftBehind), by token id and join key,
    until the join's retry makes or adopts its node on one (_earlier_join). The node left behind
    may be gone or being deleted by then (an undo's delete that landed unanswered, which nothing
    here could tell), or be left without its address: the use is remembered here, not read from
    the node, so that the retry is not counted a second use, which a one-use token refuses
    (usage-limit, fatal to the agent), however late it comes.

    Only this process's memory (lost at a restart: a retry then counts a new use), bounded as
    HalfMadeSightings is: a kept use goes after ``ttl_s`` (the unconnected-node TTL, when the node
    left behind is swept as one whose agent never came), and the oldest once ``limit`` are kept."""

    def __init__(self, ttl_s: float, limit: int = KEPT_USES_MAX, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.limit = limit
        self.clock = clock
        self._kept: collections.OrderedDict[tuple[str, str], tuple[KeptUse, float]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def _prune(self, now: float) -> None:
        while self._kept:
            oldest, (_, kept_at) = next(iter(self._kept.items()))
            if now - kept_at < self.ttl_s:
                break
            del self._kept[oldest]

    def keep(self, token_id: str, key: str, kept: KeptUse) -> None:
        now = self.clock()
        self._prune(now)
        self._kept.pop((token_id, key), None)  # to the end: the oldest go first
        while len(self._kept) >= self.limit:
            self._kept.popitem(last=False)
        self._kept[(token_id, key)] = (kept, now)

    def get(self, token_id: str, key: str) -> KeptUse | None:
        self._prune(self.clock())
        found = self._kept.get((token_id, key))
        return found[0] if found is not None else None

    def drop(self, token_id: str, key: str) -> None:
        self._kept.pop((token_id, key), None)


class EarlierTryRunning(Exception):
    """An earlier try of this join may still be under way (in another gateway replica)."""


class HalfMadeSightings:
    """When this gateway first saw each half-made node (a join's node without an address), by
    uid, on its own monotonic clock: a node seen so for HALF_MADE_JOIN_S is at least that old,
    whatever the gateway's and the API server's wall clocks say.

    Bounded, as only its own memory: a sighting is dropped COUNTED_JOIN_RETRY_S after it was made
    (the node's use is no longer honoured by then, and the node is left to the unconnected-node
    cleanup), and the oldest goes once HALF_MADE_SEEN_MAX are kept, so a token holder leaving
    many half-made nodes cannot grow it. A node forgotten (also across a restart, or seen first by
    another replica) is seen anew: its retry waits longer, never less."""

    def __init__(self, limit: int = HALF_MADE_SEEN_MAX, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.clock = clock
        self._first_seen: collections.OrderedDict[str, float] = collections.OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._first_seen)

    def seen_before(self, key: str) -> bool:
        """Whether ``key`` was seen half-made already (and is still remembered)."""
        self._prune(self.clock())
        return key in self._first_seen

    def _prune(self, now: float) -> None:
        while self._first_seen:
            oldest, seen_at = next(iter(self._first_seen.items()))
            if now - seen_at < COUNTED_JOIN_RETRY_S:
                break
            del self._first_seen[oldest]

    def seen_for(self, key: str) -> float:
        """Seconds since ``key`` was first seen half-made (0.0 when that is now)."""
        now = self.clock()
        self._prune(now)
        if key not in self._first_seen:
            while len(self._first_seen) >= self.limit:
                self._first_seen.popitem(last=False)
            self._first_seen[key] = now
        return now - self._first_seen[key]


def node_name_from_hint(hint: str) -> str:
    # Only a hint: a long one (a Kubernetes node name has up to 253 characters) is cut short, not
    # refused; its first MAX_TEXT characters bound the work spent on it.
    base = _NAME_RE.sub("-", hint[:MAX_TEXT].lower()).strip("-")[:40] or "volunteer"
    return f"{base}-{secrets.token_hex(3)}"


def join_key(join_id: str) -> str:
    """The label value that finds the node a join id created (40 hex digits fit a label's 63)."""
    return hashlib.sha256(join_id.encode()).hexdigest()[:40]


def replay_in_time(grant: JoinGrant, node: JSON, now: dt.datetime) -> bool:
    """Whether the reply of the join that made ``node``, lost on its way, may be handed out again.

    Always while the token has not expired. After that (expiry is absolute, as a kubeadm bootstrap
    token's) only for COUNTED_JOIN_RETRY_S after the node was made, as the token stores honour a
    counted use: that try counted its use before the expiry, and its retry (seconds or minutes
    later) gets the same node and a credential like the one lost, nothing the first try did not
    grant. Later, the expired token would buy a fresh credential for a node nobody ever connected,
    days or months on: refused, as it is for a node whose creation time is unknown."""
    if grant.expiration is None or now < grant.expiration:
        return True
    made_at = created_at(node)
    return made_at is not None and now - made_at < dt.timedelta(seconds=COUNTED_JOIN_RETRY_S)


# How much later than a uid-less credential's issue its object may have been created (by the API
# server's clock, which may run ahead of the gateway's) and still be the object it was issued for.
CLOCK_SLACK_S = 300


def credential_names_node(identity: credentials.NodeIdentity, node: JSON) -> bool:
    """Whether ``identity`` was issued for the object ``node`` (and not for an earlier object of
    its name). By uid; a credential from before uids were bound, by time: an object created after
    it was issued (past the clock slack) is a later one, created again under the name. Unknown
    creation times (objects of an old file registry) give it the benefit of the doubt."""
    if identity.uid:
        return identity.uid == node_uid(node)
    created = created_at(node)
    return created is None or created.timestamp() <= identity.issued_at + CLOCK_SLACK_S


def port_block_message(ports: PortBlock) -> pb.PortBlock:
    return pb.PortBlock(**ports.__dict__)


def join_failure(exc: Exception, allocator: AddressAllocator) -> tuple[grpc.StatusCode, str, str]:
    """Status code, metric reason and message for a join that failed after its token was accepted.
    All of them are worth retrying: the agent backs off and asks again."""
    if isinstance(exc, AddressPoolExhausted):
        return (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "address-pool-exhausted",
            f"join: no free virtual address in vip_cidr {allocator.network}; retry later",
        )
    if isinstance(exc, NodeExists):
        return grpc.StatusCode.ABORTED, "name-collision", "join: node name collision, retry"
    return grpc.StatusCode.UNAVAILABLE, "registry-error", "join: the VolunteerNode could not be recorded now; retry"


def validate_join(request: pb.JoinRequest) -> None:
    if len(request.gpus) > MAX_GPUS:
        raise ValueError(f"gpus: at most {MAX_GPUS} entries")
    for index, gpu in enumerate(request.gpus):
        if not gpu.model or len(gpu.model) > MAX_TEXT:
            raise ValueError(f"gpus[{index}].model: required, at most {MAX_TEXT} characters")
        if not 0 < gpu.memory_mib <= MAX_GPU_MEMORY_MIB:
            raise ValueError(f"gpus[{index}].memory_mib: must be in 1..{MAX_GPU_MEMORY_MIB}")
    # Not name_hint: node_name_from_hint cuts it short (an older agent sends a Kubernetes node
    # name, up to 253 characters, as it is). Bytes that are not UTF-8 never get here: a request
    # holding them does not parse.
    for name in ("region", "agent_version"):
        if len(getattr(request, name)) > MAX_TEXT:
            raise ValueError(f"{name}: at most {MAX_TEXT} characters")
    if request.join_id and not _JOIN_ID_RE.fullmatch(request.join_id):
        raise ValueError("join_id: 32 lowercase hex digits, or empty")


# A caller without the secret learns only that the token was not accepted: told "unknown" apart
# from "wrong secret", anyone reaching the port could list the token ids that exist. The
# gateway's log and metrics keep the precise reason. Past the secret the reason is the holder's.
# A token Secret an admin broke ("invalid-token-data") is found before its secret is compared:
# said as such, it too would tell anyone that the id exists.
UNRECOGNIZED_TOKEN = ("unknown", "invalid-secret", "invalid-token-data")


def client_refusal(exc: TokenError) -> str:
    if exc.reason in UNRECOGNIZED_TOKEN:
        return "invalid-token: no token with this id and secret (check it, or ask for a new one)"
    return f"{exc.reason}: {exc}"


# Register refusal of a node whose address lies outside the pool (--vip-cidr changed since it joined).
OUTSIDE_POOL = "address-outside-pool"


class _MalformedControl(Exception):
    """A Control message after Register that does not parse."""


class TunnelService:
    def __init__(
        self,
        config: GatewayConfig,
        tokens: TokenStore,
        registry: NodeRegistry,
        credential_key: bytes,
        allocator: AddressAllocator,
        sessions: SessionTable,
        router: Router,
        metrics: GatewayMetrics,
        ray_checker: RayNodeChecker | None,
    ) -> None:
        self.ray_checker = ray_checker
        self.config = config
        self.tokens = tokens
        self.registry = registry
        self.credential_key = credential_key
        self.allocator = allocator
        self.sessions = sessions
        self.router = router
        self.metrics = metrics
        # Join ids being handled now: a retry that overtakes its own first try (the agent's deadline
        # passed while the gateway was still recording the node) waits its turn instead of racing it.
        self._joins_in_flight: set[str] = set()
        self._refusals = LimitedLog(log)  # anyone can make Join refuse: the log keeps a few per minute
        self._uses_being_given_back: set[str] = set()  # join ids whose cancelled try still holds a use
        self._background: set[asyncio.Future[None]] = set()  # held so they run to their end
        self._join_handlers: set[asyncio.Task[Any]] = set()  # Join calls being handled
        # Anyone can call Join, and each costs token-store and registry requests (the Kubernetes
        # API): at most this many are worked on at once, the rest wait, up to a bounded queue.
        self.joins_at_once = asyncio.Semaphore(MAX_JOINS_AT_ONCE)
        self.max_joins_waiting = MAX_JOINS_WAITING
        self._joins_waiting = 0
        # Control streams per node that have not registered yet: each holds a handler for up to the
        # first-frame timeout and costs an API read, so one credential must not open them freely.
        self._controls_opening: collections.Counter[str] = collections.Counter()
        # Half-made nodes this gateway has seen, and since when (``_undo_half_made``).
        self.half_made = HalfMadeSightings()
        # Uses failed joins kept counted for the nodes their undo left (``_earlier_join``).
        self.kept_uses = KeptUses(config.unconnected_node_ttl_s)

    def assignment(self, node_name: str, address: str) -> pb.Assignment:
        return pb.Assignment(
            node_name=node_name,
            address=address,
            ports=port_block_message(self.allocator.ports_for(address)),
            ray_address=f"{self.config.head_address}:{self.config.head_gcs_port}",
            ray_auth_token=self.config.ray_auth_token,
            # Within their uint32 fields and not 0: GatewayConfig.validate() checks these very values.
            heartbeat_interval_ms=milliseconds(self.config.heartbeat_interval_s),
            heartbeat_timeout_ms=milliseconds(self.config.heartbeat_timeout_s),
            rtt_probe_interval_ms=milliseconds(self.config.heartbeat_interval_s * self.config.rtt_probe_every),
        )

    # ---- Join ----

    async def Join(self, request: pb.JoinRequest, context: Context) -> pb.JoinResponse:  # type: ignore[override]
        if self.sessions.closing:  # before the token is used: the agent joins the next gateway with it
            await context.abort(grpc.StatusCode.UNAVAILABLE, "gateway shutting down; retry later")
        if isinstance(request, MalformedMessage):
            self.metrics.joins["malformed"] += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "join refused: not a JoinRequest")
        try:
            validate_join(request)
        except ValueError as exc:
            self.metrics.joins["invalid-request"] += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"join refused: {exc}")
        join_id = request.join_id
        if join_id in self._joins_in_flight:
            self.metrics.joins["join-in-progress"] += 1
            await context.abort(grpc.StatusCode.ABORTED, "join: an earlier try of this join is still running; retry")
        if join_id:
            self._joins_in_flight.add(join_id)
        task = asyncio.current_task()
        assert task is not None
        self._join_handlers.add(task)
        try:
            async with self._join_turn(context):
                return await self._join(request, context)
        finally:
            self._join_handlers.discard(task)
            if join_id not in self._uses_being_given_back:
                self._joins_in_flight.discard(join_id)

    @contextlib.asynccontextmanager
    async def _join_turn(self, context: Context) -> AsyncIterator[None]:
        """One of the joins worked on at once, after waiting its turn; busy when too many wait."""
        if self._joins_waiting >= self.max_joins_waiting:
            self.metrics.joins["busy"] += 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "join: the gateway is busy; retry later")
        self._joins_waiting += 1
        try:
            await self.joins_at_once.acquire()
        finally:
            self._joins_waiting -= 1
        try:
            yield
        finally:
            self.joins_at_once.release()

    async def _join(self, request: pb.JoinRequest, context: Context) -> pb.JoinResponse:
        earlier, made_a_node, kept_use = await self._token_checked(self._earlier_join(request), context)
        if earlier is not None:
            node_name, address, uid = earlier
            self.metrics.joins["replayed"] += 1
            log.info("node %s joined again with the same join id (the first reply was lost)", node_name)
            return self._join_response(node_name, address, uid)
        if kept_use is not None:
            # The use a failed undo of this gateway kept counted for the node it left (LeftBehind),
            # which no retry can adopt, stands for this retry's node: not counted again, however
            # late the retry comes (the store honours a counted join for COUNTED_JOIN_HONOURED_S
            # only, and a volunteer's laptop may sleep longer). Should this try fail too, it is
            # given back, or kept again for the node this try leaves.
            grant = kept_use
        else:
            # A join that made no node yet may have had its use counted by a try whose answer was
            # lost: the store counts it once (for a while). One that did make a node is over: a new
            # use. (One whose node was deleted since looks like one that made none here; the store
            # forgot its use when the node was made, below, so it counts a new use too.)
            retry_of = join_key(request.join_id) if request.join_id and not made_a_node else ""
            consuming = asyncio.ensure_future(self.tokens.consume(request.token, retry_of))
            try:
                grant = await self._token_checked(asyncio.shield(consuming), context)
            except asyncio.CancelledError:
                # The agent gave up while the store was counting the use (an API write applied
                # whose answer is late): give it back once counted, or the retry finds a one-use
                # token spent.
                self._give_back_when_counted(consuming, request.join_id)
                raise
        left = LeftBehind()
        try:
            await self._retire_previous(request.previous_credential, grant.owner)
            node_name, address, uid = await self._record_node(request, grant, left)
        except asyncio.CancelledError:
            # The agent gave up waiting (its deadline) and will try again: that try must not be
            # refused for a use this one never delivered. Shielded: the task is being cancelled.
            if not self._keep_use(request, grant, left):
                await asyncio.shield(self._give_back(grant))
            raise
        except Exception as exc:
            # Nothing of the failed join stays behind: no node, no address, and the token's use is
            # given back, so the retry the agent makes is not refused as "usage-limit". (Unless
            # the node could not be deleted: see LeftBehind.)
            code, reason, message = join_failure(exc, self.allocator)
            self.metrics.joins[reason] += 1
            log.warning("join failed after token %s was accepted (%s): %r", grant.token_id, reason, exc)
            if not self._keep_use(request, grant, left):
                await self._give_back(grant)
            await context.abort(code, message)
        if grant.join_key:
            # The use this join's id had counted stops being honoured before the reply goes out:
            # the node is made, and once it is deleted (an admin cutting the volunteer off)
            # resending the id must count a new use, which a spent token is refused. A gateway
            # that dies first sent no reply: the retry finds the node and forgets the use then
            # (_earlier_join), or finds it gone and makes the only node that is handed out.
            try:
                await self.tokens.node_made(grant)
            except Exception as exc:  # not answered, the node kept: the retry gets it (replayed)
                self.metrics.joins["token-store-error"] += 1
                log.warning("join: node %s made, its token %s could not record it: %r", node_name, grant.token_id, exc)
                await context.abort(grpc.StatusCode.UNAVAILABLE, "join: the token could not be updated now; retry")
        self.metrics.joins["ok"] += 1
        log.info("node %s joined with token %s at %s", node_name, grant.token_id, address)
        return self._join_response(node_name, address, uid)

    def _keep_use(self, request: pb.JoinRequest, grant: JoinGrant, left: LeftBehind) -> bool:
        """Whether the failed join's use stays counted, for the node ``left`` behind: the retry
        (same join id) adopts that node as this join's, or makes its node on this use where it
        cannot (_earlier_join); given back, a one-use token would make that node and another.
        Without a join id no retry can take it over: the use goes back (False), and the node goes
        with the unconnected-node sweep."""
        if not (left.node_may_remain and request.join_id):
            return False
        self.kept_uses.keep(grant.token_id, join_key(request.join_id), KeptUse(grant, left.node_name, left.uid))
        return True

    def _join_response(self, node_name: str, address: str, uid: str) -> pb.JoinResponse:
        issued = self._issue_credential(node_name, address, uid)
        return pb.JoinResponse(
            credential=issued.token,
            assignment=self.assignment(node_name, address),
            credential_expires_at=issued.expires_at,
        )

    async def _token_checked(self, work: Awaitable[T], context: Context) -> T:
        """``work``'s result; a refused token or a failing token store ends the call instead."""
        try:
            return await work
        except TokenError as exc:
            self.metrics.joins[exc.reason] += 1
            self._refusals.warning(f"join {exc.reason}", "join refused (%s): %s", exc.reason, exc)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"join refused: {client_refusal(exc)}")
        except EarlierTryRunning:
            self.metrics.joins["join-in-progress"] += 1
            await context.abort(grpc.StatusCode.ABORTED, "join: an earlier try of this join is still running; retry")
        except Exception as exc:  # the token store or registry (the Kubernetes API) failed; no use was counted
            self.metrics.joins["token-store-error"] += 1
            log.warning("join: token store failed: %r", exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "join: the token could not be checked now; retry")
        raise AssertionError("unreachable: abort raises")

    async def _earlier_join(
        self, request: pb.JoinRequest
    ) -> tuple[tuple[str, str, str] | None, bool, JoinGrant | None]:
        """The node, address and uid an earlier try of this join recorded, when its reply never
        reached the agent: made with the same token and join id, never connected, and still holding
        its address. Its token must still be genuine and not revoked; the usage limit was checked
        when that try counted its use, and so was expiry, which a retry may outlive only for a
        while (``replay_in_time``). Second: whether any node carries this join's key (one that
        connected, is being deleted, or came too late after the token's expiry, too), leaving out
        a half-made one (``_undo_half_made``) this call deleted. Third, when a failed try of this
        join kept its use counted here (``KeptUses``) and no node of the join can be adopted or has
        connected (the one that try left is gone, being deleted, or without its address and
        deleted here): the grant of that use, for the retry to make its node on."""
        if not request.join_id:
            return None, False, None
        # The token first: the port is open to anyone, and a list of VolunteerNodes for every
        # made-up token would let unauthenticated callers load the API server at will.
        grant = await self.tokens.authenticate(request.token)
        nodes = await self.registry.list({JOIN_TOKEN_LABEL: grant.token_id, JOIN_KEY_LABEL: join_key(request.join_id)})
        now = dt.datetime.now(dt.UTC)
        key = join_key(request.join_id)
        kept = self.kept_uses.get(grant.token_id, key)
        made_a_node = connected = False
        for node in nodes:
            metadata = node.get("metadata") or {}
            name, address, status = metadata.get("name", ""), status_address(node), node.get("status") or {}
            never_connected = "lastHeartbeat" not in status and name not in self.sessions.by_name
            half_made = not address and never_connected
            # Left by a failed undo of this gateway, which kept its use for this very object and an
            # address under its name that its status write never recorded (_record_node): that try
            # is over. Not any half-made node of the join: another replica's live try may own it.
            left_here = half_made and kept is not None and kept.names(node)
            if half_made and await self._undo_half_made(node, now, left_here):
                continue  # gone: this join made no node, and the use its first try counted stands for it
            made_a_node = True
            connected = connected or not never_connected  # its agent got the reply: the join is over
            if (
                metadata.get("deletionTimestamp")
                or "lastHeartbeat" in status  # it had a session: that agent got its reply
                or name in self.sessions.by_name
                or not address
                or self.allocator.holder(address) != name
                # Too late: the join goes on as a new one, which the expired token is refused.
                or not replay_in_time(grant, node, now)
            ):
                continue
            # The first try forgot the use it counted before replying, unless it died (or the store
            # failed) in between: forgotten now, before this reply, so that deleting the node later
            # leaves the use spent. A no-op (no write) when already forgotten.
            await self.tokens.node_made(replace(grant, join_key=key))
            self.kept_uses.drop(grant.token_id, key)  # a use kept for this node is the node's now
            return (name, address, node_uid(node)), True, None
        if kept is None:
            return None, made_a_node, None
        # No await from here: the kept use is taken (or dropped) at once, and a cancelled retry
        # leaves it for the next.
        self.kept_uses.drop(grant.token_id, key)
        if connected:
            return None, made_a_node, None  # the join is over: a new join, as without a kept use
        # As the store checks a counted join's retry: expiry is absolute, and this makes a node.
        if grant.expiration is not None and now >= grant.expiration:
            raise TokenError("expired", f"token {grant.token_id}: expired at {grant.expiration.isoformat()}")
        # The node the use was kept for can never be this join's: gone (the undo's delete landed
        # unanswered; the file and memory stores report no deletion that would free its address),
        # being deleted (which gives its address back, as the deletion watch does), deleted here
        # just now (freed already), or recording an address another node holds. Whatever address
        # it holds here goes back with it.
        self.allocator.release_holder(kept.node_name)
        return None, False, kept.grant

    async def _undo_half_made(self, node: JSON, now: dt.datetime, left_here: bool = False) -> bool:
        """Deletes ``node``, one of this join's that never got its address: the gateway that made it
        died before writing its status, and the agent's retry (the join id is its secret) is here.
        Its use was counted for this join, so the retry, as a join that made no node, is counted
        no second time (the token stores honour that use for COUNTED_JOIN_RETRY_S). Left as a node
        this join made (False) when older than that, the use no longer honoured, or of unknown age:
        the retry is a new join, and the node goes with the unconnected-node cleanup; that age is
        read from creationTimestamp, the API server's clock against this host's (approximate when
        they disagree). Raises EarlierTryRunning when it may still be a live try's: until this
        gateway has seen it without an address for HALF_MADE_JOIN_S on its own monotonic clock
        (never from creationTimestamp: a clock minutes ahead would take a live replica's node for
        a dead gateway's), or when it changed since it was read (its status landed after all) or
        is already gone. One a failed undo of this gateway left (``left_here``) is no live try's
        and its use is still counted (kept, not given back): deleted at once, whatever its age."""
        made_at = created_at(node)
        metadata = node.get("metadata") or {}
        name = str(metadata.get("name") or "")
        sighting = node_uid(node) or f"name:{name}"  # uid-less: an old file registry's node
        # The age is checked when the node is first seen only: one first seen near the end of the
        # window waits its HALF_MADE_JOIN_S after it, which the stores honour (COUNTED_JOIN_HONOURED_S).
        if not left_here:
            if not self.half_made.seen_before(sighting) and (
                made_at is None or (now - made_at).total_seconds() >= COUNTED_JOIN_RETRY_S
            ):
                return False
            if self.half_made.seen_for(sighting) < HALF_MADE_JOIN_S:
                raise EarlierTryRunning()
        if being_deleted(node):
            # An earlier retry's delete, held by a finalizer: no node of this join's. (Its sighting
            # is kept, not dropped at the delete, so that this holds without a second wait.)
            return True
        # Only the object as read: one whose status was written meanwhile is a node after all.
        preconditions = {key: str(metadata[key]) for key in ("uid", "resourceVersion") if metadata.get(key)}
        if not await self.registry.delete(name, preconditions):
            raise EarlierTryRunning()  # the next retry looks again
        # A try of this gateway whose undo failed kept the address its status write (never landed)
        # may have recorded (_record_node): it goes back with the node.
        self.allocator.release_holder(name)
        log.warning("join: deleted %s, left without an address by an earlier try of the same join", name)
        return True

    async def _record_node(self, request: pb.JoinRequest, grant: JoinGrant, left: LeftBehind) -> tuple[str, str, str]:
        """Takes a free address and creates the VolunteerNode; undoes both if any step fails.
        Returns the node's name, address and uid. A node the undo could not delete that may record
        its address keeps it, as ``left`` then says."""
        node_name = node_name_from_hint(request.name_hint)
        address = self.allocator.allocate(node_name)
        spec: dict[str, Any] = {
            "owner": grant.owner,
            "region": grant.region or request.region,
            "gpus": [{"model": g.model, "memoryMiB": int(g.memory_mib)} for g in request.gpus],
        }
        created = address_sent = False
        uid = ""
        try:
            labels = {JOIN_TOKEN_LABEL: grant.token_id}
            if request.join_id:
                labels[JOIN_KEY_LABEL] = join_key(request.join_id)
            try:
                uid = await self.registry.create(node_name, spec, labels)
            except NodeExists:
                raise  # another node's name: not ours to delete
            except BaseException:
                created = True  # the API may have applied it before failing or answering late
                raise
            created = address_sent = True  # from here the object may record the address
            try:
                await self.registry.patch_status(node_name, never_connected_status(address), uid=uid)
            except Exception as exc:
                # Refused outright (a 4xx; the object gone): the object records no address, so no
                # retry can adopt it (_earlier_join), and an address and a use kept for it would
                # be held for nobody (a late retry of a one-use token refused: usage-limit).
                address_sent = not write_refused(exc)
                raise
        except BaseException:  # a cancelled join (the agent hung up) must not leave a node either
            undone = not created
            try:
                if created:
                    try:
                        await self.registry.delete(node_name)  # False: gone already, as good
                        undone = True
                    except Exception as exc:
                        log.warning("join: could not delete half-made node %s: %r", node_name, exc)
                        # The store may have dropped it before failing (the file store deletes in
                        # memory, then fails to save): gone, nothing is left to keep the address
                        # for, and the file and memory stores report no deletion that would free it.
                        undone = address_sent and await self._gone(node_name, uid)
            finally:  # also when the delete is cancelled (its outcome unknown too)
                if undone or not address_sent:
                    self.allocator.release(address, node_name)
                else:
                    # The status write may have landed unanswered: the node left behind then
                    # records the address, so it stays that node's here. Freed, it would go to the
                    # next join (the retry's new node, say), two VolunteerNodes would record it,
                    # and after a restart one of them would be refused (address-taken). It is
                    # freed with the node: the unconnected-node sweep, the deletion watch or a
                    # retry that finds it without its address delete it (release_holder), and a
                    # retry that finds it with it adopts it (_earlier_join).
                    left.node_may_remain, left.node_name, left.uid = True, node_name, uid
                    log.warning(
                        "join: half-made node %s may record %s: the address stays reserved for it", node_name, address
                    )
            raise
        return node_name, address, uid

    async def _gone(self, name: str, uid: str) -> bool:
        """Whether the object ``uid`` (named ``name``) is known to exist no more, or to be on its
        way out: being deleted (the undo's delete landed unanswered, and a finalizer holds it), it
        is no node a retry can adopt (_earlier_join), so neither its address (the deletion watch
        frees a terminating node's too) nor its use is kept for it: the retry counts its own.
        False when it remains, or when the registry cannot say now (it may remain)."""
        try:
            node = await self.registry.get(name)
        except Exception as exc:
            log.warning("join: could not check whether half-made node %s is gone: %r", name, exc)
            return False
        return node is None or (bool(uid) and node_uid(node) != uid) or being_deleted(node)

    async def finish_background(self, timeout_s: float) -> None:
        """Waits (at most ``timeout_s`` in all) for the Join handlers the stopped server cancelled
        to unwind, then for the token uses they still give back."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        for tasks in (self._join_handlers, self._background):
            pending = [task for task in tasks if not task.done()]
            if pending:
                _, late = await asyncio.wait(pending, timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
                if late:
                    log.warning("stopping with %d join(s) whose token use may not be given back", len(late))
                    return

    def _give_back_when_counted(self, consuming: asyncio.Future[JoinGrant], join_id: str) -> None:
        """Gives back the use ``consuming`` counts, once it has; a retry of the same join waits
        (ABORTED, "still running") until then."""

        async def give_back() -> None:
            try:
                with contextlib.suppress(Exception):
                    await self._give_back(await consuming)
            finally:
                self._uses_being_given_back.discard(join_id)
                self._joins_in_flight.discard(join_id)
                self._background.discard(task)

        if join_id:
            self._uses_being_given_back.add(join_id)
        task = asyncio.ensure_future(give_back())
        self._background.add(task)

    async def _give_back(self, grant: JoinGrant) -> None:
        try:
            await self.tokens.give_back(grant)
        except Exception as exc:
            log.warning("join: could not give token %s its use back: %r", grant.token_id, exc)

    async def _retire_previous(self, previous_credential: str, owner: str) -> None:
        """Deletes the node an expired credential names, so a volunteer that was offline for longer
        than a credential lives comes back as one node, not as a new one beside a NotReady ghost.

        Only with a genuine credential (signed by this gateway; its expiry is what brought the agent
        here), a join token of the same owner, and no live session: nobody can retire a node that
        is connected or that belongs to someone else.
        """
        if not previous_credential:
            return
        try:
            old = credentials.verify(self.credential_key, previous_credential, check_expiry=False)
        except credentials.CredentialError as exc:
            log.warning("join: previous credential ignored: %s", exc)
            return
        if time.time() < old.expires_at and self.allocator.contains(old.address):
            # Still valid: it could register meanwhile (a second copy, a skewed clock), and its
            # node must not lose its address to this join while it does. (One whose address left
            # the pool can never register again: it is retired.)
            self.metrics.previous_nodes["kept"] += 1
            log.warning("join: previous node %s kept (its credential has not expired)", old.node_name)
            return
        try:
            node = await self.registry.get(old.node_name)
            # Another object under its name (created again since) is not the credential's to retire.
            if node is None or status_address(node) != old.address or not credential_names_node(old, node):
                return
            if (node.get("spec") or {}).get("owner") != owner or old.node_name in self.sessions.by_name:
                self.metrics.previous_nodes["kept"] += 1
                log.warning("join: previous node %s kept (other owner or still connected)", old.node_name)
                return
            # Refused from now on, whatever the delete's fate: a Register that arrives while the
            # delete is under way must not attach a node whose address is about to be freed.
            self.sessions.revoke(old.node_name)
            deleted = await self.registry.delete(old.node_name)
        except Exception as exc:  # best effort: the join itself must not fail because of the old node
            log.warning("join: could not retire previous node %s: %r", old.node_name, exc)
            return
        if deleted:
            self.allocator.release(old.address, old.node_name)
            self.metrics.previous_nodes["retired"] += 1
            log.info("join: retired previous node %s (%s)", old.node_name, old.address)

    def _issue_credential(self, node_name: str, address: str, uid: str) -> credentials.IssuedCredential:
        return credentials.issue(self.credential_key, node_name, address, self.config.credential_lifetime_s, uid=uid)

    def _renew_credential(self, session: NodeSession) -> None:
        # Always with the uid of the object the session registered against: this is how a
        # credential issued before uids were bound (accepted until it expires) is replaced.
        issued = self._issue_credential(session.node_name, session.address, session.uid)
        session.send(
            pb.GatewayMessage(credential=pb.CredentialRenewal(credential=issued.token, expires_at=issued.expires_at))
        )
        session.credential_expires_at = issued.expires_at

    async def _identify(self, context: Context) -> credentials.NodeIdentity:
        try:
            return credentials.verify(self.credential_key, credentials.from_metadata(context.invocation_metadata()))
        except credentials.CredentialError as exc:
            self.metrics.refused_streams["bad-credential"] += 1
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            raise  # unreachable: abort raises

    # ---- Control ----

    async def Control(  # type: ignore[override]
        self, request_iterator: AsyncIterator[pb.AgentMessage], context: Context
    ) -> None:
        identity = await self._identify(context)
        if self._controls_opening[identity.node_name] >= CONTROL_STREAMS_OPENING_MAX:
            self.metrics.refused_streams["too-many-streams"] += 1
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "control: too many Control streams of this node wait to register"
            )
        self._controls_opening[identity.node_name] += 1
        try:
            register = await self._read_register(identity, context)
        finally:
            self._controls_opening[identity.node_name] -= 1
            if not self._controls_opening[identity.node_name]:
                del self._controls_opening[identity.node_name]
        if register.node_name != identity.node_name or register.address != identity.address:
            self.metrics.refused_streams["identity-mismatch"] += 1
            log.warning(
                "node %s (%s) claimed to be %.128r (%.64r)",
                identity.node_name,
                identity.address,
                register.node_name,
                register.address,
            )
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "register: node_name/address do not match the credential",
            )
        # This call's initial metadata goes out now, from its own handler, before anything can end
        # the session: every message to the agent is written by the session's writer task, and
        # grpc.aio notes the metadata as sent only once a write completes. An end (revocation,
        # reconnect, expiry) while the first write is in flight then left it asking to send the
        # metadata again with the final status; grpc refused that batch and the agent's call stayed
        # open. Here nothing holds this handler yet, so only the agent's hang-up can cancel it.
        try:
            await context.send_initial_metadata(())
        except Exception as exc:  # the agent's call is gone already
            log.info("node %s: control stream gone before it was registered: %r", identity.node_name, exc)
            return
        # Again, now that Register is here: the node may have been deleted while the stream waited
        # for it, and its address given to a new node. From this check to attach() nothing awaits,
        # so no deletion can slip in between.
        refusal, node = await self._still_entitled(identity)
        if refusal is not None:
            self.metrics.refused_streams[refusal] += 1
            log.warning("node %s (%s): register refused: %s", identity.node_name, identity.address, refusal)
            # A node outside the pool is still the volunteer's, but its credential names an address
            # no longer served: UNAUTHENTICATED makes its agent join again with its token.
            code = grpc.StatusCode.UNAUTHENTICATED if refusal == OUTSIDE_POOL else grpc.StatusCode.PERMISSION_DENIED
            await context.abort(code, f"register refused: {refusal}")
        if self.sessions.closing:  # checked with no await before attach(), as above
            self.metrics.refused_streams["gateway-stopping"] += 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "gateway shutting down; reconnect later")
        assert node is not None  # entitled: the object was read
        self.allocator.reserve(identity.address, identity.node_name)
        session = NodeSession(
            node_name=identity.node_name,
            address=identity.address,
            uid=node_uid(node),
            ports=self.allocator.ports_for(identity.address),
            stream=context,
            handler_task=asyncio.current_task(),
            agent_version=register.agent_version[:MAX_TEXT],
            gpus=gpus_reported(register.gpus),
            self_heartbeats=register.self_heartbeats,
        )
        # The object's Ready condition (the join's NeverConnected, or what an earlier gateway
        # process wrote): a first session still not ready keeps the time it went not ready.
        self.sessions.attach(session, stored_ready_condition(node.get("status") or {}))
        tasks: list[asyncio.Future[None]] = []
        reason, message = "Disconnected", "control stream ended"
        try:
            # The registry says "connected" before the agent hears "registered": whoever sees the
            # agent connected (its operator, a test) then finds the node connected too, never an
            # older status. Bounded: with the API down the write lands later, the session goes on.
            await self.sessions.writer.wait_written(session.node_name, REGISTER_STATUS_WAIT_S)
            session.send(
                pb.GatewayMessage(
                    registered=pb.Registered(assignment=self.assignment(session.node_name, session.address))
                )
            )
            self._renew_credential(session)
            tasks = [
                asyncio.ensure_future(session.write_outbox()),
                asyncio.ensure_future(self._ping_loop(session)),
                asyncio.ensure_future(self._control_loop(session, context)),
            ]
            # Whichever ends first ends the session: the agent hung up, or writing to it failed.
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        except asyncio.CancelledError:
            # The agent's connection went away (grpc cancels the handler), or the gateway ended
            # the session; in the latter case whoever ended it has said why.
            reason, message = session.end_reason or (reason, message)
            await self._abort_if_revoked(session.node_name, context)
            if session.end_reason is not None:
                # The gateway ended it (a newer session took over, the agent stopped reading): a
                # cancelled handler alone would leave the agent's call open and quiet until its
                # heartbeat timeout.
                await context.abort(grpc.StatusCode.ABORTED, f"session ended by the gateway: {message}")
            raise
        except grpc.aio.AioRpcError as exc:
            message = f"control stream failed: {exc.code().name}"
        except _MalformedControl:
            # Aborted from this, the handler's task: an abort in _control_loop's task left the call open.
            message = "control stream ended: not an AgentMessage"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "control: not an AgentMessage")
        except Exception as exc:  # a write the call refused, a session that ended itself
            message = f"control stream failed: {exc!r}"
            log.warning("node %s: %s", session.node_name, message)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            if session.verifier is not None:
                session.verifier.cancel()
            if not session.closed:
                self.sessions.detach(session, reason, message)

    async def _read_register(self, identity: credentials.NodeIdentity, context: Context) -> pb.Register:
        node = await self.registry.get(identity.node_name)
        # Another object under the credential's name (created again since) counts as deleted too.
        if node is None or being_deleted(node) or not credential_names_node(identity, node):
            self.metrics.refused_streams["node-deleted"] += 1
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"node {identity.node_name} no longer exists")
        try:
            first = await asyncio.wait_for(context.read(), self.config.first_frame_timeout_s)
        except TimeoutError:
            self.metrics.refused_streams["no-register"] += 1
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "control: no Register message in time")
        if isinstance(first, MalformedMessage):
            self.metrics.refused_streams["malformed-message"] += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "control: not an AgentMessage")
        if not isinstance(first, pb.AgentMessage) or first.WhichOneof("msg") != "register":
            self.metrics.refused_streams["no-register"] += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "control: first message must be Register")
        register: pb.Register = first.register
        return register

    async def _abort_if_revoked(self, node_name: str, context: Context) -> None:
        # A handler task that is cancelled sends the agent no status at all: the call would just go
        # quiet. A node that was deleted is told so, and its call ends now.
        if self.sessions.was_revoked(node_name):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"node {node_name} no longer exists")

    async def _still_entitled(self, identity: credentials.NodeIdentity) -> tuple[str | None, JSON | None]:
        """(None, the object) if the credential's node still exists, is the very object the
        credential was issued for, and still holds its address, else (why not, None)."""
        node = await self.registry.get(identity.node_name)
        # Being deleted counts as deleted: after a gateway restart the deletion watch may not have
        # reported it yet, and its address may already be another node's. An object created again
        # under the name since (another uid) is not the credential's node either.
        if (
            node is None
            or being_deleted(node)
            or not credential_names_node(identity, node)
            or self.sessions.was_revoked(identity.node_name)
        ):
            return "node-deleted", None
        if not self.allocator.contains(identity.address):
            return OUTSIDE_POOL, None  # --vip-cidr changed since it joined: it must join again
        recorded = status_address(node)
        holder = self.allocator.holder(identity.address)
        if (recorded and recorded != identity.address) or holder not in (None, identity.node_name):
            return "address-taken", None
        return None, node

    async def _control_loop(self, session: NodeSession, context: Context) -> None:
        while True:
            message = await context.read()
            if message is EOF:
                return
            if isinstance(message, MalformedMessage):
                self.metrics.refused_streams["malformed-message"] += 1
                raise _MalformedControl(message.error)
            assert isinstance(message, pb.AgentMessage)
            kind = message.WhichOneof("msg")
            if kind == "heartbeat":
                session.record_heartbeat(message.heartbeat, time.monotonic_ns(), self.config.rtt_smoothing_alpha)
                self._verify_ray_node(session)
                self.sessions.write_status(session)
            elif kind == "drain":
                session.last_seen = time.monotonic()
                if session.draining:  # said once is enough: a repeat must not buy status writes
                    continue
                session.draining = True
                log.info("node %s draining: %.128r", session.node_name, message.drain.reason)
                self.sessions.write_status(session, force=True)
                # The grace comes from the volunteer: keep the deadline GCS is told within a day.
                deadline = time.time() + min(message.drain.grace_seconds, MAX_DRAIN_GRACE_S)
                session.drain_request = (message.drain.reason[:MAX_TEXT], deadline)
                self._start_ray_drain(session)
            else:
                session.last_seen = time.monotonic()

    def _start_ray_drain(self, session: NodeSession) -> None:
        """Asks GCS to drain the node's Ray node once that node is known to be the node's own: the
        id GCS confirmed at the node's address, never one the agent only claims (any volunteer can
        list the others' Ray node ids). A drain asked before that starts once it is confirmed."""
        if (
            session.drain_request is None
            or not session.ray_verified_id
            or session.ray_verified_id != session.ray_node_id  # a restarted Ray node not confirmed yet
            or self.ray_checker is None
        ):
            return
        reason, deadline = session.drain_request
        session.drain_request = None
        session.ray_drainer = asyncio.ensure_future(
            self._drain_ray_node(self.ray_checker, session, session.ray_verified_id, reason, deadline)
        )

    def _verify_ray_node(self, session: NodeSession) -> None:
        if session.ray_node_id == session.ray_verified_id or session.ray_state != "running":
            return
        if self.ray_checker is None:
            session.ray_verified_id = session.ray_node_id
            return
        if session.verifier is None or session.verifier.done():
            session.verifier = asyncio.ensure_future(self._verify_loop(session, self.ray_checker))

    async def _verify_loop(self, session: NodeSession, checker: RayNodeChecker) -> None:
        failed = False
        # Ray node ids this node claimed that GCS has elsewhere: each is counted once a session
        # (session.ray_ids_elsewhere), not at every 0.25 s retry for as long as the session lasts.
        elsewhere = session.ray_ids_elsewhere
        while not session.closed and session.ray_node_id and session.ray_node_id != session.ray_verified_id:
            node_id = session.ray_node_id
            try:
                address = await checker.address_of(node_id)
            except Exception as exc:  # GCS unreachable: keep the node NotReady and retry
                # Once per node and outage, not every 0.25 s (the checker logs the outage itself).
                log.log(
                    logging.DEBUG if failed else logging.WARNING, "GCS lookup for %s failed: %r", session.node_name, exc
                )
                failed = True
                address = None
            if session.closed:  # ended during the lookup: its NotReady must stay the last word
                return
            if address == session.address:
                session.ray_verified_id, session.ray_lost_id = node_id, ""
                self.sessions.write_status(session, force=True)
                self._start_ray_drain(session)
                return
            if address is not None and node_id not in elsewhere and len(elsewhere) < MAX_RAY_IDS_ELSEWHERE:
                elsewhere.add(node_id)
                self.metrics.ray_node_claims_refused += 1
                # Bounded per node too: an agent switching among the other nodes' ids each
                # heartbeat would get a line per switch.
                self._refusals.warning(
                    f"{session.node_name} ray-node-elsewhere",
                    "node %s reports Ray node %.64r which GCS has at %s",
                    session.node_name,
                    node_id,
                    address,
                )
            await asyncio.sleep(0.25)

    async def recheck_ray_nodes(self) -> list[str]:
        """Looks up every node's confirmed Ray node in GCS again; a node whose Ray node GCS no longer
        has ALIVE at its address loses the confirmation (NotReady, no rayNodeId: its agent may go on
        reporting a dead id as running) until the verify loop confirms a live one. Returns their
        names. The checker reads GCS's node table once for the whole sweep (it caches it briefly).

        A GCS that does not answer changes nothing: its outage (the ray-head container restarting)
        must not take every node out of Ready; the sweep stops and the next one asks again."""
        checker = self.ray_checker
        if checker is None:
            return []
        lost: list[str] = []
        for session in list(self.sessions.by_name.values()):
            node_id = session.ray_verified_id
            # Only the id status names (rayNodeId): an older one the agent no longer reports is
            # not written, and its new one is the verify loop's.
            if session.closed or not node_id or session.ray_node_id != node_id:
                continue
            try:
                address = await checker.address_of(node_id)
            except Exception as exc:  # the checker logs the outage, once
                log.debug("rechecking Ray nodes in GCS failed: %r", exc)
                return lost
            if session.closed or session.ray_verified_id != node_id or address == session.address:
                continue
            log.info(
                "node %s: GCS no longer has Ray node %s alive at %s (%s); NotReady until it does",
                session.node_name,
                node_id,
                session.address,
                f"alive at {address}" if address else "not alive",
            )
            session.ray_verified_id, session.ray_lost_id = "", node_id
            self.sessions.write_status(session, force=True)
            self._verify_ray_node(session)  # confirmed again once GCS has it alive here again
            lost.append(session.node_name)
        return lost

    async def _drain_ray_node(
        self, checker: RayNodeChecker, session: NodeSession, ray_node_id: str, reason: str, deadline: float
    ) -> None:
        pause = GCS_DRAIN_RETRY_FIRST_S
        while True:
            try:
                accepted, why = await checker.drain(ray_node_id, f"volunteer draining: {reason}", deadline)
                break
            except Exception as exc:  # GCS unreachable or slow: the agent still waits for its tasks
                give_up = session.closed or time.time() + pause >= deadline
                log.warning(
                    "node %s: asking GCS to drain Ray node %s failed (%s): %r",
                    session.node_name,
                    ray_node_id,
                    "giving up" if give_up else f"asking again in {pause:.1f} s",
                    exc,
                )
                if give_up:
                    return
            await asyncio.sleep(pause)
            pause = min(pause * 2, GCS_DRAIN_RETRY_MAX_S)
            if session.closed:  # its stream ended meanwhile: the node is NotReady, GCS will see it go
                log.info("node %s is gone: no longer asking GCS to drain it", session.node_name)
                return
        if accepted:
            log.info("node %s: GCS drains Ray node %s", session.node_name, ray_node_id)
        else:  # PREEMPTION is not refused for a live node: asking again would not change the answer
            log.warning("node %s: GCS refused to drain Ray node %s: %s", session.node_name, ray_node_id, why)

    async def _ping_loop(self, session: NodeSession) -> None:
        # Liveness rests on the agent's heartbeats either way; pings are what it answers (agents that
        # do not heartbeat by themselves) or the RTT probe (agents that do).
        probe_every = self.config.rtt_probe_every if session.self_heartbeats else 1
        for tick in itertools.count():
            if session.credential_expires_at - time.time() < self.config.credential_lifetime_s / 2:
                self._renew_credential(session)
            if tick % probe_every == 0:
                # An unguessable seq: an agent can answer only pings it has received, so it cannot
                # answer ahead and claim a round trip shorter than its real one. RTT is timed on the
                # monotonic clock (a wall-clock step would read as latency); gateway_time_ns is
                # wall time, for the agent's information.
                ping = pb.Ping(seq=secrets.randbits(63) or 1, gateway_time_ns=time.time_ns())
                session.ping_sent(ping.seq, time.monotonic_ns())
                session.send(pb.GatewayMessage(ping=ping))
            await asyncio.sleep(self.config.heartbeat_interval_s)

    # ---- Connect ----

    async def Connect(  # type: ignore[override]
        self, request_iterator: AsyncIterator[pb.Frame], context: Context
    ) -> None:
        identity = await self._identify(context)
        source = self.sessions.by_name.get(identity.node_name)
        # The session of an object created again under the credential's name is not its node's.
        if source is None or source.address != identity.address or not identity.names(source.uid):
            self.metrics.refused_streams["no-session"] += 1
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "connect: node has no live Control stream")
        assert source is not None
        channel = CountedFrameChannel(
            context,
            self.metrics.tunnel_bytes,
            "from_nodes",
            "to_nodes",
            self.sessions.send_stalls.of(source.node_name),
            self.sessions.unread_writes(source.node_name),
        )
        try:
            # Held from now, not from the first frame: a revocation ends this stream too, and
            # streams that stay silent count against the node's cap. Held until grpc ends the call
            # if a write is left pending in it (_held_while_pending).
            with self.sessions.streams.slot(source.node_name) as slot, _held_while_pending(channel, context, slot):
                # From now, as the limit counts it: the peak counts silent streams too, which a
                # stream that never sends its first frame is.
                open_now = self.sessions.streams.open(source.node_name)
                self.metrics.node_streams_peak = max(self.metrics.node_streams_peak, open_now)
                try:
                    first = await asyncio.wait_for(channel.read_frame(), self.config.first_frame_timeout_s)
                except TimeoutError:
                    self.metrics.refused_streams["no-first-frame"] += 1
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "connect: no Dial or Accept frame in time")
                if source.closed or self.sessions.by_name.get(source.node_name) is not source:
                    # The session this stream was opened under ended while it waited: its address
                    # may belong to another node by now.
                    self.metrics.refused_streams["no-session"] += 1
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "connect: the node's session ended")
                await self._serve_stream(source, first, channel, context, slot)
        except TooManyStreams as exc:
            self.metrics.refused_streams["too-many-streams"] += 1
            self._refusals.warning(f"{source.node_name} too-many-streams", "connect refused: %s", exc)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"connect: {exc}")
        except (ProtocolViolation, FrameDecodeError) as exc:
            # Only this stream ends; the node's other streams and its session carry on.
            self.metrics.refused_streams["protocol-violation"] += 1
            self._refusals.warning(
                f"{source.node_name} protocol-violation",
                "node %s: connect stream closed: %.300s",
                source.node_name,
                exc,
            )
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"connect: {exc}"[:300])
        except asyncio.CancelledError:
            await self._abort_if_revoked(source.node_name, context)
            raise

    async def _serve_stream(
        self, source: NodeSession, first: Any, channel: GrpcFrameChannel, context: Context, slot: StreamSlot
    ) -> None:
        kind = first.WhichOneof("msg") if isinstance(first, pb.Frame) else None
        if kind == "dial":
            slot.dialing()
            await self._dial(source, first.dial, channel)
        elif kind == "accept":
            await self._accept(source, first.accept, channel, context, slot)
        else:
            self.metrics.refused_streams["bad-first-frame"] += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "connect: first frame must be Dial or Accept")

    async def _dial(self, source: NodeSession, dial: pb.Dial, channel: GrpcFrameChannel) -> None:
        # The stream counts among the node's connections until it ends, refused or not: a refusal
        # is a DialResult frame, which waits for as long as the node keeps its stream's window
        # shut. No time limit would help: grpc sends the status only after the frames before it,
        # and has no way to reset a stream from here, so a limit would just stop counting a
        # stream that grpc goes on holding.
        try:
            route = self.router.route(source, dial.host, dial.port)
        except DialRefused as exc:
            await channel.write_frame(
                pb.Frame(dial_result=pb.DialResult(ok=False, reason=exc.reason, message=str(exc)))
            )
            return
        if route.kind == "head":
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(route.host, route.port, limit=STREAM_READER_LIMIT), 5.0
                )
            except (OSError, TimeoutError) as exc:
                self.router.refuse(source.node_name, route.host, route.port, "unreachable", f"head: {exc!r}")
                await channel.write_frame(
                    pb.Frame(dial_result=pb.DialResult(ok=False, reason="unreachable", message=repr(exc)))
                )
                return
            with self.metrics.connection():  # counted once open, as the head proxy counts
                # Taken over at once: what the head sends while the DialResult is on its way lands
                # in the pipe's buffers, held against the node's budget, not in the StreamReader
                # (which buffered up to 8 MiB a connection, on every stream of a node at once).
                budget = self.sessions.read_budget(source.node_name)
                pipe = TcpPipe.take_over(reader, writer, CHUNK_BYTES, budget)
                try:
                    await channel.write_frame(pb.Frame(dial_result=pb.DialResult(ok=True)))
                except BaseException:
                    # The stream failed or this handler was cancelled (a revocation, the node's
                    # call gone) before the splice: nothing else would end the head connection
                    # (the node never learnt of it) or give back what its pipe holds.
                    with contextlib.suppress(Exception):
                        pipe.abort()
                    pipe.release()
                    raise
                await splice_pipe(pipe, channel)
            return
        assert route.node is not None
        try:
            connection_id, peer = await self.router.open_to_node(route.node, route.port, source.address)
        except DialRefused as exc:
            await channel.write_frame(
                pb.Frame(dial_result=pb.DialResult(ok=False, reason=exc.reason, message=str(exc)))
            )
            return
        peer_violation = ""
        try:
            with self.metrics.connection():
                await channel.write_frame(pb.Frame(dial_result=pb.DialResult(ok=True)))
                await splice_channels(channel, peer)
        except PeerProtocolViolation as exc:  # the accepting stream's handler ends it with an error
            peer_violation = str(exc) or "protocol violation"
        finally:
            self.router.finish(connection_id, peer_violation)

    async def _accept(
        self, source: NodeSession, accept: pb.Accept, channel: GrpcFrameChannel, context: Context, slot: StreamSlot
    ) -> None:
        try:
            pending = self.router.claim(source.node_name, accept.connection_id)
        except DialRefused as exc:
            # Refused while the stream still counts as opening, and by the call's status: a Close
            # frame is flow-controlled, and a node that never opened the stream's window kept it
            # (handler, call, buffers) for ever, on a stream no cap counted.
            self.metrics.refused_streams[exc.reason] += 1
            await context.abort(grpc.StatusCode.NOT_FOUND, f"accept refused ({exc.reason}): {exc}"[:300])
        # Counted no more from here: one stream per pending connection, which its dialler pays for
        # (until the connection is over: a write to it then left pending counts again,
        # _held_while_pending).
        slot.accepting()
        timed_out = False
        try:
            result = await asyncio.wait_for(channel.read_frame(), self.config.accept_timeout_s)
        except TimeoutError:
            result, timed_out = None, True
        except BaseException as exc:
            # Bytes that are not a frame (Connect's handler counts the violation and ends this
            # stream), the call failing, or this handler cancelled (a revocation): the originator
            # is refused now, not after accept_timeout_s with a timeout that says nothing.
            if not pending.accepted.done():
                pending.accepted.set_exception(DialRefused("unreachable", f"peer's accept stream failed: {exc!r}"))
            raise
        if not isinstance(result, pb.Frame) or result.WhichOneof("msg") != "dial_result" or not result.dial_result.ok:
            if timed_out:
                why = "no DialResult in time"
            elif result is None:
                why = "its accept stream ended before its DialResult"
            elif isinstance(result, pb.Frame) and result.HasField("dial_result"):
                why = result.dial_result.reason
            else:
                kind = result.WhichOneof("msg") if isinstance(result, pb.Frame) else "data"
                why = f"accept: {kind!r} frame where its DialResult belongs"
            if not pending.accepted.done():  # done: the originator gave up (open_to_node cancelled it)
                pending.accepted.set_exception(DialRefused("unreachable", f"peer could not connect locally: {why}"))
            if result is not None and not (isinstance(result, pb.Frame) and result.HasField("dial_result")):
                # It broke the Accept protocol: Connect's handler counts it and ends this stream
                # with an error (the dialler's refusal is booked by open_to_node, as before).
                raise ProtocolViolation(why)
            if result is None:
                self.metrics.refused_streams["no-dial-result"] += 1
                if timed_out:  # a read still waits inside grpc: only an abort ends this call now
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "accept: no DialResult in time")
                # The agent half-closed without answering: it broke the Accept protocol.
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "accept: stream ended before its DialResult")
            return
        if pending.accepted.done():  # the originator gave up waiting
            return
        # This call's initial metadata goes out now, from its own handler. The originator's task
        # writes to the stream next, and may be cancelled mid-write (its dialer hung up): grpc.aio
        # then believes the metadata unsent (it notes it only once a write completes), the OK this
        # handler ends with asks to send it again, grpc refuses that batch (too many operations),
        # and the acceptor's call never ends: its agent holds the connection to its Ray port.
        try:
            await context.send_initial_metadata(())
        except Exception as exc:  # the acceptor's call is gone already
            if not pending.accepted.done():
                pending.accepted.set_exception(DialRefused("unreachable", f"peer's accept stream failed: {exc!r}"))
            return
        if pending.accepted.done():  # the originator gave up meanwhile
            return
        pending.accepted.set_result(channel)
        # The originator splices; keep this call open until it is done.
        try:
            # Shielded: a cancelled wait would cancel the future, which the originator reads.
            violation = await asyncio.shield(pending.finished)
        except asyncio.CancelledError:
            # This stream is being ended first (its node revoked or deleted, the gateway stopping):
            # the originator's splice still writes to it, and would hold its connection (the
            # head's socket, its slot of the node's head connections, its buffers) for as long as
            # the node's agent kept the call open without reading.
            if not pending.finished.done() and pending.originator is not None:
                pending.originator.cancel()
            raise
        if violation:
            raise ProtocolViolation(violation)  # Connect's handler counts it and ends this stream


@contextlib.contextmanager
def _held_while_pending(channel: CountedFrameChannel, context: Context, slot: StreamSlot) -> Iterator[None]:
    """Keeps a Connect stream's slot past its handler while grpc holds the call for a write left
    pending in it (``CountedFrameChannel.write_held``: its writer, another stream's splice or the
    head proxy, was cancelled half-way). grpc sends the call's status (the handler's OK, or an
    abort's) only after that write, so the call lived on, holding its handler's state and buffers,
    for as long as the node kept its window shut; an accepted stream no longer counted against
    anyone by then. Released once grpc has ended the call: the done callback runs when the task
    that sends the status is over (sent, or failed with the call), or when a revocation cancels it.
    """
    try:
        yield
    finally:
        if channel.write_held:
            slot.held()
            # grpc-stubs declares the callback a class of its own; grpc takes any callable.
            context.add_done_callback(lambda _context: slot.release())  # type: ignore[arg-type]
