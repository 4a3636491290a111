"""Which Ray node stands for a volunteer when Ray lists more than one under its name (a raylet the
agent restarted; Ray keeps dead nodes in its list), a volunteer's Ray node that outlives its
VolunteerNode, and Ray nodes whose claims (the koinon.dev/node label, the GPU count: both set by the
volunteer's own `ray start`) do not match what the gateway recorded: they take no work."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from koinon_operator.inventory import build_capacity
from koinon_operator.placement import PlacementRequest
from koinon_operator.ray_jobs import RayNodeInfo
from koinon_operator.scheduler import ScoringConfig
from koinon_operator.scheduling import ReputationPlacer, to_snapshot
from koinon_operator.volunteers import status_from_ray

from .fake_ray import Clock, FakeRay, make_body, make_reconciler, step

LABEL = {"koinon.dev/node": "vn-a"}
GPU = {"model": "NVIDIA GeForce RTX 4090", "memoryMiB": 24000}
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
        "vn-a": {"spec": SPEC, "status": {"phase": "Ready", "address": "127.0.20.1", "rayNodeId": "new"}},
        "vn-b": {"spec": {**SPEC, "owner": "bob"}, "status": {"phase": "Ready", "address": "127.0.20.2"}},
    }
    capacity = build_capacity(ray_nodes, volunteers, [])
    assert sorted((c.name, c.ray_node_id) for c in capacity) == [("vn-a", "new"), ("vn-b", "b")]
    assert _placer().place(REQUEST, capacity).placed
    # Two bare workers sharing a host (named by their address), where bare workers are let in: the
    # first listed.
    bare = [RayNodeInfo(i, "127.0.30.1", True, False, {"GPU": 1, "CPU": 4}, {}) for i in ("w1", "w2")]
    assert [(c.name, c.ray_node_id) for c in build_capacity(bare, {}, [], allow_bare=True)] == [("127.0.30.1", "w1")]


def test_a_volunteers_ray_node_takes_no_work_once_its_volunteernode_is_deleted() -> None:
    ray_nodes = [NEW_ALIVE]
    quarantined: dict[str, Any] = {"phase": "Ready", "reputation": {"disagreements": 5.0, "lastUpdated": 1_000.0}}
    volunteers: dict[str, Any] = {
        "vn-a": {"spec": {**SPEC, "cordoned": True}, "status": {**quarantined, "address": "127.0.20.1"}}
    }
    assert not _placer().place(REQUEST, build_capacity(ray_nodes, volunteers, [])).placed
    # Deleted (kopf's index drops it) while the Ray node lives on: its cordon and reputation went
    # with the object, so it must not come back as a fresh, neutral node.
    assert not _placer().place(REQUEST, build_capacity(ray_nodes, {}, [])).placed
    # Being deleted (deletionTimestamp; a finalizer holds it) counts the same.
    deleting = {"vn-a": {"spec": SPEC, "status": {"phase": "Ready", "address": "127.0.20.1"}, "deleting": True}}
    assert not build_capacity(ray_nodes, deleting, [])[0].ready


def test_a_bare_ray_worker_takes_work_only_where_the_operator_lets_bare_workers_in() -> None:
    bare = [RayNodeInfo("w1", "127.0.30.1", True, False, {"GPU": 1, "CPU": 4}, {})]
    assert build_capacity(bare, {}, []) == []
    # KOINON_ALLOW_BARE_RAY_WORKERS, for development: usable with neutral defaults.
    [node] = build_capacity(bare, {}, [], allow_bare=True)
    assert (node.name, node.owner, node.ready) == ("127.0.30.1", "127.0.30.1", True)
    assert _placer().place(REQUEST, [node]).placed


def test_an_unlabelled_ray_node_in_a_volunteer_pool_takes_no_work(caplog: pytest.LogCaptureFixture) -> None:
    """Eve's machine (VolunteerNode vn-e) starts its raylet without the label: it was placed as an
    owner of its own (its address), could vote beside alice as a second owner, and nothing it did
    could be charged (evidence for it found no VolunteerNode)."""
    nodes = [
        RayNodeInfo("r1", "127.0.20.1", True, False, {"GPU": 1, "CPU": 4}, {"koinon.dev/node": "vn-a"}),
        RayNodeInfo("r2", "127.0.20.2", True, False, {"GPU": 1, "CPU": 4}, {}),
    ]
    vols = {
        "vn-a": {"spec": {"owner": "alice", "gpus": [GPU]}, "status": {"phase": "Ready", "address": "127.0.20.1"}},
        "vn-e": {"spec": {"owner": "eve", "gpus": [GPU]}, "status": {"phase": "Ready", "address": "127.0.20.2"}},
    }
    with caplog.at_level(logging.WARNING, logger="koinon_operator.inventory"):
        capacity = build_capacity(nodes, vols, [])
    assert {(c.name, c.owner, c.ready) for c in capacity} == {("vn-a", "alice", True), ("vn-e", "eve", False)}
    assert "Ray node r2 at 127.0.20.2 has no koinon.dev/node label: takes no work" in caplog.text
    verified = PlacementRequest("ns/j", 1, 1, 1.0, distinct_owners=True, verification_quorum=2)
    assert not ReputationPlacer(seed_key=b"k").place(verified, capacity).placed  # alice alone is no quorum
    assert [n.name for n in ReputationPlacer(seed_key=b"k").place(REQUEST, capacity).nodes] == ["vn-a"]


def test_a_ray_node_labelled_with_another_volunteers_name_takes_no_work(caplog: pytest.LogCaptureFixture) -> None:
    """The label is the volunteer's own claim: eve's raylet naming alice's VolunteerNode runs at eve's
    virtual address, not at the one the gateway gave alice."""
    vols = {
        "vn-a": {"spec": SPEC, "status": {"phase": "Ready", "address": "127.0.20.1", "rayNodeId": "alice"}},
        "vn-e": {"spec": {**SPEC, "owner": "eve"}, "status": {"phase": "Ready", "address": "127.0.20.2"}},
    }
    posing = RayNodeInfo("eve2", "127.0.20.2", True, False, {"GPU": 1, "CPU": 4}, LABEL)
    alice = RayNodeInfo("alice", "127.0.20.1", True, False, {"GPU": 1, "CPU": 4}, LABEL)
    with caplog.at_level(logging.WARNING, logger="koinon_operator.inventory"):
        [vn_a, vn_e] = build_capacity([posing], vols, [])  # alice is offline
    assert (vn_a.name, vn_a.ray_node_id, vn_a.ready, vn_e.ready) == ("vn-a", "eve2", False, False)
    assert "VolunteerNode vn-a takes no new work: Ray node eve2 claims it at 127.0.20.2" in caplog.text
    # Alice online: her node stands for vn-a, whichever Ray lists first.
    for listed in ([posing, alice], [alice, posing]):
        capacity = {c.name: c for c in build_capacity(listed, vols, [])}
        assert (capacity["vn-a"].ray_node_id, capacity["vn-a"].ready) == ("alice", True)
    # A raylet that registers at alice's address (GCS takes its word for it) is still not the one
    # the gateway confirmed there.
    at_her_address = RayNodeInfo("eve3", "127.0.20.1", True, False, {"GPU": 1, "CPU": 4}, LABEL)
    assert not build_capacity([at_her_address], vols, [])[0].ready


def test_a_volunteer_without_a_gateway_address_yet_takes_no_work() -> None:
    ray_nodes = [NEW_ALIVE]
    for status in ({}, {"phase": "Ready"}, {"phase": "Ready", "address": ""}):
        assert not build_capacity(ray_nodes, {"vn-a": {"spec": SPEC, "status": status}}, [])[0].ready


async def test_the_reconciler_places_on_bare_workers_only_when_told_to() -> None:
    class BareRay(FakeRay):
        async def nodes(self) -> list[RayNodeInfo]:
            return [RayNodeInfo("w1", "127.0.30.1", True, False, {"GPU": 1, "CPU": 4}, {})]

    for allowed, phase in ((False, "Pending"), (True, "Scheduled")):
        reconciler = make_reconciler(BareRay(), Clock())
        reconciler.allow_bare_ray_workers = allowed  # as handlers.py sets it from OperatorConfig
        body = make_body({"entrypoint": "python x.py"})
        await step(reconciler, body, {})
        assert body["status"]["phase"] == phase, body["status"]


def test_a_volunteer_is_booked_for_no_more_gpus_than_it_joined_with() -> None:
    """Ray's GPU count is the volunteer's `ray start --num-gpus`: one declaring millions made every
    placement pass build millions of GPU objects (seconds and hundreds of MiB a pass; an OOM at
    1e8-1e9) and drew multi-GPU jobs it could not run."""
    claimed = 2_000_000
    nodes = [
        RayNodeInfo("r1", "127.0.20.1", True, False, {"GPU": float(claimed), "CPU": 4}, {"koinon.dev/node": "vn-eve"}),
        RayNodeInfo("r2", "127.0.20.2", True, False, {"GPU": 1, "CPU": 4}, {"koinon.dev/node": "vn-bob"}),
    ]
    vols = {
        "vn-eve": {"spec": {"owner": "eve", "gpus": [GPU]}, "status": {"phase": "Ready", "address": "127.0.20.1"}},
        "vn-bob": {"spec": {"owner": "bob", "gpus": [GPU]}, "status": {"phase": "Ready", "address": "127.0.20.2"}},
    }
    started = time.monotonic()
    capacity = build_capacity(nodes, vols, [])
    ReputationPlacer().place(PlacementRequest("ns/j", 1, 1, 1.0), capacity)
    took = time.monotonic() - started
    eve = next(c for c in capacity if c.name == "vn-eve")
    assert eve.gpus_total == 1 and took < 1.0, (eve.gpus_total, f"{took:.1f}s for one placement")
    assert not ReputationPlacer().place(PlacementRequest("ns/j", 1, 2, 1.0), capacity).placed


@pytest.mark.parametrize(("declared", "booked"), [(2_000_000.0, 64), (3.0, 3), (float("nan"), 0), (-2.0, 0)])
def test_a_bare_workers_gpus_are_capped_and_nonsense_counts_as_none(declared: float, booked: int) -> None:
    bare = [RayNodeInfo("w1", "127.0.30.1", True, False, {"GPU": declared, "CPU": 4}, {})]
    assert build_capacity(bare, {}, [], allow_bare=True)[0].gpus_total == booked


def test_a_gpu_a_volunteer_added_and_registered_is_booked() -> None:
    """spec.gpus is what the join said; a restarted agent registers the GPUs it finds now
    (status.gpus), and Ray's count follows: a GPU added since was never booked."""
    l4 = {"model": "NVIDIA L4", "memoryMiB": 24000}
    node = RayNodeInfo("r1", "127.0.20.1", True, False, {"GPU": 2.0, "CPU": 8}, {"koinon.dev/node": "vn-a"})
    vols = {
        "vn-a": {
            "spec": {"owner": "alice", "gpus": [l4]},
            "status": {"phase": "Ready", "address": "127.0.20.1", "rayNodeId": "r1", "gpus": [l4, l4]},
        }
    }
    [cap] = build_capacity([node], vols, [])
    assert cap.ready and cap.gpus_total == 2
    assert ReputationPlacer().place(PlacementRequest("ns/j", 1, 2, 1.0), [cap]).placed
    vols["vn-a"]["status"]["gpus"] = [l4] * 3  # more listed than Ray has: Ray's count still bounds it
    assert build_capacity([node], vols, [])[0].gpus_total == 2


