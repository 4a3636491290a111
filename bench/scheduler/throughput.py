"""Placements per second of the pure decision function against 10,000 node snapshots."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from koinon_operator.scheduler import Gpu, JobRequest, NodeSnapshot, ReputationEvidence, schedule

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
