"""Wire codec of Connect stream frames with a copy-free fast path for Data frames.

Connect streams carry almost only ``Frame{data: Data{payload}}``. Going through the generated
``tunnel_pb2.Frame`` costs a copy of the payload into the message, another to serialize it, and on
the receiving side a parse plus a copy out of the message. This codec writes and reads the Data
case by hand, in exactly the protobuf wire format, so a peer using plain ``tunnel_pb2.Frame`` (an
older agent or gateway, another language) interoperates unchanged:

    0x22 <varint len(rest)>  0x0a <varint len(payload)> <payload>      (Frame.data = 4, Data.payload = 1)
    0x22 0x00                                                           (empty payload)

These are the bytes protobuf's own serializer produces for such a frame. Every other frame kind
goes through ``tunnel_pb2.Frame``. On the decoding side, anything that is not exactly a canonical
Data frame (unknown fields, repeated fields, another oneof case...) is handed to protobuf as well,
so the decoder accepts precisely what protobuf accepts and fails where protobuf fails.

Decoded Data frames are ``memoryview`` slices of the received message (no copy); other frames are
``tunnel_pb2.Frame`` instances (never with the ``data`` case set).
"""

from __future__ import annotations

from typing import TypeAlias

from google.protobuf.message import DecodeError
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

# What a Connect stream carries after decoding: a Data payload, or any other frame.
Payload: TypeAlias = memoryview
TunnelFrame: TypeAlias = pb.Frame | memoryview
# What may be written: a payload (any bytes-like object) or a frame.
OutgoingFrame: TypeAlias = pb.Frame | bytes | bytearray | memoryview

_FRAME_DATA_TAG = 0x22  # field 4 (Frame.data), wire type 2 (length-delimited)
_DATA_PAYLOAD_TAG = 0x0A  # field 1 (Data.payload), wire type 2
_EMPTY_DATA = bytes((_FRAME_DATA_TAG, 0))
_EMPTY_PAYLOAD = memoryview(b"")


class FrameDecodeError(DecodeError):
    """The bytes of a Connect message are not a valid Frame."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_data(payload: bytes | bytearray | memoryview) -> bytes:
    """The serialized ``Frame(data=Data(payload=payload))``, identical to protobuf's output."""
    size = len(payload)
    if size == 0:
        return _EMPTY_DATA
    inner = _varint(size)
    return b"".join(
        (bytes((_FRAME_DATA_TAG,)), _varint(1 + len(inner) + size), bytes((_DATA_PAYLOAD_TAG,)), inner, payload)
    )


def encode_frame(frame: OutgoingFrame) -> bytes:
    """Serializer of the Connect method: payloads by hand, frames through protobuf."""
    if isinstance(frame, pb.Frame):
        return frame.SerializeToString()
    return encode_data(frame)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, next position), or (-1, pos) when the varint is truncated or longer than 5 bytes."""
    result = 0
    shift = 0
    end = min(len(buf), pos + 5)  # lengths above 2**35 cannot occur in a message that fits in memory here
    while pos < end:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    return -1, pos


def _data_fast(buf: bytes) -> memoryview | None:
    """The payload of a canonical Data frame, or None when the message is anything else."""
    size = len(buf)
    if size < 2 or buf[0] != _FRAME_DATA_TAG:
        return None
    outer, pos = _read_varint(buf, 1)
    if outer < 0 or pos + outer != size:
        return None
    if outer == 0:
        return _EMPTY_PAYLOAD
    if buf[pos] != _DATA_PAYLOAD_TAG:
        return None
    inner, start = _read_varint(buf, pos + 1)
    if inner < 0 or start + inner != size:
        return None
    return memoryview(buf)[start:]


def decode_frame(buf: bytes) -> TunnelFrame:
    """Deserializer of the Connect method; raises FrameDecodeError for bytes protobuf rejects."""
    payload = _data_fast(buf)
    if payload is not None:
        return payload
    try:
        frame = pb.Frame.FromString(buf)
    except DecodeError as exc:
        raise FrameDecodeError(f"malformed Connect frame ({len(buf)} bytes): {exc}") from exc
    if frame.WhichOneof("msg") == "data":
        return memoryview(frame.data.payload)
    return frame
