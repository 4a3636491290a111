"""A model test of TcpPipe's receive buffers and the free list all pipes of a process share.

A buffer given back too early is handed to another pipe, which receives into it while the first
pipe's consumer still holds a view of it, or still has it in its backlog: that consumer then reads
another connection's bytes. Real sockets hit such interleavings only by chance, so here the event
loop's side of each pipe (get_buffer, buffer_updated, eof_received, connection_lost) is driven by
hand through a fake transport, interleaved at random with the consumers' read()s, for several pipes
with different buffer sizes at once. After every step it checks:

- no bytearray is twice in the free list, and no more than FREE_BUFFER_BYTES of a size is kept;
- no buffer in the free list is still held by a pipe: as its current buffer, in its backlog, or as
  the buffer of the view its consumer holds;
- every view handed out keeps its bytes until that consumer's next read();
- every connection's bytes arrive complete and in order (all that was received before a reset
  too), and a pipe whose consumer has seen its end holds no buffer;
- where the pipes share a ReadBudget (one node's connections): each pipe's charge is exactly the
  buffers it holds, the budget's is their sum, and it never exceeds the budget by more than two
  small buffers a pipe (plus what StreamReaders held before the take-over). That all pipes still
  finish shows that one whose consumer reads makes progress however full the budget is.

The loop's side does what asyncio's transports do: get_buffer may come without a buffer_updated
(recv_into found nothing), nothing is received while reading is paused or after EOF, a reset may
come at any time. Some pipes are taken over from a StreamReader that already holds bytes (and maybe
the EOF). Reads are sometimes cancelled while they wait. Each case is seeded: a failure names its
seed and replays exactly.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import cast

import pytest
from koinon_gateway import tcp_pipe
from koinon_gateway.tcp_pipe import SMALL_BUFFER_BYTES, ReadBudget, TcpPipe

PIPES = 6
STREAM_BYTES = (0, 10, 5000, 300_000, 3 << 20)
RECEIVE_BYTES = (1, 100, 4096, 65536, 1 << 20)


class FakeTransport:
    """What a pipe's receiving side (and take_over) uses of its transport."""

    def __init__(self) -> None:
        self.paused = False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        pass

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return False


class FakeWriter:
    def __init__(self, transport: FakeTransport) -> None:
        self.transport = transport


@dataclass
class Connection:
    pipe: TcpPipe
    transport: FakeTransport
    data: bytes  # what the peer sends (cut where it resets)
    sent: int = 0
    ended: bool = False  # EOF or reset: the loop receives no more
    got: bytearray = field(default_factory=bytearray)
    lent: tuple[memoryview, bytes] | None = None  # the view its consumer holds, and its bytes then
    reader: asyncio.Task[memoryview | None] | None = None
    finished: bool = False  # its consumer saw the end (EOF or the reset)


def held_buffers(pipe: TcpPipe) -> list[bytearray]:
    held = [pipe._buffer, pipe._lent, *(buffer for buffer, _ in pipe._backlog)]
    return [buffer for buffer in held if buffer]  # not None, not the empty placeholder


def check_buffers(connections: list[Connection]) -> None:
    free: set[int] = set()
    for size, buffers in tcp_pipe._free_buffers.items():
        assert len(buffers) * size <= tcp_pipe.FREE_BUFFER_BYTES, "the free list keeps more than its bound"
        for buffer in buffers:
            assert len(buffer) == size
            assert id(buffer) not in free, "a buffer is twice in the free list"
            free.add(id(buffer))
    for n, connection in enumerate(connections):
        for buffer in held_buffers(connection.pipe):
            assert id(buffer) not in free, f"pipe {n}: a buffer it still holds is in the free list"


def charged_bytes(pipe: TcpPipe) -> int:
    """What a pipe holds: its buffers, each once, and what is left of a StreamReader's bytes."""
    buffers = {id(buffer): len(buffer) for buffer in held_buffers(pipe)}
    leftover = sum(len(view) for buffer, view in pipe._backlog if buffer is None)
    return sum(buffers.values()) + leftover


def check_budget(budget: ReadBudget, connections: list[Connection], leftovers: int) -> None:
    for n, connection in enumerate(connections):
        assert connection.pipe._held == charged_bytes(connection.pipe), f"pipe {n}: charged wrongly"
    assert budget.held_bytes == sum(connection.pipe._held for connection in connections)
    past = sum(2 * min(connection.pipe._buffer_bytes, SMALL_BUFFER_BYTES) for connection in connections)
    assert budget.held_bytes <= budget.limit_bytes + leftovers + past, "the pipes hold more than their budget"


def check_lent_view(n: int, connection: Connection) -> None:
    if connection.lent is not None:
        view, copy = connection.lent
        assert view == copy, f"pipe {n}: a view changed before its consumer's next read()"


def receive(connection: Connection, rng: random.Random) -> None:
    """The event loop's turn: data (what fits the buffer the pipe offers), or EOF once all is sent."""
    pipe = connection.pipe
    if connection.sent == len(connection.data):
        pipe.eof_received()
        connection.ended = True
        return
    buffer = pipe.get_buffer(-1)
    assert len(buffer) > 0
    if rng.random() < 0.1:
        return  # recv_into raised BlockingIOError: no buffer_updated
    start = connection.sent
    count = min(len(buffer), len(connection.data) - start, rng.choice(RECEIVE_BYTES))
    buffer[:count] = connection.data[start : start + count]
    connection.sent += count
    pipe.buffer_updated(count)


