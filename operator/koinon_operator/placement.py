"""Where an AIJob's replicas run: the operator's placement interface and its first-fit policy.

The operator talks to placement only through ``Placer``; the reputation/latency scheduler plugs in
behind the same interface. Inputs are plain snapshots, so a policy is a pure function.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class NodeCapacity:
    """One volunteer node as placement sees it, after subtracting work already placed there."""

    name: str
    address: str
    ray_node_id: str
    gpus_total: int
    gpus_free: int
    cpus_free: float
    gpu_memory_mib: int = 0
    """The least memory of the node's listed GPUs: placement takes every GPU to have it."""
    gpu_models: tuple[str, ...] = ()
    """The listed GPUs' models as the agent reported them (NVML names; `status.gpus`, its latest
    registration, then `spec.gpus` beyond it); speed ranks nodes by them."""
    owner: str = ""
    region: str = "unknown"
    ready: bool = True
    cordoned: bool = False
    latency_ms: float | None = None
    latency_updated_at: float | None = None
    reputation: float = 0.5
    reputation_status: Mapping[str, Any] | None = None
    running_jobs: int = 0
    cpus_total: float | None = None
    """The node's CPUs when idle (Ray's total); None = unknown."""


@dataclass(frozen=True)
class PlacementRequest:
    job_key: str
    replicas: int
    gpus_per_replica: int
    cpus_per_replica: float
    gpu_memory_mib: int = 0
    min_reputation: float = 0.0
    max_latency_ms: int | None = None
    regions: tuple[str, ...] = ()
    distinct_owners: bool = False
    excluded_nodes: frozenset[str] = frozenset()
    excluded_owners: frozenset[str] = frozenset()
    verification_quorum: int = 1
    least_copies: int = 1
    """Copies the attempt runs at least, whatever the spot-check coin says (JobRequest.least_copies)."""
    attempt: int = 0
    creation_index: int = 0
    pending_since: float | None = None
    """When this attempt started waiting (Unix seconds); None = unknown."""
    expected_duration_s: float | None = None
    """`spec.expectedDurationSeconds`; None = unknown."""
    uid: str = ""
    """The AIJob's `metadata.uid` ("" = unknown): the spot-check coin's input, with the attempt."""


@dataclass(frozen=True)
class PlacementDecision:
    nodes: tuple[NodeCapacity, ...] = ()
    reasons: dict[str, int] = field(default_factory=dict)
    total_nodes: int = 0
    copies: int = 1  # verification copies: ``nodes`` holds copies x replicas nodes, copy-major

    @property
    def placed(self) -> bool:
        return bool(self.nodes)

    @property
    def message(self) -> str:
        if self.placed:
            return "placed on " + ", ".join(node.name for node in self.nodes)
        detail = ", ".join(f"{count} {reason}" for reason, count in sorted(self.reasons.items()))
        return f"0/{self.total_nodes} nodes are available" + (f": {detail}" if detail else "")


class Placer(Protocol):
    def place(self, request: PlacementRequest, nodes: Sequence[NodeCapacity]) -> PlacementDecision: ...


def rejection_reason(request: PlacementRequest, node: NodeCapacity) -> str | None:
    """Why ``node`` cannot take one replica of ``request``, or None when it can."""
    if not node.ready:
        return "not Ready"
    if node.cordoned:
        return "cordoned"
    if node.name in request.excluded_nodes:
        # The operator leaves out only the nodes of copies that gave no majority (lost and failed
        # nodes are tried last, by leaving them out of an earlier try of the same placement).
        return "excluded after an attempt without a majority"
    if node.owner in request.excluded_owners:
        return "owner excluded after an attempt without a majority"
    if node.gpus_free < request.gpus_per_replica:
        return "too few free GPUs"
    if request.gpu_memory_mib and node.gpu_memory_mib < request.gpu_memory_mib:
        return "too little GPU memory"
    if node.cpus_free < request.cpus_per_replica:
        return "too few free CPUs"
    if node.reputation < request.min_reputation:
        return f"reputation below {request.min_reputation:g}"
    if request.max_latency_ms is not None and (node.latency_ms is None or node.latency_ms > request.max_latency_ms):
        return f"latency above {request.max_latency_ms} ms"
    if request.regions and node.region not in request.regions:
        return "region not allowed"
    return None


class FirstFitPlacer:
    """Replicas go, one per node, onto the first nodes (in name order) that fit.

    Deliberately simple: the reputation- and latency-aware scheduler replaces it.
    """

    def place(self, request: PlacementRequest, nodes: Sequence[NodeCapacity]) -> PlacementDecision:
        reasons: Counter[str] = Counter()
        chosen: list[NodeCapacity] = []
        owners: set[str] = set()
        for node in sorted(nodes, key=lambda n: n.name):
            reason = rejection_reason(request, node)
            if reason is None and request.distinct_owners and node.owner in owners:
                reason = "owner already holds a replica"
            if reason is not None:
                reasons[reason] += 1
                continue
            if len(chosen) < request.replicas:
                chosen.append(node)
                owners.add(node.owner)
        if len(chosen) < request.replicas:
            if chosen:
                reasons[f"fit, but {request.replicas} distinct nodes are needed"] = len(chosen)
            return PlacementDecision(reasons=dict(reasons), total_nodes=len(nodes))
        return PlacementDecision(nodes=tuple(chosen), total_nodes=len(nodes))
