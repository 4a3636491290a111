"""How proxied connections end: every byte sent before a clean end arrives, a failure arrives as a
failure (a reset, not a clean end of a cut-off stream), and a malformed frame ends only its stream."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from pathlib import Path
from typing import Any

import grpc
import pytest
from koinon_gateway import tunnel_io
from koinon_gateway.rpc import EOF, tunnel_stub
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import (
    channel_for,
    cluster,
    connect_via_proxy,
    echo_handler,
    echo_roundtrip,
    echo_server,
    next_open_connection,
    registered_mute_node,
)

PAYLOAD_BYTES = 16 << 20
SLOW_READER_PAUSE_S = 0.5  # long enough for the sender to finish while the tunnel still holds data


async def read_all(reader: asyncio.StreamReader) -> bytes:
    chunks = []
    while chunk := await asyncio.wait_for(reader.read(1 << 20), 15):
        chunks.append(chunk)
    return b"".join(chunks)


async def test_what_a_volunteer_sends_last_reaches_a_slow_reader_at_the_head(tmp_path: Path) -> None:
    # head -> head proxy -> gateway -> agent (Accept) -> a server on the volunteer that answers
    # and closes. The agent's side finishes first; it must not cut off what is still in flight.
    payload = os.urandom(PAYLOAD_BYTES)

    async def answer_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.write(payload)
        await writer.drain()
        writer.close()

    async with cluster(tmp_path, tls=False) as c:
        agent = await c.start_agent("beta")
        address = agent.identity.address  # type: ignore[union-attr]
        port = agent.assignment.ports.node_manager_port  # type: ignore[union-attr]
        server = await asyncio.start_server(answer_then_close, address, port)
        head_proxy_port = int(c.gateway.head_proxy_url.rsplit(":", 1)[1])
        try:
            for _ in range(3):
                status, reader, writer = await connect_via_proxy(head_proxy_port, address, port)
                assert status == 200
                writer.write(b"request")
                writer.write_eof()
                await asyncio.sleep(SLOW_READER_PAUSE_S)
                assert await read_all(reader) == payload
                writer.close()
        finally:
            server.close()


async def test_what_is_sent_after_the_other_side_half_closed_all_arrives(tmp_path: Path) -> None:
    # The head half-closes first; the volunteer then sends a lot and half-closes too.
    payload = os.urandom(PAYLOAD_BYTES)
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def greet_then_read_slowly(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"greeting")
        writer.write_eof()
        await asyncio.sleep(SLOW_READER_PAUSE_S)
        try:
            await received.put(await read_all(reader))
        finally:
            writer.close()

    async with cluster(tmp_path, tls=False, head_handler=greet_then_read_slowly) as c:
        agent = await c.start_agent("alpha")
        for _ in range(3):
            status, reader, writer = await connect_via_proxy(agent._proxy, "127.0.0.1", c.head_port)
            assert status == 200
            assert await asyncio.wait_for(reader.read(), 10) == b"greeting"
            writer.write(payload)
            await writer.drain()
            writer.write_eof()
            assert await asyncio.wait_for(received.get(), 30) == payload
            writer.close()


async def test_a_reset_at_the_head_reaches_the_volunteer_as_a_reset(tmp_path: Path) -> None:
    async def answer_part_then_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"partial-response")
        await writer.drain()
        await asyncio.sleep(0.3)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with cluster(tmp_path, tls=False, head_handler=answer_part_then_reset) as c:
        agent = await c.start_agent("alpha")
        status, reader, writer = await connect_via_proxy(agent._proxy, "127.0.0.1", c.head_port)
        assert status == 200
        assert await asyncio.wait_for(reader.readexactly(16), 10) == b"partial-response"
        try:
            rest = await asyncio.wait_for(reader.read(), 10)
        except ConnectionResetError:
            pass
        else:
            raise AssertionError(f"a clean end ({rest!r}) although the head reset the connection")
        writer.close()


async def test_a_malformed_frame_mid_stream_ends_only_that_stream(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        agent = await c.start_agent("alpha")
        metadata = (("authorization", f"Bearer {agent.identity.credential}"),)  # type: ignore[union-attr]
        async with channel_for(c) as channel:
            raw = channel.stream_stream("/koinon.tunnel.v1.Tunnel/Connect", None, None)
            call: Any = raw(metadata=metadata)  # type: ignore[call-arg]  # no request iterator: written below
            await call.write(pb.Frame(dial=pb.Dial(host="127.0.0.1", port=c.head_port)).SerializeToString())
            assert pb.Frame.FromString(await asyncio.wait_for(call.read(), 5)).dial_result.ok
            await call.write(b"\xff\xff\xff\xff\x0f")  # not a protobuf message
            # The peer is told why, then the stream ends with an error, not with OK.
            notice = await asyncio.wait_for(call.read(), 5)
            assert notice is not EOF
            assert pb.Frame.FromString(notice).close.reason == "protocol-violation"
            assert await asyncio.wait_for(call.code(), 5) == grpc.StatusCode.INVALID_ARGUMENT
            assert "malformed" in (await call.details())
        assert c.gateway.metrics.refused_streams["protocol-violation"] == 1
        # The node's session and its other connections carry on.
        status, reader, writer = await connect_via_proxy(agent._proxy, "127.0.0.1", c.head_port)
        assert status == 200
        assert await echo_roundtrip(reader, writer, b"still here") == b"still here"
        writer.close()


async def test_a_connect_request_head_that_never_ends_is_refused_at_its_size_limit(tmp_path: Path) -> None:
    # Both CONNECT proxies (the head's, the agent's) read a request head of at most a few KiB; one
    # without its blank line used to be buffered up to the data path's 4 MiB for 10 s.
    async with cluster(tmp_path, tls=False) as c:
        agent = await c.start_agent("alpha")
        assert agent._proxy is not None
        head_proxy_port = int(c.gateway.head_proxy_url.rsplit(":", 1)[1])
        for port in (head_proxy_port, agent._proxy.port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"CONNECT 127.0.20.1:1 HTTP/1.1\r\nX-Filler: " + b"a" * (256 << 10))
            try:
                answer = await asyncio.wait_for(reader.read(), 3)  # not the 10 s request timeout
            except ConnectionResetError:
                answer = b"reset"  # closed with our unread bytes still queued: the kernel resets
            writer.close()
            assert answer.startswith(b"HTTP/1.1 400") or answer == b"reset", answer


async def test_a_head_client_that_resets_while_the_volunteer_accepts_is_no_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with cluster(tmp_path, tls=False) as c:
        agent = await c.start_agent("beta")
        assert agent.identity is not None and agent.assignment is not None
        address, port = agent.identity.address, agent.assignment.ports.node_manager_port
        server = await asyncio.start_server(echo_handler, address, port)
        head_proxy_port = int(c.gateway.head_proxy_url.rsplit(":", 1)[1])
        try:
            with caplog.at_level(logging.ERROR):
                for _ in range(5):
                    _, writer = await asyncio.open_connection("127.0.0.1", head_proxy_port)
                    writer.write(f"CONNECT {address}:{port} HTTP/1.1\r\n\r\n".encode())
                    await writer.drain()
                    linger = struct.pack("ii", 1, 0)
                    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    writer.transport.abort()  # a reset while the gateway waits for the volunteer's Accept
                await asyncio.sleep(1.0)
            assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
            # And the path still works.
            status, reader, writer = await connect_via_proxy(agent._proxy, "127.0.0.1", c.head_port)
            assert status == 200 and await echo_roundtrip(reader, writer, b"still") == b"still"
            writer.close()
        finally:
            server.close()


async def test_a_malformed_frame_towards_a_volunteer_ends_the_dialers_stream_with_an_error(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        a = await c.start_agent("alpha")
        b = await c.start_agent("beta")
        assert a.identity is not None and b.identity is not None and b.assignment is not None
        address, port = b.identity.address, b.assignment.ports.node_manager_port
        async with echo_server(address, port):
            metadata = (("authorization", f"Bearer {a.identity.credential}"),)
            async with channel_for(c) as channel:
                raw = channel.stream_stream("/koinon.tunnel.v1.Tunnel/Connect", None, None)
                call: Any = raw(metadata=metadata)  # type: ignore[call-arg]  # written below
                await call.write(pb.Frame(dial=pb.Dial(host=address, port=port)).SerializeToString())
                assert pb.Frame.FromString(await asyncio.wait_for(call.read(), 5)).dial_result.ok
                await call.write(b"\xff\xff\xff\xff\x0f")  # not a protobuf message
                notice = await asyncio.wait_for(call.read(), 5)
                assert notice is not EOF and pb.Frame.FromString(notice).close.reason == "protocol-violation"
                assert await asyncio.wait_for(call.code(), 5) == grpc.StatusCode.INVALID_ARGUMENT
        assert c.gateway.metrics.refused_streams["protocol-violation"] == 1


async def test_a_malformed_frame_from_the_accepting_volunteer_ends_its_stream_with_an_error(tmp_path: Path) -> None:
    async with cluster(tmp_path, heartbeat_timeout_s=30.0) as c, channel_for(c) as channel:
        a = await c.start_agent("alpha")
        assert a.identity is not None
        joined, control = await registered_mute_node(c, channel, "b")
        b_metadata = (("authorization", f"Bearer {joined.credential}"),)
        dial = tunnel_stub(channel).Connect(metadata=(("authorization", f"Bearer {a.identity.credential}"),))
        target = pb.Dial(host=joined.assignment.address, port=joined.assignment.ports.node_manager_port)
        await dial.write(pb.Frame(dial=target))
        opened = await next_open_connection(control)
        raw = channel.stream_stream("/koinon.tunnel.v1.Tunnel/Connect", None, None)
        accept: Any = raw(metadata=b_metadata)  # type: ignore[call-arg]  # written below
        await accept.write(pb.Frame(accept=pb.Accept(connection_id=opened.connection_id)).SerializeToString())
        await accept.write(pb.Frame(dial_result=pb.DialResult(ok=True)).SerializeToString())
        assert (await asyncio.wait_for(dial.read(), 5)).dial_result.ok  # type: ignore[attr-defined]
        await accept.write(b"\xff\xff\xff\xff\x0f")  # the accepting side breaks the protocol
        assert pb.Frame.FromString(await asyncio.wait_for(accept.read(), 5)).close.reason == "protocol-violation"
        assert await asyncio.wait_for(accept.code(), 5) == grpc.StatusCode.INVALID_ARGUMENT
        told = await asyncio.wait_for(dial.read(), 5)
        assert told.close.reason == "peer-protocol-violation"  # type: ignore[attr-defined]
        assert c.gateway.metrics.refused_streams["protocol-violation"] == 1
        for call in (dial, control):
            call.cancel()


async def accept_without_answering(c: Any, channel: grpc.aio.Channel) -> tuple[Any, Any, Any, pb.JoinResponse]:
    """Agent alpha dials mute node B, whose Accept stream is opened (raw bytes in and out) but has
    sent no DialResult yet: (alpha's dial call, B's Control call, B's Accept call, B's join)."""
    a = await c.start_agent("alpha")
    assert a.identity is not None
    joined, control = await registered_mute_node(c, channel, "b")
    dial = tunnel_stub(channel).Connect(metadata=(("authorization", f"Bearer {a.identity.credential}"),))
    target = pb.Dial(host=joined.assignment.address, port=joined.assignment.ports.node_manager_port)
    await dial.write(pb.Frame(dial=target))
    opened = await next_open_connection(control)
    raw = channel.stream_stream("/koinon.tunnel.v1.Tunnel/Connect", None, None)
    accept: Any = raw(metadata=(("authorization", f"Bearer {joined.credential}"),))  # type: ignore[call-arg]
    await accept.write(pb.Frame(accept=pb.Accept(connection_id=opened.connection_id)).SerializeToString())
    return dial, control, accept, joined


async def refusal_within(dial: Any, seconds: float) -> pb.DialResult:
    """The dialer's DialResult, which must be a refusal that comes within ``seconds``."""
    started = asyncio.get_running_loop().time()
    result = await asyncio.wait_for(dial.read(), 15)
    waited = asyncio.get_running_loop().time() - started
    assert not result.dial_result.ok, result
    assert waited < seconds, f"the dialer waited {waited:.1f} s (accept_timeout_s) for a refusal known at once"
    return result.dial_result  # type: ignore[no-any-return]


