"""A do-nothing TCP relay, the reference for what any tunnel's two relays cost in round trip.

    python -m bench.tunnel.plain_relay TARGET_PORT     # prints its listening port, then serves

A tunnel puts two user-space relays (agent, gateway) and two more loopback hops between client and
server. This relay does only that part: no framing, no encryption, no multiplexing, one blocking
thread per direction moving bytes kernel-to-kernel with splice(2). Two of them chained, measured
at the same moments as direct and the tunnel, show how much of the tunnel's added round trip is
the machine's (wake-ups and hops) rather than the tunnel's own work.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

CHUNK = 1 << 20


def _pump(source: socket.socket, sink: socket.socket) -> None:
    read_end, write_end = os.pipe()
    try:
        while moved := os.splice(source.fileno(), write_end, CHUNK):
            while moved:
                moved -= os.splice(read_end, sink.fileno(), moved)
    except OSError:
        pass  # either side went away: the other direction notices on its own
    finally:
        os.close(read_end)
        os.close(write_end)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def serve(target_port: int) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    print(server.getsockname()[1], flush=True)
    while True:
        client, _ = server.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upstream = _connect(target_port)
        threading.Thread(target=_pump, args=(client, upstream), daemon=True).start()
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()


@contextlib.contextmanager
def relay_pair(target_port: int) -> Iterator[int]:
    """Two relay processes chained in front of target_port (client -> A -> B -> target); yields A's port."""
    processes: list[subprocess.Popen[str]] = []
    try:
        port = target_port
        for _ in range(2):
            process = subprocess.Popen(
                [sys.executable, "-m", "bench.tunnel.plain_relay", str(port)],
                cwd=Path(__file__).resolve().parents[2],
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            processes.append(process)
            assert process.stdout is not None
            port = int(process.stdout.readline())  # printed once it listens
        yield port
    finally:
        for process in processes:
            process.kill()
            process.wait()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
