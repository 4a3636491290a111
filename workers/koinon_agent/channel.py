"""gRPC channel to the gateway: TLS by default, TCP or unix socket."""

from __future__ import annotations

from typing import Any

import grpc
from koinon_gateway.pki import DEFAULT_SERVER_NAME
from koinon_gateway.tunnel_io import GRPC_OPTIONS

from .config import AgentConfig


def server_name(config: AgentConfig) -> str:
    if config.tls_server_name:
        return config.tls_server_name
    if config.gateway.startswith("unix:"):
        return DEFAULT_SERVER_NAME
    return config.gateway.rpartition(":")[0].strip("[]")


def configured_ca(config: AgentConfig) -> bytes:
    """The CA to trust: --ca-file (or KOINON_CA_FILE) before KOINON_CA_CERT, so a PEM left in the
    environment cannot override the file a volunteer names; empty when neither is set."""
    return config.ca_file.read_bytes() if config.ca_file else config.ca_pem


# gRPC core draws each reconnect delay from [0.8, 1.2] times its current backoff (x1.6 per failed
# attempt, a fixed multiplier; see grpc's doc/connection-backoff.md). With the backoff at 0.75 times
# the agent's ceiling, its delays fall within [0.6, 0.9] of that ceiling: inside the upper half that
# BackoffIterator draws from, and with the same mean (0.75).
RECONNECT_BACKOFF_SHARE = 0.75
# Channel arguments are C ints: milliseconds past this do not fit (a backoff of ~24 days).
MAX_GRPC_MS = 2**31 - 1


def reconnect_backoff_options(config: AgentConfig) -> list[tuple[str, int]]:
    """gRPC's own reconnect backoff for the agent's channels, from the agent's backoff settings.

    The agent keeps its channels across outages, and a channel waiting out its reconnect backoff
    fails every call at once (UNAVAILABLE) without dialling: whatever the agent's retries do, the
    gateway is dialled again only on the channel's schedule. gRPC's default (1 s, x1.6, up to
    120 s) kept volunteers away up to ~2 min after their gateway was back. With these, a channel
    never waits longer than the agent's ceiling (backoff_max_s) to redial, and agents that lost
    the gateway together, once at that ceiling, redial it no more often than their own schedule
    would (gRPC clamps a backoff to at least 100 ms). The agent is then back at most one redial
    delay plus one of its own delays after the gateway.

    grpc.min_reconnect_backoff_ms is left alone: despite its name it is the least time one
    connection attempt is given to complete (default 20 s), which a slow link needs."""

    def ms(seconds: float) -> int:
        return min(MAX_GRPC_MS, max(1, round(seconds * RECONNECT_BACKOFF_SHARE * 1000)))

    return [
        ("grpc.initial_reconnect_backoff_ms", ms(config.backoff_initial_s)),
        ("grpc.max_reconnect_backoff_ms", ms(config.backoff_max_s)),
    ]


def open_channel(config: AgentConfig) -> grpc.aio.Channel:
    options: list[tuple[str, Any]] = [*GRPC_OPTIONS, *reconnect_backoff_options(config)]
    if config.insecure:
        return grpc.aio.insecure_channel(config.gateway, options=options)
    root = configured_ca(config) or None
    options.append(("grpc.ssl_target_name_override", server_name(config)))
    return grpc.aio.secure_channel(
        config.gateway, grpc.ssl_channel_credentials(root_certificates=root), options=options
    )