async def consume(n: int, connection: Connection, buffer_bytes: int) -> None:
    """The consumer's turn: it comes back for more (done with its view), or sees a read finish."""
    if connection.reader is None:
        check_lent_view(n, connection)
        connection.lent = None
        connection.reader = asyncio.ensure_future(connection.pipe.read())
    await asyncio.sleep(0)  # the read, and any other woken one, runs
    if not connection.reader.done():
        return
    reader, connection.reader = connection.reader, None
    try:
        view = reader.result()
    except ConnectionResetError:
        view = None  # whatever was received before the reset came first
    if view is None:
        assert connection.got == connection.data, f"pipe {n}: bytes lost at the end"
        assert not held_buffers(connection.pipe), f"pipe {n}: holds a buffer after its end"
        connection.finished = True
        return
    start = len(connection.got)
    assert len(view) <= buffer_bytes, f"pipe {n}: a view larger than a buffer"
    assert view == connection.data[start : start + len(view)], f"pipe {n}: wrong bytes at {start}"
    connection.got += view
    connection.lent = (view, bytes(view))


async def run_model(seed: int, buffer_bytes: int, budget: ReadBudget | None = None) -> None:
    rng = random.Random(seed)
    connections: list[Connection] = []
    leftovers = 0
    for _ in range(PIPES):
        transport = FakeTransport()
        size = rng.choice((buffer_bytes, 1 << 20))  # pipes of two buffer sizes share the free list
        data = rng.randbytes(rng.choice(STREAM_BYTES))
        if rng.random() < 0.5:
            pipe = TcpPipe(cast(asyncio.Transport, transport), size, budget)
            connections.append(Connection(pipe, transport, data))
            continue
        # Taken over from a StreamReader that holds some of the bytes (its backlog then starts
        # with views of a copy of them, no pool buffer), and maybe the EOF after them.
        reader = asyncio.StreamReader()
        leftover = rng.choice((1, len(data) // 2, len(data)))
        reader.feed_data(data[:leftover])
        eof = leftover == len(data) and rng.random() < 0.5
        if eof:
            reader.feed_eof()
        writer = cast(asyncio.StreamWriter, FakeWriter(transport))
        pipe = TcpPipe.take_over(reader, writer, size, budget)
        leftovers += min(leftover, len(data))
        connections.append(Connection(pipe, transport, data, sent=min(leftover, len(data)), ended=eof))
    sizes = [connection.pipe._buffer_bytes for connection in connections]
    for _ in range(200_000):
        if all(connection.finished for connection in connections):
            break
        n = rng.randrange(PIPES)
        connection = connections[n]
        if connection.finished:
            continue
        action = rng.random()
        if action < 0.004:
            if not connection.pipe.lost and rng.random() < 0.5:  # the peer resets
                connection.pipe.connection_lost(ConnectionResetError("reset by peer"))
                connection.data = connection.data[: connection.sent]
                connection.ended = True
            elif connection.reader is not None and not connection.reader.done():
                connection.reader.cancel()  # the consumer gave up waiting (its task was cancelled)
                await asyncio.sleep(0)
                connection.reader = None
        elif action < 0.5:
            if not connection.ended and not connection.transport.paused:
                receive(connection, rng)
        elif action < 0.9:
            await consume(n, connection, sizes[n])
        else:  # some other pipe's turns came in between: every held view is still intact
            for m, other in enumerate(connections):
                check_lent_view(m, other)
        check_buffers(connections)
        if budget is not None:
            check_budget(budget, connections, leftovers)
    else:
        pytest.fail("the pipes did not finish")


@pytest.mark.parametrize("buffer_bytes", [1 << 20, 100_000, 70_000, 1000])
@pytest.mark.parametrize("seed", range(12))
async def test_random_interleavings_never_share_a_buffer(
    seed: int, buffer_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Scaled down so that a few MiB reach them: reading pauses and resumes, and the free list
    # fills up and drops buffers.
    monkeypatch.setattr(tcp_pipe, "PAUSE_READING_BYTES", 512 << 10)
    monkeypatch.setattr(tcp_pipe, "FREE_BUFFER_BYTES", 3 << 20)
    monkeypatch.setattr(tcp_pipe, "_free_buffers", {})  # this test's own: none from other tests
    await run_model(seed, buffer_bytes)


@pytest.mark.parametrize("buffer_bytes", [1 << 20, 100_000, 1000])
@pytest.mark.parametrize("seed", range(12))
async def test_random_interleavings_keep_to_a_shared_budget(
    seed: int, buffer_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same, the pipes sharing a budget smaller than what they would hold without it: full-size
    buffers stop fitting, pipes pause past it and go on with small buffers."""
    monkeypatch.setattr(tcp_pipe, "PAUSE_READING_BYTES", 512 << 10)
    monkeypatch.setattr(tcp_pipe, "FREE_BUFFER_BYTES", 3 << 20)
    monkeypatch.setattr(tcp_pipe, "_free_buffers", {})
    budget = ReadBudget(3 << 19)  # 1.5 MiB for 6 pipes of up to 3 MiB each
    await run_model(seed, buffer_bytes, budget)
    assert budget.held_bytes == 0, "pipes that saw their end still charge the budget"
