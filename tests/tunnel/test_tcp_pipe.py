"""TcpPipe: zero-copy reads from a taken-over stream transport, with reused buffers and backpressure."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import struct
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from koinon_gateway import tcp_pipe
from koinon_gateway.tcp_pipe import FREE_BUFFER_BYTES, PAUSE_READING_BYTES, TcpPipe
from koinon_gateway.tunnel_io import splice_tcp
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

Handler = Callable[[TcpPipe], Awaitable[None]]


@asynccontextmanager
async def pipe_server(handler: Handler, prefix_bytes: int = 0) -> AsyncIterator[int]:
    """A server that reads ``prefix_bytes`` with the StreamReader, then hands the connection to a pipe."""
    done: list[asyncio.Task[None]] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if prefix_bytes:
            await reader.readexactly(prefix_bytes)
        task = asyncio.current_task()
        assert task is not None
        done.append(task)
        await handler(TcpPipe.take_over(reader, writer, 1 << 20))

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0, limit=1 << 20)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in done:
            await asyncio.wait_for(task, 10)


async def test_views_stay_intact_until_the_next_read_while_data_keeps_arriving() -> None:
    data = os.urandom(24 << 20)
    received = bytearray()

    async def consume(pipe: TcpPipe) -> None:
        rng = random.Random(1)
        while (view := await pipe.read()) is not None:
            expected = data[len(received) : len(received) + len(view)]
            if rng.random() < 0.2:
                await asyncio.sleep(0.002)  # let more data arrive, buffers fill up and get retired
            assert view == expected, "a handed-out view changed before the next read()"
            received.extend(view)
        pipe.close()

    async with pipe_server(consume, prefix_bytes=5) as port:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        # The first bytes arrive with the "handshake" and sit in the StreamReader when it is taken over.
        writer.write(b"HELLO" + data[:1000])
        await writer.drain()
        await asyncio.sleep(0.05)
        rng = random.Random(2)
        offset = 1000
        while offset < len(data):
            size = rng.choice([1, 100, 70_000, 1 << 20, 3 << 20])
            writer.write(data[offset : offset + size])
            offset += size
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    assert bytes(received) == data


async def test_views_stay_intact_while_other_pipes_reuse_the_same_buffers() -> None:
    """Buffers go back to a free list shared by all pipes (a full one once read, the current one
    whenever the consumer catches up) and another pipe takes them: a view must still hold its own
    connection's bytes until its consumer's next read()."""
    count, size = 4, 8 << 20
    payloads = [bytes([i]) + random.Random(i).randbytes(size - 1) for i in range(count)]
    received: list[bytes] = []

    async def consume(pipe: TcpPipe) -> None:
        rng = random.Random()
        got = bytearray()
        expected = b""
        while (view := await pipe.read()) is not None:
            expected = expected or payloads[view[0]]  # the first byte says which connection it is
            if rng.random() < 0.3:
                await asyncio.sleep(0.001)  # the others read, give buffers back and take them
            assert view == expected[len(got) : len(got) + len(view)], "a view changed before the next read()"
            got.extend(view)
        received.append(bytes(got))
        pipe.close()

    async def send(port: int, data: bytes) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        rng = random.Random(data[0])
        offset = 0
        while offset < len(data):
            size = rng.choice([100, 70_000, 1 << 20])
            writer.write(data[offset : offset + size])
            offset += size
            await writer.drain()
            if rng.random() < 0.1:
                await asyncio.sleep(0.002)  # let the consumer catch up: it gives its buffer back
        writer.write_eof()
        await writer.drain()

    async with pipe_server(consume) as port:
        await asyncio.gather(*(send(port, data) for data in payloads))
    assert sorted(received) == sorted(payloads)


async def test_idle_pipes_hold_no_receive_buffer() -> None:
    """Ray keeps its gRPC connections open for a node's whole life, mostly idle; each is a pipe at
    the gateway and another at the agent. A pipe whose consumer has read everything and waits for
    more gives its 1 MiB buffer back: idle connections must not hold a megabyte each."""
    count = 32
    waiting: list[TcpPipe] = []
    all_waiting = asyncio.Event()

    async def consume(pipe: TcpPipe) -> None:
        view = await pipe.read()
        assert view is not None and bytes(view) == b"x" * 100
        pipe.write(b"ok")
        waiting.append(pipe)
        if len(waiting) == count:
            all_waiting.set()
        assert await pipe.read() is None  # idle, until the client goes
        pipe.close()

    tracemalloc.start()
    try:
        async with pipe_server(consume) as port:
            writers = []
            before, _ = tracemalloc.get_traced_memory()
            for _ in range(count):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"x" * 100)
                assert await asyncio.wait_for(reader.readexactly(2), 5) == b"ok"
                writers.append(writer)
            await asyncio.wait_for(all_waiting.wait(), 5)
            await asyncio.sleep(0.05)
            held = tracemalloc.get_traced_memory()[0] - before
            for writer in writers:
                writer.close()
    finally:
        tracemalloc.stop()
    # The free list may keep a buffer or two (FREE_BUFFER_BYTES); not one per connection.
    assert held < 4 << 20, f"{count} idle pipes hold {held >> 10} KiB"


@pytest.mark.parametrize("end", ["half-close", "reset"])
async def test_a_pipe_that_saw_its_end_holds_no_receive_buffer(end: str) -> None:
    """Both loops take a buffer (get_buffer) for the receive that finds EOF or a reset. A consumer
    that waits for more holds none (it gave it back), so it sees the end with a buffer taken just
    for that: the buffer goes back to the free list, instead of being held by a half-closed
    connection, or dropped with the pipe (each ended connection would cost the free list one)."""
    waiting: asyncio.Future[TcpPipe] = asyncio.get_running_loop().create_future()
    ended = asyncio.Event()

    async def consume(pipe: TcpPipe) -> None:
        waiting.set_result(pipe)
        with contextlib.suppress(ConnectionResetError):
            while await pipe.read() is not None:
                pass
        ended.set()
        pipe.close()

    async with pipe_server(consume) as port:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x" * 100)
        await writer.drain()
        pipe = await asyncio.wait_for(waiting, 10)
        async with asyncio.timeout(10):
            while pipe._unread or pipe._read_waiter is None:  # all read, and waiting for more
                await asyncio.sleep(0.01)
        assert not pipe._buffer
        if end == "reset":
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.write_eof()
        await asyncio.wait_for(ended.wait(), 10)
        assert not pipe._buffer, "a pipe that saw its end still holds a receive buffer"
        writer.close()


async def test_views_stay_intact_while_other_pipes_end_and_reset() -> None:
    """Many connections at once on a real loop (test_tcp_pipe_model.py drives the callbacks by
    hand), taken over with their first bytes already read, sent in chunks of random sizes, ending
    with a half-close, a close or a reset: every view keeps its bytes until its consumer's next
    read(), every connection's bytes arrive in order (all of them, unless it reset), and the free
    list all of them share never holds a buffer twice."""
    count, buffer_bytes = 16, 100_000
    rng = random.Random(7)
    payloads = [rng.randbytes(rng.choice([0, 100, 70_000, 1 << 20, 3 << 20])) for _ in range(count)]
    ends = [("half-close", "close", "reset")[conn % 3] for conn in range(count)]
    results: dict[int, tuple[bytes, str]] = {}

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = struct.unpack("!I", await reader.readexactly(4))[0]
        expected = payloads[conn]
        pipe = TcpPipe.take_over(reader, writer, buffer_bytes)
        pauses = random.Random(conn)
        got = bytearray()
        previous: tuple[memoryview, bytes] | None = None
        how = "eof"
        try:
            while True:
                if previous is not None:  # it may change from the next read() on, not before
                    assert previous[0] == previous[1], f"connection {conn}: a view changed before the next read()"
                if (view := await pipe.read()) is None:
                    break
                assert view == expected[len(got) : len(got) + len(view)], f"connection {conn}: wrong bytes"
                got += view
                previous = (view, bytes(view))
                pause = pauses.random()
                if pause < 0.05:
                    await asyncio.sleep(0.002)  # a slow consumer: its backlog grows
                elif pause < 0.4:
                    await asyncio.sleep(0)  # the others take and give back buffers
        except ConnectionResetError:
            how = "reset"
        results[conn] = (bytes(got), how)
        pipe.close()

    async def client(port: int, conn: int) -> None:
        data, chunks = payloads[conn], random.Random(100 + conn)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(struct.pack("!I", conn) + data[:10])  # some of it lands in the StreamReader
        cut = chunks.randrange(len(data) + 1) if ends[conn] == "reset" else len(data)
        offset = min(10, cut)
        while offset < cut:
            size = min(cut - offset, chunks.choice([1, 4096, 65536, 200_000, 1 << 20]))
            writer.write(data[offset : offset + size])
            offset += size
            await writer.drain()
        if ends[conn] == "reset":
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        if ends[conn] == "half-close":
            writer.write_eof()
            await asyncio.wait_for(reader.read(), 30)  # the server closes once it has read all
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        await asyncio.wait_for(asyncio.gather(*(client(port, conn) for conn in range(count))), 60)
        async with asyncio.timeout(30):
            while len(results) < count:
                await asyncio.sleep(0.01)
    finally:
        server.close()
    for conn, end in enumerate(ends):
        got, how = results[conn]
        if end == "reset":
            assert payloads[conn].startswith(got), f"connection {conn}: not what was sent"
        else:
            assert (got, how) == (payloads[conn], "eof"), f"connection {conn} ({end}): {len(got)} bytes, {how}"
    for size, free in tcp_pipe._free_buffers.items():
        assert len({id(buffer) for buffer in free}) == len(free), "a buffer is twice in the free list"
        assert len(free) * size <= FREE_BUFFER_BYTES


async def test_slow_consumer_pauses_reading_and_resumes() -> None:
    paused: list[bool] = []

    async def consume(pipe: TcpPipe) -> None:
        await asyncio.sleep(0.3)  # let the sender run ahead
        paused.append(pipe._reading_paused)
        total = 0
        while (view := await pipe.read()) is not None:
            total += len(view)
        paused.append(pipe._reading_paused)
        pipe.write(total.to_bytes(8, "big"))
        pipe.write_eof()
        await pipe.drain()

    total = 32 << 20
    async with pipe_server(consume) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        chunk = b"\0" * (1 << 20)
        for _ in range(total // len(chunk)):
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
        assert int.from_bytes(await asyncio.wait_for(reader.readexactly(8), 10), "big") == total
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    assert paused == [True, False]
    assert total > 2 * PAUSE_READING_BYTES


async def test_eof_already_seen_by_the_stream_reader_is_kept() -> None:
    got: list[bytes | None] = []

    async def consume(pipe: TcpPipe) -> None:
        view = await pipe.read()
        got.append(None if view is None else bytes(view))
        got.append(None if (view := await pipe.read()) is None else bytes(view))
        pipe.close()

    async def slow_start(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.2)  # bytes and FIN are both in the StreamReader by now
        await consume(TcpPipe.take_over(reader, writer, 1 << 20))

    server = await asyncio.start_server(slow_start, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"last words")
    writer.write_eof()
    await writer.drain()
    for _ in range(100):
        if len(got) == 2:
            break
        await asyncio.sleep(0.05)
    server.close()
    writer.close()
    assert got == [b"last words", None]


async def test_reset_connection_fails_reads_and_drains() -> None:
    outcome: list[str] = []

    async def consume(pipe: TcpPipe) -> None:
        try:
            while await pipe.read() is not None:
                pass
            outcome.append("eof")
            for _ in range(50):
                pipe.write(b"x" * 65536)
                await pipe.drain()
                await asyncio.sleep(0.01)
            outcome.append("no error")
        except ConnectionError as exc:
            outcome.append(type(exc).__name__)

    async with pipe_server(consume) as port:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x")
        await writer.drain()
        writer.transport.abort()  # RST
    assert outcome and outcome[-1] != "no error"


@pytest.mark.parametrize("buffer_bytes", [1 << 16, 1 << 20])
async def test_views_never_exceed_the_buffer_size(buffer_bytes: int) -> None:
    sizes: list[int] = []

    async def consume(pipe: TcpPipe) -> None:
        await asyncio.sleep(0.1)
        while (view := await pipe.read()) is not None:
            sizes.append(len(view))
        pipe.close()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await consume(TcpPipe.take_over(reader, writer, buffer_bytes))

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    _, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    writer.write(b"\1" * (3 << 20))
    writer.write_eof()
    await writer.drain()
    for _ in range(100):
        if sum(sizes) == 3 << 20:
            break
        await asyncio.sleep(0.05)
    server.close()
    writer.close()
    assert sum(sizes) == 3 << 20
    assert max(sizes) <= buffer_bytes


async def test_large_stream_reader_leftover_is_split_into_buffer_sized_views() -> None:
    sizes: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1)
        await asyncio.sleep(0.3)  # several MiB pile up in the StreamReader (limit 4 MiB)
        pipe = TcpPipe.take_over(reader, writer, 1 << 20)
        while (view := await pipe.read()) is not None:
            sizes.append(len(view))
        pipe.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0, limit=4 << 20)
    _, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    writer.write(b"\1" * (5 << 20))
    writer.write_eof()
    await writer.drain()
    for _ in range(100):
        if sum(sizes) == (5 << 20) - 1:
            break
        await asyncio.sleep(0.05)
    server.close()
    writer.close()
    assert sum(sizes) == (5 << 20) - 1
    assert max(sizes) <= 1 << 20


class ScriptedChannel:
    """A Connect stream end that delivers the given frames, then waits (the tunnel's other side)."""

    def __init__(self, frames: list[object]) -> None:
        self.frames = list(frames)

    async def read_frame(self) -> object:
        if self.frames:
            return self.frames.pop(0)
        await asyncio.Event().wait()
        return None

    async def write_frame(self, frame: object) -> None:
        pass

    async def end_writing(self) -> None:
        pass


async def test_a_splice_that_ends_abnormally_drops_what_its_peer_never_read() -> None:
    # The local peer reads nothing while data arrives from the tunnel; then the tunnel stream is
    # cancelled (its agent went away). What is still buffered will never be wanted: the socket is
    # closed at once, not kept open with its buffer until the peer reads (or for ever).

    sent = 8 << 20
    channel = ScriptedChannel([memoryview(os.urandom(1 << 20))] * (sent >> 20))
    splices: list[asyncio.Task[bool]] = []
    transports: list[asyncio.BaseTransport] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transports.append(writer.transport)
        task = asyncio.ensure_future(splice_tcp(reader, writer, channel))  # type: ignore[arg-type]
        splices.append(task)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 16)
    try:
        await asyncio.sleep(0.5)  # the kernel's buffers fill up; the rest waits in the transport
        splices[0].cancel()
        await asyncio.gather(*splices, return_exceptions=True)
        await asyncio.sleep(0.1)
        # Closed now, although the peer has read nothing (a flushing close would still hold it).
        assert transports[0].get_extra_info("socket").fileno() == -1
        # ...and with a reset: a clean end (EOF) would pass a cut-off stream off as a whole one.
        assert await read_until_reset(reader) < sent
    finally:
        writer.close()
        server.close()


