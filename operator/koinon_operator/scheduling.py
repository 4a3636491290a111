"""The reputation- and latency-aware scheduler behind the operator's ``Placer`` interface.

Maps the operator's capacity snapshots to the scheduler core's types and back; the core stays a
pure function of its inputs (time included), so what runs here is what the simulator measured, one
job per call: holds for waiting multi-GPU jobs last only within a call (scheduler README).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from koinon_operator.placement import NodeCapacity, PlacementDecision, PlacementRequest
from koinon_operator.scheduler import (
    DEFAULT_CONFIG,
    Gpu,
    JobRequest,
    KoinonPlacer,
    NodeSnapshot,
    SchedulerConfig,
    from_status,
)


def to_snapshot(node: NodeCapacity) -> NodeSnapshot:
    # Ray's GPU count is what can be placed; models come from the VolunteerNode (unknown: neutral speed).
    models = node.gpu_models if len(node.gpu_models) == node.gpus_total else ("unknown",) * node.gpus_total
    gpus = tuple(Gpu(model, node.gpu_memory_mib) for model in models)
    return NodeSnapshot(
        name=node.name,
        owner=node.owner or node.name,
        region=node.region,
        ready=node.ready,
        cordoned=node.cordoned,
        gpus=gpus,
        free_gpus=max(0, min(node.gpus_free, node.gpus_total)),
        cpus_free=max(0.0, node.cpus_free),
        rtt_ms=node.latency_ms,
        rtt_updated_at=node.latency_updated_at,
        reputation=from_status(node.reputation_status),
        running_jobs=node.running_jobs,
    )


def to_job(request: PlacementRequest) -> JobRequest:
    return JobRequest(
        key=request.job_key,
        replicas=request.replicas,
        gpus_per_replica=request.gpus_per_replica,
        gpu_memory_mib=request.gpu_memory_mib,
        cpus_per_replica=request.cpus_per_replica,
        min_reputation=request.min_reputation,
        max_latency_ms=request.max_latency_ms,
        regions=frozenset(request.regions),
        verification_quorum=request.verification_quorum,
        excluded_nodes=request.excluded_nodes,
        excluded_owners=request.excluded_owners,
        attempt=request.attempt,
        creation_index=request.creation_index,
        pending_since=request.pending_since,
        expected_duration_s=request.expected_duration_s,
    )


class ReputationPlacer:
    """Operator ``Placer`` backed by the Koinon scheduling policy."""

    def __init__(self, config: SchedulerConfig = DEFAULT_CONFIG, clock: Callable[[], float] = time.time) -> None:
        self._placer = KoinonPlacer(config)
        self._clock = clock

    def place(self, request: PlacementRequest, nodes: Sequence[NodeCapacity]) -> PlacementDecision:
        if not nodes:
            return PlacementDecision(total_nodes=0)
        by_name = {node.name: node for node in nodes}
        result = self._placer.place([to_job(request)], [to_snapshot(n) for n in nodes], self._clock())
        if result.placements:
            placement = result.placements[0]
            chosen = tuple(by_name[name] for name in placement.nodes)
            return PlacementDecision(nodes=chosen, total_nodes=len(nodes), copies=placement.copies)
        reasons = result.unschedulable[0].reasons if result.unschedulable else {}
        return PlacementDecision(reasons=dict(reasons), total_nodes=len(nodes))
