"""Typed access to the generated gRPC code of the tunnel protocol.

The generated ``tunnel_pb2_grpc`` module is untyped and grpc-stubs lacks parts of grpc.aio (EOF),
so this is the one place that crosses that boundary; everything else stays strictly typed.
"""

from __future__ import annotations

import importlib
from typing import Any

import grpc

_generated: Any = importlib.import_module("koinon_proto.tunnel.v1.tunnel_pb2_grpc")

# Sentinel grpc.aio returns from read() at the end of a stream.
EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009 - missing from grpc-stubs
SERVICE = "koinon.tunnel.v1.Tunnel"
Context = grpc.aio.ServicerContext[Any, Any]


def tunnel_stub(channel: grpc.aio.Channel) -> Any:
    return _generated.TunnelStub(channel)


def add_tunnel_service(servicer: object, server: grpc.aio.Server) -> None:
    _generated.add_TunnelServicer_to_server(servicer, server)
