"""What an SRE gets from /metrics and the gateway's log when volunteers (or, for Join, anyone)
misbehave: typed metric families, every refusal counted, and refusals that cannot flood the log."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from koinon_gateway.log_limit import LimitedLog
from koinon_gateway.rpc import EOF, SERVICE, tunnel_stub
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import channel_for, cluster, registered_mute_node


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        assert response.status == 200
        return await response.text()


def gateway_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("koinon_gateway") and r.levelno >= logging.WARNING]


async def refused_dial(channel: grpc.aio.Channel, credential: str, host: str, port: int) -> pb.DialResult:
    call = tunnel_stub(channel).Connect(metadata=(("authorization", f"Bearer {credential}"),))
    try:
        await call.write(pb.Frame(dial=pb.Dial(host=host, port=port)))
        frame = await asyncio.wait_for(call.read(), 5)
        assert frame is not EOF and frame.HasField("dial_result"), frame
        result: pb.DialResult = frame.dial_result
        return result
    finally:
        call.cancel()


async def test_metrics_exposition_has_type_metadata(tmp_path: Path) -> None:
    """Prometheus text format: every family announces its TYPE (counters ending in _total as
    counters), so that Prometheus/Grafana know rate() applies; prometheus_client's parser reports
    families without # TYPE as 'unknown'."""
    from prometheus_client.parser import text_string_to_metric_families

    async with cluster(tmp_path) as c, channel_for(c) as channel:
        joined, control = await registered_mute_node(c, channel)
        try:
            await refused_dial(channel, joined.credential, "10.96.0.1", 443)
        finally:
            control.cancel()
        text = await scrape(c.gateway.admin_url)
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    untyped = sorted(name for name, kind in families.items() if kind == "unknown")
    assert untyped == [], f"families without # TYPE/# HELP: {untyped}\n{text}"


async def test_refused_dials_are_logged_but_cannot_flood_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A hostile node hammering forbidden dials is counted per dial; the log should aggregate or
    rate-limit, not write one WARNING line per refused dial."""
    caplog.set_level(logging.INFO)
    attempts = 200
    async with cluster(tmp_path) as c, channel_for(c) as channel:
        joined, control = await registered_mute_node(c, channel)
        try:
            for start in range(0, attempts, 50):
                results = await asyncio.gather(
                    *(refused_dial(channel, joined.credential, "10.96.0.1", 443) for _ in range(start, start + 50))
                )
                assert all(not r.ok and r.reason == "forbidden-address" for r in results)
        finally:
            control.cancel()
        assert c.gateway.metrics.refused_dials["forbidden-address"] == attempts
    lines = [r for r in gateway_warnings(caplog) if "refused dial" in r.getMessage()]
    assert len(lines) <= 20, f"{len(lines)} WARNING lines for {attempts} refused dials"


async def test_unauthenticated_joins_cannot_flood_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Anyone who reaches port 7443 can call Join, no credential needed; each refused token
    writes one WARNING line."""
    caplog.set_level(logging.INFO)
    attempts = 300
    async with cluster(tmp_path) as c, channel_for(c) as channel:
        stub = tunnel_stub(channel)

        async def join(i: int) -> grpc.StatusCode:
            try:
                await stub.Join(pb.JoinRequest(token=f"abcdef.{i:016d}"))
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        codes = await asyncio.gather(*(join(i) for i in range(attempts)))
        assert set(codes) == {grpc.StatusCode.PERMISSION_DENIED}
        assert c.gateway.metrics.joins["unknown"] == attempts
    lines = [r for r in gateway_warnings(caplog) if "join refused" in r.getMessage()]
    assert len(lines) <= 20, f"{len(lines)} WARNING lines for {attempts} unauthenticated refused joins"


async def test_malformed_control_message_is_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A Control message protobuf cannot parse, after Register: counted under its own reason?"""
    caplog.set_level(logging.INFO)
    async with cluster(tmp_path, heartbeat_timeout_s=30.0) as c, channel_for(c) as channel:
        stub = tunnel_stub(channel)
        joined = await stub.Join(pb.JoinRequest(token=c.tokens.add(), name_hint="evil"))
        raw: Any = channel.stream_stream(
            f"/{SERVICE}/Control", request_serializer=lambda b: b, response_deserializer=None
        )
        call = raw(metadata=(("authorization", f"Bearer {joined.credential}"),))
        register = pb.Register(node_name=joined.assignment.node_name, address=joined.assignment.address)
        await call.write(pb.AgentMessage(register=register).SerializeToString())
        first = pb.GatewayMessage.FromString(await asyncio.wait_for(call.read(), 5))
        assert first.HasField("registered")
        for _ in range(20):
            try:
                await call.write(b"\xff\xff\xff\xff")  # not a protobuf
            except Exception:
                break
        code = await asyncio.wait_for(call.code(), 5)
        metrics = dict(c.gateway.metrics.refused_streams)
        text = await scrape(c.gateway.admin_url)
    records = [f"{r.name} {r.levelname} {r.getMessage()[:120]} exc={bool(r.exc_info)}" for r in caplog.records]
    print(code, metrics, *records, sep="\n")
    assert any(k for k in metrics if "malformed" in k or "protocol" in k), (code, metrics, text)


async def test_malformed_register_is_counted_and_logged_without_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Register that protobuf cannot parse (a credential holder's first Control message): the
    handler lets DecodeError escape, so it is not counted and grpc logs a traceback per call."""
    caplog.set_level(logging.INFO)
    async with cluster(tmp_path) as c, channel_for(c) as channel:
        joined = await tunnel_stub(channel).Join(pb.JoinRequest(token=c.tokens.add(), name_hint="evil"))
        raw: Any = channel.stream_stream(
            f"/{SERVICE}/Control", request_serializer=lambda b: b, response_deserializer=None
        )
        codes = []
        for _ in range(5):
            call = raw(metadata=(("authorization", f"Bearer {joined.credential}"),))
            await call.write(b"\xff\xff\xff\xff")
            codes.append(await asyncio.wait_for(call.code(), 5))
        metrics = dict(c.gateway.metrics.refused_streams)
    # asyncio's own "Event loop is closed" noise from grpc.aio's poller at teardown is not the gateway's.
    tracebacks = [r for r in caplog.records if r.exc_info and r.name != "asyncio"]
    print(codes, metrics, *[f"{r.name} {r.levelname} {r.getMessage()[:100]}" for r in caplog.records], sep="\n")
    assert metrics.get("no-register") == 5 or any("malformed" in k for k in metrics), (codes, metrics)
    assert tracebacks == [], [r.getMessage()[:100] for r in tracebacks]