RTX_4090 = {"model": "NVIDIA GeForce RTX 4090", "memoryMiB": 24576}
RTX_3060 = {"model": "NVIDIA GeForce RTX 3060", "memoryMiB": 8192}
A100 = {"model": "NVIDIA A100", "memoryMiB": 81920}
T4 = {"model": "Tesla T4", "memoryMiB": 15360}
RTX_3090 = {"model": "NVIDIA GeForce RTX 3090", "memoryMiB": 24576}
H100 = {"model": "NVIDIA H100", "memoryMiB": 81920}
MYSTERY = {"model": "Mystery GPU 9000", "memoryMiB": 24576}  # in no speed table: unknown_gpu_speed


def _capacity(gpus: int, joined: list[dict[str, Any]], registered: list[dict[str, Any]]) -> Any:
    """vn-a's capacity: Ray declares ``gpus``; it joined with ``joined`` and last registered ``registered``."""
    node = RayNodeInfo("r1", "127.0.20.1", True, False, {"GPU": gpus, "CPU": 8}, LABEL)
    status = {"phase": "Ready", "address": "127.0.20.1", "rayNodeId": "r1", "gpus": registered}
    [cap] = build_capacity([node], {"vn-a": {"spec": {"owner": "alice", "gpus": joined}, "status": status}}, [])
    assert cap.ready
    return cap


