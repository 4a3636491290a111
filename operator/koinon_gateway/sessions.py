"""Connected nodes: one NodeSession per live Control stream, and the status they publish."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .addresses import PortBlock
from .by_node import ByNode
from .config import FROM_NODE_BYTES_PER_STREAM, GatewayConfig
from .limits import MAX_GPU_MEMORY_MIB, MAX_GPUS, MAX_TEXT
from .registry import NodeRegistry, connection_owned_by_gateway, node_uid
from .send_stalls import StallSweeper
from .status import ReadyCondition, gpus_to_status, next_condition, rfc3339, stored_ready_condition
from .status_writer import StatusWriter
from .stream_slots import StreamSlots
from .tcp_pipe import ReadBudget
from .unread_writes import UnreadWrites

log = logging.getLogger(__name__)

MAX_REMEMBERED_REVOCATIONS = 10_000
RAY_STATES = frozenset({"starting", "running", "stopped", "restarting", "disabled"})
# Pings whose answers are still awaited; an answer to an older one no longer measures anything.
PINGS_REMEMBERED = 8
# Gateway messages (pings, OpenConnection, credentials) waiting for an agent to read them.
CONTROL_OUTBOX_LIMIT = 1024
# Ray node ids a session claimed that GCS has at another address, each counted once: a hostile
# agent switching among the other nodes' ids is counted at most this many times a session.
MAX_RAY_IDS_ELSEWHERE = 64


class SessionEnded(Exception):
    """The node's Control session is over (or was just ended): nothing more can be sent to it."""


def gpus_reported(gpus: Iterable[pb.Gpu]) -> list[tuple[str, int]]:
    """(model, memory MiB) of each reported GPU, cut to what a VolunteerNode status may carry."""
    return [(g.model[:MAX_TEXT], min(max(int(g.memory_mib), 0), MAX_GPU_MEMORY_MIB)) for g in list(gpus)[:MAX_GPUS]]


