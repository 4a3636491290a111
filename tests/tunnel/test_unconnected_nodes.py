"""Which VolunteerNodes the gateway deletes because their agent never connected after joining."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest
from koinon_gateway.config import GatewayConfig
from koinon_gateway.main import build_parser, config_from_args
from koinon_gateway.registry import JOIN_TOKEN_LABEL, InMemoryNodeRegistry
from koinon_gateway.server import Gateway
from koinon_gateway.status import never_connected_status
from koinon_gateway.unconnected_nodes import unconnected_too_long

NOW = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.UTC)
DAY = 24 * 3600.0


def node(name: str, age_s: float, status: dict[str, Any] | None = None, **metadata: Any) -> dict[str, Any]:
    created = (NOW - dt.timedelta(seconds=age_s)).strftime("%Y-%m-%dT%H:%M:%SZ")
    meta: dict[str, Any] = {"name": name, "uid": f"uid-{name}", "resourceVersion": "7", "creationTimestamp": created}
    meta["labels"] = {JOIN_TOKEN_LABEL: "abcdef"}
    meta.update(metadata)
    return {"metadata": meta, "status": status if status is not None else {"phase": "Pending", "address": "10.0.0.2"}}


def names(nodes: list[dict[str, Any]], connected: frozenset[str] = frozenset()) -> list[str]:
    return [found.name for found in unconnected_too_long(nodes, NOW, DAY, connected)]


def test_an_old_node_that_never_connected_is_found_with_what_deleting_it_needs() -> None:
    [found] = unconnected_too_long([node("old", DAY + 1)], NOW, DAY, frozenset())
    assert (found.name, found.uid, found.resource_version, found.address) == ("old", "uid-old", "7", "10.0.0.2")
    assert found.created == NOW - dt.timedelta(seconds=DAY + 1)


def test_a_node_whose_join_never_wrote_a_status_is_found_too() -> None:
    # The gateway stopped between creating the node and writing its address: nothing holds it.
    [found] = unconnected_too_long([node("half", DAY + 1, status={})], NOW, DAY, frozenset())
    assert found.address == ""


@pytest.mark.parametrize(
    "spared",
    [
        node("young", DAY - 1),
        node("connected-once", 3 * DAY, {"phase": "NotReady", "lastHeartbeat": "2026-12-01T00:00:00Z"}),
        node("by-hand", 3 * DAY, labels={}),
        node("terminating", 3 * DAY, deletionTimestamp="2026-12-06T11:00:00Z"),
        node("unknown-age", 3 * DAY, creationTimestamp="2026-12-01T00:00:00"),  # no zone: unknown
    ],
    ids=lambda n: n["metadata"]["name"],
)
def test_nodes_that_are_not_old_unconnected_joins_are_spared(spared: dict[str, Any]) -> None:
    assert names([spared, node("old", DAY + 1)]) == ["old"]


def test_a_node_with_a_session_now_is_spared() -> None:
    # Its first status write may not have landed yet.
    assert names([node("old", DAY + 1)], frozenset({"old"})) == []


async def test_in_memory_delete_checks_the_uid() -> None:
    registry = InMemoryNodeRegistry()
    uid = await registry.create("vn", {"owner": "alice"}, {})
    assert await registry.delete("vn", {"uid": "someone-else"}) is False
    assert await registry.delete("vn", {"uid": uid}) is True
    assert await registry.delete("vn") is False


def test_the_ttl_is_a_flag_and_a_day_by_default() -> None:
    base = ["--head-address", "127.0.0.1"]
    assert config_from_args(build_parser().parse_args(base)).unconnected_node_ttl_s == DAY
    hour = config_from_args(build_parser().parse_args([*base, "--unconnected-node-ttl", "3600"]))
    assert hour.unconnected_node_ttl_s == 3600
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--unconnected-node-ttl", "0"])
    config = GatewayConfig(unconnected_node_ttl_s=float("nan"))
    with pytest.raises(ValueError, match="unconnected_node_ttl_s"):
        config.validate()


class HeldWritesRegistry(InMemoryNodeRegistry):
    """Status writes wait until released, as a slow API server's do."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def patch_status(self, name: str, status: dict[str, Any], uid: str = "") -> None:
        await self.release.wait()
        await super().patch_status(name, status, uid)


async def test_a_node_whose_first_session_write_is_under_way_is_spared() -> None:
    # Its agent connected and left again before the write saying so landed: it did connect.
    registry = HeldWritesRegistry()
    gateway = Gateway(GatewayConfig(verify_ray_nodes=False), registry=registry)
    for name in ("was-connected", "never-connected"):
        await registry.create(name, {"owner": "alice"}, {JOIN_TOKEN_LABEL: "abcdef"})
        registry.objects[name]["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
        registry.objects[name]["status"] = never_connected_status("127.0.20.2")
    # As a gateway starting finds them: their Ready conditions are remembered for their sessions.
    gateway.sessions.disown_stale_connections(await registry.list())
    status = {"connected": False, "lastHeartbeat": "2026-01-01T00:00:05Z"}
    gateway.sessions.writer.submit("was-connected", status, uid=registry.objects["was-connected"]["metadata"]["uid"])
    assert await gateway.delete_unconnected_nodes() == ["never-connected"]
    remembered = gateway.sessions._conditions  # what deleted nodes leave behind, for good
    assert "never-connected" not in remembered and "was-connected" in remembered
    registry.release.set()
    assert await gateway.sessions.writer.wait_written("was-connected", 5)
    assert await gateway.delete_unconnected_nodes() == []
    assert set(registry.objects) == {"was-connected"}


async def test_the_sweep_frees_what_a_node_holds_by_name_and_never_another_nodes_address() -> None:
    """A join whose undo failed keeps an address for its node whose status may not record it: the
    sweep frees that address with the node. An address a swept node records that another (live)
    node holds stays that node's."""
    registry = InMemoryNodeRegistry()
    gateway = Gateway(GatewayConfig(verify_ray_nodes=False), registry=registry)
    for name in ("left-without-address", "ghost"):
        await registry.create(name, {"owner": "alice"}, {JOIN_TOKEN_LABEL: "abcdef"})
        registry.objects[name]["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    kept = gateway.allocator.allocate("left-without-address")
    registry.objects["ghost"]["status"] = never_connected_status("127.0.20.9")
    gateway.allocator.reserve("127.0.20.9", "live")
    assert sorted(await gateway.delete_unconnected_nodes()) == ["ghost", "left-without-address"]
    assert gateway.allocator.holder(kept) is None
    assert gateway.allocator.holder("127.0.20.9") == "live"
