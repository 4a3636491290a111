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
    now = [NOW]
    placer = ReputationPlacer(clock=lambda: now[0])
    assert not placer.place(BIG, NODES).placed
    small = placer.place(SMALL, NODES)
    assert not small.placed, "a younger 1-GPU job took the node the 8-GPU job waits for"
    assert "held for an earlier job that is waiting for room" in small.message, small.message
    # The big job stops asking (deleted, say): after a while the small one is no longer held off.
    now[0] += WAITING_FOR_S + 1
    assert placer.place(SMALL, NODES).placed


def test_an_older_small_job_is_not_held_off_by_a_younger_big_one() -> None:
    placer = ReputationPlacer(clock=lambda: NOW)
    big = PlacementRequest("ns/big", replicas=1, gpus_per_replica=8, cpus_per_replica=0, creation_index=5)
    assert not placer.place(big, NODES).placed
    assert placer.place(SMALL, NODES).placed  # created before the big job: placed first, as in a batch