@dataclass
class NodeSession:
    node_name: str
    address: str
    ports: PortBlock
    stream: Any  # grpc.aio server context of the Control call
    handler_task: asyncio.Task[Any] | None
    # metadata.uid of the VolunteerNode this session was registered against: what its renewed
    # credentials name, and what a Connect stream's credential must name too.
    uid: str = ""
    agent_version: str = ""
    gpus: list[tuple[str, int]] = field(default_factory=list)
    last_seen: float = field(default_factory=time.monotonic)
    # When the agent last gave a sign of life (its Register, then each heartbeat), as status says it.
    last_heartbeat_at: str = field(default_factory=rfc3339)
    rtt_last_ms: float | None = None
    rtt_smoothed_ms: float | None = None
    rtt_updated_at: str = ""
    ray_node_id: str = ""
    ray_state: str = "starting"
    # The Ray node id GCS confirmed alive at this node's address (and still had there at the last
    # recheck, TunnelService.recheck_ray_nodes).
    ray_verified_id: str = ""
    # A confirmed id that GCS later no longer had alive at this address: the Ready condition's
    # reason says so (RayNodeNotAlive) while the agent still reports it.
    ray_lost_id: str = ""
    # Ids this node claimed that GCS has elsewhere (at most MAX_RAY_IDS_ELSEWHERE): each is counted
    # once a session. Per session, not per verify loop: a heartbeat without an id ends the loop,
    # and the next claim of the same id must not count again.
    ray_ids_elsewhere: set[str] = field(default_factory=set)
    verifier: asyncio.Task[Any] | None = None
    ray_drainer: asyncio.Task[Any] | None = None  # held so the GCS drain request runs to its end
    draining: bool = False
    # The first drain request's reason and GCS deadline (Unix seconds), until GCS has been asked.
    drain_request: tuple[str, float] | None = None
    # The agent heartbeats every interval by itself; pings are only RTT probes (Register.self_heartbeats).
    self_heartbeats: bool = False
    credential_expires_at: int = 0  # of the newest credential sent to this node (Unix seconds)
    last_status_write: float = 0.0
    # What the last status write said, apart from heartbeat news (see SessionTable.write_status).
    written_key: tuple[Any, ...] | None = None
    written_rtt_ms: float | None = None
    closed: bool = False
    end_reason: tuple[str, str] | None = None  # (reason, message) when the gateway ends the session
    pings_awaited: dict[int, int] = field(default_factory=dict)  # ping seq -> sent at (time_ns)
    outbox: asyncio.Queue[pb.GatewayMessage] = field(default_factory=lambda: asyncio.Queue(CONTROL_OUTBOX_LIMIT))

    def send(self, message: pb.GatewayMessage) -> None:
        """Queues ``message`` for the Control stream; never waits.

        grpc.aio allows one write at a time per call, and a write cancelled half-way (a dial that
        gave up while the agent's window was full) leaves the call unable to write again. So only
        write_outbox() writes, and only the session's end cancels it. An agent that stops reading
        fills the outbox; its session then ends (a live agent reconnects).
        """
        if self.closed:
            raise SessionEnded(f"node {self.node_name}: session ended")
        try:
            self.outbox.put_nowait(message)
        except asyncio.QueueFull:
            log.warning(
                "node %s: %d messages unread on its Control stream; ending the session",
                self.node_name,
                self.outbox.qsize(),
            )
            self.end_reason = ("Unresponsive", "agent stopped reading its control stream")
            if self.handler_task is not None:
                self.handler_task.cancel()  # its cleanup marks the node NotReady
            raise SessionEnded(f"node {self.node_name}: not reading its Control stream") from None

    async def write_outbox(self) -> None:
        while True:
            await self.stream.write(await self.outbox.get())

    def ping_sent(self, seq: int, time_ns: int) -> None:
        self.pings_awaited[seq] = time_ns
        while len(self.pings_awaited) > PINGS_REMEMBERED:
            del self.pings_awaited[next(iter(self.pings_awaited))]

    def record_heartbeat(self, heartbeat: pb.Heartbeat, now_ns: int, alpha: float) -> None:
        self.last_seen = time.monotonic()
        self.last_heartbeat_at = rfc3339()
        # RTT from the gateway's own record of when it sent the ping the heartbeat answers: an
        # agent can delay its answer but cannot claim a latency lower than its real one.
        sent_ns = self.pings_awaited.pop(heartbeat.echo_seq, None) if heartbeat.echo_seq else None
        if sent_ns is not None:
            rtt_ms = max(0.0, (now_ns - sent_ns) / 1e6)
            self.rtt_last_ms = rtt_ms
            self.rtt_updated_at = rfc3339()
            self.rtt_smoothed_ms = (
                rtt_ms if self.rtt_smoothed_ms is None else alpha * rtt_ms + (1 - alpha) * self.rtt_smoothed_ms
            )
        self.ray_node_id = heartbeat.ray_node_id[:MAX_TEXT]
        if heartbeat.ray_state in RAY_STATES:
            self.ray_state = heartbeat.ray_state
        if heartbeat.gpus:
            self.gpus = gpus_reported(heartbeat.gpus)

    @property
    def ready(self) -> bool:
        return not self.draining and self.ray_state == "running" and self.ray_confirmed

    @property
    def ray_confirmed(self) -> bool:
        """The Ray node the agent runs now is the one GCS has (still) alive at its address."""
        return bool(self.ray_node_id) and self.ray_node_id == self.ray_verified_id

    @property
    def draining_served(self) -> bool:
        """Draining, as a serving node's way out: its running work finishes on a Ray node GCS has
        alive here. A drain with no such Ray node (never confirmed, or lost since) is NotReady: it
        serves nothing, and must earn no uptime for as long as its agent heartbeats (a drain's grace
        may be a day)."""
        return self.draining and self.ray_confirmed


