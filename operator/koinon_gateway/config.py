"""Gateway configuration (CLI flags and KOINON_GATEWAY_* environment variables map onto this)."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from .addresses import FIRST_WORKER, LOOPBACK_NETWORK, LOOPBACK_OWN_SERVICES, MAX_WORKER_PORTS
from .tcp_pipe import SMALL_BUFFER_BYTES
from .tunnel_io import MAX_MESSAGE_BYTES, RECEIVE_WINDOW_BYTES

# Bind hosts that accept connections to any local address, the head's included.
WILDCARD_HOSTS = frozenset({"", "*"})
# The allocator hands out host addresses only (not a network's first and last): a /30 has two.
MAX_VIP_PREFIX = 30


def _bind_host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a "host:port" listen address; None for "unix:..." or what does not parse
    (the server reports a malformed address when it binds)."""
    if address.startswith("unix:"):
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address a listener or dialer ends up using: an IPv4-mapped IPv6 address (which gRPC
    binds as the IPv4 one) counts as that IPv4 address. Raises ValueError for a host name."""
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _answers_everywhere(host: str) -> bool:
    """Whether a listener bound to ``host`` accepts connections to every local address: "", "*",
    and every spelling of an unspecified address ("0.0.0.0", "::", "::0", "::ffff:0.0.0.0"...)."""
    if host in WILDCARD_HOSTS:
        return True
    try:
        return _ip(host).is_unspecified
    except ValueError:
        return False


def _same_address(a: str, b: str) -> bool:
    try:
        return _ip(a) == _ip(b)
    except ValueError:
        return a == b


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


_POSITIVE_SECONDS = (
    "heartbeat_interval_s",
    "heartbeat_timeout_s",
    "status_write_interval_s",
    "status_retry_s",
    "status_write_window_s",
    "first_frame_timeout_s",
    "accept_timeout_s",
    "credential_lifetime_s",
    "token_cleanup_interval_s",
    "token_cleanup_grace_s",
    "unconnected_node_ttl_s",
    "unconnected_node_sweep_s",
    "ray_recheck_interval_s",
)
MAX_CREDENTIAL_LIFETIME_S = 366 * 24 * 3600.0
# Agents get the heartbeat timings in milliseconds, as proto uint32 fields (pb.Assignment): each
# must fit, and be at least 1 (0 reads as "not set" to an agent, which then uses its default).
MAX_UINT32 = 2**32 - 1


def milliseconds(seconds: float) -> int:
    """``seconds`` as an Assignment's *_ms field says it (TunnelService.assignment)."""
    return int(seconds * 1000)


# The memory limit of the gateway's container as shipped (manifests/gateway/deployment.yaml) and
# the share of it one volunteer's stalled connections may take at most (see
# max_buffered_bytes_per_node): the rest is the gateway's own (123 MB idle, 250-400 MB after
# carrying many GiB of Ray objects, README "Memory of the data path") and every other node's.
SHIPPED_MEMORY_LIMIT_BYTES = 1 << 30
ONE_NODE_MEMORY_SHARE = 1 / 3
# Bytes a pipe may hold past its node's budget: the two small buffers (64 KiB each) it holds once a
# full-size one no longer fits, the one it reads into and the one its consumer still has a view of.
PAST_BUDGET_BYTES_PER_STREAM = 2 * SMALL_BUFFER_BYTES
MIN_BUFFERED_BYTES_PER_NODE = 1 << 20  # one full-size receive buffer (tunnel_io.CHUNK_BYTES)
# What the gateway may hold for one direction of a connection whose data it reads from a node's
# Connect stream while the other end (a peer node, or the head) does not take it: grpc's receive
# window of that stream (fixed, tunnel_io.RECEIVE_WINDOW_BYTES) and the one message the splice is
# forwarding, held about four times while its write waits (the received message, the frame
# serialized from it, grpc's copy of that, allocator slack). Measured with a 64 KiB window: 3.7-3.9
# MiB a stream (test_node_buffer_budget.py's peer that never reads). How many of a node's
# connections may hold that at once: GatewayConfig.max_stalled_bytes_per_node (send_stalls.py).
FROM_NODE_BYTES_PER_STREAM = RECEIVE_WINDOW_BYTES + 4 * MAX_MESSAGE_BYTES
# What the gateway holds for each byte of its writes to a node that the node has not read
# (unread_writes.py): the message as grpc holds it, and the bytes it was made from, as above.
# Measured 3.6 MiB for each 1 MiB message left in grpc (test_node_buffer_budget.py, 28 such).
UNREAD_WRITE_HOLD_FACTOR = 4


