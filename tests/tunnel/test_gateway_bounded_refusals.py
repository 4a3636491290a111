"""A malformed Control message after Register ends its call with INVALID_ARGUMENT and one bounded
line; malformed Connect frames cannot flood the log; a flood that stops is still summed up.
Connect streams the gateway refuses end, and stay counted against the node until they do, even
when the node never opens their flow-control window; a broken Accept is a counted violation; an
Accept stream whose dialler hung up while a write to it waited stays counted until it ends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from pathlib import Path
from typing import Any

import grpc
import pytest
from koinon_gateway.log_limit import LimitedLog
from koinon_gateway.rpc import EOF, SERVICE, tunnel_stub
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import Cluster, channel_for, cluster, connect_via_proxy, next_open_connection, registered_mute_node
from .raw_h2 import DATA, RST_STREAM, RawH2, frame

CONNECT = f"/{SERVICE}/Connect"


def insecure(c: Cluster) -> grpc.aio.Channel:
    """A plaintext channel (the raw HTTP/2 client speaks no TLS, so these clusters have none)."""
    return grpc.aio.insecure_channel(c.gateway.agent_target)


async def test_malformed_control_message_after_register_ends_with_invalid_argument(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After Register, the abort runs in _control_loop's own task: the handler catches AbortError
    as `Exception` and logs (unbounded, one per stream) "control stream failed:
    AbortError('Locally aborted.')", which is also the reason the node's status is given."""
    caplog.set_level(logging.INFO)
    async with cluster(tmp_path, heartbeat_timeout_s=30.0) as c, channel_for(c) as channel:
        joined = await tunnel_stub(channel).Join(pb.JoinRequest(token=c.tokens.add(), name_hint="evil"))
        raw: Any = channel.stream_stream(f"/{SERVICE}/Control", request_serializer=lambda b: b,
                                         response_deserializer=None)  # fmt: skip
        call = raw(metadata=(("authorization", f"Bearer {joined.credential}"),))
        register = pb.Register(node_name=joined.assignment.node_name, address=joined.assignment.address)
        await call.write(pb.AgentMessage(register=register).SerializeToString())
        assert pb.GatewayMessage.FromString(await asyncio.wait_for(call.read(), 5)).HasField("registered")
        await call.write(b"\xff\xff\xff\xff")

        async def drained() -> Any:
            with contextlib.suppress(grpc.aio.AioRpcError):
                while await call.read() is not EOF:
                    pass  # pings and the credential renewal an agent reads
            return await call.code()

        try:
            code: Any = await asyncio.wait_for(drained(), 10)
        except TimeoutError:
            code = "call still open 10 s later"
            call.cancel()
    aborts = [r.getMessage() for r in caplog.records if "AbortError" in r.getMessage()]
    assert code == grpc.StatusCode.INVALID_ARGUMENT and aborts == [], (code, aborts)


