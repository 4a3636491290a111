"""Moving bytes between TCP sockets and tunnel Connect streams (used by gateway and agent).

A ``FrameChannel`` is one end of a Connect stream (server context or client call). The pumps map
TCP half-close to ``CloseWrite`` frames so that protocols relying on shutdown(SHUT_WR) still work,
and stop on ``Close`` frames or stream end.

Data path per message: the socket is read straight into a reusable buffer (tcp_pipe), the payload
view is framed by hand (frame_codec: one copy into the bytes gRPC wants), and on the other side the
received message's payload is written to the socket as a view of it, without parsing into protobuf.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any, Protocol

from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .frame_codec import FrameDecodeError, OutgoingFrame, TunnelFrame
from .rpc import EOF
from .send_stalls import SendStalls, StallWatch
from .tcp_pipe import CLOSE_FLUSH_TIMEOUT_S, ReadBudget, TcpPipe
from .unread_writes import UnreadWrites

# Message size is the first lever of throughput through grpc (DESIGN §4): read up to 1 MiB at once.
CHUNK_BYTES = 1 << 20
# gRPC message limit on both sides: a full chunk plus framing, with room to spare.
MAX_MESSAGE_BYTES = CHUNK_BYTES + (64 << 10)
STREAM_READER_LIMIT = 4 * CHUNK_BYTES
# HTTP/2 receive window of each stream, fixed: what grpc core accepts on a stream that nobody reads
# (the splice stops reading while the other end does not take data). A read in progress still
# opens the window for the whole message it waits for, so messages larger than this flow.
# With BDP probing on, grpc grew the windows of streams whose data waited, without bound: a node
# sending to a peer that never reads made the gateway hold 1-2 GiB on 16 streams. Four chunks, as
# the window grpc started from before: with one chunk a stream carried one message per round trip,
# and bulk throughput fell 10-20 % (same-run quick turns, 2026-12-07: 4.5-5.2 against 5.2-5.9 Gbit/s).
RECEIVE_WINDOW_BYTES = 4 * CHUNK_BYTES

GRPC_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.lookahead_bytes", RECEIVE_WINDOW_BYTES),
    # No BDP probing: it would raise the windows past RECEIVE_WINDOW_BYTES (see above).
    ("grpc.http2.bdp_probe", 0),
    # HTTP/2 DATA frames of up to a whole chunk instead of 16 KiB: fewer frames per message.
    ("grpc.http2.max_frame_size", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


class FrameChannel(Protocol):
    """One end of a Connect stream. Data frames are read as ``memoryview`` payloads and written as
    bytes-like payloads; every other frame is a ``tunnel_pb2.Frame`` (see frame_codec).

    ``write_frame`` must be done with a payload when it returns (it is serialized, i.e. copied, by
    then): ``tcp_to_channel`` hands it views of receive buffers that are reused afterwards.
    """

    async def read_frame(self) -> TunnelFrame | None: ...

    async def write_frame(self, frame: OutgoingFrame) -> None: ...

    async def end_writing(self) -> None:
        """No frame follows on this side (a client half-closes its call; a server's stream ends
        when its handler returns)."""
        ...


class GrpcFrameChannel:
    """Adapts a grpc.aio server context or client call (both have read/write) to FrameChannel.

    The stream must use the Connect codec of ``frame_codec`` (``rpc.tunnel_stub`` and
    ``rpc.add_tunnel_service`` register it).
    """

    # The gateway's stalls of the node at this end (what it sends and the other end does not take):
    # only the gateway's streams have one (CountedFrameChannel).
    send_stalls: SendStalls | None = None

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def read_frame(self) -> TunnelFrame | None:
        message = await self._stream.read()
        if message is EOF:
            return None
        if message is None:
            # grpc.aio's client logs a failing deserializer and hands out None.
            raise ProtocolViolation("peer sent a malformed frame")
        return message  # type: ignore[no-any-return]

    async def write_frame(self, frame: OutgoingFrame) -> None:
        await self._stream.write(frame)

    async def end_writing(self) -> None:
        done_writing = getattr(self._stream, "done_writing", None)
        if done_writing is not None:  # a client call; a server context has none
            await done_writing()


class CountedFrameChannel(GrpcFrameChannel):
    """The gateway's end of a Connect stream (a server context): a GrpcFrameChannel that adds the
    payload bytes of the Data frames it carries to ``counts`` (``received`` and ``sent``), what the
    gateway's /metrics reports as bytes from and to nodes, and that notes a write left in grpc.

    A write whose writer is cancelled half-way (the other stream of a splice or the head connection
    went away, a Close notice timed out) stays pending inside grpc, which sends the call's status
    only after it: the call lives on for as long as the node keeps its window shut, whatever the
    handler does. ``write_held`` says so, for Connect's handler to keep the stream counted against
    its node until grpc ends the call. Only noted: a task per write to await it cost every write
    a few loop turns, on the path the tunnel's round trip is measured on.

    ``send_stalls`` are the stalls of the stream's node (send_stalls.py): the splices that forward
    what it sends watch their writes against them. ``unread_writes``, its node's budget of writes
    not read yet (unread_writes.py): a Data frame's write waits for room in it before it reaches
    grpc, and one left in grpc stays counted until grpc ends the call. Built in the RPC's own task
    (Connect's handler), which ends with the call.
    """

    def __init__(
        self,
        stream: Any,
        counts: collections.Counter[str],
        received: str,
        sent: str,
        send_stalls: SendStalls | None = None,
        unread_writes: UnreadWrites | None = None,
    ) -> None:
        super().__init__(stream)
        self._counts, self._received, self._sent = counts, received, sent
        self.write_held = False
        self.send_stalls = send_stalls
        self._unread_writes = unread_writes
        # The RPC's task (grpc.aio runs the handler in it; it ends once the call's status is sent or
        # the call is cancelled): a write whose writer gave up is given back when it ends, which is
        # when grpc lets go of the write. Not the context's done callbacks: registering one on every
        # call made a cycle through grpc.aio's RPC state that only the cyclic collector frees, and
        # context.done() says only that a status was queued.
        self._rpc_task = asyncio.current_task()

    async def read_frame(self) -> TunnelFrame | None:
        frame = await super().read_frame()
        if isinstance(frame, memoryview):
            self._counts[self._received] += frame.nbytes
        return frame

    async def write_frame(self, frame: OutgoingFrame) -> None:
        budget = self._unread_writes
        if isinstance(frame, pb.Frame) or budget is None:  # control frames: a few bytes each
            try:
                await self._stream.write(frame)
            except asyncio.CancelledError:
                # Its batch was started already (the write's only suspension is its completion),
                # and cancelling the wait does not withdraw it from grpc.
                self.write_held = True
                raise
            if not isinstance(frame, pb.Frame):
                self._counts[self._sent] += memoryview(frame).nbytes
            return
        nbytes = memoryview(frame).nbytes
        if not budget.take(nbytes):
            await budget.wait_to_take(nbytes)  # cancelled here, nothing reached grpc
        try:
            await self._stream.write(frame)
        except asyncio.CancelledError:
            self.write_held = True  # as above; counted until grpc ends the call
            if self._rpc_task is None:
                budget.give_back(nbytes)
            else:  # asyncio runs it soon if the task has ended already
                self._rpc_task.add_done_callback(lambda _task: budget.give_back(nbytes))
            raise
        except BaseException:
            budget.give_back(nbytes)
            raise
        budget.give_back(nbytes)
        self._counts[self._sent] += nbytes


async def tcp_to_channel(pipe: TcpPipe, channel: FrameChannel) -> None:
    while True:
        chunk = await pipe.read()
        if chunk is None:
            await channel.write_frame(pb.Frame(close_write=pb.CloseWrite()))
            return
        await channel.write_frame(chunk)


async def channel_to_tcp(
    channel: FrameChannel, pipe: TcpPipe, half_closed: asyncio.Event, watch: StallWatch | None = None
) -> str:
    """Copy Data frames to the socket; returns why the peer ended ("close:<reason>", "eof").

    A ``CloseWrite`` half-closes the socket and sets ``half_closed``; reading goes on, so that a
    peer that then aborts or vanishes (Close, end of stream) still ends the connection instead of
    leaving it held until the socket's side sends something. ``watch`` (the gateway's) is told
    while a write waits for the socket to drain.
    """
    while True:
        frame = await channel.read_frame()
        if frame is None:
            return "eof"
        if isinstance(frame, memoryview):
            if half_closed.is_set():
                raise ProtocolViolation("data after close_write")
            pipe.write(frame)
            # drain() only waits while the transport is above its high-water mark (and raises once
            # the socket is gone); skipping it when all was sent saves a coroutine round per
            # message and keeps the same backpressure and error reporting.
            if pipe.write_buffer_size > 0 or pipe.lost:
                if watch is None:
                    await pipe.drain()
                else:
                    watch.waiting()
                    try:
                        await pipe.drain()
                    finally:  # a drain that fails is no stall for the sweep to find
                        watch.done()
            continue
        kind = frame.WhichOneof("msg")
        if kind == "close_write" and not half_closed.is_set():
            pipe.write_eof()
            half_closed.set()
            continue
        if kind == "close":
            return f"close:{frame.close.reason}"
        raise ProtocolViolation(f"unexpected frame {kind!r} during data transfer")


class ProtocolViolation(Exception):
    """A peer sent a frame that is not allowed at this point of the stream."""


class PeerProtocolViolation(Exception):
    """The other stream of a spliced pair (splice_channels' ``b``) broke the protocol."""


# How long a side that aborts waits to tell the other side why (a Close frame) before giving up.
CLOSE_NOTICE_TIMEOUT_S = 1.0
# The Close reason of a connection the gateway ended because the node that sent on it stalled
# past its share (send_stalls.py).
SEND_STALLED = "send-stalled"
# How long that node is given to take the notice: what grpc holds for its stream goes only after.
STALL_NOTICE_TIMEOUT_S = 0.1


def _watch_of(channel: FrameChannel) -> StallWatch | None:
    """A watch of the node's stalls at ``channel``'s end, for the direction that forwards what it sends."""
    stalls: SendStalls | None = getattr(channel, "send_stalls", None)
    return None if stalls is None else stalls.watch()


async def splice_tcp(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    channel: FrameChannel,
    budget: ReadBudget | None = None,
) -> bool:
    """Run both directions until each has finished (half-closes) or one side aborts; True when the
    connection ended cleanly (both directions half-closed), False when it was aborted.

    An abort resets the TCP connection, so its peer sees a failure and not a clean end of a cut-off
    stream; a failure on the TCP side is sent to the other end of the tunnel as a ``Close`` frame
    with its reason. A malformed or out-of-place frame from the peer raises ``ProtocolViolation``
    (after the connection is reset) so that the caller can end the stream with an error.

    The connection's transport is taken over (see tcp_pipe); the streams must not be used again.
    Its receive buffers count against ``budget`` (the gateway's, of the node at the tunnel end)
    until it ends.
    """
    return await splice_pipe(TcpPipe.take_over(reader, writer, CHUNK_BYTES, budget), channel)


async def splice_pipe(pipe: TcpPipe, channel: FrameChannel) -> bool:
    """splice_tcp with a connection taken over already (``TcpPipe.take_over(..., CHUNK_BYTES)``);
    the pipe is closed or reset, and released, when it returns."""
    half_closed = asyncio.Event()
    watch = _watch_of(channel)
    upstream = asyncio.ensure_future(tcp_to_channel(pipe, channel))
    downstream = asyncio.ensure_future(channel_to_tcp(channel, pipe, half_closed, watch))
    if watch is not None:
        watch.task = downstream
    peer_done = asyncio.ensure_future(half_closed.wait())
    pending: set[asyncio.Future[Any]] = {upstream, downstream, peer_done}
    clean = False
    violation: BaseException | None = None
    notice = ""
    try:
        # Clean once both directions are half-closed: this side's upstream has ended and the peer
        # sent CloseWrite. The peer's Close, its stream's end or a failure to read it is an abort,
        # even after its CloseWrite (it vanished), except the end of a stream that half-closed
        # first: a peer that ends cleanly has our CloseWrite, so ours is written, or about to be.
        while True:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if downstream in done and _ended_after_half_close(downstream, half_closed) and not upstream.done():
                await asyncio.wait({upstream}, timeout=CLOSE_NOTICE_TIMEOUT_S)
            if upstream.done() and not _aborted(upstream) and half_closed.is_set():
                clean = True
                await _end_cleanly(channel, downstream)
                break
            if downstream.done() or (upstream.done() and _aborted(upstream)):
                violation = _protocol_violation(downstream)
                ended: set[asyncio.Future[Any]] = {task for task in (upstream, downstream) if task.done()}
                if watch is not None and watch.tripped:
                    notice = SEND_STALLED
                elif violation is not None:
                    notice = "protocol-violation"
                else:
                    notice = _tcp_failure(ended, upstream, downstream)
                break
    except asyncio.CancelledError:
        # Ended from outside (the stream's node revoked, the gateway stopping): reset the
        # connection now, not once upstream's write gives up (it may wait on a stream whose peer
        # reads nothing), and stop counting its buffers against the node.
        with contextlib.suppress(Exception):
            pipe.abort()
        pipe.release()
        raise
    finally:
        if watch is not None:
            watch.close()
        upstream.cancel()
        peer_done.cancel()
        try:
            await asyncio.gather(upstream, peer_done, return_exceptions=True)
        except asyncio.CancelledError:
            # Cancelled again while cleaning up (a revocation and the node's call going away at
            # once): the rest of this would be skipped, leaving the socket open and its buffers
            # charged to the node's budget for as long as the peer keeps the connection.
            with contextlib.suppress(Exception):
                pipe.abort()
            pipe.release()
            downstream.cancel()
            raise
        with contextlib.suppress(Exception):
            # After an abort nobody will read what is still buffered: reset at once, or a peer
            # that stopped reading would keep the socket and its buffer for ever.
            pipe.close() if clean else pipe.abort()
        # Nothing reads it any more (close() and abort() stop the socket's reads too).
        pipe.release()
        if notice:
            # Only once upstream is gone (a grpc stream takes one write at a time), and before the
            # read is cancelled: grpc.aio cancels a client call whose read is cancelled, and the
            # Close would never leave.
            await _send_close(
                channel, notice, STALL_NOTICE_TIMEOUT_S if notice == SEND_STALLED else CLOSE_NOTICE_TIMEOUT_S
            )
        downstream.cancel()
        await asyncio.gather(downstream, return_exceptions=True)
    if violation is not None:
        raise ProtocolViolation(str(violation)) from violation
    return clean


async def _end_cleanly(channel: FrameChannel, reading: asyncio.Future[Any]) -> None:
    """Both directions are half-closed: end this side's writing and let the peer end the stream,
    up to ``CLOSE_FLUSH_TIMEOUT_S``. The read in progress is not cancelled: grpc.aio cancels a
    client call whose read is cancelled, and the reset drops what the peer has not read yet
    (our CloseWrite, even data)."""
    with contextlib.suppress(Exception):
        await channel.end_writing()
    await asyncio.wait({reading}, timeout=CLOSE_FLUSH_TIMEOUT_S)


def _ended_after_half_close(downstream: asyncio.Future[Any], half_closed: asyncio.Event) -> bool:
    return (
        half_closed.is_set()
        and not downstream.cancelled()
        and downstream.exception() is None
        and downstream.result() == "eof"
    )


def _aborted(upstream: asyncio.Future[Any]) -> bool:
    """The socket-to-tunnel direction ends the whole connection unless it ended with a half-close."""
    return upstream.cancelled() or upstream.exception() is not None


def _protocol_violation(downstream: asyncio.Future[Any]) -> BaseException | None:
    if not downstream.done() or downstream.cancelled():
        return None
    exc = downstream.exception()
    return exc if isinstance(exc, ProtocolViolation | FrameDecodeError) else None


def _tcp_failure(done: set[asyncio.Future[Any]], upstream: asyncio.Future[Any], downstream: asyncio.Future[Any]) -> str:
    """The Close reason to send when the TCP side failed; "" when the tunnel side ended things
    (it already knows, or can no longer be written to)."""
    for task in done:
        if task.cancelled():
            continue
        exc = task.exception()
        if isinstance(exc, OSError) and (task is upstream or isinstance(exc, ConnectionError)):
            # upstream: reading the socket failed; downstream: writing to it did (drain raises
            # ConnectionError once the socket is gone). A failed channel write is a grpc error.
            return "tcp-reset" if isinstance(exc, ConnectionError) else "tcp-error"
    return ""


async def _send_close(channel: FrameChannel, reason: str, timeout: float = CLOSE_NOTICE_TIMEOUT_S) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(channel.write_frame(pb.Frame(close=pb.Close(reason=reason))), timeout)


async def splice_channels(a: FrameChannel, b: FrameChannel) -> None:
    """Forward frames between two Connect streams (volunteer to volunteer through the gateway).

    A frame out of place ends both, each told who broke the protocol; then ProtocolViolation when
    ``a`` (the stream whose handler this runs in) did, PeerProtocolViolation when ``b`` did, so
    that each stream's own handler can end it with an error instead of OK.
    """

    async def forward(
        src: FrameChannel, dst: FrameChannel, half_closed: asyncio.Event, watch: StallWatch | None
    ) -> str:
        """Copy ``src``'s frames to ``dst`` until ``src`` ends ("eof") or aborts ("close"); after its
        CloseWrite (``half_closed``) ``src`` is still read, to learn when it vanishes. ``watch``,
        the stalls of ``src``'s node, is told while a Data frame's write to ``dst`` waits."""
        while True:
            frame = await src.read_frame()
            if frame is None:
                return "eof"
            if isinstance(frame, memoryview) and not half_closed.is_set():
                if watch is None:
                    await dst.write_frame(frame)
                else:
                    watch.waiting()
                    try:
                        await dst.write_frame(frame)
                    finally:
                        watch.done()
                continue
            kind = "data" if isinstance(frame, memoryview) else frame.WhichOneof("msg")
            if kind == "close_write" and not half_closed.is_set():
                await dst.write_frame(frame)
                half_closed.set()
                continue
            if kind == "close":
                await dst.write_frame(frame)
                return "close"
            raise ProtocolViolation(f"unexpected frame {kind!r} during data transfer")

    a_half_closed, b_half_closed = asyncio.Event(), asyncio.Event()
    a_watch, b_watch = _watch_of(a), _watch_of(b)
    ab = asyncio.ensure_future(forward(a, b, a_half_closed, a_watch))
    ba = asyncio.ensure_future(forward(b, a, b_half_closed, b_watch))
    for watch, task in ((a_watch, ab), (b_watch, ba)):
        if watch is not None:
            watch.task = task
    both_half_closed = asyncio.ensure_future(asyncio.gather(a_half_closed.wait(), b_half_closed.wait()))
    try:
        pending: set[asyncio.Future[Any]] = {ab, ba, both_half_closed}
        while not both_half_closed.done():
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            ended = [
                (task, half_closed) for task, half_closed in ((ab, a_half_closed), (ba, b_half_closed)) if task.done()
            ]
            if not ended:
                continue
            if all(_ended_after_half_close(task, half_closed) for task, half_closed in ended):
                # A stream that half-closed and then ended cleanly has the other's CloseWrite,
                # which is forwarded by now or about to be.
                await asyncio.wait({both_half_closed}, timeout=CLOSE_NOTICE_TIMEOUT_S)
            if not both_half_closed.done():
                for task, dst in ((ab, b), (ba, a)):
                    if task.done() and not task.cancelled() and task.exception() is None and task.result() == "eof":
                        await _send_close(dst, "peer-ended")
                break
        if both_half_closed.done():
            # Each agent half-closes its call once it has both CloseWrites; the streams end then.
            await asyncio.wait({ab, ba}, timeout=CLOSE_FLUSH_TIMEOUT_S)
    finally:
        for watch in (a_watch, b_watch):
            if watch is not None:
                watch.close()
        for future in (ab, ba, both_half_closed):
            future.cancel()
        await asyncio.gather(ab, ba, both_half_closed, return_exceptions=True)
    # A node whose stalls were past its share is told why its connection ends, briefly: until this
    # returns, its stream and all grpc holds for it stay (it may not read either). The other end is
    # not told: it takes no data, and a Close would wait behind what it has not read; its stream
    # ends with its handler.
    for watch, src in ((a_watch, a), (b_watch, b)):
        if watch is not None and watch.tripped:
            await _send_close(src, SEND_STALLED, STALL_NOTICE_TIMEOUT_S)
    # Tell both ends which of them broke the protocol (only now: one write at a time per stream).
    violations = [(_protocol_violation(task), src, dst) for task, src, dst in ((ab, a, b), (ba, b, a))]
    for violation, src, dst in violations:
        if violation is not None:
            await _send_close(src, "protocol-violation")
            await _send_close(dst, "peer-protocol-violation")
    by_a, by_b = violations[0][0], violations[1][0]
    if by_a is not None:
        raise ProtocolViolation(str(by_a)) from by_a
    if by_b is not None:
        raise PeerProtocolViolation(str(by_b)) from by_b