def one_node_buffered_bound(
    max_streams_per_node: int, max_head_connections_per_node: int, max_buffered_bytes_per_node: int
) -> int:
    """The most memory one node's connections can make the gateway hold for data sent to the node
    that it does not read: the receive buffers of its pipes (the budget, plus two small buffers per
    connection past it: the ones it dials, and the ones the head opens to it through the head
    proxy), and as much again in grpc, which holds at most one message a stream, a copy of a view of
    one of those buffers (the one tunnel_io.tcp_to_channel is writing while the node does not
    read)."""
    connections = max_streams_per_node + max_head_connections_per_node
    return 2 * (max_buffered_bytes_per_node + connections * PAST_BUDGET_BYTES_PER_STREAM)


def one_node_memory_bound(
    max_streams_per_node: int,
    max_head_connections_per_node: int,
    max_buffered_bytes_per_node: int,
    max_unread_write_bytes_per_node: int,
    max_stalled_bytes_per_node: int,
) -> int:
    """The most memory one node's connections can make the gateway hold, in both directions: what is
    sent to it and it does not read (one_node_buffered_bound, and the writes to it that grpc holds
    until it reads them, ``max_unread_write_bytes_per_node`` times UNREAD_WRITE_HOLD_FACTOR: those
    of connections that ended meanwhile too, which grpc keeps), and what it sends that nobody takes:
    FROM_NODE_BYTES_PER_STREAM for each of its stalled connections, as many as fit in
    ``max_stalled_bytes_per_node`` (send_stalls.py ends the rest), and a receive window
    (RECEIVE_WINDOW_BYTES) on each stream the gateway is not reading at all: a dial whose DialResult
    the node has not read or that waits for a peer to accept, a stream whose connection ended while
    a write to the node was left in grpc (a stalled one whose Close the node does not read among
    them: grpc sends the status after that write, and no one reads the stream meanwhile). Those are
    capped only by the node's streams that dial or count as opening (held ones do), two
    ``max_streams_per_node``, and the accepted ones that become held past that cap: the head's
    connections to it, ``max_head_connections_per_node`` (another node of its volunteer that dials
    it adds its own dialling cap: not in this node's figure). Not in it: what more stalls take in the STALL_AFTER_S +
    SWEEP_INTERVAL_S (1.05 s) before a sweep ends them, at most that long of the node's uplink."""
    buffered = one_node_buffered_bound(max_streams_per_node, max_head_connections_per_node, max_buffered_bytes_per_node)
    unread = max_unread_write_bytes_per_node * UNREAD_WRITE_HOLD_FACTOR
    stalled = max_stalled_bytes_per_node // FROM_NODE_BYTES_PER_STREAM
    not_read = (2 * max_streams_per_node + max_head_connections_per_node) * RECEIVE_WINDOW_BYTES
    return buffered + unread + stalled * FROM_NODE_BYTES_PER_STREAM + not_read


# How old a connected node's lastHeartbeat may get between refreshes: half the 120 s after which
# the operator no longer trusts a Ready status (a heartbeat's news waits up to one interval more).
MAX_STATUS_REFRESH_S = 60.0


