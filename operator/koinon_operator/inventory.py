"""The pool as placement sees it: live Ray nodes, joined with their VolunteerNode objects, minus the
capacity that AIJobs already hold."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from koinon_operator.api.aijob import parse_time
from koinon_operator.placement import NodeCapacity
from koinon_operator.ray_jobs import RayJobsClient, RayNodeInfo

NODE_NAME_LABEL = "koinon.dev/node"


@dataclass(frozen=True)
class Allocation:
    """What one AIJob holds: one replica on each named node."""

    nodes: tuple[str, ...]
    gpus_per_replica: int
    cpus_per_replica: float


def node_name(node: RayNodeInfo) -> str:
    return node.labels.get(NODE_NAME_LABEL) or node.address


def build_capacity(
    ray_nodes: Iterable[RayNodeInfo],
    volunteers: Mapping[str, Mapping[str, Any]],
    allocations: Iterable[Allocation],
) -> list[NodeCapacity]:
    """Pure: free capacity per live, non-head Ray node.

    ``volunteers`` maps a node name to its VolunteerNode object (spec/status); a Ray node with no
    VolunteerNode is still usable, with neutral defaults, so a bare Ray worker works in development.
    """
    used_gpus: dict[str, int] = {}
    used_cpus: dict[str, float] = {}
    running: dict[str, int] = {}
    for allocation in allocations:
        for name in allocation.nodes:
            used_gpus[name] = used_gpus.get(name, 0) + allocation.gpus_per_replica
            used_cpus[name] = used_cpus.get(name, 0.0) + allocation.cpus_per_replica
            running[name] = running.get(name, 0) + 1
    capacity: list[NodeCapacity] = []
    for node in ray_nodes:
        if node.is_head or not node.alive:
            continue
        name = node_name(node)
        volunteer = volunteers.get(name, {})
        spec = volunteer.get("spec") or {}
        status = volunteer.get("status") or {}
        gpus_total = int(node.resources_total.get("GPU", 0))
        cpus_total = float(node.resources_total.get("CPU", 0.0))
        gpu_memory = min((int(g.get("memoryMiB", 0)) for g in spec.get("gpus") or []), default=0)
        reputation = status.get("reputation") or {}
        latency = status.get("latency") or {}
        capacity.append(
            NodeCapacity(
                name=name,
                address=node.address,
                ray_node_id=node.node_id,
                gpus_total=gpus_total,
                gpus_free=gpus_total - used_gpus.get(name, 0),
                cpus_free=cpus_total - used_cpus.get(name, 0.0),
                gpu_memory_mib=gpu_memory,
                gpu_models=tuple(str(g.get("model", "")) for g in spec.get("gpus") or []),
                owner=str(spec.get("owner") or name),
                region=str(spec.get("region") or "unknown"),
                # Only Ready takes new work: a Draining volunteer is leaving and a Pending one is not
                # up yet. No phase (no VolunteerNode, or none written yet) keeps the neutral default.
                ready=status.get("phase", "Ready") == "Ready",
                cordoned=bool(spec.get("cordoned", False)),
                latency_ms=latency.get("smoothedMs"),
                latency_updated_at=_epoch(latency.get("updatedAt")),
                reputation=float(reputation.get("lowerBound", 0.5)),
                reputation_status=reputation or None,
                running_jobs=running.get(name, 0),
            )
        )
    return capacity


def _epoch(value: object) -> float | None:
    moment = parse_time(value)
    return moment.timestamp() if moment else None


class RayNodeCache:
    """Ray's node list, fetched at most once per ``max_age_seconds`` (admission of hundreds of jobs
    at once must not turn into hundreds of dashboard calls)."""

    def __init__(self, ray: RayJobsClient, max_age_seconds: float = 1.0) -> None:
        self._ray = ray
        self._max_age = max_age_seconds
        self._fetched_at = float("-inf")
        self._nodes: Sequence[RayNodeInfo] = ()

    async def get(self) -> Sequence[RayNodeInfo]:
        if time.monotonic() - self._fetched_at > self._max_age:
            self._nodes = await self._ray.nodes()
            self._fetched_at = time.monotonic()
        return self._nodes

    def invalidate(self) -> None:
        self._fetched_at = float("-inf")
