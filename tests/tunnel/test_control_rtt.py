"""RTT is meant to be measured so that "an agent can delay its answer but not claim a lower latency"
(README). With predictable ping seqs an agent could answer the next ping before it arrived and get
a latency far below its real one, which the scheduler places by; seqs are random now."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from koinon_gateway import sessions as sessions_module
from koinon_gateway.rpc import EOF, tunnel_stub
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import channel_for, cluster, next_message

LINK_DELAY_S = 0.3  # every gateway -> agent message takes this long to arrive (a slow downlink)


async def test_an_agent_cannot_claim_a_latency_below_its_real_one_by_guessing_ping_seqs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def slow_write_outbox(self: sessions_module.NodeSession) -> None:
        while True:
            message = await self.outbox.get()
            await asyncio.sleep(LINK_DELAY_S)
            await self.stream.write(message)

    monkeypatch.setattr(sessions_module.NodeSession, "write_outbox", slow_write_outbox)
    async with cluster(tmp_path, heartbeat_interval_s=0.2, heartbeat_timeout_s=1.0) as c, channel_for(c) as channel:
        joined: pb.JoinResponse = await tunnel_stub(channel).Join(
            pb.JoinRequest(token=c.tokens.add(), name_hint="liar")
        )
        name = joined.assignment.node_name
        control = tunnel_stub(channel).Control(metadata=(("authorization", f"Bearer {joined.credential}"),))
        await control.write(
            pb.AgentMessage(
                register=pb.Register(node_name=name, address=joined.assignment.address, self_heartbeats=True)
            )
        )
        assert (await next_message(control)).WhichOneof("msg") == "registered"
        seen = 0

        async def read() -> None:
            nonlocal seen
            while (message := await control.read()) is not EOF:
                if message.WhichOneof("msg") == "ping":
                    seen = max(seen, message.ping.seq)

        reader = asyncio.ensure_future(read())
        try:
            # Never a real answer: only heartbeats naming pings that have not arrived yet.
            for _ in range(500):
                for guess in (seen + 1, seen + 2):
                    await control.write(pb.AgentMessage(heartbeat=pb.Heartbeat(echo_seq=guess, ray_state="running")))
                await asyncio.sleep(0.005)
            session = c.gateway.sessions.by_name[name]
            # Seqs cannot be guessed (before 2026-12-06 they counted 1, 2, 3, ... and the guesses
            # gave 1.5 ms over this link): no answer named a ping the agent had received.
            assert session.rtt_smoothed_ms is None
            # Answering the pings it did receive measures the link as it is.
            answered = 0
            while answered < 3:
                if seen:
                    await control.write(pb.AgentMessage(heartbeat=pb.Heartbeat(echo_seq=seen, ray_state="running")))
                    answered += 1
                await asyncio.sleep(LINK_DELAY_S)
            assert session.rtt_smoothed_ms is not None
            # Every gateway message took LINK_DELAY_S to reach the agent: no real round trip is shorter.
            assert session.rtt_smoothed_ms >= LINK_DELAY_S * 1000, (
                f"measured {session.rtt_smoothed_ms:.1f} ms (last {session.rtt_last_ms:.1f} ms) "
                f"over a link that delays each message {LINK_DELAY_S * 1000:.0f} ms"
            )
        finally:
            reader.cancel()
            control.cancel()
