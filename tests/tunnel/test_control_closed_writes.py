"""A heartbeat the control loop already read when the session was ended (expired, revoked or
replaced) is still handled before the handler's cleanup cancels that loop. Before 2026-12-06
write_status() did not check session.closed and wrote "connected: true" after the NotReady the end
had just written."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .test_status_writes import make_table


async def attached_session() -> tuple[Any, Any, Any]:
    """A session of node vn-a attached to a table, its handler parked, its first status written."""
    table, registry, session = make_table()
    await registry.create("vn-a", {}, {})
    session.handler_task = asyncio.ensure_future(asyncio.sleep(3600))
    table.attach(session)
    await table.flush()
    return table, registry, session


async def test_a_heartbeat_handled_after_expiry_does_not_bring_the_node_back_to_ready() -> None:
    table, registry, session = await attached_session()
    assert registry.objects["vn-a"]["status"]["phase"] == "Ready"

    session.last_seen = time.monotonic() - 3600  # silent past the timeout
    assert table.expire_stale() == ["vn-a"]
    # In the same loop iteration the control loop's read completes with a late heartbeat: it runs
    # before the cancelled handler's finally cancels it (this is _control_loop's heartbeat branch).
    session.record_heartbeat(pb.Heartbeat(ray_state="running", ray_node_id="n1"), time.time_ns(), 0.2)
    table.write_status(session)
    await table.flush()
    status = registry.objects["vn-a"]["status"]
    assert status["connected"] is False and status["phase"] == "NotReady", status
    # What is remembered of the ended node is its NotReady (kept for the transition time), not Ready.
    assert table._conditions["vn-a"].status == "False"


async def test_a_heartbeat_handled_after_revocation_does_not_write_ready() -> None:
    table, registry, session = await attached_session()
    assert table.revoke("vn-a")
    # The control loop's drain branch for a DrainRequest read just before the revocation.
    session.draining = True
    table.write_status(session, force=True)
    await table.flush()
    status = registry.objects["vn-a"]["status"]
    assert status["connected"] is False and status["phase"] == "NotReady", status