class SessionTable:
    """Routes by virtual address and keeps VolunteerNode status in step with the sessions."""

    def __init__(self, config: GatewayConfig, registry: NodeRegistry) -> None:
        self.config = config
        self.registry = registry
        self.by_name: dict[str, NodeSession] = {}
        self.by_address: dict[str, NodeSession] = {}
        self._conditions: dict[str, ReadyCondition] = {}
        # Status writes go out in the background, in order per node, retried until they land.
        self.writer = StatusWriter(
            registry, config.status_retry_s, config.status_write_burst, config.status_write_window_s
        )
        # Names of nodes whose VolunteerNode was deleted, newest last: a Register that was already
        # on its way when the deletion was seen must not bring the node back. Names are never reused
        # (random suffix), so remembering the recent ones is enough.
        self._revoked: OrderedDict[str, None] = OrderedDict()
        # Connect streams open per node (their handler tasks): capped per node, ended with it.
        self.streams = StreamSlots(config.max_streams_per_node)
        # Per node name as the stream cap counts (by_node.py): the receive buffers of each node's
        # TCP connections together (max_buffered_bytes_per_node), ...
        self._read_budgets = ByNode(lambda: ReadBudget(config.max_buffered_bytes_per_node))
        # ... how many of its connections may stall at once sending what the other end does not take
        # (swept by the gateway, Gateway._sweep_send_stalls), ...
        self.send_stalls = StallSweeper(config.max_stalled_bytes_per_node // FROM_NODE_BYTES_PER_STREAM)
        # ... and the gateway's writes to its streams that it has not read.
        self._unread_writes = ByNode(lambda: UnreadWrites(config.max_unread_write_bytes_per_node))
        self.closing = False  # the gateway is shutting down: no new sessions

    def read_budget(self, node_name: str) -> ReadBudget:
        """What the gateway may buffer for ``node_name``'s connections (max_buffered_bytes_per_node)."""
        return self._read_budgets.of(node_name)

    def unread_writes(self, node_name: str) -> UnreadWrites:
        """What the gateway's writes to ``node_name``'s streams may hold unread (max_unread_write_bytes_per_node)."""
        return self._unread_writes.of(node_name)

    def get_by_address(self, address: str) -> NodeSession | None:
        return self.by_address.get(address)

    def attach(self, session: NodeSession, stored: ReadyCondition | None = None) -> None:
        """Registers a session; an older session of the same node (a reconnect) is ended.

        ``stored``: the Ready condition the object carries, where this table remembers none (the
        join's NeverConnected, written before any session): a first session still not ready keeps
        its lastTransitionTime."""
        if stored is not None:
            self._conditions.setdefault(session.node_name, stored)
        old = self.by_name.get(session.node_name)
        self.by_name[session.node_name] = session
        self.by_address[session.address] = session
        if old is not None and old.handler_task is not None and not old.closed:
            log.info("node %s reconnected; closing its previous session", session.node_name)
            old.closed = True
            old.end_reason = ("Replaced", "a newer session of this node took over")
            old.handler_task.cancel()
        self.write_status(session, force=True)

    def detach(self, session: NodeSession, reason: str, message: str) -> None:
        session.closed = True
        if self.by_name.get(session.node_name) is not session:
            return  # replaced by a newer session; that one owns the status now
        del self.by_name[session.node_name]
        self._forget_address(session)
        self._write(session, connected=False, reason=reason, message=message)
        # The False condition just written stays: a reconnect that is still not ready keeps its
        # lastTransitionTime ("NotReady since"), as Kubernetes conditions do.

    def write_status(self, session: NodeSession, force: bool = False) -> None:
        """Writes the node's status at once when what it says changed (phase, condition, Ray node,
        GPUs, agent version) or its smoothed RTT moved noticeably (the scheduler places by it);
        heartbeat news alone (lastHeartbeat, RTT drift) at most once per status_write_interval_s.

        As kubelet refreshes an unchanged Node status only every few minutes: the API server's write
        load then grows with the number of volunteers, not with their heartbeat rate.
        """
        if session.closed:
            return  # ended (expired, revoked, replaced): its last word has been written
        now = time.monotonic()
        reason, message = self._connected_reason(session)
        due = now - session.last_status_write >= self.config.status_write_interval_s
        changed = self._key(session, True, reason, message) != session.written_key
        if not (force or changed or due or self._latency_moved(session)):
            return
        # The writer paces each node's writes (StatusWriter): news beyond its budget is merged, not sent.
        self._write(session, connected=True, reason=reason, message=message)

    async def flush(self, timeout_s: float = 10.0) -> bool:
        """Waits until the status writes handed out so far have landed; False on timeout."""
        return await self.writer.flush(timeout_s)

    @staticmethod
    def _connected_reason(session: NodeSession) -> tuple[str, str]:
        if session.ready:
            return "Connected", "control stream up, Ray node running"
        if session.draining_served:
            return "Draining", "agent is draining"
        if session.ray_state == "running":
            if session.ray_node_id and session.ray_node_id == session.ray_lost_id:
                return "RayNodeNotAlive", "Ray node no longer alive in GCS at this address"
            return "RayNodeUnconfirmed", "Ray node not (yet) alive in GCS at this address"
        return "RayNotRunning", f"Ray node {session.ray_state}"

    @staticmethod
    def _key(session: NodeSession, connected: bool, reason: str, message: str) -> tuple[Any, ...]:
        """Everything a status write says except lastHeartbeat and latency."""
        return (connected, reason, message, session.ray_verified_id, tuple(session.gpus), session.agent_version)

    def _latency_moved(self, session: NodeSession) -> bool:
        current, written = session.rtt_smoothed_ms, session.written_rtt_ms
        if current is None:
            return False
        if written is None:
            return True  # the first measurement
        threshold = max(self.config.latency_write_min_ms, self.config.latency_write_fraction * written)
        return abs(current - written) >= threshold

    def _write(self, session: NodeSession, connected: bool, reason: str, message: str) -> None:
        ready = connected and session.ready
        condition = next_condition(self._conditions.get(session.node_name), ready, reason, message)
        self._conditions[session.node_name] = condition
        phase = "Ready" if ready else ("Draining" if session.draining_served and connected else "NotReady")
        status: dict[str, Any] = {
            "phase": phase,
            "connected": connected,
            "lastHeartbeat": session.last_heartbeat_at,
            "address": session.address,
            # Only the Ray node the agent runs now: not one it reported before a restart or stop.
            "rayNodeId": (session.ray_verified_id if session.ray_node_id == session.ray_verified_id else "") or None,
            "gpus": gpus_to_status(session.gpus),
            "agentVersion": session.agent_version,
            "conditions": [condition.as_dict()],
        }
        if session.rtt_smoothed_ms is not None and session.rtt_last_ms is not None:
            status["latency"] = {
                "smoothedMs": round(session.rtt_smoothed_ms, 3),
                "lastMs": round(session.rtt_last_ms, 3),
                "updatedAt": session.rtt_updated_at,
            }
        # Counted as written when handed over: the writer retries it (merged under anything newer)
        # until it lands, so heartbeats need not hand it over again.
        self.writer.submit(session.node_name, status, uid=session.uid)
        session.last_status_write = time.monotonic()
        session.written_key = self._key(session, connected, reason, message)
        session.written_rtt_ms = session.rtt_smoothed_ms

    def disown_stale_connections(self, nodes: list[dict[str, Any]]) -> list[str]:
        """Marks nodes NotReady that a previous gateway left as connected; returns their names.

        A gateway that crashed (SIGKILL, OOM, node loss) wrote no "disconnected" status, so its
        nodes would stay Ready until they reconnect, and a node that never comes back would stay
        Ready for good. One gateway replica owns all sessions (Recreate), so at start-up no node
        is connected to this one yet: each becomes Ready again when its agent re-registers.
        Only the gateway's own nodes: one whose Ray worker joined Ray directly has its connection
        fields written by the operator, and no gateway session ever held it.
        """
        disowned: list[str] = []
        for node in nodes:
            name = str((node.get("metadata") or {}).get("name", ""))
            status = node.get("status") or {}
            stored = stored_ready_condition(status)
            if name and name not in self.by_name and stored is not None:
                # What the previous gateway wrote: a node still not ready when its agent comes
                # back keeps the time it went NotReady.
                self._conditions.setdefault(name, stored)
            if (
                not name
                or name in self.by_name
                or not connection_owned_by_gateway(node)
                or not (status.get("connected") or status.get("phase") == "Ready")
            ):
                continue
            condition = next_condition(
                stored, False, "GatewayRestarted", "gateway restarted; waiting for the agent to reconnect"
            )
            self._conditions[name] = condition
            patch = {"phase": "NotReady", "connected": False, "conditions": [condition.as_dict()]}
            # A reconnect's Ready, handed over later, lands after it. Only into the object read: one
            # deleted and created again under the name since is not the one found Ready.
            self.writer.submit(name, patch, uid=node_uid(node))
            disowned.append(name)
        if disowned:
            log.info("marking %d node(s) NotReady until they reconnect: %s", len(disowned), ", ".join(disowned))
        return disowned

    def was_revoked(self, node_name: str) -> bool:
        return node_name in self._revoked

    def revoke(self, node_name: str, replaced: bool = False) -> bool:
        """Ends the session of a node whose VolunteerNode is being deleted; True if it had one.

        The object may outlive this for a while (a finalizer holds it): its status then says
        NotReady, not the Ready of the session just ended. A write queued earlier is merged into
        that last one; once the object is gone the writer stops by itself. ``replaced``: the object
        is gone and another has its name already; nothing more is written for the gone one.
        """
        self._revoked[node_name] = None
        while len(self._revoked) > MAX_REMEMBERED_REVOCATIONS:
            self._revoked.popitem(last=False)
        for stream in self.streams.tasks(node_name):
            stream.cancel()  # its proxied connections end with it
        session = self.by_name.pop(node_name, None)
        previous = self._conditions.pop(node_name, None)
        if replaced:
            # What is queued or under way was for the gone object: the API refuses it (uid), and
            # the writer need not keep trying.
            self.writer.forget(node_name)
        elif session is not None or self.writer.busy(node_name):
            condition = next_condition(previous, False, "Deleted", "VolunteerNode deleted; credential revoked")
            self.writer.submit(
                node_name,
                {"phase": "NotReady", "connected": False, "conditions": [condition.as_dict()]},
                # The object the session (or the writes under way) belonged to, not one created
                # again under its name since.
                uid=session.uid if session is not None else self.writer.uid_of(node_name),
            )
        if session is None:
            return False
        session.closed = True
        self._forget_address(session)
        if session.handler_task is not None:
            session.handler_task.cancel()
        log.warning("node %s: VolunteerNode deleted; session ended, credential revoked", node_name)
        return True

    def _forget_address(self, session: NodeSession) -> None:
        # Only this session's own entry: the address may route to another node's session by now.
        if self.by_address.get(session.address) is session:
            del self.by_address[session.address]

    def expire_stale(self) -> list[str]:
        """Ends sessions whose heartbeats stopped; returns their names. Their NotReady writes go
        out together, so one slow write does not hold up the others' timeouts."""
        deadline = time.monotonic() - self.config.heartbeat_timeout_s
        stale = [s for s in self.by_name.values() if s.last_seen < deadline]
        for session in stale:
            log.warning("node %s: no heartbeat for %.1fs", session.node_name, self.config.heartbeat_timeout_s)
            session.end_reason = ("HeartbeatTimeout", "no heartbeat within the timeout")
            if session.handler_task is not None:
                session.handler_task.cancel()
            self.detach(session, "HeartbeatTimeout", "no heartbeat within the timeout")
        return [s.node_name for s in stale]

    async def close_all(self, flush_timeout_s: float = 10.0) -> None:
        """Ends every session and waits (bounded) for their NotReady writes. From here on no new
        session is taken (Control answers UNAVAILABLE): an agent reconnecting during the flush
        would otherwise be marked connected to a gateway that is about to go."""
        self.closing = True
        for session in list(self.by_name.values()):
            if session.handler_task is not None:
                session.handler_task.cancel()
            self.detach(session, "GatewayStopped", "gateway shut down")
        await self.writer.close(flush_timeout_s)
