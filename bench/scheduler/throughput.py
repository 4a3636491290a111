"""Placements per second against 10,000 volunteers: of the pure decision function on a batch of
pending jobs (`measure`), and as the operator places them, one AIJob per call (`measure_operator`)."""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
from koinon_operator.inventory import NODE_NAME_LABEL, Allocation, build_capacity
from koinon_operator.placement import PlacementRequest
from koinon_operator.ray_jobs import RayNodeInfo
from koinon_operator.scheduler import (
    DEFAULT_CONFIG,
    Gpu,
    JobRequest,
    NodeSnapshot,
    ReputationEvidence,
    schedule,
    to_status,
)
from koinon_operator.scheduling import ReputationPlacer

from .population import GPU_TYPE_P, GPU_TYPES, REGIONS


def fleet(count: int, now: float, rng: np.random.Generator) -> list[NodeSnapshot]:
    """A fleet in mid-life: varied evidence, RTTs, free GPUs; ~5 % not ready."""
    out = []
    for i in range(count):
        n = int(rng.choice((1, 2, 4, 8), p=(0.6, 0.25, 0.12, 0.03)))
        model, mem = GPU_TYPES[int(rng.choice(len(GPU_TYPES), p=GPU_TYPE_P))]
        ok = int(rng.integers(0, 60))
        ev = ReputationEvidence(
            successes=float(ok),
            agreements=float(rng.integers(0, ok + 1)),
            failures=float(rng.integers(0, 6)),
            timeouts=float(rng.integers(0, 4)),
            disagreements=float(rng.random() < 0.05),
            heartbeats_seen=float(rng.integers(0, 1000)),
            heartbeats_missed=float(rng.integers(0, 100)),
            consecutive_valid=int(rng.integers(0, 40)),
            last_updated=now - float(rng.uniform(0, 86400)),
        )
        out.append(
            NodeSnapshot(
                name=f"vn-{i:06d}",
                owner=f"own-{i // 2:06d}",
                region=REGIONS[int(rng.integers(len(REGIONS)))],
                ready=bool(rng.random() < 0.95),
                cordoned=bool(rng.random() < 0.01),
                gpus=tuple(Gpu(model, mem) for _ in range(n)),
                free_gpus=int(rng.integers(0, n + 1)),
                cpus_free=4.0 * n,
                rtt_ms=float(rng.uniform(5, 300)),
                rtt_updated_at=now - float(rng.uniform(0, 400)),
                reputation=ev,
                running_jobs=int(rng.integers(0, 3)),
            )
        )
    return out


def batch(size: int, rng: np.random.Generator, offset: int) -> list[JobRequest]:
    out = []
    for k in range(size):
        u = float(rng.random())
        out.append(
            JobRequest(
                key=f"ns/job-{offset + k:07d}",
                gpus_per_replica=int(rng.choice((1, 2, 4, 8), p=(0.7, 0.2, 0.08, 0.02))),
                gpu_memory_mib=int(rng.choice((0, 8192, 12288, 16384, 24576))),
                cpus_per_replica=2.0,
                verification_quorum=2,
                max_latency_ms=150.0 if u < 0.1 else None,
                regions=frozenset({REGIONS[int(rng.integers(len(REGIONS)))]}) if 0.1 <= u < 0.15 else frozenset(),
                min_reputation=0.5 if 0.15 <= u < 0.2 else 0.0,
                creation_index=offset + k,
            )
        )
    return out


def measure(
    nodes: int = 10_000, batch_sizes: tuple[int, ...] = (100, 500, 2000), seed: int = 7, repeats: int = 5
) -> dict[str, Any]:
    """Best-of-`repeats` wall time of `schedule` per batch size (fleet rebuilt per call: the
    function indexes its inputs every call, so that cost is included)."""
    rng = np.random.default_rng(seed)
    now = 1_000_000.0
    snapshots = fleet(nodes, now, rng)
    per_batch: dict[str, Any] = {}
    for size in batch_sizes:
        jobs = batch(size, rng, size * 10)
        best = float("inf")
        placed = 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            result = schedule(jobs, snapshots, now)
            best = min(best, time.perf_counter() - t0)
            placed = len(result.placements)
        per_batch[str(size)] = {
            "seconds": best,
            "placed": placed,
            "unschedulable": size - placed,
            "decisions_per_s": size / best,
            "placements_per_s": placed / best,
        }
    return {"nodes": nodes, "batches": per_batch}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat().replace("+00:00", "Z")


