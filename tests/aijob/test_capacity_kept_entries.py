"""inventory.build_capacity keeps what each node's entry takes from its Ray node and VolunteerNode
alone (the status checked, the GPUs listed, times parsed) for the next call while those stay the
same: the operator builds the whole fleet's capacity once per pending AIJob, and at 10,000
volunteers that took ~200 ms a call. What the kept entries must never do is change a result: the
capacity and the decision made on it are those of a build that kept nothing, whatever changed in
between (a status, in place or as a new object; a Ray node replaced; the allocations; a node or a
VolunteerNode gone), and a changed status counts in the very next call."""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import pytest
from koinon_operator import inventory
from koinon_operator.inventory import NODE_NAME_LABEL, Allocation, build_capacity
from koinon_operator.placement import NodeCapacity, PlacementRequest
from koinon_operator.ray_jobs import RayNodeInfo
from koinon_operator.scheduling import ReputationPlacer

NOW = 1_800_000_000.0
L4 = {"model": "NVIDIA L4", "memoryMiB": 24000}
RTX_4090 = {"model": "NVIDIA GeForce RTX 4090", "memoryMiB": 24576}
PROVEN = {"successes": 40.0, "agreements": 40.0, "heartbeatsSeen": 500.0, "lastUpdated": "2027-01-15T08:00:00Z"}


@pytest.fixture(autouse=True)
def _fresh_module_state() -> Iterator[None]:
    """Each test starts with nothing kept and nothing logged, and leaves the module as it found it."""
    saved = (inventory._kept_live, inventory._kept_offline, inventory._reported_unreadable,
             inventory._reported_unproven, inventory._reported_bare)  # fmt: skip
    inventory._kept_live, inventory._kept_offline = {}, {}
    inventory._reported_unreadable, inventory._reported_unproven, inventory._reported_bare = {}, {}, set()
    yield
    (inventory._kept_live, inventory._kept_offline, inventory._reported_unreadable,
     inventory._reported_unproven, inventory._reported_bare) = saved  # fmt: skip


def _uncached(
    ray_nodes: Sequence[RayNodeInfo],
    volunteers: Mapping[str, Mapping[str, Any]],
    allocations: Sequence[Allocation],
    allow_bare: bool,
) -> list[NodeCapacity]:
    """build_capacity with nothing kept from earlier calls (what it computed before it kept
    anything), the kept entries left as they were for the next cached call."""
    kept = inventory._kept_live, inventory._kept_offline
    inventory._kept_live, inventory._kept_offline = {}, {}
    try:
        return build_capacity(ray_nodes, volunteers, allocations, allow_bare)
    finally:
        inventory._kept_live, inventory._kept_offline = kept


def _ray_node(i: int, name: str | None = None, node_id: str | None = None, gpus: float = 2.0) -> RayNodeInfo:
    labels = {} if name is None else {NODE_NAME_LABEL: name}
    return RayNodeInfo(node_id or f"ray-{i}", f"10.0.0.{i}", True, False, {"GPU": gpus, "CPU": 8.0}, labels)


def _volunteer(i: int, rng: random.Random) -> dict[str, Any]:
    status: dict[str, Any] = {
        "phase": rng.choice(["Ready", "Ready", "Ready", "Draining"]),
        "address": f"10.0.0.{i}",
        "rayNodeId": f"ray-{i}",
        "latency": {"smoothedMs": rng.uniform(5, 300), "updatedAt": "2027-01-15T08:00:00Z"},
        "reputation": {**PROVEN, "successes": float(rng.randint(0, 60)), "lowerBound": rng.random()},
    }
    if rng.random() < 0.3:
        status["gpus"] = [rng.choice([L4, RTX_4090])] * rng.randint(1, 3)
    spec = {"owner": f"own-{i // 2}", "region": rng.choice(["eu", "us"]), "gpus": [L4, L4], "cordoned": False}
    return {"spec": spec, "status": status, "deleting": False}