@dataclass
class GatewayConfig:
    # Where agents connect: "host:port" or "unix:/path". Port 0 picks a free port.
    listen: str = "0.0.0.0:7443"
    # Head-side HTTP CONNECT proxy for the head's Ray processes (grpc_proxy=http://<this>).
    head_proxy_listen: str = "127.0.0.1:0"
    # Admin HTTP (/healthz, /metrics); volunteers can never dial it (not a Ray port of a cluster address).
    admin_listen: str = "127.0.0.1:0"
    tls: bool = True
    # Extra names/IPs in the server certificate ("koinon-gateway" is always there).
    tls_hostnames: list[str] = field(default_factory=lambda: ["localhost", "127.0.0.1"])
    # Ray head: GCS address and the ports of the head that volunteers may reach.
    head_address: str = "127.0.0.1"
    head_gcs_port: int = 6379
    head_ports: list[int] = field(default_factory=list)
    head_port_ranges: list[tuple[int, int]] = field(default_factory=list)
    ray_auth_token: str = ""
    # Virtual addresses and port blocks of volunteers.
    vip_cidr: str = "127.0.20.0/22"
    port_base: int = 20000
    port_block_size: int = 40
    heartbeat_interval_s: float = 2.0
    heartbeat_timeout_s: float = 8.0
    # Status news from heartbeats alone (lastHeartbeat, small RTT drift) is written at most once per
    # interval; anything else at once (SessionTable.write_status).
    status_write_interval_s: float = 30.0
    # A smoothed RTT that moved by this much since the last write is written at once.
    latency_write_min_ms: float = 1.0
    latency_write_fraction: float = 0.2
    # After a failed status write, the node's next write waits this long (unless forced).
    status_retry_s: float = 5.0
    # API writes of one node's status, whatever asks for them (heartbeat news, new and ended
    # sessions, drains): at most status_write_burst per status_write_window_s; news beyond that
    # waits, merged into the next write (StatusWriter). A write taking the node out of Ready does
    # not wait (NotReady within heartbeat_timeout_s) but counts: at most ~2x burst per window.
    status_write_burst: int = 10
    status_write_window_s: float = 10.0
    # A Connect stream must send its first frame within this time.
    first_frame_timeout_s: float = 10.0
    # A peer must answer OpenConnection within this time.
    accept_timeout_s: float = 10.0
    # Connect streams one node may hold open at once, counted separately for the ones it dials
    # (its proxied connections) and the ones not past their first frame yet; the ones that accept a
    # pending connection count against neither once they claim it, as the dialler paid for them
    # (an Accept that claims nothing is refused while still counted: stream_slots.py). Together with
    # max_head_connections_per_node and max_buffered_bytes_per_node, this bounds what one volunteer
    # can make the gateway hold.
    max_streams_per_node: int = 256
    # Connections the head may hold open (or be opening) to one node at once through the head
    # proxy; more CONNECTs are answered 503 and counted (refused_dials "too-many-head-connections").
    # Each holds a pipe against the node's budget like one the node dials, and anything on the head
    # may open them (a volunteer's task pinned there included): without a cap, thousands to one
    # node that never reads held past the 1Gi limit. Ray's own head opens about one per port of the
    # node it talks to (raylet, object manager, dashboard agent, metrics, workers of actors GCS made
    # there): 5 in test_ray_netns.py, and a default block of 40 has 36 ports the head may reach.
    # koinon_gateway_head_connections_peak shows what nodes use; raising this raises the bound below.
    max_head_connections_per_node: int = 64
    # Receive buffers the gateway may hold for one node's TCP connections together (head-side
    # sockets of its dials and the head's connections to it, tcp_pipe.ReadBudget): data read from
    # the head that the node is not reading from its Connect streams. A connection alone stops at
    # 4 MiB unread (tcp_pipe.PAUSE_READING_BYTES, ~6 MiB of buffers), so a few bulk transfers never
    # feel this; once the node's pipes hold it all, each goes on in 64 KiB buffers, one read at a
    # time. Worst case for one node (one_node_memory_bound): the 128 MiB budget, two 64 KiB buffers
    # more past it for each of its connections (at most 256 it dials + 64 the head opens), and
    # grpc's copy of as much: 2 x (128 MiB + 320 x 128 KiB) = 336 MiB, under ONE_NODE_MEMORY_SHARE
    # of the shipped 1Gi limit. Without it 256 stalled streams held 256 x 4-6 MiB, over 1 GiB, and
    # the gateway was OOM-killed with every node's session. This covers data sent to the node only,
    # as do the next limit; what it sends, the one after.
    max_buffered_bytes_per_node: int = 128 << 20
    # Payload bytes of the gateway's writes to one node's streams that the node has not read yet,
    # together (unread_writes.py): more wait before they reach grpc. grpc cannot take back a write
    # whose writer gave up (its connection ended), so without this the node could leave one in grpc
    # on every connection it accepted (each a second node of its volunteer dialled, say), ~3.6 MiB
    # each, for as long as it reads none of them. 16 MiB is 16 whole messages in flight at once;
    # one connection has at most one.
    max_unread_write_bytes_per_node: int = 16 << 20
    # What one node's connections may hold of data it sends that their other end (the head, a peer
    # node) does not take: grpc's receive window and the message being forwarded, up to
    # FROM_NODE_BYTES_PER_STREAM (8.25 MiB) on each connection whose forwarding write has waited
    # send_stalls.STALL_AFTER_S. The connections stalled past it are ended, the longest waiting
    # first (send_stalls.py; refused_streams "send-stalled"). 96 MiB lets 11 stall at once; a bulk
    # transfer to a peer reading a few MiB/s never stalls. Without it a node whose connections
    # all stalled while the gateway forwarded made it hold 320 x 8.25 MiB, 2.6 GiB. What is still
    # not bounded together: a 4 MiB window on each stream the gateway does not read at all (before
    # its splice, or after one that left a write in grpc), up to 2 x 256 + 64 of them: with the
    # defaults one node can make the gateway hold at most 336 + 4 x 16 + 11 x 8.25 + 576 x 4 MiB
    # = 2.7 GiB (one_node_memory_bound), where the old bound said 5.5 GiB; past the 1Gi limit still.
    max_stalled_bytes_per_node: int = 96 << 20
    rtt_smoothing_alpha: float = 0.2
    # Agents that heartbeat by themselves (Register.self_heartbeats) get a Ping, the RTT probe, every
    # this many heartbeat intervals; others get one every interval.
    rtt_probe_every: int = 3
    # Node credentials expire after this long; connected agents get a renewed one once half of it
    # has passed, so only a node offline for longer than this must join again.
    credential_lifetime_s: float = 7 * 24 * 3600.0
    # Ready requires the reported Ray node to be ALIVE in GCS at the node's address (off only in
    # tunnel-level tests and the 1,000-agent benchmark, which run no Ray head: --no-verify-ray-nodes).
    verify_ray_nodes: bool = True
    # ...and to stay ALIVE there: every confirmed Ray node is looked up again this often, in one
    # sweep (one read of GCS's node table for all nodes: cheap at 1,000 nodes), so a Ray node that
    # died while its agent still reports it running does not leave its node Ready.
    ray_recheck_interval_s: float = 5.0
    namespace: str = "koinon-system"
    # Token Secrets (kube store) that expired more than token_cleanup_grace_s ago are deleted every
    # token_cleanup_interval_s.
    token_cleanup_interval_s: float = 600.0
    token_cleanup_grace_s: float = 3600.0
    # A VolunteerNode whose agent never connected this long after its join is deleted (and its
    # virtual address freed), looked for every unconnected_node_sweep_s: 24 h, as Kubernetes keeps
    # a pending CSR (unconnected_nodes.py).
    unconnected_node_ttl_s: float = 24 * 3600.0
    unconnected_node_sweep_s: float = 600.0

    def validate(self) -> None:
        # NaN passes every comparison below unnoticed, and a negative interval only fails later, at
        # each join (after its token use was counted): refuse both here, by name.
        for name in _POSITIVE_SECONDS:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be a finite number of seconds > 0, got {value}")
        if self.credential_lifetime_s > MAX_CREDENTIAL_LIFETIME_S:
            raise ValueError(f"credential_lifetime_s: at most {MAX_CREDENTIAL_LIFETIME_S:.0f} (a year)")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_timeout_s: must be greater than heartbeat_interval_s")
        if self.credential_lifetime_s < 4 * self.heartbeat_interval_s:
            raise ValueError("credential_lifetime_s: must be at least 4 heartbeat intervals (renewals ride on pings)")
        if self.status_write_interval_s + self.heartbeat_interval_s > MAX_STATUS_REFRESH_S:
            # The operator takes a Ready status not refreshed for 120 s as left by a gateway that
            # stopped (reputation_book.SILENT_STATUS_S): a slower refresh would cost healthy nodes
            # their uptime evidence.
            raise ValueError(
                f"status_write_interval_s + heartbeat_interval_s: at most {MAX_STATUS_REFRESH_S:.0f} s, "
                f"got {self.status_write_interval_s + self.heartbeat_interval_s:g}"
            )
        self._validate_assignment_timings()
        if self.status_write_burst < 1:
            raise ValueError(f"status_write_burst: must be at least 1, got {self.status_write_burst}")
        if self.port_block_size - FIRST_WORKER > MAX_WORKER_PORTS:
            # What agents take as a Ray port block (koinon_agent.assignment_check): more is refused.
            most = FIRST_WORKER + MAX_WORKER_PORTS
            raise ValueError(f"port_block_size: at most {most}, got {self.port_block_size}")
        if self.max_streams_per_node < 1:
            raise ValueError("max_streams_per_node: must be at least 1")
        if self.max_head_connections_per_node < 1:
            raise ValueError("max_head_connections_per_node: must be at least 1")
        for name, minimum, why in (
            ("max_buffered_bytes_per_node", MIN_BUFFERED_BYTES_PER_NODE, "one receive buffer"),
            ("max_unread_write_bytes_per_node", 1, "a byte"),
            ("max_stalled_bytes_per_node", FROM_NODE_BYTES_PER_STREAM, "one stalled connection"),
        ):
            if getattr(self, name) < minimum:
                raise ValueError(f"{name}: at least {minimum} ({why}), got {getattr(self, name)}")
        if not 0 < self.rtt_smoothing_alpha <= 1:
            raise ValueError("rtt_smoothing_alpha: must be in (0, 1]")
        if not 0 < self.head_gcs_port < 65536:
            raise ValueError(f"head_gcs_port: must be a port within 1-65535, got {self.head_gcs_port}")
        for port in self.head_ports:
            if not 0 < port < 65536:
                raise ValueError(f"head_ports: {port} is not a port within 1-65535")
        for low, high in self.head_port_ranges:
            if not 0 < low <= high < 65536:
                raise ValueError(f"head_port_ranges: bad range {low}-{high}")
        self._validate_own_ports_not_head_ports()
        self._validate_vip_cidr()

    def _validate_assignment_timings(self) -> None:
        """Each timing an Assignment carries fits its uint32 milliseconds field and is not 0:
        a value past it failed every Join (after its node was made), one under 1 ms reached the
        agent as "use your default"."""
        if self.rtt_probe_every < 1:
            raise ValueError("rtt_probe_every: must be at least 1")
        for name, seconds in (
            ("heartbeat_interval_s", self.heartbeat_interval_s),
            ("heartbeat_timeout_s", self.heartbeat_timeout_s),
            ("heartbeat_interval_s * rtt_probe_every", self.heartbeat_interval_s * self.rtt_probe_every),
        ):
            if not 1 <= milliseconds(seconds) <= MAX_UINT32:
                raise ValueError(
                    f"{name}: must be within 0.001-{MAX_UINT32 / 1000:.3f} s (agents get it in whole "
                    f"milliseconds, a uint32 field), got {seconds:g}"
                )

    def _head_field_allowing(self, port: int) -> str:
        """The start of an error message naming the head setting that opens ``port`` at head_address."""
        if port == self.head_gcs_port:
            return f"head_gcs_port: {port} is"
        if port in self.head_ports:
            return f"head_ports: {port} is"
        low, high = next((low, high) for low, high in self.head_port_ranges if low <= port <= high)
        return f"head_port_ranges: {low}-{high} includes {port},"

    def _validate_own_ports_not_head_ports(self, bound_ports: Mapping[str, int] | None = None) -> None:
        """Volunteers may dial head_address at the head's Ray ports; the gateway's own listeners
        must not answer there. A listener answers at head_address when it binds to a wildcard
        address, to head_address itself, or to a host name (which may resolve to it; a head_address
        given as a name is compared as text). Port 0 (a free port) is known only once bound:
        ``bound_ports`` (by setting name) gives it, from Gateway.start (validate_bound_ports)."""
        for name, address in (
            ("listen", self.listen),
            ("admin_listen", self.admin_listen),
            ("head_proxy_listen", self.head_proxy_listen),
        ):
            bound = _bind_host_port(address)
            if bound is None:
                continue
            host, port = bound
            chosen = ""
            if port == 0 and bound_ports is not None:
                port = bound_ports.get(name, 0)
                chosen = f", given port {port} when bound"
            if port == 0 or not self.head_port_allowed(port):
                continue
            if _answers_everywhere(host) or _same_address(host, self.head_address) or not _is_ip(host):
                raise ValueError(
                    f"{self._head_field_allowing(port)} the port of {name} ({address}{chosen}), which also "
                    f"answers at head_address {self.head_address}: volunteers could reach the gateway's "
                    f"own port through the tunnel; keep the head's Ray ports clear of the gateway's ports"
                    + (f" (give {name} a fixed port outside them)" if chosen else "")
                )

    def validate_bound_ports(self, bound_ports: Mapping[str, int]) -> None:
        """The check of validate() for the listeners bound to port 0, with the ports they got
        (``{"listen": ..., "admin_listen": ..., "head_proxy_listen": ...}``): a free port the
        system picks may well lie within head_port_ranges. ValueError if one does."""
        self._validate_own_ports_not_head_ports(bound_ports)

    def _validate_vip_cidr(self) -> None:
        try:
            network = ipaddress.IPv4Network(self.vip_cidr)
        except ValueError as exc:
            raise ValueError(f"vip_cidr: {exc}") from exc
        if not network.subnet_of(LOOPBACK_NETWORK) or LOOPBACK_OWN_SERVICES in network:
            # Agents refuse any other address (koinon_agent.assignment_check): a node binds its Ray
            # node to it on its own loopback, and 127.0.0.1 is where its own services listen.
            raise ValueError(
                f"vip_cidr: {self.vip_cidr} must lie within 127.0.0.0/8 and leave out 127.0.0.1 (volunteers "
                f"bind their virtual address on their own loopback, where 127.0.0.1 is their own services')"
            )
        if network.prefixlen > MAX_VIP_PREFIX:
            raise ValueError(
                f"vip_cidr: {self.vip_cidr} holds no address to hand out (its first and last are the "
                f"network's own); use a /{MAX_VIP_PREFIX} or larger"
            )
        try:
            head = ipaddress.ip_address(self.head_address)
        except ValueError:
            return  # a host name: not an address the allocator could hand out
        if head in network:
            raise ValueError(
                f"vip_cidr: {self.vip_cidr} contains head_address {self.head_address}; volunteers' "
                f"virtual addresses are drawn from it, so a node could be given the head's address"
            )

    def head_port_allowed(self, port: int) -> bool:
        if port == self.head_gcs_port or port in self.head_ports:
            return True
        return any(low <= port <= high for low, high in self.head_port_ranges)