def test_an_added_smaller_gpu_is_not_taken_for_the_bigger_one_it_joined_with() -> None:
    """Review repro: joined with a 24 GB GPU, later added an 8 GB one and restarted its agent. It is
    booked for both GPUs (status.gpus counts), but placement gives every GPU one memory, which was
    the join's: a job wanting 2 GPUs of 16 GB each was placed there and its second GPU ran out of
    memory (an exit code of the job's, charged to nobody). Each GPU now has the least listed."""
    cap = _capacity(2, [RTX_4090], [RTX_4090, RTX_3060])
    assert (cap.gpus_total, cap.gpu_memory_mib) == (2, 8192)
    assert cap.gpu_models == ("NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 3060")
    request = PlacementRequest("ns/j", 1, 2, 1.0, gpu_memory_mib=16000)
    decision = _placer().place(request, [cap])
    assert not decision.placed, f"placed on {[n.name for n in decision.nodes]}: its 8 GB GPU will OOM"
    assert _placer().place(PlacementRequest("ns/j", 1, 2, 1.0, gpu_memory_mib=8000), [cap]).placed


def test_a_swapped_in_gpu_is_booked_with_its_own_memory() -> None:
    """Review repro: the A100 it joined with was replaced by a T4 (status.gpus, the latest
    registration): a 40 GB job was placed on a node whose only GPU has 15 GB. A GPU swapped for a
    bigger one is booked as the bigger one, as a fresh join would be."""
    cap = _capacity(1, [A100], [T4])
    assert (cap.gpus_total, cap.gpu_memory_mib, cap.gpu_models) == (1, 15360, ("Tesla T4",))
    request = PlacementRequest("ns/j", 1, 1, 1.0, gpu_memory_mib=40000)
    assert not _placer().place(request, [cap]).placed, "a 40 GB job placed on a node whose only GPU now has 15 GB"
    assert _capacity(1, [T4], [A100]).gpu_memory_mib == 81920


