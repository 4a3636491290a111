"""Minimal HTTP/1.1 CONNECT handling, as spoken by gRPC's http proxy support (grpc_proxy=http://...)."""

from __future__ import annotations

import asyncio
import re
from typing import NamedTuple

MAX_HEADER_BYTES = 8192
# The StreamReader limit for a CONNECT proxy's connections: readuntil() stops at it, and the reader
# stops reading from the socket at twice it, so a request head that never ends holds this much,
# not the megabytes a data path's reader may buffer (the connection is handed to a TcpPipe after).
REQUEST_READER_LIMIT = 2 * MAX_HEADER_BYTES
# ASCII digits only: str.isdigit() also accepts '²' and friends, which int() then rejects.
_PORT_RE = re.compile(r"[0-9]{1,5}")


class BadConnectRequest(Exception):
    pass


class ConnectRequest(NamedTuple):
    host: str
    port: int
    # The value of each Proxy-Authorization header, in order (a client sends at most one).
    proxy_authorization: tuple[str, ...] = ()


async def read_connect_request(reader: asyncio.StreamReader, timeout: float = 10.0) -> ConnectRequest:
    """Reads ``CONNECT host:port HTTP/1.1`` and its headers."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError) as exc:
        # ConnectionError: the client reset the connection before its request was complete.
        raise BadConnectRequest("request: incomplete, too long or too slow") from exc
    if len(head) > MAX_HEADER_BYTES:
        raise BadConnectRequest("request: headers too long")
    request_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
    parts = request_line.split()
    if len(parts) != 3 or parts[0] != "CONNECT":
        raise BadConnectRequest(f"request line: expected 'CONNECT host:port HTTP/1.1', got {request_line!r}")
    host, sep, port_text = parts[1].rpartition(":")
    if not sep or _PORT_RE.fullmatch(port_text) is None or not 0 < int(port_text) < 65536:
        raise BadConnectRequest(f"target: expected host:port, got {parts[1]!r}")
    authorization = tuple(
        value.strip()
        for name, sep, value in (line.partition(":") for line in header_lines)
        if sep and name.strip().lower() == "proxy-authorization"
    )
    return ConnectRequest(host.strip("[]"), int(port_text), authorization)


# What a reason phrase may hold here: the agent passes on the gateway's refusal reasons, which it
# does not trust (a CR LF in one would add headers or a second response).
_REASON_UNSAFE = re.compile(r"[^A-Za-z0-9 ._-]")


def response(status: int, reason: str) -> bytes:
    phrase = _REASON_UNSAFE.sub("", reason)[:64] or "Error"
    return f"HTTP/1.1 {status} {phrase}\r\nContent-Length: 0\r\n\r\n".encode()


ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


def send(writer: asyncio.StreamWriter, data: bytes) -> None:
    """``writer.write``, failing alike on every event loop once the client is gone: uvloop raises
    RuntimeError writing to a transport whose peer reset, the stdlib loop drops the bytes."""
    if writer.transport.is_closing():
        raise ConnectionResetError("the client's connection is gone")
    writer.write(data)