async def test_a_clean_close_gives_up_on_a_peer_that_never_reads_after_the_flush_timeout() -> None:
    sent = 16 << 20
    closed = asyncio.get_running_loop().create_future()

    async def fill_then_close(pipe: TcpPipe) -> None:
        pipe.write(os.urandom(sent))
        pipe.close(flush_timeout_s=0.3)
        closed.set_result(None)

    async with pipe_server(fill_then_close) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 16)
        await asyncio.wait_for(closed, 10)
        await asyncio.sleep(0.6)  # past the flush timeout, with most of the data unread
        assert await read_until_reset(reader) < sent
        writer.close()


async def read_until_reset(reader: asyncio.StreamReader) -> int:
    """Reads until the connection fails; returns how much arrived before. Fails on a clean EOF."""
    received = 0
    with pytest.raises(ConnectionResetError):
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 10):
            received += len(chunk)
    return received


class StuckTunnel:
    """A Connect stream whose outgoing data never drains (the peer's window is full); Close frames
    still go through and are recorded."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[object] = asyncio.Queue()
        self.closes: list[str] = []

    async def read_frame(self) -> object:
        return await self.incoming.get()

    async def write_frame(self, frame: object) -> None:
        if isinstance(frame, pb.Frame):
            if frame.HasField("close"):
                self.closes.append(frame.close.reason)
            return
        await asyncio.Event().wait()

    async def end_writing(self) -> None:
        pass


async def test_a_socket_reset_while_data_waits_to_be_written_reaches_the_tunnel_peer_as_a_reset() -> None:
    """On either event loop: uvloop raises where the stdlib loop drops a write to a lost transport."""
    tunnel = StuckTunnel()
    ended: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await splice_tcp(reader, writer, tunnel)  # type: ignore[arg-type]
            ended.set_result(None)
        except BaseException as exc:
            ended.set_result(exc)

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        writer.write(b"request")
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # the local peer resets
        await asyncio.sleep(0.2)
        tunnel.incoming.put_nowait(memoryview(b"an answer from the other end"))
        assert await asyncio.wait_for(ended, 5) is None
        assert tunnel.closes == ["tcp-reset"]
    finally:
        server.close()