async def test_malformed_join_from_anyone_is_counted_and_not_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Join needs no credential: anyone reaching port 7443 can send bytes protobuf rejects."""
    caplog.set_level(logging.INFO)
    async with cluster(tmp_path) as c, channel_for(c) as channel:
        raw = channel.unary_unary(f"/{SERVICE}/Join", request_serializer=lambda b: b, response_deserializer=None)
        codes = []
        for _ in range(5):
            try:
                await raw(b"\xff\xff\xff\xff")
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
        joins = dict(c.gateway.metrics.joins)
    tracebacks = [r for r in caplog.records if (r.exc_info or r.levelno >= logging.ERROR) and r.name != "asyncio"]
    print(codes, joins, *[f"{r.name} {r.levelname} {r.getMessage()[:100]}" for r in caplog.records], sep="\n")
    assert tracebacks == [], [f"{r.name}: {r.getMessage()[:100]}" for r in tracebacks]
    assert joins.get("malformed") == 5, joins


async def test_refusal_reasons_of_dials(tmp_path: Path) -> None:
    """Sanity (expected to pass): each forbidden target is refused and counted by reason."""
    async with cluster(tmp_path) as c, channel_for(c) as channel:
        a, ca = await registered_mute_node(c, channel, "a")
        b, cb = await registered_mute_node(c, channel, "b")
        admin_port = int(c.gateway.admin_url.rsplit(":", 1)[1])
        grpc_port = int(c.gateway.agent_target.rsplit(":", 1)[1])
        try:
            cases = {
                ("127.0.0.1", admin_port): "forbidden-port",
                ("127.0.0.1", grpc_port): "forbidden-port",
                ("127.0.0.1", 22): "forbidden-port",
                ("10.96.0.1", 443): "forbidden-address",
                ("kubernetes.default.svc", 443): "forbidden-address",
                ("localhost", c.head_port): "forbidden-address",
                (a.assignment.address, a.assignment.ports.node_manager_port): "forbidden-address",
                (b.assignment.address, 22): "forbidden-port",
                ("127.0.20.14", 1): "unreachable",
            }
            for (host, port), reason in cases.items():
                result = await refused_dial(channel, a.credential, host, port)
                assert (result.ok, result.reason) == (False, reason), (host, port, result)
        finally:
            ca.cancel()
            cb.cancel()


def test_the_log_keeps_a_few_refusals_of_each_kind_and_then_says_how_many_more(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    limited = LimitedLog(logging.getLogger("koinon_gateway.test"), per_window=3, window_s=60.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING)
    for number in range(50):
        limited.warning("vn-a forbidden-port", "refused dial %d", number)
    limited.warning("vn-b forbidden-port", "refused dial from another node")  # its own allowance
    now[0] = 61.0
    limited.warning("vn-a forbidden-port", "refused dial again")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == ["refused dial 0", "refused dial 1", "refused dial 2"]
    assert "summarized" in lines[3]
    assert "refused dial from another node" in lines
    assert any("47 more" in line for line in lines), lines
    assert lines[-1] == "refused dial again"


def test_a_broken_token_secret_is_not_confirmed_to_a_caller() -> None:
    """A token Secret with malformed data is read before the secret is compared: the caller was
    told "invalid-token-data: Secret bootstrap-token-<id> ...", which confirms that the id exists."""
    from koinon_gateway.service import client_refusal
    from koinon_gateway.tokens import TokenError

    broken = client_refusal(
        TokenError("invalid-token-data", "Secret bootstrap-token-abcdef: data.expiration: not RFC3339")
    )
    unknown = client_refusal(TokenError("unknown", "no token abcdef"))
    assert broken == unknown and "abcdef" not in broken


async def test_the_node_streams_peak_counts_streams_that_never_send_their_first_frame(tmp_path: Path) -> None:
    """As the README and the metric's help say, and as the limit counts them: it was updated only
    once a stream's first frame came, so silent streams never showed."""
    async with cluster(tmp_path, first_frame_timeout_s=5.0) as c:
        async with channel_for(c) as channel:
            response, control = await registered_mute_node(c, channel)
            name = response.assignment.node_name
            metadata = (("authorization", f"Bearer {response.credential}"),)
            silent = [tunnel_stub(channel).Connect(metadata=metadata) for _ in range(5)]
            for _ in range(100):
                if c.gateway.sessions.streams.open(name) == 5:
                    break
                await asyncio.sleep(0.05)
            held, peak = c.gateway.sessions.streams.open(name), c.gateway.metrics.node_streams_peak
            for call in silent:
                call.cancel()
            control.cancel()
        assert held == 5 and peak == held
