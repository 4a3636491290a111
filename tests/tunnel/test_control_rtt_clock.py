"""RTT is the difference of two time.time_ns() readings (ping sent, answer read): the wall clock,
which NTP may step. A step between a ping and its answer becomes the node's latency (clamped to 0
for a step back, tens of seconds for a step forward), written to status and used for placement."""

from __future__ import annotations

import asyncio
import time
import types
from pathlib import Path

import pytest
from koinon_gateway import service as service_module
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import channel_for, cluster, registered_mute_node

STEP_NS = 30 * 10**9


async def test_a_wall_clock_step_is_not_taken_for_latency(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    offset = 0
    clock = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    clock.time_ns = lambda: time.time_ns() + offset
    monkeypatch.setattr(service_module, "time", clock)
    async with cluster(tmp_path, heartbeat_interval_s=0.2, heartbeat_timeout_s=2.0) as c, channel_for(c) as channel:
        joined, control = await registered_mute_node(c, channel)  # pinged every interval; answers each ping
        session = c.gateway.sessions.by_name[joined.assignment.node_name]
        try:
            answered = 0
            while answered < 6:
                message = await asyncio.wait_for(control.read(), 5)
                assert isinstance(message, pb.GatewayMessage)
                if message.WhichOneof("msg") != "ping":
                    continue
                if answered == 3:
                    offset += STEP_NS  # NTP steps the gateway's clock while this ping is out
                heartbeat = pb.Heartbeat(echo_seq=message.ping.seq, echo_gateway_time_ns=message.ping.gateway_time_ns)
                await control.write(pb.AgentMessage(heartbeat=heartbeat))
                answered += 1
            await asyncio.sleep(0.1)
            assert session.rtt_smoothed_ms is not None
            assert session.rtt_smoothed_ms < 1000, f"smoothed RTT {session.rtt_smoothed_ms:.0f} ms after a clock step"
        finally:
            control.cancel()
