"""How proxied connections end: a peer that half-closes and then vanishes or aborts still ends the
connection (it was held until the socket's side sent something); a clean end loses nothing (the
request/half-close/answer pattern); a local refusal at the acceptor reaches the dialer at once;
one volunteer-to-volunteer connection counts once in the active gauge; gateway text cannot add
lines to the local proxy's HTTP answer."""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path

import pytest
from koinon_gateway import tunnel_io
from koinon_gateway.rpc import EOF, tunnel_stub
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import channel_for, cluster, connect_via_proxy, next_open_connection, registered_mute_node
from .test_tcp_pipe import ScriptedChannel


async def test_head_connection_ends_when_a_half_closed_volunteer_vanishes(tmp_path: Path) -> None:
    """head -> head proxy -> volunteer B. B half-closes (CloseWrite), then its agent vanishes
    (its Accept stream is cancelled). The head's connection and the pending connection must end."""
    async with cluster(tmp_path, heartbeat_timeout_s=30.0) as c, channel_for(c) as channel:
        joined, control = await registered_mute_node(c, channel, "b")
        b_metadata = (("authorization", f"Bearer {joined.credential}"),)
        head_proxy_port = int(c.gateway.head_proxy_url.rsplit(":", 1)[1])
        address, port = joined.assignment.address, joined.assignment.ports.node_manager_port
        reader, writer = await asyncio.open_connection("127.0.0.1", head_proxy_port)
        writer.write(f"CONNECT {address}:{port} HTTP/1.1\r\n\r\n".encode())
        await writer.drain()
        opened = await next_open_connection(control)
        accept = tunnel_stub(channel).Connect(metadata=b_metadata)
        await accept.write(pb.Frame(accept=pb.Accept(connection_id=opened.connection_id)))
        await accept.write(pb.Frame(dial_result=pb.DialResult(ok=True)))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        await accept.write(pb.Frame(close_write=pb.CloseWrite()))  # B is done sending
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the head sees B's EOF
        accept.cancel()  # B's agent vanishes
        await asyncio.sleep(2.0)
        try:
            assert c.gateway.router.pending == {}, "the head proxy still splices a connection to a vanished volunteer"
        finally:
            writer.close()
            control.cancel()


async def test_dialer_stream_ends_when_a_half_closed_peer_vanishes(tmp_path: Path) -> None:
    """A -> gateway -> B. B half-closes, then B's Accept stream is cancelled. A's stream must be
    told (Close or end of stream) and stop counting against A's streams."""
    async with cluster(tmp_path, heartbeat_timeout_s=30.0) as c, channel_for(c) as channel:
        a = await c.start_agent("alpha")
        assert a.identity is not None
        joined, control = await registered_mute_node(c, channel, "b")
        b_metadata = (("authorization", f"Bearer {joined.credential}"),)
        dial = tunnel_stub(channel).Connect(metadata=(("authorization", f"Bearer {a.identity.credential}"),))
        target = pb.Dial(host=joined.assignment.address, port=joined.assignment.ports.node_manager_port)
        await dial.write(pb.Frame(dial=target))
        opened = await next_open_connection(control)
        accept = tunnel_stub(channel).Connect(metadata=b_metadata)
        await accept.write(pb.Frame(accept=pb.Accept(connection_id=opened.connection_id)))
        await accept.write(pb.Frame(dial_result=pb.DialResult(ok=True)))
        assert (await asyncio.wait_for(dial.read(), 5)).dial_result.ok
        await accept.write(pb.Frame(close_write=pb.CloseWrite()))
        frame = await asyncio.wait_for(dial.read(), 5)
        assert frame.WhichOneof("msg") == "close_write"
        accept.cancel()  # B vanishes after half-closing
        try:
            frame = await asyncio.wait_for(dial.read(), 5)
            assert frame is EOF or frame.WhichOneof("msg") == "close", frame
        except TimeoutError:
            raise AssertionError("A's stream was never told that B vanished") from None
        finally:
            await asyncio.sleep(0.2)
            open_streams = c.gateway.sessions.streams.counted(a.identity.node_name, "dialing")
            dial.cancel()
            control.cancel()
        assert open_streams == 0


async def test_volunteer_to_volunteer_request_then_half_close_gets_the_whole_answer(tmp_path: Path) -> None:
    """A's client half-closes after its request; B's server answers after EOF, then closes: every
    byte arrives (ending cleanly must not reset the streams while the last frames are in flight)."""
    import os

    from .helpers import connect_via_proxy

    payload = os.urandom(3 << 20)

    async def answer_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()
        await asyncio.sleep(0.3)
        writer.write(payload + request)
        await writer.drain()
        writer.close()

    async with cluster(tmp_path, tls=False) as c:
        a = await c.start_agent("alpha")
        b = await c.start_agent("beta")
        assert b.identity is not None and b.assignment is not None and a._proxy is not None
        server = await asyncio.start_server(answer_after_eof, b.identity.address, b.assignment.ports.node_manager_port)
        try:
            status, reader, writer = await connect_via_proxy(
                a._proxy, b.identity.address, b.assignment.ports.node_manager_port
            )
            assert status == 200
            writer.write(b"req")
            writer.write_eof()
            got = await asyncio.wait_for(reader.read(), 10)
            assert got == payload + b"req"
            writer.close()
        finally:
            server.close()


