"""A malformed Control message after Register ends its call with INVALID_ARGUMENT and one bounded
line; malformed Connect frames cannot flood the log; a flood that stops is still summed up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import grpc
import pytest
from koinon_gateway.log_limit import LimitedLog
from koinon_gateway.rpc import EOF, SERVICE, tunnel_stub
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import channel_for, cluster, registered_mute_node


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
