"""A waiting multi-GPU job's hold on the nodes closest to fitting it lasts across the operator's
one-job-per-pass placements, as it does in the scheduler's batch call the simulator measured (a
younger 1-GPU job took the node an older 8-GPU job waited for)."""

from __future__ import annotations

from koinon_operator.placement import NodeCapacity, PlacementRequest
from koinon_operator.scheduler import Gpu, JobRequest, NodeSnapshot, schedule
from koinon_operator.scheduling import WAITING_FOR_S, ReputationPlacer

NOW = 1_800_000_000.0
NODES = [NodeCapacity("big", "10.0.0.1", "r1", gpus_total=8, gpus_free=4, cpus_free=32, owner="o")]
BIG = PlacementRequest("ns/big", replicas=1, gpus_per_replica=8, cpus_per_replica=0, creation_index=1)
SMALL = PlacementRequest("ns/small", replicas=1, gpus_per_replica=1, cpus_per_replica=0, creation_index=2)


def test_the_batch_call_holds_the_node_for_the_older_big_job() -> None:
    node = NodeSnapshot("big", "o", "eu", True, False, tuple(Gpu("x", 24576) for _ in range(8)), 4, 32.0)
    result = schedule([JobRequest("ns/big", gpus_per_replica=8, creation_index=1),
                       JobRequest("ns/small", gpus_per_replica=1, creation_index=2)], [node], NOW)  # fmt: skip
    assert not result.placements


def test_the_operator_holds_the_node_for_the_older_big_job() -> None:
    mono = [0.0]
    placer = ReputationPlacer(clock=lambda: NOW, monotonic=lambda: mono[0])
    assert not placer.place(BIG, NODES).placed
    small = placer.place(SMALL, NODES)
    assert not small.placed, "a younger 1-GPU job took the node the 8-GPU job waits for"
    assert "held for an earlier job that is waiting for room" in small.message, small.message
    # The big job stops asking (deleted, say): after a while the small one is no longer held off.
    mono[0] += WAITING_FOR_S + 1
    assert placer.place(SMALL, NODES).placed


def test_an_older_small_job_is_not_held_off_by_a_younger_big_one() -> None:
    placer = ReputationPlacer(clock=lambda: NOW)
    big = PlacementRequest("ns/big", replicas=1, gpus_per_replica=8, cpus_per_replica=0, creation_index=5)
    assert not placer.place(big, NODES).placed
    assert placer.place(SMALL, NODES).placed  # created before the big job: placed first, as in a batch


def _node(name: str, owner: str) -> NodeCapacity:
    return NodeCapacity(name, f"10.0.0.{len(name)}", f"r-{name}", gpus_total=8, gpus_free=8, cpus_free=32, owner=owner)


def test_a_job_that_could_not_run_even_on_an_idle_fleet_holds_nothing() -> None:
    """Two owners with one 8-GPU node each; an 8-GPU job verified by 3 owners can never be placed
    and asks every poll: younger jobs must still get the idle nodes (they were held off for good)."""
    nodes = [_node("n1", "alice"), _node("n2", "bob")]
    now, mono = [NOW], [0.0]
    placer = ReputationPlacer(clock=lambda: now[0], monotonic=lambda: mono[0])
    impossible = PlacementRequest(
        "ns/impossible", replicas=1, gpus_per_replica=8, cpus_per_replica=0,
        distinct_owners=True, verification_quorum=3, creation_index=1,
    )  # fmt: skip
    for _ in range(10):
        assert not placer.place(impossible, nodes).placed
        now[0] += 2
        mono[0] += 2
    small = PlacementRequest("ns/small", replicas=1, gpus_per_replica=1, cpus_per_replica=0, creation_index=2)
    big = PlacementRequest("ns/big", replicas=1, gpus_per_replica=8, cpus_per_replica=0, creation_index=3)
    assert placer.place(small, nodes).placed
    assert placer.place(big, nodes).placed


def test_a_hold_ends_on_the_monotonic_clock_whatever_the_wall_clock_does() -> None:
    now, mono = [NOW], [0.0]
    placer = ReputationPlacer(clock=lambda: now[0], monotonic=lambda: mono[0])
    assert not placer.place(BIG, NODES).placed  # its last ask: then it is deleted
    now[0] -= 3600  # the wall clock is stepped back an hour
    now[0] += WAITING_FOR_S + 1
    mono[0] += WAITING_FOR_S + 1
    assert placer.place(SMALL, NODES).placed


def test_a_job_that_needs_more_cpus_than_any_node_has_holds_nothing() -> None:
    """The idle-fleet check gave every node unlimited CPUs: a 2-GPU job asking 64 CPUs per replica
    of 16-CPU volunteers (a typo) kept holding the best nodes, and younger jobs stayed Pending."""
    nodes = [
        NodeCapacity("n1", "10.0.0.1", "r1", gpus_total=8, gpus_free=8, cpus_free=16, owner="alice", cpus_total=16.0)
    ]
    now, mono = [1_800_000_000.0], [0.0]
    placer = ReputationPlacer(clock=lambda: now[0], monotonic=lambda: mono[0])
    impossible = PlacementRequest(
        "ns/impossible", replicas=1, gpus_per_replica=2, cpus_per_replica=64, creation_index=1
    )
    for _ in range(5):  # it asks at every poll
        assert not placer.place(impossible, nodes).placed
        now[0] += 2
        mono[0] += 2
    small = PlacementRequest("ns/small", replicas=1, gpus_per_replica=1, cpus_per_replica=1, creation_index=2)
    decision = placer.place(small, nodes)
    assert decision.placed, decision.message