async def test_one_volunteer_to_volunteer_connection_counts_as_one_active_connection(tmp_path: Path) -> None:
    """connections_opened_total counts one per proxied connection, and so does connections_active:
    a volunteer-to-volunteer connection takes two Connect streams (the dialer's and the acceptor's)
    but is one connection, as a head one is."""
    from .helpers import connect_via_proxy, echo_handler, echo_roundtrip

    async with cluster(tmp_path, tls=False) as c:
        a = await c.start_agent("alpha")
        b = await c.start_agent("beta")
        assert b.identity is not None and b.assignment is not None and a._proxy is not None
        port = b.assignment.ports.node_manager_port
        server = await asyncio.start_server(echo_handler, b.identity.address, port)
        try:
            status, reader, writer = await connect_via_proxy(a._proxy, b.identity.address, port)
            assert status == 200 and await echo_roundtrip(reader, writer, b"x") == b"x"
            assert c.gateway.metrics.connections_opened == 1
            assert c.gateway.metrics.connections_active == 1
            writer.close()
        finally:
            server.close()


async def test_splice_tcp_notices_a_close_that_follows_a_close_write() -> None:
    """The cause of the two leaks above, in splice_tcp itself (the gateway's head route, the head
    proxy, the agent's local proxy and accept_connection): once the tunnel side sent CloseWrite,
    nobody read the channel any more, so a later Close (or the stream's end) went unseen while the
    local TCP peer stayed idle, and the socket and the stream were held for ever."""
    from koinon_gateway.tunnel_io import splice_tcp

    # A tunnel peer that half-closes, then aborts (Close: its socket was reset).
    channel = ScriptedChannel([pb.Frame(close_write=pb.CloseWrite()), pb.Frame(close=pb.Close(reason="tcp-reset"))])
    splices: list[asyncio.Task[bool]] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        splices.append(asyncio.ensure_future(splice_tcp(reader, writer, channel)))  # type: ignore[arg-type]

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the CloseWrite arrived as EOF
        # The local peer keeps its side open and idle; the tunnel peer has aborted.
        done, _ = await asyncio.wait(splices, timeout=3)
        assert done, "splice_tcp never noticed the tunnel peer's Close after its CloseWrite"
        assert splices[0].result() is False
    finally:
        for task in splices:
            task.cancel()
        writer.close()
        server.close()


async def test_a_refused_local_connect_at_the_acceptor_is_reported_promptly(tmp_path: Path) -> None:
    """B's agent cannot connect to its local port: it writes DialResult(ok=False) and at once
    cancels its call. The dialer must hear 'unreachable' fast, not after accept_timeout_s."""
    import time

    async with cluster(tmp_path, tls=False, accept_timeout_s=8.0) as c:
        a = await c.start_agent("alpha")
        b = await c.start_agent("beta")
        assert a.identity is not None and b.identity is not None and b.assignment is not None
        import grpc
        from koinon_gateway.rpc import tunnel_stub as stub

        slow = []
        async with grpc.aio.insecure_channel(c.gateway.agent_target) as channel:
            for _ in range(40):  # a race: usually one of the first few tries shows it
                call = stub(channel).Connect(metadata=(("authorization", f"Bearer {a.identity.credential}"),))
                started = time.monotonic()
                await call.write(
                    pb.Frame(dial=pb.Dial(host=b.identity.address, port=b.assignment.ports.node_manager_port))
                )
                result = await asyncio.wait_for(call.read(), 15)
                took = time.monotonic() - started
                assert not result.dial_result.ok
                call.cancel()
                if took > 4:
                    slow.append((round(took, 1), result.dial_result.message[:120]))
                    break
        assert slow == []


def test_gateway_refusal_text_cannot_add_lines_to_the_http_answer() -> None:
    from koinon_gateway import http_connect

    answer = http_connect.response(502, "unreachable\r\nSet-Cookie: x=1\r\n\r\nHTTP/1.1 200 OK")
    assert answer.count(b"\r\n") == 3, answer  # status line, Content-Length, blank line
    assert answer.startswith(b"HTTP/1.1 502 unreachableSet-Cookie x1HTTP1.1 200 OK")
    assert http_connect.response(403, "\r\n").startswith(b"HTTP/1.1 403 Error\r\n")


async def idle_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while await reader.read(1 << 16):
            pass
    except ConnectionError:
        pass
    finally:
        writer.close()


async def test_a_reset_at_the_dialers_socket_reaches_the_gateway_as_a_tcp_reset_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure on the TCP side reaches the other end as a Close with its reason. On the agent (a
    grpc.aio client) the read used to be cancelled first, which cancels the call: the Close was
    refused and the gateway saw only a stream that ended."""
    ends: list[str] = []
    original = tunnel_io.channel_to_tcp

    async def recording(channel, pipe, half_closed, watch=None):  # type: ignore[no-untyped-def]
        try:
            result = await original(channel, pipe, half_closed, watch)
        except BaseException as exc:
            ends.append(f"raised {type(exc).__name__}")
            raise
        ends.append(result)
        return result

    monkeypatch.setattr(tunnel_io, "channel_to_tcp", recording)
    async with cluster(tmp_path, tls=False, head_handler=idle_head) as c:
        a = await c.start_agent("alpha")
        assert a._proxy is not None
        status, _, writer = await connect_via_proxy(a._proxy, "127.0.0.1", c.head_port)
        assert status == 200
        writer.write(b"hello")
        await writer.drain()
        await asyncio.sleep(0.3)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # the dialer's local client resets
        for _ in range(50):
            if c.gateway.metrics.connections_active == 0 and len(ends) >= 2:
                break
            await asyncio.sleep(0.1)
        # ends: the agent's downstream (cancelled) and the gateway's downstream.
        assert "close:tcp-reset" in ends, ends