def _mutate(
    rng: random.Random,
    ray_nodes: list[RayNodeInfo],
    volunteers: dict[str, dict[str, Any]],
    allocations: list[Allocation],
) -> str:
    """One change of the kind the operator sees between two passes; returns what it was."""
    names = sorted(volunteers)
    name = rng.choice(names) if names else "vn-0"
    kind = rng.randrange(15)
    volunteer = volunteers.get(name)
    if volunteer is None:  # none left: make one
        kind, volunteer = 9, {}
    if kind == 0:  # a watch event: a new object (kopf's index replaces it)
        status = {**volunteer["status"], "phase": rng.choice(["Ready", "Draining", "NotReady"])}
        volunteers[name] = {**volunteer, "status": status}
    elif kind == 1:  # changed in place, nested
        # Equal values of other types among them (1, 1.0, True): the checks tell them apart.
        volunteer["status"]["latency"]["smoothedMs"] = rng.choice([1, 1.0, True, 250.0, -1.0, float("inf")])
    elif kind == 2:
        volunteer["status"]["reputation"] = {**PROVEN, "lowerBound": rng.choice([0.1, 0.9, 2.0, False])}
    elif kind == 3:
        volunteer["status"]["address"] = rng.choice([f"10.0.0.{rng.randrange(30)}", ""])
    elif kind == 4 and isinstance(volunteer["spec"], MappingProxyType):  # read-only: a new one
        spec = volunteer["spec"]
        volunteers[name] = {**volunteer, "spec": MappingProxyType({**spec, "cordoned": not spec["cordoned"]})}
    elif kind == 4:
        volunteer["spec"]["cordoned"] = not volunteer["spec"]["cordoned"]
        volunteer["spec"]["owner"] = rng.choice(["mallory", "own-1", 7])
    elif kind == 5:
        volunteers[name] = {**volunteer, "deleting": rng.random() < 0.5}
    elif kind == 6:  # the raylet restarted: a new node id under the same label (and address)
        for j, node in enumerate(ray_nodes):
            if node.labels.get(NODE_NAME_LABEL) == name:
                ray_nodes[j] = RayNodeInfo(node.node_id + "r", node.address, True, False,
                                           dict(node.resources_total), dict(node.labels))  # fmt: skip
    elif kind == 7:  # Ray's list fetched again: equal nodes, new objects
        ray_nodes[:] = [copy.deepcopy(node) for node in ray_nodes]
    elif kind == 8:  # a Ray node gone (its VolunteerNode stays, offline)
        if ray_nodes:
            ray_nodes.pop(rng.randrange(len(ray_nodes)))
    elif kind == 9:  # a VolunteerNode gone, or one (re)created
        if name in volunteers and rng.random() < 0.5:
            del volunteers[name]
        else:
            i = rng.randrange(30)
            volunteers[f"vn-{i}"] = _volunteer(i, rng)
    elif kind == 10:  # a Ray node joins: labelled (maybe as a duplicate of a name), or bare
        i = rng.randrange(30)
        ray_nodes.append(_ray_node(i, rng.choice([f"vn-{i}", None]), node_id=f"ray-{i}-{rng.randrange(1000)}"))
    elif kind == 11:  # a job placed, or one ended
        if allocations and rng.random() < 0.4:
            allocations.pop(rng.randrange(len(allocations)))
        else:
            # A CPU-only job changes only running_jobs; a GPU count given as a float only a type.
            gpus: Any = rng.choice([0, 1, 2, 1.0])
            allocations.append(Allocation((name,), gpus, rng.choice([0.0, 1.0, 2.5])))
    elif kind == 12:  # Ray's GPU count of a node changed in place (a dict the caller holds)
        for node in ray_nodes:
            if node.labels.get(NODE_NAME_LABEL) == name:
                node.resources_total["GPU"] = rng.choice([0, 1, 3.0, -1, "x"])  # type: ignore[index]
    elif kind == 13:  # status.gpus registered anew, in place
        volunteer["status"]["gpus"] = [rng.choice([L4, RTX_4090, {"model": "odd", "memoryMiB": True}])]
    else:  # an equal value of another type, in a new object: a number where a bool was, and back
        latency = volunteer["status"]["latency"]
        smoothed = latency.get("smoothedMs")
        swapped = 1 if smoothed is True else True
        volunteers[name] = {
            **volunteer,
            "status": {**volunteer["status"], "latency": {**latency, "smoothedMs": swapped}},
        }
    return f"{kind} on {name}"


def _decision(capacity: Sequence[NodeCapacity], request: PlacementRequest) -> tuple[object, ...]:
    decision = ReputationPlacer(clock=lambda: NOW, seed_key=b"k" * 32).place(request, capacity)
    return tuple(node.name for node in decision.nodes), decision.copies, decision.reasons


