"""Which Ray node stands for a volunteer when Ray lists more than one under its name (a raylet the
agent restarted; Ray keeps dead nodes in its list), and a volunteer's Ray node that outlives its
VolunteerNode."""

from __future__ import annotations

from typing import Any

from koinon_operator.inventory import build_capacity
from koinon_operator.placement import PlacementRequest
from koinon_operator.ray_jobs import RayNodeInfo
from koinon_operator.scheduling import ReputationPlacer
from koinon_operator.volunteers import status_from_ray

LABEL = {"koinon.dev/node": "vn-a"}
SPEC = {"owner": "alice", "gpus": [{"model": "NVIDIA L4", "memoryMiB": 24000}]}
OLD_DEAD = RayNodeInfo("old", "127.0.20.1", False, False, {"GPU": 1, "CPU": 4}, LABEL)
NEW_ALIVE = RayNodeInfo("new", "127.0.20.1", True, False, {"GPU": 1, "CPU": 4}, LABEL)
REQUEST = PlacementRequest("ns/j", 1, 1, 1.0)


def _placer() -> ReputationPlacer:
    return ReputationPlacer(clock=lambda: 1_000.0)


def test_a_restarted_raylet_makes_its_volunteer_ready_whatever_order_ray_lists_nodes_in() -> None:
    body = {"metadata": {"name": "vn-a"}, "spec": SPEC, "status": {}}
    for listed in ([NEW_ALIVE, OLD_DEAD], [OLD_DEAD, NEW_ALIVE]):
        status = status_from_ray(body, listed, "t1")
        assert (status["phase"], status["rayNodeId"]) == ("Ready", "new")
    assert status_from_ray(body, [OLD_DEAD], "t1")["phase"] == "NotReady"


def test_two_live_ray_nodes_under_one_name_give_one_candidate_the_one_its_volunteer_names() -> None:
    older = RayNodeInfo("older", "127.0.20.1", True, False, {"GPU": 1, "CPU": 4}, LABEL)
    ray_nodes = [older, NEW_ALIVE, RayNodeInfo("b", "127.0.20.2", True, False, {"GPU": 1}, {"koinon.dev/node": "vn-b"})]
    volunteers = {
        "vn-a": {"spec": SPEC, "status": {"phase": "Ready", "rayNodeId": "new"}},
        "vn-b": {"spec": {**SPEC, "owner": "bob"}, "status": {"phase": "Ready"}},
    }
    capacity = build_capacity(ray_nodes, volunteers, [])
    assert sorted((c.name, c.ray_node_id) for c in capacity) == [("vn-a", "new"), ("vn-b", "b")]
    assert _placer().place(REQUEST, capacity).placed
    # Two bare workers sharing a host (named by their address): the first listed.
    bare = [RayNodeInfo(i, "127.0.30.1", True, False, {"GPU": 1, "CPU": 4}, {}) for i in ("w1", "w2")]
    assert [(c.name, c.ray_node_id) for c in build_capacity(bare, {}, [])] == [("127.0.30.1", "w1")]


def test_a_volunteers_ray_node_takes_no_work_once_its_volunteernode_is_deleted() -> None:
    ray_nodes = [NEW_ALIVE]
    quarantined: dict[str, Any] = {"phase": "Ready", "reputation": {"disagreements": 5.0, "lastUpdated": 1_000.0}}
    volunteers: dict[str, Any] = {"vn-a": {"spec": {**SPEC, "cordoned": True}, "status": quarantined}}
    assert not _placer().place(REQUEST, build_capacity(ray_nodes, volunteers, [])).placed
    # Deleted (kopf's index drops it) while the Ray node lives on: its cordon and reputation went
    # with the object, so it must not come back as a fresh, neutral node.
    assert not _placer().place(REQUEST, build_capacity(ray_nodes, {}, [])).placed
    # Being deleted (deletionTimestamp; a finalizer holds it) counts the same.
    deleting = {"vn-a": {"spec": SPEC, "status": {"phase": "Ready"}, "deleting": True}}
    assert not build_capacity(ray_nodes, deleting, [])[0].ready
    # A bare Ray worker (no label) is still usable with neutral defaults, for development.
    bare = [RayNodeInfo("w1", "127.0.30.1", True, False, {"GPU": 1, "CPU": 4}, {})]
    assert _placer().place(REQUEST, build_capacity(bare, {}, [])).placed
