"""Blocking socket helpers for the tunnel benchmark: sink/echo servers and their clients."""

from __future__ import annotations

import base64
import socket
import struct
import threading
import time
from typing import NamedTuple

BUF = 1 << 20


def _serve(handler: object, host: str = "127.0.0.1") -> tuple[socket.socket, int]:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, 0))
    server.listen(64)

    def accept_loop() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=handler, args=(conn,), daemon=True).start()  # type: ignore[arg-type]

    threading.Thread(target=accept_loop, daemon=True).start()
    return server, server.getsockname()[1]


def _sink(conn: socket.socket) -> None:
    total = 0
    with conn:
        while chunk := conn.recv(BUF):
            total += len(chunk)
        conn.sendall(struct.pack("!Q", total))


def _echo(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while chunk := conn.recv(65536):
            conn.sendall(chunk)


def start_sink() -> tuple[socket.socket, int]:
    return _serve(_sink)


def start_echo() -> tuple[socket.socket, int]:
    return _serve(_echo)


class Proxy(NamedTuple):
    """An agent's local CONNECT proxy: its port on 127.0.0.1 and the secret it asks for."""

    port: int
    secret: str

    def authorization(self) -> str:
        return base64.b64encode(f"koinon:{self.secret}".encode()).decode()


def open_via(host: str, port: int, proxy: Proxy | None) -> socket.socket:
    """Connects to host:port, through an agent's CONNECT proxy if given."""
    if proxy is None:
        sock = socket.create_connection((host, port))
    else:
        sock = socket.create_connection(("127.0.0.1", proxy.port))
        sock.sendall(
            f"CONNECT {host}:{port} HTTP/1.1\r\nProxy-Authorization: Basic {proxy.authorization()}\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        if b" 200 " not in head.split(b"\r\n")[0]:
            raise RuntimeError(f"proxy refused: {head!r}")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def throughput_mbps(sock: socket.socket, total_bytes: int) -> float:
    """Sends total_bytes, waits for the sink's count; returns megabits per second."""
    payload = b"\0" * BUF
    start = time.perf_counter()
    sent = 0
    while sent < total_bytes:
        sock.sendall(payload)
        sent += len(payload)
    sock.shutdown(socket.SHUT_WR)
    received = b""
    while len(received) < 8:
        chunk = sock.recv(8 - len(received))
        if not chunk:
            raise RuntimeError("sink closed early")
        received += chunk
    elapsed = time.perf_counter() - start
    assert struct.unpack("!Q", received)[0] == sent, "sink saw a different byte count"
    sock.close()
    return sent * 8 / elapsed / 1e6


def _round_trip_us(sock: socket.socket, payload: bytes) -> float:
    start = time.perf_counter()
    sock.sendall(payload)
    got = 0
    while got < len(payload):
        chunk = sock.recv(len(payload) - got)
        if not chunk:
            raise RuntimeError("echo closed early")
        got += len(chunk)
    return (time.perf_counter() - start) * 1e6


def interleaved_rtts_us(
    paths: dict[str, socket.socket], count: int, size: int = 1024, block: int = 50
) -> dict[str, list[float]]:
    """count round trips on each path (all to echo servers), taken in turns of block each.

    This machine's speed swings by up to 2x within minutes; measuring the paths one after another
    would put those swings into their difference, while turns of a few milliseconds each see the
    same moments.
    """
    payload = b"r" * size
    samples: dict[str, list[float]] = {name: [] for name in paths}
    while any(len(taken) < count for taken in samples.values()):
        for name, sock in paths.items():
            for _ in range(min(block, count - len(samples[name]))):
                samples[name].append(_round_trip_us(sock, payload))
    for sock in paths.values():
        sock.close()
    return samples