@pytest.mark.parametrize("seed", range(6))
def test_kept_entries_give_what_a_build_keeping_nothing_gives_across_changes(seed: int) -> None:
    rng = random.Random(seed)
    volunteers = {f"vn-{i}": _volunteer(i, rng) for i in range(24)}
    ray_nodes = [_ray_node(i, f"vn-{i}") for i in range(20)] + [_ray_node(40, None)]
    allocations: list[Allocation] = [Allocation(("vn-1", "vn-2"), 1, 2.0)]
    # One node the copy cannot hold (a mapping that is no dict): derived again every call.
    volunteers["vn-3"] = {**volunteers["vn-3"], "spec": MappingProxyType(dict(volunteers["vn-3"]["spec"]))}
    requests = [PlacementRequest("ns/one", 1, 1, 1.0), PlacementRequest("ns/two", 2, 1, 2.0, distinct_owners=True,
                                                                        verification_quorum=2)]  # fmt: skip
    for step in range(120):
        change = _mutate(rng, ray_nodes, volunteers, allocations) if step else "none"
        allow_bare = step % 7 == 3
        expected = _uncached(ray_nodes, volunteers, allocations, allow_bare)
        got = build_capacity(ray_nodes, volunteers, allocations, allow_bare)
        # repr tells 1 from 1.0 and True: the very same values, of the same types.
        assert repr(got) == repr(expected), f"step {step}, after change {change}"
        # The status.reputation handed out is the caller's object, as a build keeping nothing hands out.
        assert all(a.reputation_status is b.reputation_status for a, b in zip(got, expected, strict=True))
        for request in requests:
            assert _decision(got, request) == _decision(expected, request), f"step {step}, after change {change}"
    assert inventory._kept_live, "nothing was kept: the test compared a build with itself"


def test_an_unchanged_node_is_checked_once_and_only_changed_ones_again(monkeypatch: pytest.MonkeyPatch) -> None:
    checked: list[Mapping[str, Any]] = []
    real = inventory.unreadable_status

    def counting(status: Mapping[str, Any]) -> str:
        checked.append(status)
        return real(status)

    monkeypatch.setattr(inventory, "unreadable_status", counting)
    rng = random.Random(1)
    volunteers = {f"vn-{i}": _volunteer(i, rng) for i in range(12)}  # two without a Ray node
    ray_nodes = [_ray_node(i, f"vn-{i}") for i in range(10)]
    first = build_capacity(ray_nodes, volunteers, [])
    assert len(checked) == 12
    # Ray's list fetched again (new, equal objects) and a job placed: nothing to check again.
    again = build_capacity(copy.deepcopy(ray_nodes), volunteers, [Allocation(("vn-0",), 1, 1.0)])
    assert len(checked) == 12
    assert [c.gpus_free for c in again][:2] == [first[0].gpus_free - 1, first[1].gpus_free]
    status = volunteers["vn-4"]["status"]
    status["phase"] = "Draining" if status["phase"] == "Ready" else "Ready"  # in place
    volunteers["vn-11"] = {**volunteers["vn-11"], "spec": {**volunteers["vn-11"]["spec"], "cordoned": True}}
    build_capacity(ray_nodes, volunteers, [])
    assert checked[12:] == [volunteers["vn-4"]["status"], volunteers["vn-11"]["status"]]