async def test_bytes_that_are_no_frame_instead_of_the_dial_result_refuse_the_dialer_at_once(tmp_path: Path) -> None:
    """B's Accept stream sends bytes that do not decode where its DialResult belongs: its stream
    ends as a protocol violation, and A's dial is refused now, as for a DialResult(ok=False). The
    decode error escaped the wait for the DialResult and left the dialer waiting accept_timeout_s
    for a "did not accept: TimeoutError()"."""
    async with cluster(tmp_path, heartbeat_timeout_s=30.0, accept_timeout_s=8.0) as c, channel_for(c) as channel:
        dial, control, accept, _ = await accept_without_answering(c, channel)
        await accept.write(b"\xff\xff\xff\xff\x0f")  # not a DialResult, not a Frame at all
        assert await asyncio.wait_for(accept.code(), 5) == grpc.StatusCode.INVALID_ARGUMENT
        refused = await refusal_within(dial, 2.0)
        assert refused.reason == "unreachable" and "FrameDecodeError" in refused.message
        assert c.gateway.metrics.refused_streams["protocol-violation"] == 1
        for call in (dial, control):
            call.cancel()


async def test_an_accept_stream_that_ends_before_its_dial_result_is_told_so(tmp_path: Path) -> None:
    """B half-closes its Accept stream without a DialResult: A is refused at once, and B's stream
    ends saying what happened (it was ended as DEADLINE_EXCEEDED "no DialResult in time")."""
    async with cluster(tmp_path, heartbeat_timeout_s=30.0, accept_timeout_s=8.0) as c, channel_for(c) as channel:
        dial, control, accept, _ = await accept_without_answering(c, channel)
        await accept.done_writing()
        refused = await refusal_within(dial, 2.0)
        assert "ended before its DialResult" in refused.message
        assert await asyncio.wait_for(accept.code(), 5) == grpc.StatusCode.INVALID_ARGUMENT
        assert "ended before its DialResult" in (await accept.details() or "")
        assert c.gateway.metrics.refused_streams["no-dial-result"] == 1
        for call in (dial, control):
            call.cancel()


