"""Typed access to the generated gRPC code of the tunnel protocol.

The generated ``tunnel_pb2_grpc`` module is untyped and grpc-stubs lacks parts of grpc.aio (EOF),
so this is the one place that crosses that boundary; everything else stays strictly typed.

The Connect method is registered here with the codec of ``frame_codec`` instead of the generated
protobuf (de)serializers: the wire format is the same, Data payloads just skip the copies.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .frame_codec import decode_frame, encode_frame

_generated: Any = importlib.import_module("koinon_proto.tunnel.v1.tunnel_pb2_grpc")

# Sentinel grpc.aio returns from read() at the end of a stream.
EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009 - missing from grpc-stubs
SERVICE = "koinon.tunnel.v1.Tunnel"
CONNECT_METHOD = f"/{SERVICE}/Connect"
Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True)
class MalformedMessage:
    """What the server's deserializer hands a handler for bytes that are not the message: the
    handler counts and refuses it. Raised from the deserializer, the DecodeError ended the call
    with UNKNOWN, uncounted, and an ERROR traceback in the log for each (no credential needed)."""

    error: str


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as error:
            return MalformedMessage(str(error)[:200])

    return deserialize


def tunnel_stub(channel: grpc.aio.Channel) -> Any:
    stub = _generated.TunnelStub(channel)
    stub.Connect = channel.stream_stream(
        CONNECT_METHOD,
        request_serializer=encode_frame,
        response_deserializer=decode_frame,
        _registered_method=True,  # type: ignore[call-arg]  # not in grpc-stubs
    )
    return stub


def add_tunnel_service(servicer: Any, server: grpc.aio.Server) -> None:
    """Like the generated ``add_TunnelServicer_to_server``, with the Connect frame codec."""
    handlers = {
        "Join": grpc.unary_unary_rpc_method_handler(
            servicer.Join,
            request_deserializer=_lenient(pb.JoinRequest.FromString),
            response_serializer=pb.JoinResponse.SerializeToString,
        ),
        "Control": grpc.stream_stream_rpc_method_handler(
            servicer.Control,
            request_deserializer=_lenient(pb.AgentMessage.FromString),
            response_serializer=pb.GatewayMessage.SerializeToString,
        ),
        "Connect": grpc.stream_stream_rpc_method_handler(
            servicer.Connect,
            request_deserializer=decode_frame,
            response_serializer=encode_frame,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    getattr(server, "add_registered_method_handlers")(SERVICE, handlers)  # noqa: B009 - not in grpc-stubs
