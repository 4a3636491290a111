"""How often the gateway writes a VolunteerNode's status: changes at once, heartbeat news rarely."""

from __future__ import annotations

from koinon_gateway.addresses import PortBlock
from koinon_gateway.config import GatewayConfig
from koinon_gateway.registry import InMemoryNodeRegistry
from koinon_gateway.sessions import NodeSession, SessionTable
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb


def make_table() -> tuple[SessionTable, InMemoryNodeRegistry, NodeSession]:
    config = GatewayConfig(status_write_interval_s=30.0, latency_write_min_ms=1.0, latency_write_fraction=0.2)
    registry = InMemoryNodeRegistry()
    session = NodeSession("vn-a", "127.0.20.1", PortBlock(*range(20000, 20008)), stream=None, handler_task=None)
    session.ray_state, session.ray_node_id, session.ray_verified_id = "running", "n1", "n1"
    return SessionTable(config, registry), registry, session


async def beat(table: SessionTable, session: NodeSession, rtt_ms: float | None = None, **fields: object) -> None:
    """One heartbeat as the control loop handles it: recorded, then a status write if one is due."""
    heartbeat = pb.Heartbeat(ray_state="running", ray_node_id="n1", **fields)  # type: ignore[arg-type]
    if rtt_ms is not None:
        session.ping_sent(7, 1_000_000_000)
        heartbeat.echo_seq = 7
        now_ns = 1_000_000_000 + int(rtt_ms * 1e6)
    else:
        now_ns = 0
    session.record_heartbeat(heartbeat, now_ns, alpha=1.0)  # alpha 1: the smoothed RTT is the last one
    await table.write_status(session)


async def test_heartbeats_that_change_nothing_are_not_written_until_the_refresh_is_due() -> None:
    table, registry, session = make_table()
    await registry.create("vn-a", {}, {})
    await table.write_status(session, force=True)
    assert registry.status_writes == 1 and registry.objects["vn-a"]["status"]["phase"] == "Ready"
    for _ in range(20):
        await beat(table, session)
    assert registry.status_writes == 1
    session.last_status_write -= 31  # the refresh interval has passed
    await beat(table, session)
    assert registry.status_writes == 2


async def test_changes_are_written_at_once() -> None:
    table, registry, session = make_table()
    await registry.create("vn-a", {}, {})
    await table.write_status(session, force=True)
    await beat(table, session, gpus=[pb.Gpu(model="L4", memory_mib=24576)])
    assert registry.status_writes == 2
    assert registry.objects["vn-a"]["status"]["gpus"] == [{"model": "L4", "memoryMiB": 24576}]
    await beat(table, session, gpus=[pb.Gpu(model="L4", memory_mib=24576)])  # the same again: nothing new
    assert registry.status_writes == 2
    session.draining = True
    await table.write_status(session)
    assert registry.status_writes == 3 and registry.objects["vn-a"]["status"]["phase"] == "Draining"


async def test_rtt_is_written_when_first_measured_and_when_it_moves_noticeably() -> None:
    table, registry, session = make_table()
    await registry.create("vn-a", {}, {})
    await table.write_status(session, force=True)
    await beat(table, session, rtt_ms=20.0)  # the first measurement
    assert registry.status_writes == 2 and registry.objects["vn-a"]["status"]["latency"]["smoothedMs"] == 20.0
    await beat(table, session, rtt_ms=23.0)  # 15 %: drift, left for the refresh
    assert registry.status_writes == 2
    await beat(table, session, rtt_ms=25.0)  # 25 % from what was written
    assert registry.status_writes == 3 and registry.objects["vn-a"]["status"]["latency"]["smoothedMs"] == 25.0
    await beat(table, session, rtt_ms=25.9)  # under the 1 ms floor
    assert registry.status_writes == 3


async def test_a_failed_write_is_tried_again_after_the_retry_delay() -> None:
    table, registry, session = make_table()
    await table.write_status(session, force=True)  # no such VolunteerNode yet: the write fails
    assert registry.status_writes == 0
    await registry.create("vn-a", {}, {})
    await beat(table, session)  # within the retry delay: not yet
    assert registry.status_writes == 0
    session.status_retry_at -= table.config.status_retry_s
    await beat(table, session)
    assert registry.status_writes == 1 and registry.objects["vn-a"]["status"]["phase"] == "Ready"


async def test_rtt_comes_only_from_answers_to_pings_the_gateway_sent() -> None:
    _, registry, session = make_table()
    await registry.create("vn-a", {}, {})
    # An answer naming no ping, or a ping never sent, measures nothing, whatever time it echoes.
    session.record_heartbeat(pb.Heartbeat(echo_gateway_time_ns=10**19 // 10), now_ns=5_000_000, alpha=1.0)
    session.record_heartbeat(pb.Heartbeat(echo_seq=99, echo_gateway_time_ns=4_999_999), now_ns=5_000_000, alpha=1.0)
    assert session.rtt_last_ms is None
    # The time is the gateway's own record: an echo claiming a later send time changes nothing.
    session.ping_sent(1, 1_000_000)
    session.record_heartbeat(pb.Heartbeat(echo_seq=1, echo_gateway_time_ns=4_999_999), now_ns=5_000_000, alpha=1.0)
    assert session.rtt_last_ms == 4.0
    # Each ping is answered once.
    session.record_heartbeat(pb.Heartbeat(echo_seq=1), now_ns=9_000_000, alpha=1.0)
    assert session.rtt_last_ms == 4.0


async def test_heartbeat_reports_are_cut_to_what_a_status_may_carry() -> None:
    _, _, session = make_table()
    gpus = [pb.Gpu(model="G" * 10_000, memory_mib=1 << 40)] * 20_000
    session.record_heartbeat(
        pb.Heartbeat(ray_state="x" * 100_000, ray_node_id="n" * 100_000, gpus=gpus), now_ns=0, alpha=1.0
    )
    assert len(session.gpus) == 64 and session.gpus[0] == ("G" * 128, 1 << 24)
    assert session.ray_state == "running"  # an unknown state is ignored
    assert len(session.ray_node_id) == 128
    session.record_heartbeat(pb.Heartbeat(ray_state="stopped"), now_ns=0, alpha=1.0)
    assert session.ray_state == "stopped"


async def test_a_node_flipping_its_state_on_every_message_gets_a_bounded_number_of_writes() -> None:
    table, registry, session = make_table()
    await registry.create("vn-a", {}, {})
    for index in range(200):
        session.record_heartbeat(
            pb.Heartbeat(ray_state="running" if index % 2 else "stopped", ray_node_id="n1"), now_ns=0, alpha=1.0
        )
        await table.write_status(session)
    assert registry.status_writes == 10
    assert registry.objects["vn-a"]["status"]["phase"] == "Ready"  # the 10th write: index 9, running
    # A change is written again once the window has passed.
    session.status_writes[0] -= 11
    session.record_heartbeat(pb.Heartbeat(ray_state="stopped", ray_node_id="n1"), now_ns=0, alpha=1.0)
    await table.write_status(session)
    assert registry.status_writes == 11 and registry.objects["vn-a"]["status"]["phase"] == "NotReady"
