"""Only a VolunteerNode in phase Ready takes new AIJobs; one that is draining or not up yet does not."""

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
        volunteer["status"] = status
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


@pytest.mark.parametrize(
    "volunteers",
    [
        _volunteers({"phase": "Ready", "connected": True}),
        _volunteers(None),  # created, status not written yet: its Ray node is alive
    ],
    ids=["ready", "no-status-yet"],
)
def test_ready_or_unreported_volunteers_stay_placeable(volunteers: dict[str, dict[str, Any]]) -> None:
    assert build_capacity(RAY_NODES, volunteers, [])[0].ready
    assert _placed(volunteers)