def as_cluster(
    snapshots: list[NodeSnapshot], now: float
) -> tuple[list[RayNodeInfo], dict[str, dict[str, Any]], list[Allocation]]:
    """The fleet as the operator reads it: each volunteer's Ray node, its VolunteerNode object
    (spec and status as the gateway and the reputation book write them: RFC 3339 times, reputation
    counts), and the AIJobs' allocations that make its busy GPUs busy."""
    ray_nodes, volunteers, allocations = [], {}, []
    for i, s in enumerate(snapshots):
        address, node_id = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", f"ray-{i:06d}"
        ray_nodes.append(
            RayNodeInfo(
                node_id, address, True, False, {"GPU": len(s.gpus), "CPU": s.cpus_free}, {NODE_NAME_LABEL: s.name}
            )
        )
        status: dict[str, Any] = {
            "phase": "Ready" if s.ready else "NotReady",
            "connected": s.ready,
            "address": address,
            "rayNodeId": node_id,
            "reputation": to_status(s.reputation, now, DEFAULT_CONFIG.reputation),
        }
        if s.rtt_ms is not None and s.rtt_updated_at is not None:
            status["latency"] = {"smoothedMs": s.rtt_ms, "updatedAt": _iso(s.rtt_updated_at)}
        volunteers[s.name] = {
            "spec": {
                "owner": s.owner,
                "region": s.region,
                "cordoned": s.cordoned,
                "gpus": [{"model": g.model, "memoryMiB": g.memory_mib} for g in s.gpus],
            },
            "status": status,
        }
        if s.free_gpus < len(s.gpus):
            allocations.append(Allocation((s.name,), len(s.gpus) - s.free_gpus, 0.0))
    return ray_nodes, volunteers, allocations


def request_of(job: JobRequest) -> PlacementRequest:
    """The AIJob's PlacementRequest as reconciler._place builds it (verified: distinct owners)."""
    return PlacementRequest(
        job_key=job.key,
        replicas=job.replicas,
        gpus_per_replica=job.gpus_per_replica,
        cpus_per_replica=job.cpus_per_replica,
        gpu_memory_mib=job.gpu_memory_mib,
        min_reputation=job.min_reputation,
        max_latency_ms=None if job.max_latency_ms is None else int(job.max_latency_ms),
        regions=tuple(sorted(job.regions)),
        distinct_owners=job.verification_quorum > 1,
        verification_quorum=job.verification_quorum,
        attempt=1,
        creation_index=job.creation_index,
    )


def measure_operator(nodes: int = 10_000, calls: int = 100, seed: int = 7) -> dict[str, Any]:
    """Placements per second the way the operator places: reconciler._place, for each pending
    AIJob in turn, builds the fleet's capacity (inventory.build_capacity: Ray's nodes, the
    VolunteerNodes, the allocations held; a node's entry is derived again only where its inputs
    or what is held there changed since the last call, as in the operator) and asks one
    `ReputationPlacer.place` for that one job, which converts the capacity to snapshots and
    indexes the whole fleet; a multi-GPU job it
    cannot place costs one more placement on the fleet as if idle. Each placement is held (as
    the ledger does) before the next job's call. Both parts are timed, separately: `placements_per_s`
    counts `place` alone, `with_capacity_per_s` the capacity build too (both run under the
    operator's placement lock). One pass, as the operator's passes go: the first call converts
    every node, later ones only the nodes whose capacity changed since (scheduling._Converted)."""
    rng = np.random.default_rng(seed)
    now = 1_000_000.0
    ray_nodes, volunteers, allocations = as_cluster(fleet(nodes, now, rng), now)
    placer = ReputationPlacer(clock=lambda: now, seed_key=b"bench-scheduler-throughput-key-0")
    place_s: list[float] = []
    capacity_s: list[float] = []
    placed = 0
    for job in batch(calls, rng, 0):
        t0 = time.perf_counter()
        capacity = build_capacity(ray_nodes, volunteers, allocations)
        t1 = time.perf_counter()
        decision = placer.place(request_of(job), capacity)
        t2 = time.perf_counter()
        capacity_s.append(t1 - t0)
        place_s.append(t2 - t1)
        if decision.placed:
            placed += 1
            names = tuple(node.name for node in decision.nodes)
            allocations.append(Allocation(names, job.gpus_per_replica, job.cpus_per_replica))
    place_total, capacity_total = sum(place_s), sum(capacity_s)
    return {
        "nodes": nodes,
        "calls": calls,
        "placed": placed,
        "place_s": place_total,
        "capacity_s": capacity_total,
        "first_place_s": place_s[0],
        "median_place_s": statistics.median(place_s),
        "median_capacity_s": statistics.median(capacity_s),
        "placements_per_s": placed / place_total,
        "with_capacity_per_s": placed / (place_total + capacity_total),
    }
