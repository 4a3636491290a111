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


def open_channel(config: AgentConfig) -> grpc.aio.Channel:
    options: list[tuple[str, Any]] = list(GRPC_OPTIONS)
    if config.insecure:
        return grpc.aio.insecure_channel(config.gateway, options=options)
    root = configured_ca(config) or None
    options.append(("grpc.ssl_target_name_override", server_name(config)))
    return grpc.aio.secure_channel(
        config.gateway, grpc.ssl_channel_credentials(root_certificates=root), options=options
    )
