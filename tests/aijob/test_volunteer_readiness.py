"""Only a VolunteerNode in phase Ready, at the address the gateway gave it, takes new AIJobs; one
that is draining, not up yet, or has no address yet (its status not written) does not."""

from __future__ import annotations

from typing import Any

import pytest
from koinon_operator.inventory import build_capacity
from koinon_operator.placement import PlacementRequest
from koinon_operator.ray_jobs import RayNodeInfo
from koinon_operator.scheduling import ReputationPlacer

RAY_NODES = [RayNodeInfo("r1", "127.0.20.1", True, False, {"GPU": 1, "CPU": 4}, {"koinon.dev/node": "vn-a"})]
SPEC = {"owner": "alice", "gpus": [{"model": "NVIDIA L4", "memoryMiB": 24000}]}


def _volunteers(status: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    volunteer: dict[str, Any] = {"spec": SPEC}
    if status is not None:
        volunteer["status"] = {"address": "127.0.20.1", **status}
    return {"vn-a": volunteer}


def _placed(volunteers: dict[str, dict[str, Any]]) -> bool:
    decision = ReputationPlacer(clock=lambda: 1_000.0).place(
        PlacementRequest("ns/j", 1, 1, 1.0), build_capacity(RAY_NODES, volunteers, [])
    )
    return decision.placed


@pytest.mark.parametrize("phase", ["Draining", "Pending", "NotReady"])
def test_a_volunteer_that_is_not_ready_is_not_placeable(phase: str) -> None:
    volunteers = _volunteers({"phase": phase, "connected": phase != "NotReady"})
    assert not build_capacity(RAY_NODES, volunteers, [])[0].ready
    assert not _placed(volunteers)


def test_placement_with_the_only_node_draining_does_not_place() -> None:
    assert not _placed(_volunteers({"phase": "Draining", "connected": True}))


def test_a_ready_volunteer_is_placeable() -> None:
    volunteers = _volunteers({"phase": "Ready", "connected": True})
    assert build_capacity(RAY_NODES, volunteers, [])[0].ready
    assert _placed(volunteers)


def test_a_volunteer_whose_status_is_not_written_yet_is_not_placeable() -> None:
    # Created, its Ray node alive, but no status.address yet: nothing ties that Ray node (whose
    # label is its own claim) to this VolunteerNode.
    volunteers = _volunteers(None)
    assert not build_capacity(RAY_NODES, volunteers, [])[0].ready
    assert not _placed(volunteers)
