"""The Ready condition as SREs read it (`kubectl describe vn`): its lastTransitionTime moves only
when Ready flips, across reconnects and gateway restarts; a joined node that never connected says
Pending."""

from __future__ import annotations

import itertools
import secrets
from pathlib import Path
from typing import Any

import pytest
from koinon_gateway import status as gateway_status
from koinon_gateway.registry import InMemoryNodeRegistry
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import cluster
from .test_join_idempotency import join, registers
from .test_status_writes import make_session, make_table


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each condition time one second after the previous: a moved transition time shows."""
    seconds = itertools.count(1)

    def tick(when: Any = None) -> str:
        second = next(seconds)
        return f"2030-01-01T00:{second // 60:02d}:{second % 60:02d}Z"

    monkeypatch.setattr(gateway_status, "rfc3339", tick)


def _ready(registry: InMemoryNodeRegistry, name: str = "vn-a") -> dict[str, Any]:
    conditions = registry.objects[name]["status"]["conditions"]
    return dict(next(c for c in conditions if c["type"] == "Ready"))


def _not_ready_session(name: str = "vn-a") -> Any:
    session = make_session(name)
    session.ray_state, session.ray_node_id, session.ray_verified_id = "stopped", "", ""
    return session


async def test_a_reconnect_still_not_ready_keeps_the_time_the_node_went_not_ready() -> None:
    """The gateway forgot the condition when a session ended: every reconnect of a node whose Ray
    keeps failing read "NotReady since a few seconds ago", and alerts on NotReady duration never fired."""
    table, registry, _ = make_table()
    await registry.create("vn-a", {"owner": "alice"}, {})
    first = _not_ready_session()
    table.attach(first)
    await table.flush()
    table.detach(first, "HeartbeatTimeout", "no heartbeat within the timeout")
    await table.flush()
    went = _ready(registry)
    table.attach(_not_ready_session())
    await table.flush()
    now = _ready(registry)
    assert (now["status"], now["lastTransitionTime"]) == ("False", went["lastTransitionTime"])
    ready = make_session()  # Ray comes up: a real transition
    table.attach(ready)
    await table.flush()
    assert _ready(registry)["status"] == "True" and _ready(registry)["lastTransitionTime"] != went["lastTransitionTime"]


async def test_a_gateway_restart_keeps_the_time_of_nodes_that_stay_not_ready() -> None:
    """A new gateway did not read the stored condition back: every upgrade reset the fleet's
    "NotReady since"."""
    old, registry, _ = make_table()
    await registry.create("vn-a", {"owner": "alice"}, {})
    old.attach(_not_ready_session())
    await old.flush()
    await old.close_all()
    before = _ready(registry)
    new, _, _ = make_table(registry)
    new.disown_stale_connections(await registry.list())
    new.attach(_not_ready_session())
    await new.flush()
    assert _ready(registry)["lastTransitionTime"] == before["lastTransitionTime"]


async def test_a_joined_node_says_pending_until_its_agent_connects(tmp_path: Path) -> None:
    """It had phase NotReady and no condition, so `kubectl get vn` could not tell it from a node
    that went away (and the uptime sampler charged it missed heartbeats)."""
    async with cluster(tmp_path) as c:
        token = c.tokens.add(owner="alice", usage_limit=1)
        response = await join(c, token, secrets.token_hex(16))
        assert isinstance(response, pb.JoinResponse)
        name = response.assignment.node_name
        status = c.registry.objects[name]["status"]
        assert (status["phase"], status["connected"]) == ("Pending", False)
        assert status["address"] == response.assignment.address
        assert _ready(c.registry, name)["reason"] == "NeverConnected"
        assert await registers(c, response)
        await c.gateway.sessions.flush()
        assert c.registry.objects[name]["status"]["phase"] in ("NotReady", "Ready")  # connected now


async def test_first_connect_of_a_joined_node_keeps_the_not_ready_since_time(tmp_path: Path) -> None:
    """Join writes Ready=False (NeverConnected). The agent's first Register, Ray not yet running,
    wrote Ready=False again, yet with a new lastTransitionTime: the gateway seeded its condition
    memory only at start-up, not from the object (nor from the join it wrote itself)."""
    async with cluster(tmp_path) as c:
        token = c.tokens.add(owner="alice", usage_limit=1)
        response = await join(c, token, secrets.token_hex(16))
        assert isinstance(response, pb.JoinResponse)
        name = response.assignment.node_name
        joined = _ready(c.registry, name)
        assert joined["status"] == "False"
        assert await registers(c, response)
        await c.gateway.sessions.flush()
        now = _ready(c.registry, name)
        assert now["status"] == "False" and now["reason"] != "NeverConnected"  # connected, Ray not running
        assert now["lastTransitionTime"] == joined["lastTransitionTime"]
