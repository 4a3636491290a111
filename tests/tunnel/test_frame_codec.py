"""The Connect frame codec: byte-identical to protobuf, interoperable with plain tunnel_pb2 peers."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from koinon_gateway.frame_codec import FrameDecodeError, decode_frame, encode_data, encode_frame
from koinon_gateway.rpc import EOF, tunnel_stub
from koinon_gateway.tunnel_io import CHUNK_BYTES, GrpcFrameChannel, ProtocolViolation
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import cluster, proxy_authorization

other_frames = st.one_of(
    st.builds(lambda h, p: pb.Frame(dial=pb.Dial(host=h, port=p)), st.text(max_size=30), st.integers(0, 2**32 - 1)),
    st.builds(lambda i: pb.Frame(accept=pb.Accept(connection_id=i)), st.integers(0, 2**64 - 1)),
    st.builds(
        lambda ok, r, m: pb.Frame(dial_result=pb.DialResult(ok=ok, reason=r, message=m)),
        st.booleans(),
        st.text(max_size=10),
        st.text(max_size=10),
    ),
    st.just(pb.Frame(close_write=pb.CloseWrite())),
    st.builds(lambda r: pb.Frame(close=pb.Close(reason=r)), st.text(max_size=10)),
    st.just(pb.Frame()),
)
# Sizes around the varint boundaries (1, 2 and 3 length bytes) as well as small ones.
payloads = st.one_of(
    st.binary(max_size=300),
    st.integers(16_370, 16_400).map(lambda n: os.urandom(n)),
    st.sampled_from([127, 128, 129, 16_383, 16_384, 2**21 - 1, 2**21]).map(lambda n: os.urandom(n)),
)
data_frames = payloads.map(lambda p: pb.Frame(data=pb.Data(payload=p)))


def as_expected(frame: pb.Frame) -> pb.Frame | bytes:
    """What decode_frame must return for a message protobuf parses as ``frame``."""
    return frame.data.payload if frame.WhichOneof("msg") == "data" else frame


def decoded(buf: bytes) -> pb.Frame | bytes:
    result = decode_frame(buf)
    return bytes(result) if isinstance(result, memoryview) else result


@settings(max_examples=200, deadline=None)
@given(payloads)
def test_data_frames_are_byte_identical_to_protobuf(payload: bytes) -> None:
    reference = pb.Frame(data=pb.Data(payload=payload)).SerializeToString()
    assert encode_data(payload) == reference
    assert encode_frame(memoryview(payload)) == reference
    assert encode_frame(bytearray(payload)) == reference
    assert pb.Frame.FromString(encode_data(payload)).data.payload == payload
    assert decoded(reference) == payload


@settings(max_examples=200, deadline=None)
@given(other_frames)
def test_other_frames_go_through_protobuf(frame: pb.Frame) -> None:
    assert encode_frame(frame) == frame.SerializeToString()
    assert decode_frame(frame.SerializeToString()) == frame


def test_decoded_payload_is_a_view_of_the_message() -> None:
    message = encode_data(os.urandom(CHUNK_BYTES))
    view = decode_frame(message)
    assert isinstance(view, memoryview) and view.obj is message
    assert len(view) == CHUNK_BYTES and view == message[-CHUNK_BYTES:]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(other_frames, data_frames), min_size=1, max_size=4))
def test_non_canonical_messages_decode_like_protobuf(frames: list[pb.Frame]) -> None:
    # Concatenated messages merge (last oneof case wins, repeated Data fields merge): whatever
    # protobuf makes of them, the codec must make the same.
    buf = b"".join(f.SerializeToString() for f in frames)
    assert decoded(buf) == as_expected(pb.Frame.FromString(buf))


@pytest.mark.parametrize(
    "buf",
    [
        b"\x22\x05\x0a\x03abc\x38\x01",  # Data frame followed by an unknown varint field 7
        b"\x22\x07\x0a\x03abc\x10\x01",  # Data with an unknown field 2 after the payload
        b"\x22\x07\x10\x01\x0a\x03abc",  # ... and before it
        b"\x22\x85\x00\x0a\x03abc",  # over-long (non-minimal) length varint
        b"\x22\x00",  # empty Data
        b"\x22\x02\x0a\x00",  # empty payload written out
        b"",  # no field at all
    ],
)
def test_unusual_but_valid_encodings(buf: bytes) -> None:
    assert decoded(buf) == as_expected(pb.Frame.FromString(buf))


def _near_data_frame(payload: bytes, keep: int, junk: bytes) -> bytes:
    """A Data frame cut short at ``keep`` bytes (when shorter) with ``junk`` after it."""
    whole = pb.Frame(data=pb.Data(payload=payload)).SerializeToString()
    return whole[:keep] + junk


# Random bytes alone almost never look like a Data frame, so the hand-written fast path would
# only ever decline them: half the inputs are Data frames, whole or cut short, with bytes after.
near_data_frames = st.builds(_near_data_frame, st.binary(max_size=40), st.integers(0, 48), st.binary(max_size=6))


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=64), near_data_frames))
def test_arbitrary_bytes_fail_exactly_where_protobuf_fails(buf: bytes) -> None:
    try:
        expected = as_expected(pb.Frame.FromString(buf))
    except Exception:
        with pytest.raises(FrameDecodeError):
            decode_frame(buf)
    else:
        assert decoded(buf) == expected


@pytest.mark.parametrize(
    "buf",
    [
        b"\x22\x05\x0a\x03ab",  # truncated payload
        b"\x22\x85",  # truncated length
        b"\x22\x04\x0a\x05abc",  # inner length past the end
        b"\xff\xff\xff\xff\x0f",  # not a Frame at all
    ],
)
def test_malformed_messages_raise(buf: bytes) -> None:
    with pytest.raises(FrameDecodeError, match="malformed Connect frame"):
        decode_frame(buf)


async def test_plain_protobuf_peer_interoperates_with_the_gateway(tmp_path: Path) -> None:
    """An agent built on the generated tunnel_pb2 serializers still works against this gateway."""
    async with cluster(tmp_path) as c:
        agent = await c.start_agent("alpha")
        assert agent.identity is not None
        channel = grpc.aio.secure_channel(
            c.gateway.agent_target,
            grpc.ssl_channel_credentials(c.gateway.ca_pem),
            options=[("grpc.ssl_target_name_override", "koinon-gateway")],
        )
        try:
            connect = channel.stream_stream(
                "/koinon.tunnel.v1.Tunnel/Connect",
                request_serializer=pb.Frame.SerializeToString,
                response_deserializer=pb.Frame.FromString,
            )
            call = connect(metadata=(("authorization", f"Bearer {agent.identity.credential}"),))  # type: ignore[call-arg]

            async def read() -> pb.Frame:
                message = await asyncio.wait_for(call.read(), 10)
                assert isinstance(message, pb.Frame)
                return message

            await call.write(pb.Frame(dial=pb.Dial(host="127.0.0.1", port=c.head_port)))
            assert (await read()).dial_result.ok
            payload = os.urandom(200_000)
            await call.write(pb.Frame(data=pb.Data(payload=payload)))
            echoed = b""
            while len(echoed) < len(payload):
                frame = await read()
                assert frame.WhichOneof("msg") == "data"
                echoed += frame.data.payload
            assert echoed == payload
            await call.write(pb.Frame(close_write=pb.CloseWrite()))
            assert (await read()).WhichOneof("msg") == "close_write"
            call.cancel()
        finally:
            await channel.close(None)


async def test_malformed_frame_received_ends_only_that_stream() -> None:
    """A client reading a frame it cannot decode gets ProtocolViolation; other streams carry on."""

    async def handler(request_iterator: object, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        first = await context.read()  # raw bytes: this test server has no deserializer
        await context.write(b"\x22\x05\x0a\x03ab" if first == encode_data(b"bad") else encode_data(b"ok"))

    server = grpc.aio.server()
    connect = grpc.stream_stream_rpc_method_handler(handler)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("koinon.tunnel.v1.Tunnel", {"Connect": connect}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = tunnel_stub(channel)
        bad = GrpcFrameChannel(stub.Connect())
        await bad.write_frame(b"bad")
        with pytest.raises(ProtocolViolation, match="malformed"):
            await asyncio.wait_for(bad.read_frame(), 10)
        good = GrpcFrameChannel(stub.Connect())
        await good.write_frame(b"good")
        reply = await asyncio.wait_for(good.read_frame(), 10)
        assert isinstance(reply, memoryview) and bytes(reply) == b"ok"
    finally:
        await channel.close(None)
        await server.stop(0)


async def test_pipelined_bytes_after_connect_reach_the_target(tmp_path: Path) -> None:
    """Bytes that arrive together with the CONNECT request are spliced, not lost."""
    async with cluster(tmp_path) as c:
        agent = await c.start_agent("alpha")
        assert agent._proxy is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", agent._proxy.port)
        request = f"CONNECT 127.0.0.1:{c.head_port} HTTP/1.1\r\n{proxy_authorization(agent._proxy)}\r\n".encode()
        writer.write(request + b"early bytes")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert b" 200 " in head
        assert await asyncio.wait_for(reader.readexactly(len(b"early bytes")), 10) == b"early bytes"
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()


async def test_channel_end_reports_undecodable_frames() -> None:
    class FakeCall:
        async def read(self) -> object:
            return None  # what grpc.aio's client hands out when the deserializer failed

    with pytest.raises(ProtocolViolation):
        await GrpcFrameChannel(FakeCall()).read_frame()

    class EndedCall:
        async def read(self) -> object:
            return EOF

    assert await GrpcFrameChannel(EndedCall()).read_frame() is None