def test_a_registration_listing_fewer_gpus_keeps_the_joins_count_with_the_least_memory() -> None:
    """The count stays the more of the two lists (a registration listing fewer does not lower it:
    Ray's own count does), so the GPUs beyond the registration's are the join's, and the memory is
    the least of all those counted."""
    cap = _capacity(2, [A100, A100], [T4])
    assert (cap.gpus_total, cap.gpu_memory_mib) == (2, 15360)
    assert cap.gpu_models == ("Tesla T4", "NVIDIA A100")
    same = _capacity(1, [A100], [A100])  # the usual case: the registration lists what the join did
    assert (same.gpus_total, same.gpu_memory_mib, same.gpu_models) == (1, 81920, ("NVIDIA A100",))
    unregistered = _capacity(1, [A100], [])
    assert (unregistered.gpus_total, unregistered.gpu_memory_mib) == (1, 81920)


@pytest.mark.parametrize("entry", [None, "T4", {"model": "T4"}, {"model": "T4", "memoryMiB": "lots"}])
def test_an_unreadable_registered_gpu_counts_with_no_known_memory(entry: object) -> None:
    """status.gpus entries are read for their memory now: one without a readable memoryMiB (the CRD
    does not require it there; junk written before the CRD checked) counts as a GPU of unknown
    memory, so only jobs that ask for no GPU memory go there, and no entry stops placement."""
    cap = _capacity(2, [A100], [A100, entry])  # type: ignore[list-item]
    assert (cap.gpus_total, cap.gpu_memory_mib) == (2, 0)
    assert not _placer().place(PlacementRequest("ns/j", 1, 1, 1.0, gpu_memory_mib=1024), [cap]).placed
    assert _placer().place(PlacementRequest("ns/j", 1, 1, 1.0), [cap]).placed


