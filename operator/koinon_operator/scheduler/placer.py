"""The scheduling function: filter, score, place; one engine shared by Koinon and the baselines.

`schedule(jobs, nodes, now, config)` is the Koinon policy as a pure function. Every policy goes
through the same hard filters and capacity accounting (`_run`); they differ only in how they pick
among the nodes that fit (`Chooser`) and in whether they plan verification copies.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from .config import DEFAULT_CONFIG, SchedulerConfig
from .index import (
    BoolArray,
    FloatArray,
    NodeIndex,
    Positions,
    build_index,
    dynamic_mask,
    explain,
    reasons_message,
    reserve_for,
    static_mask,
)
from .types import JobRequest, NodeSnapshot, Placement, SchedulingResult, Unschedulable
from .verification import TrustRecord, plan_replication, stable_seed

Chooser = Callable[[NodeIndex, BoolArray, JobRequest], int]
"""Position of the chosen node among those `mask` allows, or -1 when none is allowed."""


class Placer(Protocol):
    name: str

    def place(self, jobs: Sequence[JobRequest], nodes: Sequence[NodeSnapshot], now: float) -> SchedulingResult: ...


# Added to the values a mask leaves out. Scores are finite and far above it, so an allowed value
# stays exactly what it was (v + -0.0 == v) and the first maximum is the same as over allowed values
# alone; about three times cheaper than np.where(mask, values, -inf) on 10,000 nodes.
_LEFT_OUT = -1e300


def _masked_argmax(values: np.ndarray, mask: BoolArray) -> int:  # type: ignore[type-arg]
    i = int(np.multiply(~mask, _LEFT_OUT).__iadd__(values).argmax())
    return i if mask[i] else -1


def expected_hours(job: JobRequest, cfg: SchedulerConfig) -> float:
    """The job's expected run time on the reference GPU, in hours (the configured default if unknown)."""
    duration = job.expected_duration_s if job.expected_duration_s is not None else cfg.scoring.default_duration_s
    return duration / 3600.0


def make_best_score_chooser(cfg: SchedulerConfig) -> Chooser:
    """Koinon: highest reputation lower bound, least latency and load, best GPU fit, plus two terms
    in GPU-hours that grow with the job: the work a crash is expected to waste on this node, and the
    second copy a BOINC-trusted node saves (ties: first node by name)."""
    sc = cfg.scoring
    skip = cfg.verification.max_skip_probability

    chooser_id = object()  # names this chooser's cached scores in an index

    def choose(index: NodeIndex, mask: BoolArray, job: JobRequest) -> int:
        memory, needed = job.gpu_memory_mib, job.gpus_per_replica
        hours = expected_hours(job, cfg)
        gpus = max(needed, 1)
        unit = sc.large_job_gpu_hours
        size = min(gpus * hours / unit, 1.0)
        trust = sc.trusted_weight * skip * gpus * hours / unit - (1.0 - size) * sc.trusted_reserve_weight

        def scores(at: Positions) -> FloatArray:
            leftover = index.fit_count(memory)[at] - (index.total_gpus[at] - index.free_gpus[at]) - needed
            values = index.score[at] - index.packing_weight * leftover / 8.0
            # Hours on each node are hours / speed (the estimate is for the reference GPU). A crash at
            # a uniform point loses half the run on average and the rerun starts from scratch, so the
            # expected loss is crashRate * nodeHours^2 / 2 (per-node factors precomputed in the index).
            values = values - (sc.runtime_weight * hours) * index.inverse_speed[at]
            crash_loss = sc.reliability_weight * gpus * hours * hours / 2.0 / unit
            values = values - crash_loss * index.crash_rate_per_speed2[at]
            if trust:
                values = values + trust * index.trusted[at]
            return values

        # Jobs of one shape share their scores; placements change only the nodes they use.
        return _masked_argmax(index.derived((chooser_id, memory, needed, hours), scores), mask)

    return choose


def choose_best_score(index: NodeIndex, mask: BoolArray, job: JobRequest) -> int:
    """The Koinon chooser with the default weights."""
    return _DEFAULT_CHOOSER(index, mask, job)


_DEFAULT_CHOOSER = make_best_score_chooser(DEFAULT_CONFIG)


WAITING_FOR_TRUSTED = "not trusted yet (a large replicated job waits a while for a trusted node)"


def waits_for_trusted(job: JobRequest, now: float, cfg: SchedulerConfig) -> bool:
    """A replicated job of at least `trusted_wait_gpu_hours` that has waited less than
    `trusted_wait_s` is placed only on trusted nodes (where it usually runs once)."""
    vc = cfg.verification
    if job.verification_quorum <= 1 or job.pending_since is None or now - job.pending_since >= vc.trusted_wait_s:
        return False
    return job.replicas * max(job.gpus_per_replica, 1) * expected_hours(job, cfg) >= vc.trusted_wait_gpu_hours


def _pick_group(index: NodeIndex, mask: BoolArray, count: int, choose: Chooser, job: JobRequest) -> list[int] | None:
    """`count` nodes with pairwise distinct owners (so also distinct nodes); consumes `mask`."""
    picked: list[int] = []
    for _ in range(count):
        i = choose(index, mask, job)
        if i < 0:
            return None
        picked.append(i)
        mask &= index.owner_code != index.owner_code[i]
    return picked