def test_a_changed_volunteernode_is_seen_in_the_next_call() -> None:
    status: dict[str, Any] = {"phase": "Ready", "address": "10.0.0.1", "rayNodeId": "ray-1",
                              "latency": {"smoothedMs": 1, "updatedAt": "2027-01-15T08:00:00Z"},
                              "reputation": dict(PROVEN)}  # fmt: skip
    volunteers: dict[str, dict[str, Any]] = {"vn-1": {"spec": {"owner": "alice", "gpus": [L4]}, "status": status}}
    ray_nodes = [_ray_node(1, "vn-1", gpus=1)]

    def node() -> NodeCapacity:
        [capacity] = build_capacity(ray_nodes, volunteers, [])
        return capacity

    assert node().ready and node().ready  # the second from what was kept
    status["phase"] = "Draining"  # in place, as a test or a caller holding the object may
    assert not node().ready
    status["phase"] = "Ready"
    assert node().ready
    status["latency"]["smoothedMs"] = -5  # nested, in place: unreadable
    assert not node().ready and node().latency_ms is None
    status["latency"]["smoothedMs"] = 30
    assert node().latency_ms == 30 and node().ready
    # A new object whose values compare equal but whose types the checks tell apart.
    volunteers["vn-1"] = {
        **volunteers["vn-1"],
        "status": {**status, "latency": {**status["latency"], "smoothedMs": True}},
    }
    assert not node().ready, "a bool latency is unreadable, though True == 1"
    volunteers["vn-1"] = {"spec": {"owner": "alice", "gpus": [L4]}, "status": status}
    status["latency"]["smoothedMs"] = 1
    assert node().ready and node().latency_ms == 1
    status["latency"]["smoothedMs"] = True  # the same, in place
    assert not node().ready
    status["latency"]["smoothedMs"] = 1.0  # an int's float, in place: the same decisions, its own value
    assert node().ready and repr(node().latency_ms) == "1.0"
    status["rayNodeId"] = "ray-other"  # the gateway confirmed another raylet there
    assert not node().ready
    status["rayNodeId"] = "ray-1"
    ray_nodes[0] = _ray_node(1, "vn-1", node_id="ray-imposter", gpus=1)  # the Ray node replaced
    assert not node().ready
    ray_nodes[0] = _ray_node(1, "vn-1", gpus=1)
    assert node().ready
    volunteers["vn-1"]["spec"]["gpus"] = []  # in place: it lists no GPU now, so none is booked
    assert node().gpus_total == 0
    del volunteers["vn-1"]
    assert not node().ready
    volunteers["vn-1"] = {"spec": {"owner": "alice", "gpus": [L4]}, "status": status}
    assert node().ready
    ray_nodes.clear()  # offline: the VolunteerNode's own entry, not ready
    offline = node()
    assert not offline.ready and offline.address == "" and offline.reputation == 0.5
    status["reputation"] = {**PROVEN, "lowerBound": 0.25}
    assert node().reputation == 0.25


def test_what_is_logged_is_what_a_build_keeping_nothing_logs(caplog: pytest.LogCaptureFixture) -> None:
    """The reasons a node takes no work are logged once each, when they change, kept entries or not."""

    def run(keep: bool) -> list[tuple[int, str]]:
        inventory._reported_unreadable.clear()
        inventory._reported_unproven.clear()
        inventory._reported_bare.clear()
        rng = random.Random(5)
        volunteers = {f"vn-{i}": _volunteer(i, rng) for i in range(16)}
        ray_nodes = [_ray_node(i, f"vn-{i}") for i in range(14)]
        allocations: list[Allocation] = []
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=inventory.__name__):
            for _ in range(150):
                _mutate(rng, ray_nodes, volunteers, allocations)
                if keep:
                    build_capacity(ray_nodes, volunteers, allocations)
                else:
                    _uncached(ray_nodes, volunteers, allocations, False)
        return [(record.levelno, record.getMessage()) for record in caplog.records]

    kept, fresh = run(keep=True), run(keep=False)
    assert kept == fresh
    assert any("takes no new work" in message for _, message in kept)


def test_what_the_allocations_hold_counts_in_the_next_call() -> None:
    rng = random.Random(2)
    volunteers = {f"vn-{i}": _volunteer(i, rng) for i in range(3)}
    ray_nodes = [_ray_node(i, f"vn-{i}") for i in range(3)]
    one_gpu_as_float: Any = 1.0
    held: list[list[Allocation]] = [
        [],
        [Allocation(("vn-0",), 0, 0.0)],  # a job asking for neither: only running_jobs changes
        [Allocation(("vn-0",), 0, 2.0)],  # only the CPUs held
        [Allocation(("vn-0",), 1, 2.0)],  # only the GPUs held
        [Allocation(("vn-0",), one_gpu_as_float, 2.0)],  # only the type of the GPUs held
        [Allocation(("vn-0", "vn-1"), 1, 2.0), Allocation(("vn-1",), 1, 0.5)],
        [],
    ]
    for allocations in held:
        expected = _uncached(ray_nodes, volunteers, allocations, False)
        assert repr(build_capacity(ray_nodes, volunteers, allocations)) == repr(expected), allocations
