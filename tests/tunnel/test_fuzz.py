"""Fuzzing the gateway's frame handling: whatever one stream sends, only that stream suffers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from koinon_gateway.rpc import EOF
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import cluster, connect_via_proxy, echo_roundtrip

frames = st.one_of(
    st.builds(lambda h, p: pb.Frame(dial=pb.Dial(host=h, port=p)), st.text(max_size=30), st.integers(0, 70000)),
    st.builds(lambda i: pb.Frame(accept=pb.Accept(connection_id=i)), st.integers(0, 2**64 - 1)),
    st.builds(lambda ok, r: pb.Frame(dial_result=pb.DialResult(ok=ok, reason=r)), st.booleans(), st.text(max_size=10)),
    st.builds(lambda b: pb.Frame(data=pb.Data(payload=b)), st.binary(max_size=4096)),
    st.just(pb.Frame(close_write=pb.CloseWrite())),
    st.builds(lambda r: pb.Frame(close=pb.Close(reason=r)), st.text(max_size=10)),
)
control_messages = st.one_of(
    st.builds(
        lambda n, a: pb.AgentMessage(register=pb.Register(node_name=n, address=a)),
        st.text(max_size=20),
        st.text(max_size=20),
    ),
    st.builds(
        lambda s, t, i: pb.AgentMessage(heartbeat=pb.Heartbeat(seq=s, echo_gateway_time_ns=t, ray_node_id=i)),
        st.integers(0, 2**63),
        st.integers(-(2**63), 2**63 - 1),
        st.text(max_size=60),
    ),
    st.builds(lambda r: pb.AgentMessage(drain=pb.DrainRequest(reason=r)), st.text(max_size=20)),
)
# Each stream: either well-typed messages in any order, or raw bytes that may not parse at all.
# "dialled" streams first open a real connection to the head, so what follows reaches the data
# path; "registered" Control streams first register as the fuzzing node itself, so what follows
# reaches the control loop (random Dials, Accepts and Registers are refused at the door).
stream_inputs = st.tuples(
    st.sampled_from(["connect", "control", "dialled", "registered"]),
    st.one_of(
        st.lists(st.binary(max_size=64), min_size=1, max_size=4).map(lambda raw: ("raw", raw)),
        st.lists(frames, max_size=6).map(lambda f: ("frames", f)),
        st.lists(control_messages, max_size=4).map(lambda m: ("control", m)),
    ),
)


async def _send(
    channel: grpc.aio.Channel, credential: str, method: str, kind: str, items: list[object], opening: bytes | None
) -> None:
    path = f"/koinon.tunnel.v1.Tunnel/{'Connect' if method in ('connect', 'dialled') else 'Control'}"
    method_call = channel.stream_stream(path, None, None)  # bytes in, bytes out
    call = method_call(metadata=(("authorization", f"Bearer {credential}"),))  # type: ignore[call-arg]
    try:
        if opening is not None:
            await call.write(opening)
        if method == "dialled":
            await _expect_dial_ok(call)
        for item in items:
            await call.write(item if kind == "raw" else item.SerializeToString())  # type: ignore[attr-defined]
        await call.done_writing()
        # Pacing only: a stream the gateway still holds open after this is cancelled (its end then
        # comes from this side); nothing below depends on how far the gateway got with it.
        async with asyncio.timeout(1.0):
            while await call.read() is not EOF:
                pass
    except (grpc.aio.AioRpcError, TimeoutError, asyncio.InvalidStateError):
        pass
    finally:
        call.cancel()


async def _expect_dial_ok(call: grpc.aio.StreamStreamCall) -> None:  # type: ignore[type-arg]
    """Waits for the gateway's DialResult to a dialled stream's Dial: the connection to the head is
    open (and counted) before the fuzzed frames go out. The deadline only matters on failure."""
    try:
        async with asyncio.timeout(15):
            reply = await call.read()
    except (grpc.aio.AioRpcError, TimeoutError) as exc:
        raise AssertionError(f"a dial to the head was not answered: {exc!r}") from exc
    assert isinstance(reply, bytes), f"a dial to the head got no DialResult: {reply!r}"
    frame = pb.Frame.FromString(reply)
    assert frame.WhichOneof("msg") == "dial_result" and frame.dial_result.ok, f"a dial to the head failed: {frame}"


def _fuzzed_inputs() -> list[tuple[str, tuple[str, list[object]]]]:
    inputs: list[tuple[str, tuple[str, list[object]]]] = []

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(stream_inputs)
    def collect(example: tuple[str, tuple[str, list[object]]]) -> None:
        inputs.append(example)

    collect()
    return inputs


async def test_fuzzed_streams_never_disturb_other_nodes(tmp_path: Path) -> None:
    # Drawn before the gateway and the agents start: Hypothesis draws synchronously, for 0.5 s and
    # more on a busy machine, and this event loop is theirs too. Drawn in the middle of the test,
    # that stall (with CPU load on top) outlasted the heartbeat timeout: the gateway ended both
    # agents' sessions, and the dials that followed were refused "no-session".
    inputs = _fuzzed_inputs()
    # Heartbeats stay frequent, but a session ends only for cause (not for a loop slowed by a busy
    # machine), so that the good node's session surviving the fuzzing means something. A first
    # frame (the agents' own Register too) is not held to a deadline a loaded machine can miss.
    async with cluster(tmp_path, heartbeat_timeout_s=30.0, first_frame_timeout_s=5.0, accept_timeout_s=0.3) as c:
        good = await c.start_agent("good")
        fuzzer = await c.start_agent("fuzzer")
        assert good._proxy is not None and good.identity is not None and fuzzer.identity is not None
        good_session = c.gateway.sessions.by_name[good.identity.node_name]
        credential = fuzzer.identity.credential
        channel = grpc.aio.secure_channel(
            c.gateway.agent_target,
            grpc.ssl_channel_credentials(c.gateway.ca_pem),
            options=[("grpc.ssl_target_name_override", "koinon-gateway")],
        )
        identity = fuzzer.identity
        openings = {
            "dialled": pb.Frame(dial=pb.Dial(host="127.0.0.1", port=c.head_port)).SerializeToString(),
            "registered": pb.AgentMessage(
                register=pb.Register(node_name=identity.node_name, address=identity.address)
            ).SerializeToString(),
        }
        # Registering as the fuzzing node ends its agent's session for a while: those go last, so
        # that the dialled streams find the session they need.
        inputs.sort(key=lambda example: example[0] == "registered")
        opened_before = c.gateway.metrics.connections_opened
        for method, (kind, items) in inputs:
            await _send(channel, credential, method, kind, items, openings.get(method))
        await channel.close(None)
        dialled = sum(1 for method, _ in inputs if method == "dialled")
        assert c.gateway.metrics.connections_opened - opened_before == dialled  # the data path was reached
        # The good node kept its very session throughout (never dropped, never reconnected) and
        # still moves data.
        assert c.gateway.sessions.by_name.get(good.identity.node_name) is good_session
        assert not good_session.closed
        status, reader, writer = await connect_via_proxy(good._proxy, "127.0.0.1", c.head_port)
        assert status == 200
        assert await echo_roundtrip(reader, writer, b"ok" * 1000) == b"ok" * 1000
        writer.close()
        # No stream outlived its caller (the good one above has ended too), and the fuzzing node
        # itself is back: its agent re-registered after the forged sessions ended.
        await wait_until(lambda: c.gateway.metrics.connections_active == 0)
        assert fuzzer._proxy is not None
        async with asyncio.timeout(15):
            while True:  # 502 until the agent's new Control stream is up
                status, reader, writer = await connect_via_proxy(fuzzer._proxy, "127.0.0.1", c.head_port)
                if status == 200:
                    break
                writer.close()
                await asyncio.sleep(0.1)
        assert await echo_roundtrip(reader, writer, b"me too") == b"me too"
        writer.close()


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.05)