def _ordered(jobs: Sequence[JobRequest]) -> list[JobRequest]:
    ordered = sorted(jobs, key=lambda j: (-j.priority, j.creation_index, j.key))
    for a, b in itertools.pairwise(ordered):
        if a.key == b.key:
            raise ValueError(f"pending jobs must have unique keys; {a.key!r} appears twice")
    return ordered


def _run(
    jobs: Sequence[JobRequest],
    nodes: Sequence[NodeSnapshot],
    now: float,
    cfg: SchedulerConfig,
    choose: Chooser,
    verify: bool,
) -> SchedulingResult:
    """Shared engine. `verify` = Koinon behaviour: plan verification copies and keep quarantined
    nodes out; the baselines run with it off (one copy, no reputation floor of their own)."""
    quarantine = cfg.scoring.quarantine_below if verify else None
    index = build_index(nodes, now, cfg)
    placements: list[Placement] = []
    unschedulable: list[Unschedulable] = []
    static_cache: dict[tuple[object, ...], BoolArray] = {}
    # Capacity only shrinks during a call, so a shape that found no primary nodes stays unplaceable
    # for the rest of the call. Its reasons are computed once, at its first failure (an O(nodes)
    # pass), and shared by the later jobs of that shape in this call.
    failed_shapes: dict[tuple[object, ...], dict[str, int]] = {}

    def refuse(job: JobRequest, reasons: dict[str, int]) -> None:
        unschedulable.append(Unschedulable(job.key, reasons, reasons_message(reasons, index.size)))

    for job in _ordered(jobs):
        signature = (
            job.gpus_per_replica,
            job.gpu_memory_mib,
            job.min_reputation,
            job.max_latency_ms,
            job.regions,
        )
        shape = None
        if not job.excluded_nodes and not job.excluded_owners:
            shape = (*signature, job.cpus_per_replica, job.replicas)
            failed = failed_shapes.get(shape)
            if failed is not None:
                refuse(job, failed)
                continue
        static = static_cache.get(signature)
        if static is None:
            static = static_cache[signature] = static_mask(index, job, quarantine)
        mask = dynamic_mask(index, job, static)
        if verify and waits_for_trusted(job, now, cfg):
            primary = _pick_group(index, mask & index.trusted, job.replicas, choose, job)
            if primary is None and bool(mask.any()):
                # Untrusted nodes fit, but the job would run twice there: it waits (bounded).
                refuse(job, {WAITING_FOR_TRUSTED: int(mask.sum())})
                continue
            for i in primary or ():
                mask &= index.owner_code != index.owner_code[i]
        else:
            primary = _pick_group(index, mask, job.replicas, choose, job)
        if primary is None:
            reasons = explain(index, job, job.replicas, quarantine)
            if shape is not None:
                failed_shapes[shape] = reasons
            refuse(job, reasons)
            if verify and job.gpus_per_replica > 1:
                # Koinon holds nodes for the oldest waiting multi-GPU job (no starvation of 8-GPU jobs
                # by a stream of 1-GPU ones); naive baselines do not.
                reserve_for(index, job, static, job.replicas * job.verification_quorum)
            continue
        copies = 1
        chosen = primary
        if verify and job.verification_quorum > 1:
            record = TrustRecord(
                consecutive_valid=int(index.consecutive_valid[primary].min()),
                owner_disagreements=float(index.owner_disagreements[primary].max()),
            )
            copies = plan_replication(
                job.verification_quorum, record, stable_seed(job.key, job.attempt), cfg.verification
            )
            if copies > 1:
                extra = None
                if cfg.verification.trusted_partner and not bool(index.trusted[primary].all()):
                    # Pairing rule: an untrusted primary is checked by trusted nodes when they fit.
                    extra = _pick_group(index, mask & index.trusted, (copies - 1) * job.replicas, choose, job)
                if extra is None:
                    extra = _pick_group(index, mask, (copies - 1) * job.replicas, choose, job)
                if extra is None:
                    refuse(job, explain(index, job, copies * job.replicas, quarantine))
                    if job.gpus_per_replica > 1:
                        reserve_for(index, job, static, copies * job.replicas)
                    continue
                chosen = primary + extra
        for i in chosen:
            index.consume(i, job.gpus_per_replica, job.cpus_per_replica)
        placements.append(Placement(job.key, tuple(index.names[i] for i in chosen), copies))
    return SchedulingResult(tuple(placements), tuple(unschedulable))


def schedule(
    jobs: Sequence[JobRequest],
    nodes: Sequence[NodeSnapshot],
    now: float,
    config: SchedulerConfig = DEFAULT_CONFIG,
) -> SchedulingResult:
    """Koinon placement: pure and deterministic; independent of the order of `jobs` and `nodes`.

    Jobs are placed by (priority desc, creation order, key). Each replica (and each verification
    copy) goes to a node of a distinct owner that passes every filter with the capacity left after
    earlier placements of this call; the node with the best score wins.
    """
    chooser = _DEFAULT_CHOOSER if config == DEFAULT_CONFIG else make_best_score_chooser(config)
    return _run(jobs, nodes, now, config, chooser, verify=True)


class KoinonPlacer:
    """The Koinon policy behind the `Placer` protocol."""

    name = "koinon"

    def __init__(self, config: SchedulerConfig = DEFAULT_CONFIG) -> None:
        self.config = config

    def place(self, jobs: Sequence[JobRequest], nodes: Sequence[NodeSnapshot], now: float) -> SchedulingResult:
        return schedule(jobs, nodes, now, self.config)