@pytest.mark.parametrize("memory", [1e300, 2**63, (1 << 24) + 1])
def test_gpu_memory_beyond_the_gateways_bound_is_read_as_unknown(memory: float) -> None:
    """A status.gpus memoryMiB no gateway writes (an admin's hand edit) overflowed the scheduler's
    int64 arrays, which stopped placement for every job, not only that node's."""
    from koinon_operator.inventory import GPU_MEMORY_MIB_MAX, build_capacity

    ray = [RayNodeInfo("r1", "10.0.0.1", True, False, {"GPU": 1, "CPU": 8}, {"koinon.dev/node": "vn-a"})]
    status = {"phase": "Ready", "connected": True, "address": "10.0.0.1", "gpus": [{"model": "X", "memoryMiB": memory}]}
    volunteers = {"vn-a": {"spec": {"owner": "alice", "gpus": [{"model": "X", "memoryMiB": 1024}]}, "status": status}}
    [capacity] = build_capacity(ray, volunteers, [])
    assert capacity.gpu_memory_mib == 0 and GPU_MEMORY_MIB_MAX == 1 << 24


def _models(cap: Any, scoring: ScoringConfig | None = None) -> list[str]:
    """The model of each GPU the scheduler sees on ``cap`` (what its speed is read from)."""
    return [g.model for g in (to_snapshot(cap) if scoring is None else to_snapshot(cap, scoring)).gpus]


def test_a_swapped_in_slower_gpu_is_scored_as_the_slowest_listed() -> None:
    """Review repro (README, Scheduling: each GPU has the least memory listed, "models likewise"):
    joined with two RTX 4090s, now registers one T4 and Ray counts 1. It was booked with the T4's
    memory but, the lists (2) not matching Ray's count (1), every model became "unknown", neutral
    speed 1.0 = an RTX 4090: an 8 h job went to it rather than to a real RTX 3090 (0.65)."""
    swapped = _capacity(1, [RTX_4090, RTX_4090], [T4])
    assert (swapped.gpus_total, swapped.gpu_memory_mib) == (1, 15360)
    assert _models(swapped) == ["Tesla T4"]
    node = RayNodeInfo("r2", "127.0.20.2", True, False, {"GPU": 1, "CPU": 8}, {"koinon.dev/node": "vn-b"})
    status = {"phase": "Ready", "address": "127.0.20.2", "rayNodeId": "r2", "gpus": [RTX_3090]}
    [real] = build_capacity([node], {"vn-b": {"spec": {"owner": "bob", "gpus": [RTX_3090]}, "status": status}}, [])
    long_job = PlacementRequest("ns/j", 1, 1, 1.0, expected_duration_s=8 * 3600)
    assert [n.name for n in _placer().place(long_job, [swapped, real]).nodes] == ["vn-b"]


def test_a_model_the_speed_table_lacks_counts_at_its_neutral_speed_among_those_listed() -> None:
    """Where Ray counts fewer GPUs than are listed, the slowest listed is read by the placer's own
    speed table, a model it lacks at ``unknown_gpu_speed`` (1.0), as when the counts match: the
    node is never scored faster than all it lists would make it, nor penalised for an unknown."""
    assert _models(_capacity(1, [H100, H100], [MYSTERY])) == ["Mystery GPU 9000"]  # 1.0 < H100's 2.0
    assert _models(_capacity(1, [T4, T4], [MYSTERY])) == ["Tesla T4"]  # T4's 0.2 < 1.0
    assert _models(_capacity(2, [T4, T4], [MYSTERY])) == ["Mystery GPU 9000", "Tesla T4"]  # counts match
    # Another table (the placer's config): there the T4 is the fast one.
    fast_t4 = ScoringConfig(gpu_speeds=(("T4", 3.0), ("RTX 4090", 1.0)))
    assert _models(_capacity(1, [T4, RTX_4090], []), fast_t4) == ["NVIDIA GeForce RTX 4090"]
    slow_unknown = ScoringConfig(unknown_gpu_speed=0.1)
    assert _models(_capacity(1, [T4, MYSTERY], []), slow_unknown) == ["Mystery GPU 9000"]
