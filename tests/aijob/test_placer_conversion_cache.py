"""ReputationPlacer keeps each node's conversion to a scheduler snapshot for the next call while
the node's capacity stays equal: the operator asks once per pending AIJob, against the whole fleet,
and converting 10,000 volunteers every time made each call ~60-110 ms (8-14 placements/s). What
the kept conversions must never do is change a decision: time-dependent values (RTT staleness,
reputation decay) come from each call's clock, and a node whose capacity changed is converted again."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest
from koinon_operator import scheduling
from koinon_operator.placement import NodeCapacity, PlacementDecision, PlacementRequest
from koinon_operator.scheduler import DEFAULT_CONFIG, NodeSnapshot, ScoringConfig
from koinon_operator.scheduling import ReputationPlacer

NOW = 1_800_000_000.0
PROVEN = {"successes": 40.0, "agreements": 40.0, "heartbeatsSeen": 500.0, "lastUpdated": NOW}


def _node(name: str, **fields: Any) -> NodeCapacity:
    base: dict[str, Any] = {"gpus_total": 1, "gpus_free": 1, "cpus_free": 8.0, "cpus_total": 8.0, "owner": name}
    return NodeCapacity(name, f"10.0.0.{len(name)}", f"ray-{name}", **{**base, **fields})


def _names(decision: PlacementDecision) -> list[str]:
    return [node.name for node in decision.nodes]


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the nodes to_snapshot converted, in order."""
    converted: list[str] = []
    real = scheduling.to_snapshot

    def counting(node: NodeCapacity, scoring: ScoringConfig = DEFAULT_CONFIG.scoring) -> NodeSnapshot:
        converted.append(node.name)
        return real(node, scoring)

    monkeypatch.setattr(scheduling, "to_snapshot", counting)
    return converted


def test_an_unchanged_node_is_converted_once(conversions: list[str]) -> None:
    fleet = [_node(f"vn-{i}", reputation_status=dict(PROVEN)) for i in range(50)]
    placer = ReputationPlacer(clock=lambda: NOW)
    request = PlacementRequest("ns/j", 1, 1, 1.0)
    first = placer.place(request, fleet)
    assert len(conversions) == 50
    # The operator builds the capacity afresh for every call: equal, not the same objects.
    again = placer.place(request, [copy.deepcopy(node) for node in fleet])
    assert len(conversions) == 50 and _names(again) == _names(first)
    changed = [replace(node, gpus_free=0) if node.name == _names(first)[0] else node for node in fleet]
    moved = placer.place(request, changed)
    assert conversions[50:] == _names(first), "only the node whose capacity changed is converted again"
    assert _names(moved) != _names(first)


def test_rtt_staleness_and_reputation_decay_come_from_each_call_s_clock() -> None:
    """The same capacity, asked later: a kept conversion must not keep the RTT fresh or the
    reputation undecayed."""
    now = [NOW]
    placer = ReputationPlacer(clock=lambda: now[0])
    fast = [_node("vn-a", latency_ms=20.0, latency_updated_at=NOW)]
    near = PlacementRequest("ns/near", 1, 1, 1.0, max_latency_ms=100)
    assert placer.place(near, fast).placed
    now[0] = NOW + DEFAULT_CONFIG.latency.stale_after_s + 1
    assert not placer.place(near, fast).placed, "an RTT gone stale still counted"
    assert not ReputationPlacer(clock=lambda: now[0]).place(near, fast).placed

    now[0] = NOW
    proven = [_node("vn-b", reputation_status=dict(PROVEN))]
    picky = PlacementRequest("ns/picky", 1, 1, 1.0, min_reputation=0.8)
    assert placer.place(picky, proven).placed
    now[0] = NOW + 90 * 86400.0  # thirteen half-lives: the evidence has decayed to almost nothing
    assert not placer.place(picky, proven).placed, "evidence kept undecayed"


def test_a_status_changed_in_place_is_read_again() -> None:
    """A frozen NodeCapacity holds its reputation status as a dict: changed in place (the same
    object), the node must be converted again, not compared with itself."""
    status = dict(PROVEN)
    fleet = [_node("vn-a", reputation_status=status)]
    placer = ReputationPlacer(clock=lambda: NOW)
    picky = PlacementRequest("ns/picky", 1, 1, 1.0, min_reputation=0.8)
    assert placer.place(picky, fleet).placed
    status["disagreements"] = 20.0
    assert not placer.place(picky, fleet).placed, "a conversion of the status before it changed was used"


def test_the_idle_fleet_check_follows_the_node_s_total_cpus() -> None:
    """A multi-GPU job that no node could ever run (too few CPUs even idle) holds nothing; once a
    node has the CPUs it waits for room and holds it (the idle snapshot is the node's current one)."""
    mono = [0.0]
    placer = ReputationPlacer(clock=lambda: NOW, monotonic=lambda: mono[0])
    big = PlacementRequest("ns/big", 1, 2, 4.0, creation_index=1)
    small = PlacementRequest("ns/small", 1, 1, 1.0, creation_index=2)
    too_small = [_node("vn-a", gpus_total=2, gpus_free=1, cpus_total=2.0)]
    assert not placer.place(big, too_small).placed
    assert placer.place(small, too_small).placed, "a job that can never run held the node"
    roomy = [replace(too_small[0], cpus_total=8.0)]
    assert not placer.place(big, roomy).placed
    held = placer.place(small, roomy)
    assert not held.placed and "held for an earlier job" in held.message, held.message