async def test_revoking_a_node_whose_accept_stream_waits_refuses_the_dialer_at_once(tmp_path: Path) -> None:
    """B is revoked (its VolunteerNode deleted) while its Accept stream has not answered yet: the
    stream's handler is cancelled, and A's dial is refused now, not after accept_timeout_s."""
    async with cluster(tmp_path, heartbeat_timeout_s=30.0, accept_timeout_s=8.0) as c, channel_for(c) as channel:
        dial, control, accept, joined = await accept_without_answering(c, channel)
        await asyncio.sleep(0.2)  # the gateway has claimed the connection and waits for the DialResult
        assert c.gateway.sessions.revoke(joined.assignment.node_name)
        await refusal_within(dial, 2.0)
        assert await asyncio.wait_for(accept.code(), 5) == grpc.StatusCode.PERMISSION_DENIED
        for call in (dial, control):
            call.cancel()


async def test_the_acceptors_stream_ends_when_the_dialer_hangs_up_while_a_frame_to_it_is_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A -> gateway -> B. A hangs up (grpc.aio cancels the handler of A's stream, which splices)
    just as the gateway writes the first frame to B's Accept stream: that write is cancelled while
    grpc still sends it. B's stream must still end once the gateway is done with the connection.
    It used to stay open for ever: grpc.aio took B's initial metadata for unsent (it notes it once
    a write completes), the OK of B's handler asked to send it again, grpc refused that batch, and
    B's agent held the call and its connection to the Ray port."""
    from koinon_gateway import service

    original = tunnel_io.splice_channels  # what service calls

    class DialerHangsUpMidWrite:
        """B's end: its first write cancels the dialer's handler, which cancels this write in turn
        once it waits in grpc (the same loop turn, before grpc can have completed it)."""

        def __init__(self, peer: tunnel_io.FrameChannel, handler: asyncio.Task[Any]) -> None:
            self._peer, self._handler, self._hung_up = peer, handler, False

        async def read_frame(self) -> Any:
            return await self._peer.read_frame()

        async def write_frame(self, frame: Any) -> None:
            if not self._hung_up:
                self._hung_up = True
                self._handler.cancel()
            await self._peer.write_frame(frame)

        async def end_writing(self) -> None:
            await self._peer.end_writing()

    async def splice_while_the_dialer_hangs_up(a: tunnel_io.FrameChannel, b: tunnel_io.FrameChannel) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        await original(a, DialerHangsUpMidWrite(b, handler))

    monkeypatch.setattr(service, "splice_channels", splice_while_the_dialer_hangs_up)
    async with cluster(tmp_path, heartbeat_timeout_s=30.0) as c, channel_for(c) as channel:
        a = await c.start_agent("alpha")
        assert a.identity is not None
        joined, control = await registered_mute_node(c, channel, "b")
        dial = tunnel_stub(channel).Connect(metadata=(("authorization", f"Bearer {a.identity.credential}"),))
        accept = tunnel_stub(channel).Connect(metadata=(("authorization", f"Bearer {joined.credential}"),))
        try:
            target = pb.Dial(host=joined.assignment.address, port=joined.assignment.ports.node_manager_port)
            await dial.write(pb.Frame(dial=target))
            opened = await next_open_connection(control)
            await accept.write(pb.Frame(accept=pb.Accept(connection_id=opened.connection_id)))
            await accept.write(pb.Frame(dial_result=pb.DialResult(ok=True)))
            assert (await asyncio.wait_for(dial.read(), 5)).dial_result.ok  # type: ignore[union-attr]
            await dial.write(b"x")  # a Data frame, forwarded to B: the write the hang-up cancels
            received = []
            try:
                while (frame := await asyncio.wait_for(accept.read(), 5)) is not EOF:
                    received.append(frame)
            except TimeoutError:
                raise AssertionError(f"B's Accept stream never ended (it received {received})") from None
            assert await asyncio.wait_for(accept.code(), 5) == grpc.StatusCode.OK
            assert c.gateway.router.pending == {}
        finally:
            for call in (dial, accept, control):
                call.cancel()
