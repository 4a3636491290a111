"""Gateway configuration (CLI flags and KOINON_GATEWAY_* environment variables map onto this)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    # A Connect stream must send its first frame within this time.
    first_frame_timeout_s: float = 10.0
    # A peer must answer OpenConnection within this time.
    accept_timeout_s: float = 10.0
    # Connect streams (proxied connections) one node may hold open at once, counting both the ones
    # it dialled and the ones it accepted. Each can buffer several MiB when its reader stalls, so
    # this bounds what one volunteer can make the gateway hold.
    max_streams_per_node: int = 256
    rtt_smoothing_alpha: float = 0.2
    # Agents that heartbeat by themselves (Register.self_heartbeats) get a Ping, the RTT probe, every
    # this many heartbeat intervals; others get one every interval.
    rtt_probe_every: int = 3
    # Node credentials expire after this long; connected agents get a renewed one once half of it
    # has passed, so only a node offline for longer than this must join again.
    credential_lifetime_s: float = 7 * 24 * 3600.0
    # Ready requires the reported Ray node to be ALIVE in GCS at the node's address (off only in
    # tunnel-level tests that run no Ray head).
    verify_ray_nodes: bool = True
    namespace: str = "koinon-system"
    # Token Secrets (kube store) that expired more than token_cleanup_grace_s ago are deleted every
    # token_cleanup_interval_s.
    token_cleanup_interval_s: float = 600.0
    token_cleanup_grace_s: float = 3600.0

    def validate(self) -> None:
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_timeout_s: must be greater than heartbeat_interval_s")
        if self.credential_lifetime_s < 4 * self.heartbeat_interval_s:
            raise ValueError("credential_lifetime_s: must be at least 4 heartbeat intervals (renewals ride on pings)")
        if self.rtt_probe_every < 1:
            raise ValueError("rtt_probe_every: must be at least 1")
        if self.max_streams_per_node < 1:
            raise ValueError("max_streams_per_node: must be at least 1")
        if not 0 < self.rtt_smoothing_alpha <= 1:
            raise ValueError("rtt_smoothing_alpha: must be in (0, 1]")
        for low, high in self.head_port_ranges:
            if not 0 < low <= high < 65536:
                raise ValueError(f"head_port_ranges: bad range {low}-{high}")

    def head_port_allowed(self, port: int) -> bool:
        if port == self.head_gcs_port or port in self.head_ports:
            return True
        return any(low <= port <= high for low, high in self.head_port_ranges)
