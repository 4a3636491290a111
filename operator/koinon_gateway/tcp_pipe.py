"""A TCP connection taken over for splicing: reads land in buffers that are handed out uncopied.

``asyncio.StreamReader`` copies every byte several times before a pump sees it (the transport's
bytes object, the reader's bytearray, a slice of it and a bytes of the slice). ``TcpPipe`` is a
``BufferedProtocol``: the event loop receives straight into a chunk buffer owned by the pipe, and
``read()`` returns ``memoryview`` slices of it. A view is valid until the next ``read()``: a full
buffer is replaced by another, and goes back to a free list shared by the process's pipes once
everything in it was read and the consumer came back for more (reusing buffers spares the
allocator and the page faults of a fresh megabyte per read). A consumer that comes back for more
and finds nothing unread gives the pipe's current buffer back too: an idle connection holds no
buffer (Ray keeps its gRPC connections open for a node's whole life, most of them idle), and the
next data lands in one taken from the free list.

Connections are opened and CONNECT requests parsed with asyncio streams; ``TcpPipe.take_over``
then swaps the transport's protocol and keeps whatever the ``StreamReader`` had already buffered.
Writes go straight to the transport, with the same pause/resume flow control streams use.

The pipes of one node's connections may share a ``ReadBudget``: the receive buffers they hold
together (unread data, the buffer a read lands in, the one whose view the consumer holds). A pipe
takes a full-size buffer only while one fits in the budget; past it, a pipe with unread data stops
reading instead of taking another buffer, and one that has none takes a small one (so a pipe whose
consumer reads always makes progress). One bulk connection holds a few MiB and never feels the
budget; a node whose many connections all stall cannot make the gateway hold more than the budget
plus two small buffers per connection (see GatewayConfig.max_buffered_bytes_per_node).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import struct
from typing import cast

# A read lands in the free tail of the current receive buffer; once less than MIN_READ_BYTES is
# left, the next read gets a fresh (or spare) buffer of ``buffer_bytes``.
MIN_READ_BYTES = 64 << 10
# Stop reading the socket while this much received data waits for the consumer.
PAUSE_READING_BYTES = 4 << 20
# The buffers a pipe takes once a full-size one no longer fits in its ReadBudget: one read each.
SMALL_BUFFER_BYTES = MIN_READ_BYTES
# Free buffers kept for reuse, per buffer size, by all the pipes of this process together (the rest
# are freed): enough for a few connections in bulk transfer, a bound on what idle ones cost.
FREE_BUFFER_BYTES = 8 << 20
# After a clean close, how long a peer may take to read what is still buffered for it.
CLOSE_FLUSH_TIMEOUT_S = 30.0


_free_buffers: dict[int, list[bytearray]] = {}


def _take_buffer(size: int) -> bytearray:
    with contextlib.suppress(KeyError, IndexError):
        return _free_buffers[size].pop()
    return bytearray(size)


def _give_back_buffer(buffer: bytearray) -> None:
    """Keeps ``buffer`` for another read, unless FREE_BUFFER_BYTES of its size are kept already.
    Nobody may still use it: no view of it is handed out and valid, none is in a backlog."""
    if not buffer:  # the empty placeholder of a pipe that holds none
        return
    free = _free_buffers.setdefault(len(buffer), [])
    if (len(free) + 1) * len(buffer) <= FREE_BUFFER_BYTES:
        free.append(buffer)


class ReadBudget:
    """Bytes of receive buffers that the pipes sharing it (one node's connections) may hold.

    Only full-size buffers are checked against ``limit_bytes``; the small ones a pipe takes past it
    (at most two a pipe: the one it reads into and the one whose view its consumer holds) are
    counted but not refused, so ``held_bytes`` stays under ``limit_bytes`` plus
    ``2 * SMALL_BUFFER_BYTES`` per pipe.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.held_bytes = 0

    def fits(self, nbytes: int) -> bool:
        return self.held_bytes + nbytes <= self.limit_bytes


class TcpPipe(asyncio.BufferedProtocol):
    def __init__(self, transport: asyncio.Transport, buffer_bytes: int, budget: ReadBudget | None = None) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._buffer_bytes = buffer_bytes
        self._buffer = bytearray(0)  # receives the next read
        self._view = memoryview(self._buffer)
        self._filled = 0  # bytes of the current buffer received so far
        self._taken = 0  # bytes of the current buffer handed out so far
        # Received and not yet read, from full buffers (or what a StreamReader held), oldest first.
        self._backlog: collections.deque[tuple[bytearray | None, memoryview]] = collections.deque()
        self._unread = 0
        self._lent: bytearray | None = None  # buffer of the view the consumer holds
        self._eof = False
        self._lost = False
        self._error: BaseException | None = None
        self._reading_paused = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._budget = budget
        # Bytes of the buffers this pipe holds (current, backlog, lent), as charged to the budget.
        self._held = 0

    @classmethod
    def take_over(
        cls,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        buffer_bytes: int,
        budget: ReadBudget | None = None,
    ) -> TcpPipe:
        """Makes a pipe the protocol of the streams' transport; the streams must not be used again.
        Its buffers are charged to ``budget`` until ``release()``."""
        transport = cast(asyncio.Transport, writer.transport)
        pipe = cls(transport, buffer_bytes, budget)
        # asyncio has no public accessor for what a StreamReader holds; these two attributes have
        # been its state since Python 3.4. Nothing runs between reading them and swapping the
        # protocol, so no byte and no EOF can slip past.
        held: bytearray = getattr(reader, "_buffer")  # noqa: B009
        if held:
            leftover = memoryview(bytes(held))
            for start in range(0, len(leftover), buffer_bytes):  # no view larger than a buffer
                pipe._backlog.append((None, leftover[start : start + buffer_bytes]))
            pipe._unread = len(leftover)
            pipe._charge(len(leftover))  # freed view by view as it is read
            held.clear()
        pipe._eof = bool(getattr(reader, "_eof"))  # noqa: B009
        if transport.is_closing():
            # Gone already (its connection_lost may have gone to the streams): fail like a lost one.
            pipe._lost = pipe._eof = True
            pipe._error = reader.exception()
        transport.set_protocol(pipe)
        if not pipe._eof:
            transport.resume_reading()  # the StreamReader may have paused it
        return pipe

    # ---- budget ----

    def _charge(self, nbytes: int) -> None:
        self._held += nbytes
        if self._budget is not None:
            self._budget.held_bytes += nbytes

    def _short_of_room(self) -> bool:
        """A full-size buffer no longer fits in the budget: the node's other pipes hold it."""
        return self._budget is not None and not self._budget.fits(self._buffer_bytes)

    def release(self) -> None:
        """The connection is over: what this pipe still holds no longer counts against its budget
        (the buffers go with the pipe). Idempotent."""
        if self._budget is not None:
            self._budget.held_bytes -= self._held
            self._budget = None
        self._held = 0

    # ---- protocol callbacks ----

    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self._view) - self._filled < MIN_READ_BYTES:
            full = self._buffer
            if self._taken < self._filled:
                self._backlog.append((full, self._view[self._taken : self._filled]))
            elif full is not self._lent:
                _give_back_buffer(full)
                self._charge(-len(full))
            size = min(self._buffer_bytes, SMALL_BUFFER_BYTES) if self._short_of_room() else self._buffer_bytes
            self._buffer = _take_buffer(size)
            self._charge(size)
            self._view = memoryview(self._buffer)
            self._filled = self._taken = 0
        return self._view[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        self._unread += nbytes
        # Past the budget, a pipe whose next read needs another buffer waits for its consumer
        # instead (its unread data is there for it): reading resumes once all of it was read.
        needs_buffer = len(self._view) - self._filled < MIN_READ_BYTES
        if not self._reading_paused and (
            self._unread > PAUSE_READING_BYTES or (needs_buffer and self._short_of_room())
        ):
            self._reading_paused = True
            self._transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        return True  # keep the transport open: the other direction may still be sending

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._eof = True
        self._error = exc
        self._wake_reader()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(ConnectionResetError("connection lost"))

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def _wake_reader(self) -> None:
        if self._read_waiter is not None and not self._read_waiter.done():
            self._read_waiter.set_result(None)

    # ---- consumer side ----

    async def read(self) -> memoryview | None:
        """Bytes received so far (at most one buffer's worth) as a view, valid until the next
        read(); None at EOF."""
        lent, self._lent = self._lent, None
        if lent is not None and lent is not self._buffer and all(entry[0] is not lent for entry in self._backlog):
            _give_back_buffer(lent)  # full, all of it read, and the consumer is done with it
            self._charge(-len(lent))
        if not self._unread:
            # All of the current buffer was read (nothing waits in a backlog either) and the
            # consumer is done with its views: an idle pipe keeps no buffer. In bulk transfer the
            # next read takes the same buffer straight back, and starts at its beginning.
            self._give_back_current()
        while not self._unread:
            if self._error is not None or self._eof:
                # The end came while the consumer waited, from a receive into a buffer taken for
                # it: both loops call get_buffer() before the recv that finds EOF or the reset.
                # Nothing in it is unread: back to the free list, not dropped with the pipe.
                self._give_back_current()
                if self._error is not None:
                    raise self._error
                return None
            self._read_waiter = self._loop.create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        if self._backlog:
            self._lent, view = self._backlog.popleft()
            if self._lent is None:  # what a StreamReader held: no buffer of ours, no longer held
                self._charge(-len(view))
        else:
            self._lent, view = self._buffer, self._view[self._taken : self._filled]
            self._taken = self._filled
        self._unread -= len(view)
        if (
            self._reading_paused
            and self._unread <= PAUSE_READING_BYTES // 2
            and (not self._unread or not self._short_of_room())
        ):
            self._reading_paused = False
            if not self._lost:
                self._transport.resume_reading()
        return view

    def _give_back_current(self) -> None:
        """Gives the current buffer back; only when nothing in it is unread and no view of it is
        lent (no backlog entry can be in it: those are buffers retired by get_buffer)."""
        if not self._buffer:  # holds none already
            return
        _give_back_buffer(self._buffer)
        self._charge(-len(self._buffer))
        self._buffer = bytearray(0)
        self._view = memoryview(self._buffer)
        self._filled = self._taken = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        # uvloop raises RuntimeError writing to a transport that is gone, the stdlib loop drops the
        # bytes: both become the ConnectionResetError a reset is everywhere else.
        if self._lost or self._transport.is_closing():
            raise ConnectionResetError("connection lost")
        self._transport.write(data)

    async def drain(self) -> None:
        """Waits while the transport holds more than its high-water mark; raises once it is gone."""
        if self._lost:
            raise ConnectionResetError("connection lost")
        if not self._writing_paused:
            return
        self._drain_waiter = self._loop.create_future()
        try:
            await self._drain_waiter
        finally:
            self._drain_waiter = None

    @property
    def lost(self) -> bool:
        return self._lost

    @property
    def write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def write_eof(self) -> None:
        if self._transport.can_write_eof() and not self._transport.is_closing():
            self._transport.write_eof()

    def close(self, flush_timeout_s: float = CLOSE_FLUSH_TIMEOUT_S) -> None:
        """Closes after what is buffered has been sent; for a peer that does not read it within
        ``flush_timeout_s`` the rest is dropped, so its socket and buffer are not held for ever."""
        self._transport.close()
        if self._transport.get_write_buffer_size() > 0:
            asyncio.get_running_loop().call_later(flush_timeout_s, self.abort)

    def abort(self) -> None:
        """Closes at once with a reset, dropping unsent data (the connection failed on the other
        side). A plain close would send FIN, and the peer would take a cut-off stream for a whole one.
        """
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._transport.abort()