async def test_malformed_connect_frames_cannot_flood_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Refusal log lines are said to be bounded per kind and minute; a node opening Connect
    streams that send bytes protobuf rejects still writes one WARNING per stream."""
    caplog.set_level(logging.INFO)
    attempts = 60
    async with cluster(tmp_path) as c, channel_for(c) as channel:
        joined, control = await registered_mute_node(c, channel)
        raw: Any = channel.stream_stream(f"/{SERVICE}/Connect", request_serializer=lambda b: b,
                                         response_deserializer=lambda b: b)  # fmt: skip
        try:
            for _ in range(attempts):
                call = raw(metadata=(("authorization", f"Bearer {joined.credential}"),))
                await call.write(b"\xff\xff\xff\xff")
                await asyncio.wait_for(call.code(), 5)
        finally:
            control.cancel()
        assert c.gateway.metrics.refused_streams["protocol-violation"] == attempts
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING and "connect stream closed" in r.getMessage()]
    assert len(lines) <= 20, f"{len(lines)} WARNING lines for {attempts} malformed Connect streams"


def test_suppressed_refusals_are_reported_even_when_the_flood_stops(caplog: pytest.LogCaptureFixture) -> None:
    """'then one line saying how many more': the summary is only written when a refusal of the
    same kind comes after the window; a burst that stops (or a key evicted past MAX_KEYS) never
    says how many more there were."""
    now = [0.0]
    limited = LimitedLog(logging.getLogger("koinon_gateway.test"), per_window=3, window_s=60.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING)
    for number in range(50):
        limited.warning("vn-a forbidden-port", "refused dial %d", number)
    now[0] = 3600.0
    limited.warning("join unknown", "a refusal of another kind, an hour later")
    assert any("47 more" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


async def test_accept_streams_for_no_pending_connection_end_even_when_never_read(tmp_path: Path) -> None:
    """Accept streams for no pending connection, from a client that never opens its streams'
    window (grpc's own client always does): the refusal must not be a frame that waits for that
    window. Each was uncounted from its first frame and held for ever (its handler, call and
    buffers: a way to the gateway's memory limit, and every node's session with it)."""
    streams = 40
    async with cluster(tmp_path, tls=False, max_streams_per_node=4) as c, insecure(c) as channel:
        response, control = await registered_mute_node(c, channel)
        host, port = c.gateway.agent_target.rsplit(":", 1)
        raw = await RawH2.connect(host, int(port), stream_window=0)
        accept = pb.Frame(accept=pb.Accept(connection_id=987654)).SerializeToString()
        metadata = {"authorization": f"Bearer {response.credential}"}
        try:
            opened = {raw.open_call(CONNECT, c.gateway.agent_target, metadata, accept) for _ in range(streams)}
            await raw.writer.drain()
            deadline = asyncio.get_running_loop().time() + 5
            while raw.ended != opened and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            held = c.gateway.sessions.streams.open(response.assignment.node_name)
            ended = len(raw.ended & opened)
        finally:
            await raw.close()
            control.cancel()
        refused = c.gateway.metrics.refused_streams
        # All refused: as unknown, or (while max_streams_per_node were still opening) as too many.
        assert refused["unknown-connection"] + refused["too-many-streams"] == streams, dict(refused)
        assert (held, ended) == (0, streams), f"{held} streams still held, {ended} of {streams} ended"


async def test_dial_refusals_a_node_never_reads_stay_counted_against_it(tmp_path: Path) -> None:
    """A refused Dial is answered with a DialResult frame, which waits for as long as the node
    keeps its stream's window shut (grpc sends no status past it, nor resets the stream): the
    stream must count among the node's connections all that time, so such a node holds only
    max_streams_per_node of them."""
    cap = 4
    async with cluster(tmp_path, tls=False, max_streams_per_node=cap) as c, insecure(c) as channel:
        response, control = await registered_mute_node(c, channel)
        host, port = c.gateway.agent_target.rsplit(":", 1)
        raw = await RawH2.connect(host, int(port), stream_window=0)
        dial = pb.Frame(dial=pb.Dial(host="127.0.20.15", port=1)).SerializeToString()  # no such node
        metadata = {"authorization": f"Bearer {response.credential}"}
        try:
            for _ in range(2 * cap):
                raw.open_call(CONNECT, c.gateway.agent_target, metadata, dial)
                await raw.writer.drain()
                await asyncio.sleep(0.1)  # one at a time: the first ones are dialling by the next
            held = c.gateway.sessions.streams.open(response.assignment.node_name)
        finally:
            await raw.close()
            control.cancel()
        assert held == cap, f"{held} streams held, cap {cap}"
        assert c.gateway.metrics.refused_dials["unreachable"] == cap
        assert c.gateway.metrics.refused_streams["too-many-streams"] == cap


async def test_an_accept_stream_answering_with_data_instead_of_a_dial_result_is_a_counted_violation(
    tmp_path: Path,
) -> None:
    """The accepting node breaks the Accept protocol (a Data frame where its DialResult belongs):
    its stream ends with INVALID_ARGUMENT and counts as a protocol violation, and the dialler is
    refused as before."""
    async with cluster(tmp_path, tls=False, heartbeat_timeout_s=600.0) as c, insecure(c) as channel:
        b, b_control = await registered_mute_node(c, channel, "peer")
        a, a_control = await registered_mute_node(c, channel, "dialler")
        dial = tunnel_stub(channel).Connect(metadata=(("authorization", f"Bearer {a.credential}"),))
        accept = tunnel_stub(channel).Connect(metadata=(("authorization", f"Bearer {b.credential}"),))
        try:
            target = pb.Dial(host=b.assignment.address, port=b.assignment.ports.node_manager_port)
            await dial.write(pb.Frame(dial=target))
            opened = await next_open_connection(b_control)
            await accept.write(pb.Frame(accept=pb.Accept(connection_id=opened.connection_id)))
            await accept.write(pb.Frame(data=pb.Data(payload=b"not a dial result")))
            result = await asyncio.wait_for(dial.read(), 5)
            code = await asyncio.wait_for(accept.code(), 5)
        finally:
            for call in (dial, accept, a_control, b_control):
                call.cancel()
        assert result.dial_result.reason == "unreachable" and not result.dial_result.ok
        assert c.gateway.metrics.refused_dials["unreachable"] == 1
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert c.gateway.metrics.refused_streams["protocol-violation"] == 1, dict(c.gateway.metrics.refused_streams)


WINDOW_UPDATE = 0x8


def grpc_message(message: pb.Frame) -> bytes:
    body = message.SerializeToString()
    return b"\x00" + struct.pack(">I", len(body)) + body


async def accept_and_answer_ok(raw: RawH2, c: Cluster, metadata: dict[str, str], opened: pb.OpenConnection) -> int:
    """Node B's side of ``opened`` on a hand-written HTTP/2 connection (one that never opens its
    stream windows): an Accept stream that answers DialResult ok. Its stream id."""
    accept = pb.Frame(accept=pb.Accept(connection_id=opened.connection_id)).SerializeToString()
    stream = raw.open_call(CONNECT, c.gateway.agent_target, metadata, accept)
    raw.writer.write(frame(DATA, 0, stream, grpc_message(pb.Frame(dial_result=pb.DialResult(ok=True)))))
    await raw.writer.drain()
    return stream


async def test_accepted_streams_a_node_never_reads_stay_counted_after_their_dialler_hangs_up(tmp_path: Path) -> None:
    """Node B claims connections its own volunteer's node A dials and never opens its Accept
    streams' window; A sends one Data frame (it waits on that window) and hangs up. grpc sends no
    status behind a pending write, so each such call is held for as long as B likes: it must stay
    counted against B (its further streams refused), not against nobody (it was: any number of
    them, a way to the gateway's memory limit)."""
    cap, rounds = 4, 12
    overrides: dict[str, Any] = {"max_streams_per_node": cap, "heartbeat_timeout_s": 600.0, "accept_timeout_s": 2.0}
    async with cluster(tmp_path, tls=False, **overrides) as c, insecure(c) as channel:
        b, b_control = await registered_mute_node(c, channel, "peer")
        a, a_control = await registered_mute_node(c, channel, "dialler")
        host, port = c.gateway.agent_target.rsplit(":", 1)
        raw = await RawH2.connect(host, int(port), stream_window=0)
        b_meta = {"authorization": f"Bearer {b.credential}"}
        accepted, connected = set(), 0
        try:
            for _ in range(rounds):
                dial = tunnel_stub(channel).Connect(metadata=(("authorization", f"Bearer {a.credential}"),))
                target = pb.Dial(host=b.assignment.address, port=b.assignment.ports.node_manager_port)
                await dial.write(pb.Frame(dial=target))
                opened = await asyncio.wait_for(next_open_connection(b_control), 5)
                stream = await accept_and_answer_ok(raw, c, b_meta, opened)
                accepted.add(stream)
                result = await asyncio.wait_for(dial.read(), 5)
                if result.dial_result.ok:  # refused once B's streams are all held (too many)
                    connected += 1
                    await dial.write(pb.Frame(data=pb.Data(payload=b"x" * 1000)))
                    await asyncio.sleep(0.2)
                dial.cancel()  # the dialler hangs up
                await asyncio.sleep(0.2)
            await asyncio.sleep(1)
            streams = c.gateway.sessions.streams
            counted = streams.counted(b.assignment.node_name, "opening")
            held = sorted(accepted - raw.ended)
            dialler_streams = streams.open(a.assignment.node_name)
            # Released once grpc ends the call, however it ends: B reads at last (the write is
            # done, then the status goes out), or resets the stream.
            raw.writer.write(frame(WINDOW_UPDATE, 0, held[0], struct.pack(">I", 1 << 16)))
            raw.writer.write(frame(RST_STREAM, 0, held[1], struct.pack(">I", 8)))  # CANCEL
            await raw.writer.drain()
            for _ in range(50):
                if held[0] in raw.ended and streams.counted(b.assignment.node_name, "opening") == len(held) - 2:
                    break
                await asyncio.sleep(0.1)
            after_two = streams.counted(b.assignment.node_name, "opening"), held[0] in raw.ended
        finally:
            await raw.close()  # ends the rest
            for call in (a_control, b_control):
                call.cancel()
        assert connected == cap, f"{connected} of {rounds} connections made (cap {cap})"
        # Every Accept stream either ended or still counts against its node, bounded by the cap.
        assert len(held) <= counted <= cap, f"{len(held)} accepted streams never ended, {counted} counted (cap {cap})"
        assert c.gateway.metrics.refused_streams["too-many-streams"] == rounds - cap
        assert dialler_streams == 0  # the dialler's own allowance is not spent by B's
        assert after_two == (len(held) - 2, True), after_two
        for _ in range(50):  # no slot outlives its call
            if not streams.open(b.assignment.node_name):
                break
            await asyncio.sleep(0.1)
        assert streams.open(b.assignment.node_name) == streams.counted(b.assignment.node_name, "opening") == 0


async def test_head_connections_to_a_node_that_never_reads_stay_counted_after_the_head_resets_them(
    tmp_path: Path,
) -> None:
    """The same through the head proxy: the head resets its connection, the proxy's Close notice
    to the node waits on the Accept stream's shut window and is given up after a second; the head's
    connection no longer counts, and the Accept stream, which grpc holds until that write is done,
    counts against its node instead."""
    cap, rounds = 2, 4
    overrides: dict[str, Any] = {"max_streams_per_node": cap, "heartbeat_timeout_s": 600.0, "accept_timeout_s": 2.0}
    async with cluster(tmp_path, tls=False, **overrides) as c, insecure(c) as channel:
        b, b_control = await registered_mute_node(c, channel, "peer")
        proxy_port = int(c.gateway.head_proxy_url.rsplit(":", 1)[1])
        host, port = c.gateway.agent_target.rsplit(":", 1)
        raw = await RawH2.connect(host, int(port), stream_window=0)
        b_meta = {"authorization": f"Bearer {b.credential}"}
        accepted, statuses = set(), []
        try:
            for _ in range(rounds):
                target = (b.assignment.address, b.assignment.ports.node_manager_port)
                dialing = asyncio.ensure_future(connect_via_proxy(proxy_port, *target))
                opened = await asyncio.wait_for(next_open_connection(b_control), 5)
                stream = await accept_and_answer_ok(raw, c, b_meta, opened)
                accepted.add(stream)
                status, _, writer = await asyncio.wait_for(dialing, 5)
                statuses.append(status)
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()  # a reset (no lingering): the proxy sends the node a Close
                await asyncio.sleep(1.5)  # the Close notice is given up after 1 s
            counted = c.gateway.sessions.streams.counted(b.assignment.node_name, "opening")
            not_ended = len(accepted - raw.ended)
            connections = c.gateway.metrics.connections_active
        finally:
            await raw.close()
            b_control.cancel()
        assert statuses == [200] * cap + [502] * (rounds - cap), statuses
        assert not_ended <= counted <= cap, f"{not_ended} accepted streams never ended, {counted} counted (cap {cap})"
        assert connections == 0  # the head proxy holds none of them any more
