"""A minimal hand-written HTTP/2 gRPC client for tests: unlike grpc's own client, it can announce a
stream window of 0 and never open it, so every DATA frame the server writes to it waits for ever.

It sends calls (one message each, no half-close) and notes which streams the server ended, by
trailers (HEADERS with END_STREAM) or RST_STREAM; nothing it receives is decoded further.
"""

from __future__ import annotations

import asyncio
import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING = 0x0, 0x1, 0x3, 0x4, 0x6
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
SETTINGS_ENABLE_PUSH, SETTINGS_INITIAL_WINDOW_SIZE = 0x2, 0x4


def _hpack_int(value: int, prefix_bits: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((value,))
    out = bytearray((limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: str, value: str) -> bytes:
    """An HPACK literal header field without indexing, with a new name (no table, no Huffman)."""
    n, v = name.encode(), value.encode()
    return b"\x00" + _hpack_int(len(n), 7) + n + _hpack_int(len(v), 7) + v


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


class RawH2:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.next_stream = 1
        self.ended: set[int] = set()  # streams the server ended (trailers or RST_STREAM)
        self._pump = asyncio.ensure_future(self._read_loop())

    @classmethod
    async def connect(cls, host: str, port: int, stream_window: int = 0) -> RawH2:
        reader, writer = await asyncio.open_connection(host, port)
        settings = struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, stream_window)
        settings += struct.pack(">HI", SETTINGS_ENABLE_PUSH, 0)
        writer.write(PREFACE + frame(SETTINGS, 0, 0, settings))
        await writer.drain()
        return cls(reader, writer)

    async def _read_loop(self) -> None:
        try:
            while True:
                head = await self.reader.readexactly(9)
                kind, flags = head[3], head[4]
                stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                payload = await self.reader.readexactly(int.from_bytes(head[:3], "big"))
                if kind == SETTINGS and not flags & ACK:
                    self.writer.write(frame(SETTINGS, ACK, 0, b""))
                elif kind == PING and not flags & ACK:
                    self.writer.write(frame(PING, ACK, 0, payload))
                elif kind == RST_STREAM or (kind in (HEADERS, DATA) and flags & END_STREAM):
                    self.ended.add(stream)
                # DATA is never acknowledged with WINDOW_UPDATE: the window stays shut.
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    def open_call(self, path: str, authority: str, metadata: dict[str, str], message: bytes) -> int:
        """Opens a gRPC call and sends its first message; returns its stream id."""
        stream = self.next_stream
        self.next_stream += 2
        headers = {
            ":method": "POST", ":scheme": "http", ":path": path, ":authority": authority,
            "content-type": "application/grpc", "te": "trailers", **metadata,
        }  # fmt: skip
        block = b"".join(_literal(name, value) for name, value in headers.items())
        grpc_message = b"\x00" + struct.pack(">I", len(message)) + message
        self.writer.write(frame(HEADERS, END_HEADERS, stream, block) + frame(DATA, 0, stream, grpc_message))
        return stream

    async def close(self) -> None:
        self._pump.cancel()
        self.writer.close()
        await asyncio.gather(self._pump, return_exceptions=True)
